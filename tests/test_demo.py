"""The demo's narration: which steps stand for before / slowed / end, and the decisions listed."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from adaptive_pp.core.report import StepReport
from adaptive_pp.core.schedules import make_schedule
from adaptive_pp.core.simulator import Costs, simulate
from adaptive_pp.emulation.demo import Slowdown, before_after, typical


def _run(walls: list[float], events: dict[int, str]) -> list[StepReport]:
    base = simulate(make_schedule("1f1b", 2, 4), Costs.build(2, 4, 1e-3, 2e-3))
    return [
        replace(
            base,
            step=k,
            extra={"wall": w},
            events=(events[k],) if k in events else (),
        )
        for k, w in enumerate(walls)
    ]


def test_typical_is_the_median_step_not_an_average() -> None:
    reports = _run([0.3, 0.1, 0.2, 0.5], {})
    assert typical(reports).step == 2
    assert typical(reports[:3]).step == 2
    assert typical(reports[:1]).step == 0


def _steps(lines: list[str]) -> dict[str, int]:
    """Row label -> the step (from 1) the row shows."""
    rows = {}
    for line in lines:
        for label in ("before slowdown", "slowed, as was", "end"):
            if line.startswith(label):
                rows[label] = int(line[16:].split()[0])
    return rows


def test_rows_come_from_the_right_stretches_and_every_decision_is_listed() -> None:
    # Steps 0-9; a schedule change before step 2, slowdown from step 5, moves before 7 and 8.
    walls = [0.1, 0.1, 0.12, 0.11, 0.13, 0.3, 0.31, 0.2, 0.22, 0.21]
    events = {2: "set schedule 1f1b -> zb-h1 (try)", 7: "moved layers 3-3 (a)", 8: "moved (b)"}
    lines = before_after(_run(walls, events), Slowdown(at=5), tail=3)
    # before: steps 2-4 (since the change), median wall 0.12 = step 2; slowed: steps 5-6, the
    # lower median 0.3 = step 5; end: steps 8-9 (since the last move), lower median = step 9.
    assert _steps(lines) == {"before slowdown": 3, "slowed, as was": 6, "end": 10}
    listed = [line for line in lines if line.startswith("  step ")]
    assert listed == [f"  step {k + 1}: {e}" for k, e in sorted(events.items())]


def test_without_a_slowdown_only_the_end_is_shown() -> None:
    lines = before_after(_run([0.1, 0.2, 0.3], {}), None)
    assert set(_steps(lines)) == {"end"} and "no decisions" in lines


@pytest.mark.parametrize("at", [0, 7])
def test_a_slowdown_at_the_start_or_past_the_end(at: int) -> None:
    rows = _steps(before_after(_run([0.1, 0.2, 0.3], {}), Slowdown(at=at)))
    assert set(rows) == ({"slowed, as was", "end"} if at == 0 else {"end"})


@pytest.mark.multiprocess
def test_the_demo_shows_a_live_move(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    """`make demo` as a user sees it: the slowdown said on screen, the controller's move with
    its reason, before/after rows, and the run's files where it says."""
    from adaptive_pp.cli import main

    run_dir = tmp_path / "demo"
    assert main(["demo", "--run-dir", str(run_dir)]) == 0
    out = capfd.readouterr().out  # the ranks print: their file descriptors are captured
    assert "EMULATED" in out and "PipelineConfig(adaptive=True)" in out
    assert "stage 2's device is 2x slower" in out
    moves = [line for line in out.splitlines() if line.startswith("  step ") and "moved" in line]
    assert moves and all("(" in line for line in moves), out  # each move says why
    assert all(int(line.split()[1].rstrip(":")) > 8 for line in moves)  # after the slowdown
    assert {"before slowdown", "slowed, as was", "end"} <= {
        label for line in out.splitlines() for label in _steps([line])
    }
    reports = (run_dir / "reports.jsonl").read_text().splitlines()
    assert len(reports) == 20
    for name in ("trace.json", "steps.png", "queue-depth.png"):
        assert (run_dir / name).is_file() and str(run_dir / name) in out
