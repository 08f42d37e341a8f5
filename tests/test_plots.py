"""Tests for adaptive_pp.plots: PNG files, figure contents (bars, lines, decision markers)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from report_cases import simulated_run, write_run

from adaptive_pp.core.analysis import waits
from adaptive_pp.observability.chrome_trace import RunDirError

pytest.importorskip("matplotlib")

from adaptive_pp.observability.plots import (
    PlotDependencyError,
    decision_lines,
    plot_run,
    queue_depth_figure,
    save_figure,
    steps_figure,
    timeline_figure,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def assert_png(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC, path
    assert len(data) > 5000, (path, len(data))  # a drawn figure, not an empty canvas


def bars(fig: object, gid: str) -> int:
    return sum(len(c.get_paths()) for c in fig.axes[0].collections if c.get_gid() == gid)  # type: ignore[attr-defined]


@pytest.mark.parametrize(("stages", "schedule"), [(3, "1f1b"), (4, "gpipe"), (1, "1f1b")])
def test_timeline_has_a_bar_per_action_and_per_wait(stages: int, schedule: str) -> None:
    r = simulated_run(stages, steps=1, schedule=schedule)[0]
    fig = timeline_figure(r)
    assert len(fig.axes) == 1
    assert bars(fig, "F") == bars(fig, "B") == stages * r.microbatches
    assert bars(fig, "wait") == len(waits(r))
    assert (bars(fig, "wait") > 0) == (stages > 1)
    assert [t.get_text() for t in fig.axes[0].get_yticklabels()] == [
        f"stage {s}" for s in range(stages)
    ]


def test_queue_depth_has_a_panel_per_receiver_and_a_line_per_link() -> None:
    reports = simulated_run(4, steps=5)
    fig = queue_depth_figure(reports)
    assert len(fig.axes) == 4
    lines = [ln for ax in fig.axes for ln in ax.get_lines() if ln.get_gid() == "queue"]
    assert len(lines) == 2 * 3  # act and grad on each of the 3 hops
    # each panel marks the two steps that carry decisions
    assert all(
        len([ln for ln in ax.get_lines() if ln.get_gid() == "decision"]) == 2 for ax in fig.axes
    )
    # the line holds every depth change of every step (plus a 0 at each step start)
    act01 = next(ln for ln in fig.axes[1].get_lines() if ln.get_label() == "act from stage 0")
    assert max(act01.get_ydata()) == max(r.queue(0, 1).max_depth for r in reports)
    assert len(act01.get_xdata()) == sum(1 + 2 * r.microbatches for r in reports)


def test_steps_figure_marks_each_decision_once_per_panel() -> None:
    reports = simulated_run(3, steps=6)
    fig = steps_figure(reports)
    assert len(fig.axes) == 3
    with_events = [r for r in reports if r.events]
    assert len(decision_lines(fig)) == len(with_events) == 2
    assert [ln.get_xdata()[0] for ln in decision_lines(fig)] == [r.step - 0.5 for r in with_events]
    labels = [t.get_text() for t in fig.axes[0].texts]
    assert len(labels) == 2 and labels[0].startswith("moved layers")
    assert len([ln for ln in fig.axes[2].get_lines() if (ln.get_gid() or "").startswith("U")]) == 3
    (bubble,) = [ln for ln in fig.axes[1].get_lines() if ln.get_gid() == "bubble"]
    assert list(bubble.get_ydata()) == pytest.approx([100 * r.bubble_fraction for r in reports])
    no_decisions = steps_figure(simulated_run(3, steps=3, decisions={}))
    assert decision_lines(no_decisions) == []


def test_plot_run_writes_pngs_and_trace(tmp_path: Path) -> None:
    reports = simulated_run(3, steps=6)
    run = write_run(tmp_path / "run", reports)
    paths = plot_run(run)
    assert [p.name for p in paths] == [
        "timeline-step5.png",
        "queue-depth.png",
        "steps.png",
        "trace.json",
    ]
    assert all(p.parent == run for p in paths)
    for p in paths[:3]:
        assert_png(p)
    trace = json.loads(paths[3].read_text())
    fb = [e for e in trace["traceEvents"] if e.get("cat") in ("forward", "backward")]
    assert len(fb) == sum(2 * r.num_stages * r.microbatches for r in reports)


def test_plot_run_chosen_step_and_out_dir(tmp_path: Path) -> None:
    run = write_run(tmp_path / "run", simulated_run(2, steps=4))
    paths = plot_run(run / "reports.jsonl", tmp_path / "out", step=1)
    assert paths[0] == tmp_path / "out" / "timeline-step1.png"
    assert_png(paths[0])
    with pytest.raises(ValueError, match=r"no step 9 \(steps 0\.\.3\)"):
        plot_run(run, tmp_path / "out", step=9)
    with pytest.raises(RunDirError, match=r"missing: no such file"):
        plot_run(tmp_path / "empty-dir-that-is-missing")


def test_save_figure_creates_folders(tmp_path: Path) -> None:
    path = save_figure(timeline_figure(simulated_run(2, steps=1)[0]), tmp_path / "a" / "b.png")
    assert_png(path)


def test_missing_matplotlib_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib.backends.backend_agg", None)
    with pytest.raises(PlotDependencyError, match=r"pip install 'adaptive-pp\[plot\]'"):
        timeline_figure(simulated_run(2, steps=1)[0])
