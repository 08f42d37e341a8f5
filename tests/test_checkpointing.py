"""Multi-process: activation checkpointing keeps training bit-exact and shrinks the stash."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from conftest import PoolFor
from torch import nn

from adaptive_pp import Pipeline, PipelineConfig
from adaptive_pp.core.report import StepReport
from adaptive_pp.core.schedules import make_schedule, validate
from adaptive_pp.emulation.kernels import EmulatedFFN

pytestmark = pytest.mark.multiprocess

WIDTH, HIDDEN, LAYERS, BATCH, M = 6, 20, 5, 8, 4
BOUNDS = (0, 3, 5)


def train(schedule: str, checkpointing: bool) -> dict[str, Any]:
    """Rank job: 3 Adam steps of residual FFN blocks (no sleep) on 2 stages."""
    torch.manual_seed(0)
    model = nn.Sequential(*(EmulatedFFN(WIDTH, HIDDEN, 0.0) for _ in range(LAYERS)))
    cfg = PipelineConfig(
        microbatches=M,
        schedule=schedule,
        partition=BOUNDS,
        activation_checkpointing=checkpointing,
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


def expected_bytes(schedule: str, checkpointing: bool) -> list[int]:
    """Per stage: peak micro-batches in flight x bytes kept per micro-batch (float32).

    Every segment boundary (the stage input and each layer's output, b x width) is kept;
    without checkpointing each FFN also saves its hidden pre-activation and GELU output.
    """
    b = BATCH // M
    peak = validate(make_schedule(schedule, 2, M)).peak
    out = []
    for s, layers in enumerate((BOUNDS[1] - BOUNDS[0], BOUNDS[2] - BOUNDS[1])):
        per_mb = (layers + 1) * b * WIDTH * 4
        if not checkpointing:
            per_mb += layers * 2 * b * HIDDEN * 4
        out.append(peak[s] * per_mb)
    return out


@pytest.mark.parametrize("schedule", ["1f1b", "gpipe"])
def test_checkpointing_is_bit_exact_and_lowers_the_stash(pools: PoolFor, schedule: str) -> None:
    plain = pools(2).run(train, schedule, False, timeout=120)
    ckpt = pools(2).run(train, schedule, True, timeout=120)
    for a, b in zip(plain, ckpt, strict=True):
        assert a["losses"] == b["losses"]
        assert a["state"].keys() == b["state"].keys()
        for name, sd in a["state"].items():
            for key, tensor in sd.items():
                assert torch.equal(tensor, b["state"][name][key]), (name, key)
        for idx, st in a["optimizer"]["state"].items():
            for key, value in st.items():
                other = b["optimizer"]["state"][idx][key]
                assert torch.equal(torch.as_tensor(value), torch.as_tensor(other)), (idx, key)
    before = StepReport.from_dict(plain[0]["report"]).peak_stash_bytes
    after = StepReport.from_dict(ckpt[0]["report"]).peak_stash_bytes
    assert list(before) == expected_bytes(schedule, False)
    assert list(after) == expected_bytes(schedule, True)
    assert all(x < y for x, y in zip(after, before, strict=True))


def test_old_reports_without_stash_bytes_still_load() -> None:
    data = StepReport.from_dict(
        {
            "step": 0,
            "schedule": "1f1b",
            "microbatches": 1,
            "step_time": 1.0,
            "stages": [{"stage": 0, "compute": 1.0, "wait": 0.0, "wall": 1.0, "peak_stash": 1}],
        }
    )
    assert data.peak_stash_bytes == (0,)
    assert StepReport.from_dict(data.to_dict()) == data
