"""Tests for adaptive_pp.cli: simulate (with --chrome-trace), trace and plot on run dirs, errors."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from report_cases import simulated_run, write_run

from adaptive_pp.cli import build_parser, main

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def fb_slices(path: Path) -> list[dict[str, object]]:
    trace = json.loads(path.read_text())
    return [e for e in trace["traceEvents"] if e.get("cat") in ("forward", "backward")]


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    return write_run(tmp_path / "run", simulated_run(3, steps=5))


def test_simulate_prints_summary_and_timeline(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["simulate", "-S", "2", "-M", "3", "--timeline", "--width", "40"]) == 0
    out = capsys.readouterr().out
    assert "schedule 1f1b   stages 2   micro-batches 3" in out
    assert "stage  1 |" in out


def test_simulate_2bw_with_a_lead_hides_the_hops(capsys: pytest.CaptureFixture[str]) -> None:
    times = {}
    for lead in (1, 2):
        argv = ["simulate", "-S", "4", "-M", "6", "--schedule", "2bw", "--tau-c", "0.5", "--json"]
        assert main([*argv, "--lead", str(lead)]) == 0
        times[lead] = json.loads(capsys.readouterr().out)["step_time"]
    assert times[2] == pytest.approx(6 * 3e-3) and times[1] > times[2]


def test_simulate_chrome_trace(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "t" / "sim.json"
    assert main(["simulate", "-S", "3", "-M", "5", "--chrome-trace", str(path)]) == 0
    assert f"wrote {path}" in capsys.readouterr().out
    assert len(fb_slices(path)) == 2 * 3 * 5
    # under --json, stdout stays one JSON document; the note goes to stderr
    assert main(["simulate", "-S", "2", "-M", "2", "--json", "--chrome-trace", str(path)]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["microbatches"] == 2
    assert f"wrote {path}" in captured.err
    assert len(fb_slices(path)) == 2 * 2 * 2


def test_trace_writes_the_run(
    run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "trace.json"
    assert main(["trace", str(run_dir), "-o", str(out)]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    reports = simulated_run(3, steps=5)
    assert len(fb_slices(out)) == sum(2 * r.num_stages * r.microbatches for r in reports)
    assert main(["trace", str(run_dir)]) == 0
    assert capsys.readouterr().out.strip() == str(run_dir / "trace.json")
    assert fb_slices(run_dir / "trace.json") == fb_slices(out)


def test_trace_with_replay_lays_run_and_replay_side_by_side(
    run_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["trace", str(run_dir), "--replay"]) == 0
    trace = json.loads((run_dir / "trace.json").read_text())
    names = {e["args"]["name"] for e in trace["traceEvents"] if e["name"] == "process_name"}
    parts = ("stage 0", "stage 1", "stage 2", "steps")
    assert names == {f"{run}: {part}" for run in ("run", "replay") for part in parts}
    reports = simulated_run(3, steps=5)
    assert len(fb_slices(run_dir / "trace.json")) == 2 * sum(
        2 * r.num_stages * r.microbatches for r in reports
    )


def test_plot_writes_pngs_and_trace(
    run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "plots"
    assert main(["plot", str(run_dir), "--out", str(out), "--step", "2"]) == 0
    printed = [Path(line) for line in capsys.readouterr().out.splitlines()]
    assert [p.name for p in printed] == [
        "timeline-step2.png",
        "queue-depth.png",
        "steps.png",
        "trace.json",
    ]
    for p in printed[:3]:
        assert p.parent == out and p.read_bytes()[:8] == PNG_MAGIC
    assert json.loads(printed[3].read_text())["traceEvents"]


@pytest.mark.parametrize("command", ["trace", "plot"])
def test_missing_run_dir_is_exit_2_naming_the_path(
    command: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "nowhere"
    assert main([command, str(missing)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("adaptive-pp: error: ")
    assert f"{missing}: no such file; a run directory holds reports.jsonl" in err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main([command, str(empty)]) == 2
    assert f"{empty / 'reports.jsonl'}: no such file" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["trace", "plot"])
def test_malformed_reports_are_exit_2_naming_file_and_line(
    command: str, run_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with (run_dir / "reports.jsonl").open("a") as fh:
        fh.write("{not json\n")
    assert main([command, str(run_dir)]) == 2
    err = capsys.readouterr().err
    assert f"{run_dir / 'reports.jsonl'} is malformed" in err
    assert "reports.jsonl:6: not a step report" in err
    assert not (run_dir / "trace.json").exists()


def test_plot_unknown_step_is_exit_2(run_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plot", str(run_dir), "--step", "42"]) == 2
    assert "no step 42 (steps 0..4)" in capsys.readouterr().err


def test_plot_without_matplotlib_is_exit_2(
    run_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib.backends.backend_agg", None)
    assert main(["plot", str(run_dir)]) == 2
    assert "pip install 'adaptive-pp[plot]'" in capsys.readouterr().err


def test_demo_observability_flags() -> None:
    """--otlp-endpoint/--log-format/--log-level/--run-dir parse; a bad log format is refused.
    The demo narrates itself: its logs default to warnings, its files to runs/demo."""
    args = build_parser().parse_args(
        ["demo", "--otlp-endpoint", "http://c:4317", "--log-format", "json", "--run-dir", "r"]
    )
    assert (args.otlp_endpoint, args.log_format, args.log_level, args.run_dir) == (
        "http://c:4317",
        "json",
        "warning",
        "r",
    )
    defaults = build_parser().parse_args(["demo"])
    assert (defaults.run_dir, defaults.slow_stage, defaults.slow_at) == ("runs/demo", 2, 8)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["demo", "--log-format", "xml"])


def test_simulate_zero_bubble_and_interleaved(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["simulate", "--schedule", "zb-h1", "-S", "3", "-M", "4", "--tau-w", "0.5"]) == 0
    assert "schedule zb-h1" in capsys.readouterr().out
    args = ["simulate", "--schedule", "interleaved-1f1b", "--chunks", "2", "-S", "2", "-M", "4"]
    assert main([*args, "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["schedule"] == "interleaved-1f1b"
    # 4 x (1 + 2) ms plus (S - 1)(1 + 2)/V ms
    assert data["step_time"] == pytest.approx(0.0135)
    assert main(["simulate", "--schedule", "interleaved-1f1b", "-S", "4", "-M", "6"]) == 2
    assert "multiple of the stages" in capsys.readouterr().err
