"""Undoing a step that failed before any rank applied its optimizer.

What a partial step changes on a rank: the stashed activations, the gradients accumulated so
far, the random number generator (dropout), and buffers updated in place by a forward pass
(batch-norm statistics). ``StepMark`` notes the generator state and each buffer's version
counter when a step starts (no copy of any tensor); ``undo`` restores the generator, drops
the gradients, and refuses when a buffer changed, since its old value is gone.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn


def buffers(modules: Mapping[str, nn.Module]) -> dict[str, torch.Tensor]:
    """Global name -> buffer over ``{global module name: module}``."""
    return {f"{mn}.{bn}": b for mn, mod in modules.items() for bn, b in mod.named_buffers()}


def clear_gradients(modules: Mapping[str, nn.Module]) -> None:
    """Drop every parameter's gradient (as ``zero_grad(set_to_none=True)`` does)."""
    for mod in modules.values():
        for p in mod.parameters():
            p.grad = None


@dataclass(frozen=True)
class StepMark:
    """A rank's state at the start of a step, as far as undoing it needs."""

    rng: torch.Tensor
    cuda_rng: torch.Tensor | None
    versions: dict[str, int]

    @classmethod
    def take(cls, modules: Mapping[str, nn.Module], device: torch.device) -> StepMark:
        """Note the generator states and the buffers' version counters."""
        cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
        versions = {name: b._version for name, b in buffers(modules).items()}
        return cls(torch.get_rng_state(), cuda, versions)

    def undo(self, modules: Mapping[str, nn.Module], device: torch.device) -> str | None:
        """Restore what the step changed; the name of a changed buffer if that is impossible."""
        clear_gradients(modules)
        torch.set_rng_state(self.rng)
        if self.cuda_rng is not None:
            torch.cuda.set_rng_state(self.cuda_rng, device)
        for name, b in buffers(modules).items():
            if b._version != self.versions.get(name, b._version):
                return name
        return None
