"""Multi-process: activation checkpointing keeps training bit-exact and shrinks the stash."""

from __future__ import annotations

import ffn_cases
import pytest
import torch
from conftest import PoolFor
from ffn_cases import BATCH, BOUNDS, HIDDEN, WIDTH, M

from adaptive_pp.core.report import StepReport
from adaptive_pp.core.schedules import make_schedule, validate

pytestmark = pytest.mark.multiprocess


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
    plain = pools(2).run(ffn_cases.train_ffn, schedule, False, timeout=120)
    ckpt = pools(2).run(ffn_cases.train_ffn, schedule, True, timeout=120)
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
