"""A served request as a ``StepReport``, and the run directory serve runs write.

One request (a batch split into M micro-batches) is one "step": stage s's timeline holds one
``F`` action per micro-batch (its onnxruntime run, in the order it ran them), its queue trace
(``QueueTrace(s - 1, s, "act")``; stage 0's comes from the client, src -1) when each
micro-batch arrived and when its compute started. Per stage: ``compute`` is the sum of its
runs, ``wait`` the time it sat empty until the next input arrived, ``wall`` the request's wall
time (first send to last answer, at the client), so ``bubble`` = 1 - compute / wall as in
training. ``extra`` holds ``wall``, ``offset`` (seconds since the run's first request),
``latencies`` (each micro-batch's send-to-answer seconds, by micro-batch), ``latency_p50``,
``latency_p99`` and ``throughput`` (samples/s). Times are wall-clock (``time.time()``) from
every process, comparable on one host.

The run directory is the training one (``reports.jsonl``, one report per line), so
``adaptive-pp plot`` and ``adaptive-pp trace`` read it, plus ``serve.json`` (a summary).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any, cast

from adaptive_pp.core.report import (
    QueueTrace,
    StageStats,
    StepReport,
    StepTimes,
    Timeline,
    append_jsonl,
)
from adaptive_pp.core.schedules import Action
from controllers.serving import percentile

from .wire import Timing

SCHEDULE = SOURCE = "serve"


def build_report(
    *,
    request: int,
    start: float,
    end: float,
    sent: Sequence[float],
    received: Sequence[float],
    timings: Sequence[Sequence[Timing]],
    partition: Sequence[int],
    batch: int,
    offset: float = 0.0,
) -> StepReport:
    """The StepReport of one request from the stages' timings of each micro-batch."""
    num_stages = len(partition) - 1
    runs: list[list[tuple[int, float, float, float]]] = [[] for _ in range(num_stages)]
    for m, stage_timings in enumerate(timings):
        for s, arrived, t0, t1 in stage_timings:
            runs[s].append((m, arrived - start, t0 - start, t1 - start))
    wall = end - start
    actions, starts, ends, queues, stats = [], [], [], [], []
    for s, stage_runs in enumerate(runs):
        stage_runs.sort(key=lambda r: r[2])
        actions.append(tuple(Action(s, "F", m) for m, _, _, _ in stage_runs))
        starts.append(tuple(t0 for _, _, t0, _ in stage_runs))
        ends.append(tuple(t1 for _, _, _, t1 in stage_runs))
        queues.append(
            QueueTrace(
                s - 1,
                s,
                "act",
                tuple(a for _, a, _, _ in stage_runs),
                tuple(t0 for _, _, t0, _ in stage_runs),
            )
        )
        wait, prev = 0.0, 0.0
        for _, arrived, t0, t1 in stage_runs:
            wait += max(0.0, min(arrived, t0) - prev)
            prev = t1
        stats.append(
            StageStats(
                stage=s,
                compute=math.fsum(t1 - t0 for _, _, t0, t1 in stage_runs),
                wait=wait,
                wall=wall,
                peak_stash=0,
                layers=tuple(range(partition[s], partition[s + 1])),
            )
        )
    lat = [r - t for t, r in zip(sent, received, strict=True)]
    extra = {
        "wall": wall,
        "offset": offset,
        "latencies": lat,
        "latency_p50": percentile(lat, 50),
        "latency_p99": percentile(lat, 99),
        "throughput": batch / wall if wall > 0 else 0.0,
    }
    return StepReport(
        step=request,
        schedule=SCHEDULE,
        microbatches=len(sent),
        step_time=wall,
        stages=tuple(stats),
        queues=tuple(queues),
        timeline=Timeline(tuple(actions), tuple(starts), tuple(ends)),
        partition=tuple(partition),
        source=SOURCE,
        extra=cast(StepTimes, extra),
        batch=batch,
    )


def extra_of(report: StepReport) -> dict[str, Any]:
    """A serving report's ``extra`` as a plain dict (it has keys StepTimes does not list)."""
    return dict(cast(dict[str, Any], report.extra))


class RunDir:
    """A serve run directory: ``reports.jsonl`` (one per request) and ``serve.json``."""

    def __init__(self, path: str | Path, *, replace: bool = True) -> None:
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        self.reports = self.path / "reports.jsonl"
        if replace:
            self.reports.unlink(missing_ok=True)

    def append(self, report: StepReport) -> None:
        append_jsonl(self.reports, report)

    def write_summary(self, summary: dict[str, Any]) -> Path:
        path = self.path / "serve.json"
        path.write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
        return path
