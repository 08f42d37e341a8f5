"""Matplotlib figures of step reports: pipeline Gantt chart, queue depth, bubble and U per step.

matplotlib is the optional extra ``plot`` (``pip install 'adaptive-pp[plot]'``); it is imported
on first use. Figures are drawn on the Agg canvas without pyplot, so nothing global (backend,
open-figure list) changes in the caller's process.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..core.analysis import waits
from ..core.report import StepReport
from .chrome_trace import load_run, step_offsets, write_chrome_trace

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

_COLOUR = {"F": "tab:blue", "B": "tab:orange", "I": "tab:orange", "W": "tab:green", "wait": "0.85"}
_LABEL_LIMIT = 128  # write micro-batch numbers into the bars up to this many actions


class PlotDependencyError(ImportError):
    """matplotlib is not installed."""


def _figure(width: float, height: float) -> Figure:
    """A new figure on an Agg canvas; PlotDependencyError if matplotlib is missing."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise PlotDependencyError(
            f"plots need matplotlib ({exc}); install it with: pip install 'adaptive-pp[plot]'"
        ) from exc
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def save_figure(fig: Figure, path: str | Path, dpi: int = 110) -> Path:
    """Write ``fig`` as a PNG (creating parent folders); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi, format="png")
    return path


def _title(r: StepReport) -> str:
    return (
        f"step {r.step}: {r.schedule}, {r.num_stages} stages x {r.microbatches} micro-batches "
        f"({r.source}), {r.step_time * 1e3:.2f} ms, bubble {r.bubble_fraction:.1%}"
    )


def timeline_figure(report: StepReport) -> Figure:
    """Gantt chart of one step: a row per stage, F and B bars, hatched waits on late inputs."""
    from matplotlib.patches import Patch

    stages = len(report.timeline.actions)
    fig = _figure(max(8.0, min(20.0, 0.12 * len(report.timeline))), 1.4 + 0.55 * stages)
    ax = fig.add_subplot()
    blocked = waits(report)
    label = len(report.timeline) <= _LABEL_LIMIT
    has_w = any(t.kind == "W" for t in report.timeline)
    for s in range(stages):
        for kind in ("F", "B", "I", "W"):
            acts = [t for t in report.timeline.stage(s) if t.kind == kind]
            bars = [(t.start * 1e3, (t.end - t.start) * 1e3) for t in acts]
            ax.broken_barh(bars, (s - 0.4, 0.8), facecolors=_COLOUR[kind], gid=kind)
            for t in acts if label else ():
                mid = (t.start + t.end) / 2 * 1e3
                ax.text(mid, s, str(t.microbatch), ha="center", va="center", fontsize=7)
        bars = [(w.start * 1e3, (w.end - w.start) * 1e3) for w in blocked if w.stage == s]
        ax.broken_barh(bars, (s - 0.25, 0.5), facecolors=_COLOUR["wait"], hatch="///", gid="wait")
    ax.set_yticks(range(stages), [f"stage {s}" for s in range(stages)])
    ax.set_ylim(stages - 0.5, -0.5)
    ax.set_xlim(0, max(report.step_time, 1e-12) * 1e3)
    ax.set_xlabel("time in step (ms)")
    ax.set_title(_title(report), fontsize=10)
    handles = [
        Patch(facecolor=_COLOUR["F"], label="forward (F)"),
        Patch(facecolor=_COLOUR["B"], label="backward (B, or input gradient I)"),
        *[Patch(facecolor=_COLOUR["W"], label="weight gradient (W)")] * has_w,
        Patch(facecolor=_COLOUR["wait"], hatch="///", label="wait (input late)"),
    ]
    fig.legend(handles=handles, loc="outside lower center", ncols=len(handles))
    return fig


def _mark_decisions(ax: Axes, xs: Sequence[float], labels: Sequence[str] | None = None) -> None:
    """A dotted vertical line per decision (gid "decision"), labelled when ``labels`` are given."""
    for i, x in enumerate(xs):
        ax.axvline(x, color="k", linestyle=":", linewidth=1, gid="decision")
        if labels is not None:
            ax.annotate(
                labels[i],
                (x, 1.0),
                xycoords=("data", "axes fraction"),
                xytext=(2, -2),
                textcoords="offset points",
                rotation=90,
                va="top",
                fontsize=7,
            )


def _decision_label(r: StepReport, width: int = 34) -> str:
    text = "; ".join(r.events)
    return text if len(text) <= width else text[: width - 3] + "..."


def queue_depth_figure(reports: Sequence[StepReport]) -> Figure:
    """Messages waiting on each link over the steps (laid end to end): a panel per receiver."""
    offsets = step_offsets(reports)
    links = sorted({(q.dst, q.kind, q.src) for r in reports for q in r.queues})
    receivers = sorted({dst for dst, _, _ in links})
    fig = _figure(10.0, 1.2 + 1.3 * max(1, len(receivers)))
    axes = fig.subplots(max(1, len(receivers)), 1, sharex=True, squeeze=False)[:, 0]
    # a decision sits at the boundary just before the step whose report lists it
    decided = [
        (off - float(r.extra.get("change", 0.0))) * 1e3
        for r, off in zip(reports, offsets, strict=True)
        if r.events
    ]
    for ax, dst in zip(axes, receivers, strict=False):
        for _, kind, src in (link for link in links if link[0] == dst):
            xs: list[float] = []
            ys: list[int] = []
            for r, off in zip(reports, offsets, strict=True):
                for q in r.queues:
                    if (q.dst, q.kind, q.src) == (dst, kind, src):
                        series = [(0.0, 0), *q.depth_series()]
                        xs += [(off + t) * 1e3 for t, _ in series]
                        ys += [d for _, d in series]
            ax.step(xs, ys, where="post", label=f"{kind} from stage {src}", gid="queue")
        ax.set_ylabel(f"stage {dst}")
        ax.yaxis.get_major_locator().set_params(integer=True)
        ax.legend(loc="upper right", fontsize=7)
        _mark_decisions(ax, decided)
    axes[-1].set_xlabel("time (ms), steps end to end")
    first, last = (reports[0].step, reports[-1].step) if reports else (0, 0)
    axes[0].set_title(
        f"messages queued per link (arrived, not yet consumed), steps {first}..{last}",
        fontsize=10,
    )
    return fig


def steps_figure(reports: Sequence[StepReport]) -> Figure:
    """Step time, bubble and per-stage U over the steps; decisions marked and labelled."""
    fig = _figure(10.0, 7.0)
    ax_t, ax_b, ax_u = fig.subplots(3, 1, sharex=True)
    steps = [r.step for r in reports]
    ax_t.plot(steps, [_span_ms(r) for r in reports], marker=".", gid="step_time")
    ax_t.set_ylabel("step wall (ms)")
    ax_b.plot(steps, [100 * r.bubble_fraction for r in reports], marker=".", gid="bubble")
    ax_b.set_ylabel("bubble (%)")
    num_stages = max((r.num_stages for r in reports), default=0)
    for s in range(num_stages):
        u = [100 * r.utilization[s] if s < r.num_stages else math.nan for r in reports]
        ax_u.plot(steps, u, marker=".", label=f"stage {s}", gid=f"U{s}")
    ax_u.set_ylabel("U = compute / wall (%)")
    ax_u.set_xlabel("step")
    ax_u.xaxis.get_major_locator().set_params(integer=True)
    if num_stages:
        ax_u.legend(loc="best", fontsize=8, ncols=min(num_stages, 4))
    marked = [r for r in reports if r.events]
    for ax in (ax_t, ax_b, ax_u):
        _mark_decisions(
            ax,
            [r.step - 0.5 for r in marked],
            [_decision_label(r) for r in marked] if ax is ax_t else None,
        )
    ax_t.set_title(
        f"{len(reports)} steps, decisions dotted (before the step they changed)", fontsize=10
    )
    return fig


def _span_ms(r: StepReport) -> float:
    return float(r.extra.get("wall", r.step_time)) * 1e3


def decision_lines(fig: Figure) -> list[Any]:
    """The decision markers drawn on a figure's first axes (for tests and callers)."""
    return [ln for ln in fig.axes[0].get_lines() if ln.get_gid() == "decision"]


def plot_run(
    run_dir: str | Path,
    out_dir: str | Path | None = None,
    *,
    step: int | None = None,
    queue_steps: int = 3,
) -> list[Path]:
    """Write the run's PNGs and trace.json into ``out_dir`` (default: the run dir); return paths.

    timeline-stepN.png shows the last step (or ``step``), queue-depth.png the ``queue_steps``
    steps ending there, steps.png every step; a RunDirError names a missing or bad run.
    """
    reports = load_run(run_dir)
    src = Path(run_dir)
    out = Path(out_dir) if out_dir is not None else (src if src.is_dir() else src.parent)
    if step is None:
        chosen = reports[-1]
    else:
        found = [r for r in reports if r.step == step]
        if not found:
            raise ValueError(f"{src}: no step {step} (steps {reports[0].step}..{reports[-1].step})")
        chosen = found[-1]
    last = next(i for i, r in enumerate(reports) if r is chosen)
    window = reports[max(0, last + 1 - queue_steps) : last + 1]
    figures = [
        (f"timeline-step{chosen.step}.png", timeline_figure(chosen)),
        ("queue-depth.png", queue_depth_figure(window)),
        ("steps.png", steps_figure(reports)),
    ]
    paths = [save_figure(fig, out / name) for name, fig in figures]
    paths.append(write_chrome_trace(out / "trace.json", reports))
    return paths
