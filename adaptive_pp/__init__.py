"""adaptive_pp: a pipeline-parallel training runtime that rebalances itself while it trains.

The runtime names below load on first use, so the data modules (schedules, simulator,
partition, report, decisions) and the controllers package import without torch.distributed.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "BatchError": "errors",
    "LaunchError": "launch",
    "Partition": "partition",
    "Pipeline": "pipeline",
    "PipelineConfig": "config",
    "PipelineError": "errors",
    "PipelinePoisoned": "errors",
    "StageFrozen": "errors",
    "StepOutput": "pipeline",
    "WorkerPool": "launch",
    "launch": "launch",
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
    from .config import PipelineConfig
    from .errors import BatchError, PipelineError, PipelinePoisoned, StageFrozen
    from .launch import LaunchError, WorkerPool, launch
    from .partition import Partition
    from .pipeline import Pipeline, StepOutput


def __getattr__(name: str) -> Any:
    """Import a public runtime name on first use."""
    if name in _EXPORTS:
        return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'adaptive_pp' has no attribute {name!r}")
