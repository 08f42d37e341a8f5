"""adaptive_pp: a pipeline-parallel training runtime that rebalances itself while it trains.

Layout (docs/DESIGN.md): ``core`` (pure data: schedules, partition, simulator, report,
decisions, analysis, errors; no torch), ``runtime`` (the Pipeline facade and what runs a
rank), ``observability`` and ``emulation``. The runtime names below load on first use, so
the core and the controllers package import without torch. The core's public modules keep
their short paths: ``adaptive_pp.decisions`` is ``adaptive_pp.core.decisions``, and so on.
"""

from __future__ import annotations

import sys
from importlib import import_module
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

from .core import analysis, decisions, errors, partition, report, schedules, simulator

for _module in (analysis, decisions, errors, partition, report, schedules, simulator):
    sys.modules[f"{__name__}.{_module.__name__.rsplit('.', 1)[1]}"] = _module

_EXPORTS = {
    "BatchError": "core.errors",
    "LaunchError": "runtime.launch",
    "Partition": "core.partition",
    "Pipeline": "runtime.pipeline",
    "PipelineConfig": "runtime.config",
    "PipelineError": "core.errors",
    "PipelinePoisoned": "core.errors",
    "StageFrozen": "core.errors",
    "StepOutput": "runtime.pipeline",
    "WorkerPool": "runtime.launch",
    "launch": "runtime.launch",
}

__all__ = [
    "BatchError",
    "LaunchError",
    "Partition",
    "Pipeline",
    "PipelineConfig",
    "PipelineError",
    "PipelinePoisoned",
    "StageFrozen",
    "StepOutput",
    "WorkerPool",
    "__version__",
    "launch",
]

if TYPE_CHECKING:
    from .core.errors import BatchError, PipelineError, PipelinePoisoned, StageFrozen
    from .core.partition import Partition
    from .runtime.config import PipelineConfig
    from .runtime.launch import LaunchError, WorkerPool, launch
    from .runtime.pipeline import Pipeline, StepOutput


def __getattr__(name: str) -> Any:
    """Import a public runtime name on first use."""
    if name in _EXPORTS:
        return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'adaptive_pp' has no attribute {name!r}")
