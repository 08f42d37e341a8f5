"""Emulated-kernel layers: a real small layer plus a sleep standing for accelerator time.

On a 2-core CPU machine four stage processes cannot each run real kernels at accelerator speed,
so timing studies use these: the math is real (a Linear + tanh), the duration is a sleep whose
length is affine in the micro-batch size, ``launch + per_sample * batch``, with backward = 2.4x
forward by default (as measured for GPT blocks on an H100; see DESIGN.md). ``slowdown`` scales a
layer at run time to inject skew. Every figure produced with these says so.

``EmulatedLayer`` (Linear + tanh) saves only its boundaries for backward; ``EmulatedFFN`` (a
residual width -> hidden -> width block) also saves its hidden activations, like a transformer
block. ``emulated_time`` is the sleep itself, for other modules (``adaptive_pp.moe``).
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

BACKWARD_RATIO = 2.4


class _Sleep(torch.autograd.Function):
    """Identity whose forward sleeps ``fwd`` s and backward sleeps ``bwd`` s."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, fwd: float, bwd: float) -> torch.Tensor:
        ctx.bwd = bwd
        if fwd > 0:
            time.sleep(fwd)
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        if ctx.bwd > 0:
            time.sleep(ctx.bwd)
        return grad, None, None


def emulated_time(x: torch.Tensor, forward_s: float, backward_s: float) -> torch.Tensor:
    """``x`` after ``forward_s`` of emulated kernel time; its backward takes ``backward_s``."""
    y: torch.Tensor = _Sleep.apply(x, forward_s, backward_s)  # type: ignore[no-untyped-call]
    return y


class Emulated(nn.Module):
    """Base of emulated-kernel modules: duration affine in the batch size, times a slowdown."""

    def __init__(
        self,
        forward_s: float,
        backward_s: float | None = None,
        per_sample_s: float = 0.0,
        slowdown: float = 1.0,
    ) -> None:
        super().__init__()
        self.forward_s = forward_s
        self.backward_s = BACKWARD_RATIO * forward_s if backward_s is None else backward_s
        self.per_sample_s = per_sample_s
        self.slowdown = slowdown

    def durations(self, batch: int) -> tuple[float, float]:
        """Emulated (forward, backward) seconds for a micro-batch of ``batch`` samples."""
        extra = self.per_sample_s * batch
        ratio = self.backward_s / self.forward_s if self.forward_s > 0 else BACKWARD_RATIO
        return (
            self.slowdown * (self.forward_s + extra),
            self.slowdown * (self.backward_s + ratio * extra),
        )

    def timed(self, y: torch.Tensor, batch: int) -> torch.Tensor:
        """``y`` after the emulated kernel time of a micro-batch of ``batch`` samples."""
        return emulated_time(y, *self.durations(batch))


class EmulatedLayer(Emulated):
    """Linear(width, width) + tanh whose forward/backward take emulated accelerator time."""

    def __init__(
        self,
        width: int,
        forward_s: float,
        backward_s: float | None = None,
        per_sample_s: float = 0.0,
        slowdown: float = 1.0,
    ) -> None:
        super().__init__(forward_s, backward_s, per_sample_s, slowdown)
        self.linear = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Real math, then the emulated kernel time."""
        return self.timed(torch.tanh(self.linear(x)), x.shape[0])


class EmulatedFFN(Emulated):
    """Residual feed-forward block x + W2 gelu(W1 x) (width -> hidden -> width), emulated time.

    Unlike EmulatedLayer it keeps internal activations for backward (the hidden pre-activation
    and the GELU output, 2 x hidden per token against width at its boundary), as transformer
    blocks do: the layer activation checkpointing pays off on. The forward's emulated time comes
    before the math, so a checkpointed block's recomputation (which stops once the tensors
    backward needs exist) pays it again, as on a real device; the backward's comes first in
    backward.
    """

    def __init__(
        self,
        width: int,
        hidden: int,
        forward_s: float,
        backward_s: float | None = None,
        per_sample_s: float = 0.0,
        slowdown: float = 1.0,
    ) -> None:
        super().__init__(forward_s, backward_s, per_sample_s, slowdown)
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Emulated forward time, then the real math; backward time first in backward."""
        fwd, bwd = self.durations(x.shape[0])
        h = emulated_time(x, fwd, 0.0)
        return emulated_time(h + self.fc2(nn.functional.gelu(self.fc1(h))), 0.0, bwd)


def emulated_mlp(
    layers: int,
    width: int,
    forward_s: float,
    backward_s: float | None = None,
    per_sample_s: float = 0.0,
) -> nn.Sequential:
    """An nn.Sequential of ``layers`` EmulatedLayers."""
    return nn.Sequential(
        *(EmulatedLayer(width, forward_s, backward_s, per_sample_s) for _ in range(layers))
    )


def set_slowdown(modules: Iterable[nn.Module], factor: float) -> None:
    """Set ``slowdown`` on every emulated module among ``modules`` (e.g. a slow device's)."""
    for mod in modules:
        if isinstance(mod, Emulated):
            mod.slowdown = factor
