"""Simulated runs for the trace, plot and CLI tests: reports with losses and decisions, run dirs."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path

from adaptive_pp.core.report import StepReport, append_jsonl
from adaptive_pp.core.schedules import make_schedule
from adaptive_pp.core.simulator import Costs, simulate

DECISIONS: Mapping[int, tuple[str, ...]] = {
    2: ("moved layers 4-4 from stage 2 to stage 1 (1088 bytes, 0.5 ms); partition 0-3 | 4-5",),
    4: ("set micro-batches 4 -> 8", "refused move 9 layer(s) 0->1: would leave stage 0 empty"),
}


def simulated_run(
    stages: int = 3,
    steps: int = 6,
    schedule: str = "1f1b",
    decisions: Mapping[int, Sequence[str]] = DECISIONS,
) -> list[StepReport]:
    """``steps`` reports as a runtime would write them; M goes 4 -> 8 where a decision says so."""
    reports, m = [], 4
    for step in range(steps):
        events = tuple(decisions.get(step, ()))
        for text in events:
            if text.startswith("set micro-batches"):
                m = int(text.split()[-1])
        costs = Costs.build(stages, m, 4e-3 / m, 8e-3 / m, 1e-4, slowdown={stages - 1: 1.3})
        r = simulate(make_schedule(schedule, stages, m), costs, step=step)
        extra = {"wall": r.step_time * 1.1, "change": 2e-3 if events else 0.0}
        reports.append(replace(r, loss=1.0 / (step + 1), events=events, extra=extra))
    return reports


def write_run(run_dir: Path, reports: Sequence[StepReport]) -> Path:
    """Append ``reports`` to RUN_DIR/reports.jsonl as the runtime does; returns ``run_dir``."""
    for r in reports:
        append_jsonl(run_dir / "reports.jsonl", r)
    return run_dir
