"""The demo: an emulated-kernel MLP trained on local stage processes with adaptivity on, while one
stage's device slows down mid-run; rank 0 narrates each step, the decisions and their reasons,
and compares the pipeline before and after."""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..core.report import StepReport
from ..observability.logs import configure_logging
from ..observability.otel import setup_otlp
from ..observability.progress import Progress
from ..runtime.config import PipelineConfig
from ..runtime.pipeline import Pipeline
from .kernels import EmulatedLayer, emulated_mlp

LAYERS, WIDTH, BATCH = 16, 32, 64
# Per layer and micro-batch: launch + per_sample x samples (so M changes are real trade-offs).
LAUNCH_S, PER_SAMPLE_S = 0.2e-3, 0.1e-3


@dataclass(frozen=True)
class Observe:
    """How each demo rank reports beyond stdout: logs, OTLP export, a run directory."""

    log_format: str = "console"
    log_level: str = "warning"
    otlp_endpoint: str | None = None
    run_dir: str | None = None


@dataclass(frozen=True)
class Slowdown:
    """From step ``at`` on, stage ``stage``'s device runs ``factor`` x slower (emulated: every
    layer it holds, now or after a move, sleeps ``factor`` x longer)."""

    stage: int = 2
    factor: float = 2.0
    at: int = 8


def train_rank(
    steps: int,
    microbatches: int,
    schedule: str,
    observe: Observe | None = None,
    slow: Slowdown | None = None,
) -> float:
    """Rank job: regression on a 16-layer emulated MLP with ``adaptive=True``; rank 0 narrates.

    With an OTLP endpoint, what was recorded is exported on the way out, error or not (the
    rank's process may leave by ``os._exit``, which skips the SDK's own flush at exit).
    """
    observe = observe or Observe()
    configure_logging(observe.log_format, observe.log_level)
    rank = int(os.environ.get("RANK", 0))
    otel = setup_otlp(observe.otlp_endpoint, attributes={"adaptive_pp.rank": rank})
    with otel if otel is not None else contextlib.nullcontext():
        loss = _train(steps, microbatches, schedule, observe, telemetry=otel is not None, slow=slow)
    if otel is not None and rank == 0:
        print(f"exported spans and metrics to {otel.endpoint}", flush=True)
    return loss


def _slow_device(pipe: Pipeline, slow: Slowdown | None, step: int) -> None:
    """Every layer this rank holds runs at its device's speed for ``step``."""
    slowed = slow is not None and pipe.stage == slow.stage and step >= slow.at
    for mod in pipe.local_modules().values():
        if isinstance(mod, EmulatedLayer):
            mod.slowdown = slow.factor if slow is not None and slowed else 1.0


def _train(
    steps: int,
    microbatches: int,
    schedule: str,
    observe: Observe,
    *,
    telemetry: bool,
    slow: Slowdown | None = None,
) -> float:
    torch.manual_seed(0)
    model = emulated_mlp(LAYERS, WIDTH, LAUNCH_S, per_sample_s=PER_SAMPLE_S)
    true_w = torch.randn(WIDTH, WIDTH) / WIDTH**0.5
    cfg = PipelineConfig(
        microbatches=microbatches,
        schedule=schedule,
        adaptive=True,
        telemetry=telemetry,
        run_dir=observe.run_dir,
    )
    g = torch.Generator().manual_seed(1)
    reports: list[StepReport] = []
    with Pipeline(
        model, nn.functional.mse_loss, lambda p: torch.optim.Adam(p, lr=1e-3), cfg
    ) as pipe:
        say = pipe.stage == 0
        if say:
            _intro(pipe, slow)
        progress = Progress(steps, sys.stdout, live=False) if say else None
        out = None
        for k in range(steps):
            if say and slow is not None and k == slow.at:
                print(
                    f">>> from step {k + 1} on, stage {slow.stage}'s device is {slow.factor:g}x "
                    f"slower (EMULATED: the layers it holds sleep {slow.factor:g}x longer)",
                    flush=True,
                )
            _slow_device(pipe, slow, k)
            x = torch.randn(BATCH, WIDTH, generator=g)
            out = pipe.step(x, torch.tanh(x @ true_w))
            reports.append(out.report)
            if progress is not None:
                progress.update(out)
        if say:
            print("\n".join(before_after(reports, slow)), flush=True)
    return out.loss if out is not None else float("nan")


def _intro(pipe: Pipeline, slow: Slowdown | None) -> None:
    print(
        f"training a {LAYERS}-layer MLP on {pipe.num_stages} stage processes, partition "
        f"{pipe.partition}, M={pipe.microbatches}, {pipe.plan.schedule}, "
        "PipelineConfig(adaptive=True)\n"
        "EMULATED kernels: each layer is a real Linear+tanh plus a sleep standing for "
        f"accelerator time ({LAUNCH_S * 1e3:g} ms + {PER_SAMPLE_S * 1e3:g} ms per sample "
        "forward, 2.4x that backward)",
        flush=True,
    )
    if slow is not None:
        print(f"stage {slow.stage} will slow down {slow.factor:g}x at step {slow.at + 1}\n")


def _row(label: str, r: StepReport) -> str:
    util = " ".join(f"{u:4.0%}" for u in r.utilization)
    depth = max((q.max_depth for q in r.queues), default=0)
    wall = float(r.extra.get("wall", r.step_time))
    bounds = ",".join(map(str, r.partition))
    return (
        f"{label:16} {r.step + 1:4d} {wall * 1e3:8.1f} {r.bubble_fraction:7.1%}  {util:20}"
        f" {depth:5d}  {bounds:18} {r.microbatches:3d}  {r.schedule}"
    )


def typical(reports: Sequence[StepReport]) -> StepReport:
    """The step of median wall time among ``reports`` (one real step, not an average)."""
    ranked = sorted(reports, key=lambda r: float(r.extra.get("wall", r.step_time)))
    return ranked[(len(ranked) - 1) // 2]


def before_after(reports: Sequence[StepReport], slow: Slowdown | None, tail: int = 3) -> list[str]:
    """The pipeline before the slowdown, slowed on the old plan, and at the end (each the
    median step of its stretch, up to ``tail`` steps on the same plan); then every change the
    controller made, with its reason."""
    if not reports:
        return []
    lines = [
        "",
        f"before and after (EMULATED kernels; each row the median step of up to {tail} on one "
        "plan; queue = most messages waiting on one link):",
        f"{'':16} step  time ms  bubble  U per stage          queue  partition          M"
        "  schedule",
    ]
    changed = [k for k, r in enumerate(reports) if r.events]  # step k ran a new plan
    at = slow.at if slow is not None and slow.at < len(reports) else None

    def stretch(start: int, stop: int) -> list[StepReport]:
        """Steps in [start, stop) since the last change in it, the last ``tail`` of them."""
        start = max([start, *(k for k in changed if start <= k < stop)])
        return list(reports[max(start, stop - tail) : stop])

    if at is not None and at > 0:
        lines.append(_row("before slowdown", typical(stretch(0, at))))
    if at is not None:
        first = next((k for k in changed if k > at), len(reports))
        lines.append(_row("slowed, as was", typical(reports[at : min(first, at + tail)])))
    lines.append(_row("end", typical(stretch(0, len(reports)))))
    changes = [(k, e) for k in changed for e in reports[k].events]
    lines.append("")
    lines.append("decisions (applied before the step named):" if changes else "no decisions")
    lines += [f"  step {k + 1}: {e}" for k, e in changes]
    return lines


def written(run_dir: str, paths: Sequence[Path]) -> list[str]:
    """Where the run's files are, for the user to open."""
    lines = [f"run directory: {run_dir} (reports.jsonl: one StepReport per step)"]
    for p in paths:
        what = "Chrome trace (chrome://tracing or ui.perfetto.dev)" if p.suffix == ".json" else ""
        lines.append(f"  {p}" + (f"  {what}" if what else ""))
    return lines
