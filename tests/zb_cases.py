"""Jobs that stage processes run in tests/test_zero_bubble.py (importable by spawned ranks)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from adaptive_pp import Pipeline, PipelineConfig
from adaptive_pp.emulation.kernels import EmulatedFFN

WIDTH, HIDDEN, LAYERS, BATCH, M = 6, 20, 5, 8, 4
BOUNDS = (0, 3, 5)


def train_ffn(schedule: str, checkpointing: bool) -> dict[str, Any]:
    """Rank job: 3 Adam steps of residual FFN blocks (no sleep) on 2 stages."""
    torch.manual_seed(0)
    model = nn.Sequential(*(EmulatedFFN(WIDTH, HIDDEN, 0.0) for _ in range(LAYERS)))
    cfg = PipelineConfig(
        microbatches=M, schedule=schedule, partition=BOUNDS, activation_checkpointing=checkpointing
    )
    g = torch.Generator().manual_seed(1)
    data = [(torch.randn(BATCH, WIDTH, generator=g), torch.randn(BATCH, WIDTH, generator=g))]
    with Pipeline(
        model, nn.functional.mse_loss, lambda p: torch.optim.Adam(p, lr=1e-2), cfg
    ) as pipe:
        out = [pipe.step(x, y) for x, y in data * 3]
        return {
            "losses": [o.loss for o in out],
            "state": {
                k: {n: t.clone() for n, t in sd.items()} for k, sd in pipe.local_state().items()
            },
            "optimizer": pipe.optimizer.state_dict() if pipe.optimizer is not None else None,
            "report": out[-1].report.to_dict(),
        }


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
