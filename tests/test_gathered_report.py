"""A flushed step's report is merged when first read, once; its loss is the last stage's."""

from __future__ import annotations

from typing import Any

import pytest

from adaptive_pp.runtime import stepreport
from adaptive_pp.runtime.stepreport import GatheredReport, ReportMeta


def _part(stage: int, loss: float | None, t0: float) -> dict[str, Any]:
    return {
        "stage": stage,
        "compute": 0.01,
        "wait": 0.002,
        "end": 0.02,
        "peak_stash": 1,
        "peak_stash_bytes": 64,
        "layers": [stage],
        "layer_forward": [0.001],
        "layer_backward": [0.002],
        "layer_bytes": [128],
        "weight_bytes": 128,
        "batch": 4,
        "actions": f"{stage}F0 {stage}B0",
        "start": [0.0, 0.01],
        "stop": [0.005, 0.02],
        "queues": [],
        "loss": loss,
        "optimizer": 0.001,
        "t0": t0,
        "since": t0,
    }


def test_merged_once_when_read_with_the_last_stages_loss(monkeypatch: pytest.MonkeyPatch) -> None:
    meta = ReportMeta(3, "1f1b", 1, (0, 1, 2), (), 0.0)
    parts = [_part(0, None, 10.0), _part(1, 0.25, 10.004)]
    merges: list[int] = []
    merge = stepreport.merge_parts

    def counted(*args: Any) -> Any:
        merges.append(1)
        return merge(*args)

    monkeypatch.setattr(stepreport, "merge_parts", counted)
    gathered = GatheredReport(meta, parts, 0.03)
    assert gathered.loss() == 0.25 and merges == []
    report = gathered.result()
    assert gathered.result() is report and merges == [1]
    assert report.step == 3 and report.loss == 0.25
    assert report.step_time == pytest.approx(0.024)  # stage 1 started 4 ms later
