"""A rank job shared by tests/test_checkpointing.py and tests/test_zero_bubble.py: residual
FFN blocks on 2 stages (importable by spawned ranks)."""

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
