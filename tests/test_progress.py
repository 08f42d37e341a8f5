"""Tests for adaptive_pp.progress: a line per step off a TTY, one rewritten line on a TTY."""

from __future__ import annotations

import io
import os
import re
from dataclasses import replace
from typing import NamedTuple

import pytest
from report_cases import simulated_run

from adaptive_pp.core.report import StepReport
from adaptive_pp.observability.progress import Progress, status_line


class Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


class Output(NamedTuple):
    """Shaped like Pipeline.step's StepOutput."""

    loss: float
    report: StepReport


@pytest.fixture
def no_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CI", raising=False)


def test_status_line_fields() -> None:
    r = simulated_run(3, steps=5)[4]  # M 4 -> 8 and a refusal at step 4
    line = status_line(r, 5, 10)
    u = r.utilization
    assert line.startswith("step 5/10  loss 0.2  ")
    assert f"{r.extra['wall'] * 1e3:.1f} ms" in line
    assert f"bubble {r.bubble_fraction:.1%}" in line
    assert f"U min {min(u):.0%} mean {sum(u) / len(u):.0%}" in line
    assert f"queue max {max(q.max_depth for q in r.queues)}" in line
    assert "M=8" in line
    assert line.endswith(
        "| set micro-batches 4 -> 8; refused move 9 layer(s) 0->1: would leave stage 0 empty"
    )
    assert "loss -" in status_line(replace(r, loss=None), 1, None)
    assert status_line(r, 3, None).startswith("step 3  ")
    assert status_line(r, 3, 9, eta=125.0).startswith("step 3/9 (eta 2m05s)  ")
    assert status_line(r, 3, 9, eta=2.34).startswith("step 3/9 (eta 2.3s)  ")
    assert status_line(r, 3, 9, eta=7500.0).startswith("step 3/9 (eta 2h05m)  ")


def test_one_line_per_step_when_not_a_tty(no_ci: None) -> None:
    reports = simulated_run(3, steps=4)
    out = io.StringIO()
    with Progress(len(reports), out) as progress:
        assert not progress.live
        for r in reports:
            progress.update(r)
    text = out.getvalue()
    assert "\r" not in text
    lines = text.splitlines()
    assert len(lines) == 4
    for i, line in enumerate(lines, 1):
        assert re.match(rf"step {i}/4( \(eta \S+\))?  loss \S+  [\d.]+ ms  bubble [\d.]+%", line)
    assert "(eta " in lines[0] and "(eta " not in lines[-1]
    assert lines[2].endswith(
        "| moved layers 4-4 from stage 2 to stage 1 (1088 bytes, 0.5 ms); partition 0-3 | 4-5"
    )


def test_in_place_line_on_a_tty(no_ci: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("shutil.get_terminal_size", lambda fallback: os.terminal_size((60, 24)))
    reports = simulated_run(3, steps=4)
    out = Tty()
    progress = Progress(4, out)
    assert progress.live
    for r in reports:
        progress.update(Output(0.125, replace(r, loss=None)))
    before_close = out.getvalue()
    progress.close()
    progress.close()  # idempotent
    text = out.getvalue()
    assert text == before_close + "\n"
    frames = before_close.split("\r")[1:]
    # one frame per step plus one permanent line for the step with events (step 3)
    assert len(frames) == 5
    permanent = [f for f in frames if f.endswith("\n")]
    assert [f.strip() for f in permanent] == [
        "step 3: moved layers 4-4 from stage 2 to stage 1 (1088 bytes, 0.5 ms); partition 0-3 | 4-5"
    ]
    status = [f for f in frames if not f.endswith("\n")]
    assert len(status) == 4
    assert all(len(f.rstrip()) <= 59 for f in status)  # clipped to the terminal width
    assert all(re.match(r"step [1-4]/4.*  loss 0\.125  ", f) for f in status)
    # a shorter frame is padded to blank out the longer one before it
    for a, b in zip(status, status[1:]):
        assert len(b) >= len(a.rstrip())


def test_ci_or_explicit_live_overrides_the_tty(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CI", "true")
    assert not Progress(3, Tty()).live
    monkeypatch.delenv("CI")
    assert Progress(3, Tty()).live
    assert not Progress(3, Tty(), live=False).live
    assert Progress(3, io.StringIO(), live=True).live


def test_default_stream_is_stderr(capsys: pytest.CaptureFixture[str], no_ci: None) -> None:
    Progress(None).update(simulated_run(2, steps=1)[0])
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.startswith("step 1  loss 1  ")
