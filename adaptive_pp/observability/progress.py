"""A live status line for long runs: a line per step in logs and CI, one updating line on a TTY."""

from __future__ import annotations

import os
import shutil
import sys
import time
from typing import Protocol, TextIO

from ..core.report import StepReport


class _HasReport(Protocol):
    """What ``Pipeline.step`` returns (``StepOutput``): a loss and a report."""

    @property
    def loss(self) -> float: ...

    @property
    def report(self) -> StepReport: ...


def _duration(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds < 10:
        return f"{seconds:.1f}s"
    if seconds < 60:
        return f"{seconds:.0f}s"
    minutes, secs = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


def status_line(
    report: StepReport,
    index: int,
    total: int | None,
    loss: float | None = None,
    eta: float | None = None,
) -> str:
    """``step i/N  loss  step ms  bubble %  U min/mean  queue max``, then the report's events."""
    loss = report.loss if loss is None else loss
    util = report.utilization
    u_min = min(util, default=0.0)
    u_mean = sum(util) / len(util) if util else 0.0
    wall = float(report.extra.get("wall", report.step_time))
    depth = max((q.max_depth for q in report.queues), default=0)
    count = f"{index}/{total}" if total else str(index)
    if eta is not None:
        count += f" (eta {_duration(eta)})"
    parts = [
        f"step {count}",
        f"loss {loss:.4g}" if loss is not None else "loss -",
        f"{wall * 1e3:.1f} ms",
        f"bubble {report.bubble_fraction:.1%}",
        f"U min {u_min:.0%} mean {u_mean:.0%}",
        f"queue max {depth}",
        f"M={report.microbatches}",
    ]
    if report.events:
        parts.append("| " + "; ".join(report.events))
    return "  ".join(parts)


class Progress:
    """Prints a status line per step; rewrites it in place (``\\r``) when the stream is a TTY.

    In place needs a terminal and no ``CI`` variable (``live`` forces either way). On a TTY,
    steps with events (migrations, M changes, refusals) also leave a permanent line.
    """

    def __init__(
        self, total_steps: int | None, stream: TextIO | None = None, *, live: bool | None = None
    ) -> None:
        self.total = total_steps
        self.stream = stream if stream is not None else sys.stderr
        if live is None:
            isatty = getattr(self.stream, "isatty", None)
            live = bool(isatty and isatty()) and not os.environ.get("CI")
        self.live = live
        self.count = 0
        self._shown = 0  # width of the line now on screen (live mode)
        self._t0 = time.monotonic()
        self._closed = False

    def update(self, item: StepReport | _HasReport) -> str:
        """Show one finished step (a StepReport or Pipeline.step's output); returns the line."""
        if isinstance(item, StepReport):
            report, loss = item, item.loss
        else:
            report, loss = item.report, item.loss
        self.count += 1
        eta = None
        if self.total and self.count < self.total:
            eta = (time.monotonic() - self._t0) / self.count * (self.total - self.count)
        line = status_line(report, self.count, self.total, loss, eta)
        if not self.live:
            self.stream.write(line + "\n")
        else:
            if report.events:
                self._rewrite(f"step {self.count}: " + "; ".join(report.events), end="\n")
            self._rewrite(line)
        self.stream.flush()
        return line

    def _rewrite(self, text: str, end: str = "") -> None:
        """Replace the line on screen; the status line (no ``end``) is clipped so it never wraps."""
        width = shutil.get_terminal_size((100, 24)).columns - 1
        if not end and len(text) > width:
            text = text[: width - 3] + "..."
        self.stream.write("\r" + text.ljust(self._shown) + end)
        self._shown = 0 if end else len(text)

    def close(self) -> None:
        """End the in-place line (live mode) so later output starts on a fresh line."""
        if self._closed:
            return
        self._closed = True
        if self.live and self._shown:
            self.stream.write("\n")
            self.stream.flush()
            self._shown = 0

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
