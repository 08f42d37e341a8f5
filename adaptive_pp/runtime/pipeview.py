"""Pipeline's read-only views of its rank's LocalStage (a base class of ``Pipeline``)."""

from __future__ import annotations

import torch
from torch import nn

from ..core.decisions import Plan
from ..core.partition import Partition
from ..core.schedules import Schedule
from .local import LocalStage


class PipelineView:
    """What this rank holds: read-only views of the LocalStage ``_local``."""

    _local: LocalStage

    @property
    def local(self) -> LocalStage:
        """This rank's state (chunks, optimizer, version, links, plan); see runtime/local.py."""
        return self._local

    @property
    def stage(self) -> int:
        """This process's stage index (its rank in the process group)."""
        return self._local.stage

    @property
    def num_stages(self) -> int:
        """Number of pipeline stages (processes)."""
        return self._local.num_stages

    @property
    def is_last(self) -> bool:
        """True on the stage that computes the loss."""
        return self._local.is_last

    @property
    def blocks(self) -> list[nn.Module]:
        """The whole model's blocks (those held elsewhere are twins on the "meta" device)."""
        return self._local.blocks

    @property
    def partition(self) -> Partition:
        """The current partition of the blocks over the stages."""
        return self._local.partition

    @property
    def microbatches(self) -> int:
        """Micro-batches per step (M)."""
        return self._local.microbatches

    @property
    def schedule(self) -> Schedule:
        """The current schedule."""
        return self._local.schedule

    @property
    def plan(self) -> Plan:
        """The current partition, micro-batches and schedule."""
        return self._local.plan

    @property
    def step_count(self) -> int:
        """Steps completed (restored by load_checkpoint)."""
        return self._local.step_count

    @property
    def optimizer(self) -> torch.optim.Optimizer | None:
        """The optimizer over this rank's parameters (None if it holds none)."""
        return self._local.optimizer

    @property
    def device(self) -> torch.device:
        """Where this rank's layers live."""
        return self._local.device

    def local_modules(self) -> dict[str, nn.Module]:
        """The modules this rank holds now, by global name ("pre", "layers.3", "post")."""
        return self._local.modules()

    def local_state(self) -> dict[str, dict[str, torch.Tensor]]:
        """This stage's module state dicts keyed by global name ("layers.3", "pre", "post")."""
        return self._local.state()
