"""Emulated-kernel layers: a real small layer plus a sleep standing for accelerator time.

On a 2-core CPU machine four stage processes cannot each run real kernels at accelerator speed,
so timing studies use these: the math is real (a Linear + tanh), the duration is a sleep whose
length is affine in the micro-batch size, ``launch + per_sample * batch``, with backward = 2.4x
forward by default (as measured for GPT blocks on an H100; see DESIGN.md). ``slowdown`` scales a
layer at run time to inject skew. Every figure produced with these says so.
"""

from __future__ import annotations

import time
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


class EmulatedLayer(nn.Module):
    """Linear(width, width) + tanh whose forward/backward take emulated accelerator time."""

    def __init__(
        self,
        width: int,
        forward_s: float,
        backward_s: float | None = None,
        per_sample_s: float = 0.0,
        slowdown: float = 1.0,
    ) -> None:
        super().__init__()
        self.linear = nn.Linear(width, width)
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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Real math, then the emulated kernel time."""
        fwd, bwd = self.durations(x.shape[0])
        y: torch.Tensor = _Sleep.apply(torch.tanh(self.linear(x)), fwd, bwd)  # type: ignore[no-untyped-call]
        return y


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
