"""Tests for adaptive_pp.report: StepReport round trips, JSON lines, queue traces, stats."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from adaptive_pp.core.report import (
    ActionTiming,
    QueueTrace,
    StageStats,
    StepReport,
    Timeline,
    append_jsonl,
    read_jsonl,
    summarize,
)
from adaptive_pp.core.schedules import Action, gpipe, one_f_one_b
from adaptive_pp.core.simulator import Costs, simulate


def simulated(step: int = 0, slow: float = 1.0) -> StepReport:
    """A 3-stage x 4-micro-batch 1F1B step with uneven costs and hop times."""
    costs = Costs.build(
        3, 4, [[1.0, 1.5, 0.5, 2.0], 1.0, 1.25], 2.0, [0.1, 0.3], slowdown={1: slow}
    )
    return simulate(one_f_one_b(3, 4), costs, step=step)


def assert_same_report(got: StepReport, want: StepReport) -> None:
    assert got.step == want.step
    assert got.schedule == want.schedule
    assert got.microbatches == want.microbatches
    assert got.step_time == want.step_time
    assert got.stages == want.stages
    assert got.queues == want.queues
    assert list(got.timeline) == list(want.timeline)
    assert got.timeline.actions == want.timeline.actions
    assert got.partition == want.partition
    assert got.source == want.source
    assert got.loss == want.loss
    assert got.events == want.events
    assert got.extra == want.extra


# --- dict / JSON round trips ------------------------------------------------------------------


def test_to_dict_from_dict_round_trip() -> None:
    report = simulated(step=3)
    assert len(report.timeline) == 24 and len(report.queues) == 4  # something to compare
    data = report.to_dict()
    assert_same_report(StepReport.from_dict(data), report)
    # Through JSON text too (tuples become lists, floats stay exact).
    back = StepReport.from_dict(json.loads(json.dumps(data)))
    assert_same_report(back, report)
    assert json.loads(json.dumps(back.to_dict())) == json.loads(json.dumps(data))


def test_to_dict_contents() -> None:
    report = simulated()
    data = report.to_dict()
    assert data["step_time"] == report.step_time
    assert data["bubble_fraction"] == report.bubble_fraction
    assert data["utilization"] == list(report.utilization)
    assert data["timeline"][0]["actions"] == "0F0 0F1 0F2 0B0 0F3 0B1 0B2 0B3"
    assert data["timeline"][2]["start"] == list(report.timeline.start[2])
    json.dumps(data)  # JSON-ready


def test_round_trip_keeps_optional_fields() -> None:
    report = replace(
        simulated(step=9),
        partition=(0, 4, 9, 12),
        source="runtime",
        loss=2.5,
        events=("rebalance 1->2 x1", "microbatches 4->8"),
        extra={"lr": 1e-3, "tokens": 4096.0},
        stages=tuple(
            replace(s, layers=(4, 5), layer_forward=(0.25, 0.5), layer_backward=(0.5, 1.0))
            for s in simulated(step=9).stages
        ),
    )
    back = StepReport.from_dict(json.loads(json.dumps(report.to_dict())))
    assert_same_report(back, report)
    assert back.stages[1].layer_forward == (0.25, 0.5)


def test_from_dict_defaults() -> None:
    minimal = {
        "step": 1,
        "schedule": "gpipe",
        "microbatches": 2,
        "step_time": 4.0,
        "stages": [{"stage": 0, "compute": 4.0, "wait": 0.0, "wall": 4.0, "peak_stash": 2}],
    }
    report = StepReport.from_dict(minimal)
    assert report.queues == ()
    assert len(report.timeline) == 0
    assert report.source == "simulator"
    assert report.loss is None
    assert report.utilization == (1.0,)


# --- JSON lines -------------------------------------------------------------------------------


def test_jsonl_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "runs" / "nested" / "steps.jsonl"  # parent folders get created
    reports = [simulated(step=0), simulated(step=1, slow=2.0)]
    reports.append(simulate(gpipe(2, 3), Costs.build(2, 3, 1.0, 2.0), step=2))
    for r in reports:
        append_jsonl(path, r)
    lines = path.read_text(encoding="utf-8").splitlines()
    assert len(lines) == 3
    back = read_jsonl(path)
    assert len(back) == 3
    for got, want in zip(back, reports, strict=True):
        assert_same_report(got, want)
    assert back[1].step_time > back[0].step_time  # the slowed stage made step 1 longer


def test_read_jsonl_skips_blank_lines(tmp_path: Path) -> None:
    path = tmp_path / "steps.jsonl"
    path.write_text("\n" + json.dumps(simulated().to_dict()) + "\n\n  \n", encoding="utf-8")
    assert len(read_jsonl(str(path))) == 1


@pytest.mark.parametrize(
    "bad_line",
    [
        '{"step": 2, "schedule": "1f1b", "microbat',  # truncated write
        "not json at all",
        "[1, 2, 3]",
        "null",
        '{"step": 2}',  # missing keys
        '{"step": 2, "schedule": "1f1b", "microbatches": 1, "step_time": "soon", "stages": []}',
        '{"step": 1e400, "schedule": "1f1b", "microbatches": 1, "step_time": 1, "stages": []}',
        '{"step": 1, "schedule": "1f1b", "microbatches": 1, "step_time": 1, "stages": [],'
        ' "timeline": [{"actions": 5, "start": [], "end": []}]}',
        '{"step": 1, "schedule": "1f1b", "microbatches": 1, "step_time": 1, "stages": [],'
        ' "timeline": [{"actions": "0F0 0Q0", "start": [0, 1], "end": [1, 2]}]}',
        '{"step": 1, "schedule": "1f1b", "microbatches": 1, "step_time": 1,'
        ' "stages": [{"stage": 0}]}',
    ],
)
def test_read_jsonl_corrupt_line_names_it(tmp_path: Path, bad_line: str) -> None:
    path = tmp_path / "steps.jsonl"
    append_jsonl(path, simulated(step=0))
    append_jsonl(path, simulated(step=1))
    with path.open("a", encoding="utf-8") as fh:
        fh.write(bad_line + "\n")
    append_jsonl(path, simulated(step=3))
    with pytest.raises(ValueError, match=r"steps\.jsonl:3: not a step report"):
        read_jsonl(path)


# --- queue traces -----------------------------------------------------------------------------


def test_depth_series_hand_made() -> None:
    # Message 0 arrives at 1, taken at 1.5; message 1 arrives at 2, taken at 5; message 2
    # arrives at 4 and is taken at once (an arrival counts before a same-instant take).
    q = QueueTrace(0, 1, "act", (1.0, 2.0, 4.0), (1.5, 5.0, 4.0))
    assert q.depth_series() == [(1.0, 1), (1.5, 0), (2.0, 1), (4.0, 2), (4.0, 1), (5.0, 0)]
    assert q.max_depth == 2
    # Time in queue: 0.5 + 3 + 0 = 3.5 message-seconds over a 10 s step.
    assert q.mean_depth(10.0) == pytest.approx(0.35)
    assert q.mean_depth(0.0) == 0.0


def test_depth_series_out_of_order_arrivals() -> None:
    # Gradients can arrive out of micro-batch order; events are sorted by time.
    q = QueueTrace(2, 1, "grad", (3.0, 1.0), (6.0, 2.0))
    assert q.depth_series() == [(1.0, 1), (2.0, 0), (3.0, 1), (6.0, 0)]
    assert q.max_depth == 1


def test_empty_queue() -> None:
    q = QueueTrace(0, 1, "act", (), ())
    assert q.depth_series() == []
    assert q.max_depth == 0
    assert q.mean_depth(5.0) == 0.0


# --- stats and timeline helpers ---------------------------------------------------------------


def test_stage_stats() -> None:
    stats = StageStats(stage=1, compute=3.0, wait=1.0, wall=4.0, peak_stash=2)
    assert stats.idle == 1.0
    assert stats.utilization == 0.75
    assert stats.bubble == 0.25
    idle = StageStats(stage=0, compute=0.0, wait=0.0, wall=0.0, peak_stash=0)
    assert idle.utilization == 0.0
    assert idle.idle == 0.0


def test_step_report_aggregates() -> None:
    stages = (
        StageStats(0, compute=2.0, wait=0.0, wall=4.0, peak_stash=3),
        StageStats(1, compute=4.0, wait=0.0, wall=4.0, peak_stash=1),
    )
    report = StepReport(step=0, schedule="1f1b", microbatches=2, step_time=4.0, stages=stages)
    assert report.num_stages == 2
    assert report.utilization == (0.5, 1.0)
    assert report.bubble_fraction == 0.25  # 2 idle seconds out of 8 stage-seconds
    assert report.peak_stash == (3, 1)
    assert report.stage_compute == (2.0, 4.0)
    empty = StepReport(step=0, schedule="1f1b", microbatches=1, step_time=0.0, stages=())
    assert empty.bubble_fraction == 0.0


def test_timeline_helpers() -> None:
    timeline = Timeline(
        ((Action(0, "F", 0), Action(0, "B", 0)), (Action(1, "F", 0), Action(1, "B", 0))),
        ((0.0, 3.0), (1.0, 2.0)),
        ((1.0, 4.0), (2.0, 3.0)),
    )
    assert len(timeline) == 4
    assert timeline.stage(1) == [
        ActionTiming(1, "F", 0, 1.0, 2.0),
        ActionTiming(1, "B", 0, 2.0, 3.0),
    ]
    assert [t.action for t in timeline] == [
        Action(0, "F", 0),
        Action(0, "B", 0),
        Action(1, "F", 0),
        Action(1, "B", 0),
    ]
    assert Timeline.from_dict(timeline.to_dict()) == timeline


def test_summarize() -> None:
    reports = [simulated(step=0), simulated(step=1, slow=2.0)]
    lines = summarize(reports).splitlines()
    assert len(lines) == 2
    assert lines[1].startswith("step    1")
    assert f"{reports[0].step_time * 1e3:8.2f} ms" in lines[0]
    assert f"bubble {reports[0].bubble_fraction:6.2%}" in lines[0]
    assert lines[0].count("%") == 1 + reports[0].num_stages
