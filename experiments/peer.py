"""The peer, torch.distributed.pipelining, run as a rank job; its timelines as StepReports."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from adaptive_pp.core.schedules import virtual_stage
from experiments.common import timed_steps

# (kind, micro-batch, start, end, model chunk) of one action of torch's, on one rank.
Record = tuple[str, int, float, float, int]


def torch_pipeline_walls(
    sub: Any,
    schedule: str,
    microbatches: int,
    optimizer: Any,
    x: Any,
    y: Any,
    steps: int,
    before_step: Any = None,
    timeline: list[list[Record]] | None = None,
) -> list[float]:
    """Rank job body: ``steps`` timed steps of torch.distributed.pipelining on this rank's ``sub``.

    The peer we compare against: PipelineStage + Schedule1F1B / ScheduleGPipe /
    ScheduleInterleavedZeroBubble (``"zb-h1"``, one stage per rank: torch's ZB1P) /
    ScheduleInterleaved1F1B (``"interleaved-1f1b"``: ``sub`` is then the list of this rank's
    model chunks, chunk c holding virtual stage ``c * S + rank`` as ours does) /
    ScheduleZBVZeroBubble (``"zb-v"``: ``sub`` the rank's 2 chunks, virtual stages ``rank``
    and ``2S - 1 - rank``, V placement as ours; the loss on rank 0) with shapes
    inferred on the first step, MSE loss, then ``optimizer``, timed by ``timed_steps`` (the
    schedule's step and the optimizer's); ``before_step(k)`` runs untimed. Under ``"zb-h1"``
    and ``"zb-v"`` torch's input- and weight-gradient passes are marked like ours
    (``splitgrad.phase``), so the emulated kernels split their backward time the same way for
    both runtimes.
    ``timeline``, if given, gets per step this rank's (kind, micro-batch, start, end) of every
    forward and backward chunk, seconds from the step's start, and its model chunk (the timing
    wraps the stage instances' chunk methods; the schedule's sends and receives fall between
    actions).
    """
    import torch.distributed as dist
    from torch.distributed.pipelining import (
        PipelineStage,
        Schedule1F1B,
        ScheduleGPipe,
        ScheduleInterleaved1F1B,
        ScheduleInterleavedZeroBubble,
        ScheduleZBVZeroBubble,
    )

    rank, stages = dist.get_rank(), dist.get_world_size()
    if schedule == "zb-h1":
        # torch's input-gradient pass detaches the stage output in place, which fails on a
        # view (an emulated layer's output is one): end the stage on a copy (microseconds).
        sub = nn.Sequential(*sub, _Copy())
    sched: Any
    held: list[Any]  # this rank's PipelineStages, in chunk order
    if schedule == "interleaved-1f1b":
        chunks = list(sub)
        virtual = len(chunks) * stages
        held = [
            PipelineStage(mod, virtual_stage(rank, c, stages), virtual, torch.device("cpu"))
            for c, mod in enumerate(chunks)
        ]
        sched = ScheduleInterleaved1F1B(held, microbatches, loss_fn=nn.functional.mse_loss)
    elif schedule == "zb-v":
        virtual = 2 * stages
        held = [
            PipelineStage(
                nn.Sequential(*mod, _Copy()),
                virtual_stage(rank, c, stages, "v"),
                virtual,
                torch.device("cpu"),
            )
            for c, mod in enumerate(sub)
        ]
        for st in held:
            _mark_split_backward(st)
        sched = ScheduleZBVZeroBubble(held, microbatches, loss_fn=nn.functional.mse_loss)
    else:
        held = [PipelineStage(sub, rank, stages, torch.device("cpu"))]
        if schedule == "zb-h1":
            _mark_split_backward(held[0])
            sched = ScheduleInterleavedZeroBubble(
                held, microbatches, loss_fn=nn.functional.mse_loss
            )
        else:
            cls = Schedule1F1B if schedule == "1f1b" else ScheduleGPipe
            sched = cls(held[0], microbatches, loss_fn=nn.functional.mse_loss)
    records: list[Record] = []
    if timeline is not None:
        for c, st in enumerate(held):
            _time_chunks(st, records, c)
    return _timed_walls(
        sched, optimizer, x, y, steps, before_step, timeline, records, v_shape=schedule == "zb-v"
    )


def torch_step(
    sched: Any, optimizer: Any, x: Any, y: Any, rank: int, stages: int, v_shape: bool = False
) -> None:
    """One step of a torch.distributed.pipelining schedule on this rank (the first stage feeds
    ``x``, the last ``y``: both rank 0's under V placement, ``v_shape``), then the optimizer."""
    if rank == 0 and v_shape:
        sched.step(x, target=y, losses=[])
    elif rank == 0:
        sched.step(x)
    elif rank == stages - 1:
        sched.step(target=y, losses=[])
    else:
        sched.step()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def _timed_walls(
    sched: Any,
    optimizer: Any,
    x: Any,
    y: Any,
    steps: int,
    before_step: Any,
    timeline: list[list[Record]] | None,
    records: list[Record],
    v_shape: bool = False,
) -> list[float]:
    """``steps`` timed steps of ``sched`` then ``optimizer``; per step, ``records`` (filled by
    the chunk methods' timing) moved to ``timeline`` with times from the step's start."""
    import torch.distributed as dist

    rank, stages = dist.get_rank(), dist.get_world_size()
    per_step: list[list[Record]] = []

    def prepare(k: int) -> None:
        if before_step is not None:
            before_step(k)
        records.clear()

    def step(_: int) -> None:
        torch_step(sched, optimizer, x, y, rank, stages, v_shape)

    restore = _time_posts(records) if timeline is not None else None
    try:
        timed = timed_steps(
            step, steps, before_step=prepare, after_step=lambda k, _: per_step.append(list(records))
        )
    finally:
        if restore is not None:
            restore()
    if timeline is not None:
        timeline += [
            [(kind, m, a - t0, b - t0, c) for kind, m, a, b, c in recs]
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


def _time_posts(records: list[Record]) -> Callable[[], None]:
    """Record, as kind "P", each time torch's schedules post a batch of sends and receives
    (their ``_batch_p2p``; the waits are not included); return what undoes the wrapping.

    Torch posts its sends between actions, ours inside them: per-action overhead compares
    like with like only with this posting time added to torch's actions (``posting_ms``).
    """
    from torch.distributed.pipelining import schedules

    post = schedules._batch_p2p

    def timed(*args: Any, **kwargs: Any) -> Any:
        t = time.perf_counter()
        out = post(*args, **kwargs)
        records.append(("P", -1, t, time.perf_counter(), 0))
        return out

    schedules._batch_p2p = timed

    def restore() -> None:
        schedules._batch_p2p = post

    return restore


def posting_ms(ranks: Sequence[dict[str, Any]]) -> float:
    """Torch's posting time per action (ms): per rank and step past the warm-up, the time
    spent posting sends and receives over the actions run, median over them (nan if none)."""
    per: list[float] = []
    for r in ranks:
        for recs in r.get("timeline", [])[1:]:
            posts = sum(rec[3] - rec[2] for rec in recs if rec[0] == "P")
            actions = sum(rec[0] != "P" for rec in recs)
            if actions:
                per.append(1e3 * posts / actions)
    return statistics.median(per) if per else float("nan")


def _time_chunks(stage: Any, records: list[Record], chunk: int = 0) -> None:
    """Wrap ``stage``'s forward / backward (I when split) / weight-gradient chunk methods to
    record their start and end (``chunk``: the rank's model chunk ``stage`` runs)."""

    def timed(kind: str, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            t = time.perf_counter()
            out = fn(*args, **kwargs)
            mb = args[0] if args else kwargs[name]
            split = kind == "B" and not kwargs.get("full_backward", True)
            records.append(("I" if split else kind, int(mb), t, time.perf_counter(), chunk))
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
    per_rank: Sequence[Sequence[Sequence[Any]]],
    schedule: str,
    microbatches: int,
    step: int = 0,
) -> Any:
    """A StepReport from every rank's (kind, micro-batch, start, end[, chunk]) of one step (a
    peer's run).

    Only what a timeline gives: compute per stage, wall = the last action's end, no queue traces
    (``adaptive_pp.analysis`` then takes arrival = the producer's end).
    """
    from adaptive_pp.core.report import StageStats, StepReport, Timeline
    from adaptive_pp.core.schedules import Action

    per_rank = [[rec for rec in recs if rec[0] != "P"] for recs in per_rank]  # posting: apart
    end = max(rec[3] for recs in per_rank for rec in recs)
    stages = tuple(
        StageStats(s, sum(rec[3] - rec[2] for rec in recs), 0.0, end, 0)
        for s, recs in enumerate(per_rank)
    )
    timeline = Timeline(
        tuple(
            tuple(Action(s, rec[0], rec[1], rec[4] if len(rec) > 4 else 0) for rec in recs)
            for s, recs in enumerate(per_rank)
        ),
        tuple(tuple(rec[2] for rec in recs) for recs in per_rank),
        tuple(tuple(rec[3] for rec in recs) for recs in per_rank),
    )
    return StepReport(step, schedule, microbatches, end, stages, timeline=timeline, source="peer")
