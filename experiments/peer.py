"""The peer, torch.distributed.pipelining, run as a rank job; its timelines as StepReports."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from experiments.common import timed_steps


def torch_pipeline_walls(
    sub: Any,
    schedule: str,
    microbatches: int,
    optimizer: Any,
    x: Any,
    y: Any,
    steps: int,
    before_step: Any = None,
    timeline: list[list[tuple[str, int, float, float]]] | None = None,
) -> list[float]:
    """Rank job body: ``steps`` timed steps of torch.distributed.pipelining on this rank's ``sub``.

    The peer we compare against: PipelineStage + Schedule1F1B / ScheduleGPipe /
    ScheduleInterleavedZeroBubble (``"zb-h1"``, one stage per rank: torch's ZB1P) with shapes
    inferred on the first step, MSE loss, then ``optimizer``, timed by ``timed_steps`` (the
    schedule's step and the optimizer's); ``before_step(k)`` runs untimed. Under ``"zb-h1"``
    torch's input- and weight-gradient passes are marked like ours (``splitgrad.phase``), so
    the emulated kernels split their backward time the same way for both runtimes.
    ``timeline``, if given, gets per step this rank's (kind, micro-batch, start, end) of every
    forward and backward chunk, seconds from the step's start (the timing wraps the stage
    instance's chunk methods; the schedule's sends and receives fall between actions).
    """
    import torch.distributed as dist
    from torch.distributed.pipelining import (
        PipelineStage,
        Schedule1F1B,
        ScheduleGPipe,
        ScheduleInterleavedZeroBubble,
    )

    rank, stages = dist.get_rank(), dist.get_world_size()
    if schedule == "zb-h1":
        # torch's input-gradient pass detaches the stage output in place, which fails on a
        # view (an emulated layer's output is one): end the stage on a copy (microseconds).
        sub = nn.Sequential(*sub, _Copy())
    stage = PipelineStage(sub, rank, stages, torch.device("cpu"))
    sched: Any
    if schedule == "zb-h1":
        _mark_split_backward(stage)
        sched = ScheduleInterleavedZeroBubble([stage], microbatches, loss_fn=nn.functional.mse_loss)
    else:
        cls = Schedule1F1B if schedule == "1f1b" else ScheduleGPipe
        sched = cls(stage, microbatches, loss_fn=nn.functional.mse_loss)
    records: list[tuple[str, int, float, float]] = []
    per_step: list[list[tuple[str, int, float, float]]] = []
    if timeline is not None:
        _time_chunks(stage, records)

    def prepare(k: int) -> None:
        if before_step is not None:
            before_step(k)
        records.clear()

    def step(_: int) -> None:
        if rank == 0:
            sched.step(x)
        elif rank == stages - 1:
            sched.step(target=y, losses=[])
        else:
            sched.step()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    timed = timed_steps(
        step, steps, before_step=prepare, after_step=lambda k, _: per_step.append(list(records))
    )
    if timeline is not None:
        timeline += [
            [(kind, m, a - t0, b - t0) for kind, m, a, b in recs]
            for recs, t0 in zip(per_step, timed.starts, strict=True)
        ]
    return timed.walls


class _Copy(nn.Module):
    """Identity that returns a copy, not a view."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.clone()


def _mark_split_backward(stage: Any) -> None:
    """Run torch's input-gradient and weight-gradient passes under our phase marks."""
    from adaptive_pp.runtime.splitgrad import phase

    backward, weight = stage.backward_one_chunk, stage.backward_weight_one_chunk

    def input_pass(*args: Any, **kwargs: Any) -> Any:
        if kwargs.get("full_backward", True):
            return backward(*args, **kwargs)
        with phase("I"):
            return backward(*args, **kwargs)

    def weight_pass(*args: Any, **kwargs: Any) -> Any:
        with phase("W"):
            return weight(*args, **kwargs)

    stage.backward_one_chunk, stage.backward_weight_one_chunk = input_pass, weight_pass


def _time_chunks(stage: Any, records: list[tuple[str, int, float, float]]) -> None:
    """Wrap ``stage``'s forward / backward (I when split) / weight-gradient chunk methods to
    record their start and end."""

    def timed(kind: str, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            t = time.perf_counter()
            out = fn(*args, **kwargs)
            chunk = args[0] if args else kwargs[name]
            split = kind == "B" and not kwargs.get("full_backward", True)
            records.append(("I" if split else kind, int(chunk), t, time.perf_counter()))
            return out

        return wrapper

    stage.forward_one_chunk = timed("F", "fwd_chunk_id", stage.forward_one_chunk)
    stage.backward_one_chunk = timed("B", "bwd_chunk_id", stage.backward_one_chunk)
    stage.backward_weight_one_chunk = timed("W", "bwd_chunk_id", stage.backward_weight_one_chunk)


def run_reports(ranks: Sequence[dict[str, Any]], schedule: str, microbatches: int) -> list[Any]:
    """The StepReports of one benchmark run past its warm-up step: rank 0's ``reports`` (ours)
    or, from every rank's ``timeline`` (torch's, see ``torch_pipeline_walls``), one per step."""
    from adaptive_pp.core.report import StepReport

    if "timeline" not in ranks[0]:
        return [StepReport.from_dict(d) for d in ranks[0]["reports"][1:]]
    steps = len(ranks[0]["timeline"])
    return [
        timeline_report([r["timeline"][k] for r in ranks], schedule, microbatches, k)
        for k in range(1, steps)
    ]


def timeline_report(
    per_rank: Sequence[Sequence[tuple[str, int, float, float]]],
    schedule: str,
    microbatches: int,
    step: int = 0,
) -> Any:
    """A StepReport from every rank's (kind, micro-batch, start, end) of one step (a peer's run).

    Only what a timeline gives: compute per stage, wall = the last action's end, no queue traces
    (``adaptive_pp.analysis`` then takes arrival = the producer's end).
    """
    from adaptive_pp.core.report import StageStats, StepReport, Timeline
    from adaptive_pp.core.schedules import Action

    end = max(b for recs in per_rank for _, _, _, b in recs)
    stages = tuple(
        StageStats(s, sum(b - a for _, _, a, b in recs), 0.0, end, 0)
        for s, recs in enumerate(per_rank)
    )
    timeline = Timeline(
        tuple(tuple(Action(s, k, m) for k, m, _, _ in recs) for s, recs in enumerate(per_rank)),  # type: ignore[arg-type]
        tuple(tuple(a for _, _, a, _ in recs) for recs in per_rank),
        tuple(tuple(b for _, _, _, b in recs) for recs in per_rank),
    )
    return StepReport(step, schedule, microbatches, end, stages, timeline=timeline, source="peer")
