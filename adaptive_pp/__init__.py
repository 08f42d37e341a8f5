"""adaptive_pp: a pipeline-parallel training runtime that rebalances itself while it trains."""

__version__ = "0.1.0"
