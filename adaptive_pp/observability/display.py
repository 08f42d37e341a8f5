"""Text rendering of step reports: summary tables and ASCII pipeline timelines."""

from __future__ import annotations

from ..core.report import StepReport
from ..core.simulator import bubble_approx, bubble_exact


def bubble_lines(report: StepReport) -> list[str]:
    """The bubble three ways, each labelled: measured/simulated, exact formula, approximation."""
    s, m = report.num_stages, report.microbatches
    label = f"bubble ({report.source}):"
    measured = f"{label:32}{report.bubble_fraction:7.2%}   idle / (stages x wall)"
    if report.schedule not in ("1f1b", "gpipe"):
        return [measured]  # the formulas below are theirs (others': tests/test_schedules_zb.py)
    return [
        measured,
        f"bubble exact (S-1)/(M+S-1):     {bubble_exact(s, m):7.2%}   = {s - 1}/{m + s - 1}",
        f"bubble approx (S-1)/M:          {bubble_approx(s, m):7.2%}   = {s - 1}/{m}"
        + ("   (upper bound)" if s > 1 else ""),
    ]


def stage_table(report: StepReport) -> list[str]:
    """One row per stage: compute, wait, idle, utilization, peak stash."""
    rows = ["stage   compute ms   wait ms   idle ms      U    peak stash"]
    for st in report.stages:
        rows.append(
            f"{st.stage:5d}  {st.compute * 1e3:11.3f}  {st.wait * 1e3:8.3f}  {st.idle * 1e3:8.3f}"
            f"  {st.utilization:6.1%}  {st.peak_stash:11d}"
        )
    return rows


def summary(report: StepReport) -> str:
    """Step time, bubble (labelled three ways) and the per-stage table."""
    head = (
        f"schedule {report.schedule}   stages {report.num_stages}   "
        f"micro-batches {report.microbatches}   ({report.source})"
    )
    lines = [head, f"step time:                      {report.step_time * 1e3:10.3f} ms"]
    lines += bubble_lines(report)
    lines += stage_table(report)
    return "\n".join(lines)


_BACKWARD = "abcdefghij"
LEGEND = (
    "digit d: forward of a micro-batch m with m % 10 == d; letter: its backward (a=0 .. j=9;"
    " its input gradient under zero-bubble schedules), capital: its weight gradient"
)


def timeline(report: StepReport, width: int = 100) -> str:
    """ASCII Gantt chart, one row per stage; ``.`` is idle time (see LEGEND)."""
    if report.step_time <= 0:
        return "(empty timeline)"
    scale = width / report.step_time
    rows = []
    for s in range(len(report.timeline.actions)):
        cells = ["."] * width
        for t in report.timeline.stage(s):
            mark = str(t.microbatch % 10) if t.kind == "F" else _BACKWARD[t.microbatch % 10]
            mark = mark.upper() if t.kind == "W" else mark
            a = round(t.start * scale)
            for i in range(a, min(max(round(t.end * scale), a + 1), width)):
                cells[i] = mark
        rows.append(f"stage {s:2d} |{''.join(cells)}|")
    rows.append(f"          0 ms{report.step_time * 1e3:{width - 3}.2f} ms")
    rows.append(LEGEND)
    return "\n".join(rows)
