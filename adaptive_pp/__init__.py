"""adaptive_pp: a pipeline-parallel training runtime that rebalances itself while it trains."""

__version__ = "0.1.0"

from .config import PipelineConfig
from .errors import PipelineError
from .launch import LaunchError, launch
from .partition import Partition
from .pipeline import Pipeline, StepOutput

__all__ = [
    "LaunchError",
    "Partition",
    "Pipeline",
    "PipelineConfig",
    "PipelineError",
    "StepOutput",
    "__version__",
    "launch",
]
