"""Jobs that stage processes run in tests/test_zero_bubble.py (importable by spawned ranks)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from adaptive_pp import Pipeline, PipelineConfig


class _FailInWeightGrad(torch.autograd.Function):
    """Identity on a weight whose backward (reached only by W) raises."""

    @staticmethod
    def forward(ctx: Any, w: torch.Tensor) -> torch.Tensor:
        return w.view_as(w)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("injected weight-gradient failure")


class BadWeightGrad(nn.Module):
    """Linear + tanh whose weight gradient raises (its input gradient is fine)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.linear = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = _FailInWeightGrad.apply(self.linear.weight)  # type: ignore[no-untyped-call]
        return torch.tanh(nn.functional.linear(x, w, self.linear.bias))


def job_weight_grad_fails() -> None:
    """Rank job: zb-h1 on 2 stages, layer 2 (stage 1) fails in its W."""
    torch.manual_seed(0)
    blocks: list[nn.Module] = [nn.Sequential(nn.Linear(4, 4), nn.Tanh()) for _ in range(4)]
    blocks[2] = BadWeightGrad(4)
    cfg = PipelineConfig(microbatches=2, schedule="zb-h1", partition=(0, 2, 4))
    with Pipeline(
        nn.Sequential(*blocks), nn.functional.mse_loss, lambda p: torch.optim.SGD(p, lr=0.1), cfg
    ) as pipe:
        pipe.step(torch.randn(4, 4), torch.randn(4, 4))
