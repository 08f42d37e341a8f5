"""PipeDream-2BW as plain data: 1F1B without a flush between steps.

The stream of micro-batches never drains: on rank s (warm-up ``w = lead x (S - 1 - s)``) the
infinite 1F1B order is F(g + w), B(g) for g = 0, 1, ... A step is a *window* of it holding the
M forwards of that step's micro-batches: F(i) and B(i - w) for i = 0..M-1, where a negative id
``i - w`` is the previous step's micro-batch ``i - w + M`` (its backward spills into this step).
The first window after a start or a drain has no spill (its first w backwards are skipped, as in
1F1B's warm-up); ``drain`` runs the spilled backwards of the last window and nothing else.

Weights (Narayanan et al., "Memory-Efficient Pipeline-Parallel DNN Training", 2021): every
micro-batch of step t runs forward and backward on version W(t-1), and once a rank has every
backward of step t, it makes W(t+1) = W(t) - update(sum of step t's gradients), with W(-1) =
W(0). A rank holds two versions at once: the one its in-flight micro-batches use and the newest.

``lead``: how many forwards each rank runs ahead of the next one. 1 is PipeDream-2BW's order,
the fewest activations in flight (S - s on rank s). In its steady state every message is
awaited the moment it is sent, so each hop's latency adds to the period (1.5 hops per
micro-batch at S = 4). With ``lead = 2`` a message has one action's time to arrive before it
is needed and the period is the compute alone, for about twice the activations in flight
(2(S - 1 - s) + 1); it needs M >= 2(S - 1). The update rule, and so every number trained, is
the same for any lead: only the order of independent work changes.

``unrolled`` is the same stream over several steps with global micro-batch ids: exactly 1F1B
over steps x M micro-batches, which the validator and the simulator already handle (a window's
steady-state time is read off its timeline).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from .actions import Action, Schedule
from .report import StageStats, StepReport, Timeline
from .schedules import one_f_one_b

if TYPE_CHECKING:
    from .simulator import Costs

NAME = "2bw"


def check_lead(lead: object) -> None:
    """ValueError unless ``lead`` is an int >= 1 (not a bool)."""
    if isinstance(lead, bool) or not isinstance(lead, int) or lead < 1:
        raise ValueError(f"{NAME}'s lead must be an int >= 1, got {lead!r}")


def check(num_stages: int, microbatches: int, lead: int = 1) -> None:
    """ValueError unless every spilled backward lands in the very next step (M >= lead x
    (S - 1)), the condition for the one-step delay of W(t+1) = W(t) - update(grad at W(t-1))."""
    check_lead(lead)
    if num_stages < 1 or microbatches < max(1, lead * (num_stages - 1)):
        need = "S - 1" if lead == 1 else f"{lead} x (S - 1) (lead {lead})"
        raise ValueError(
            f"{NAME} needs M >= {need} micro-batches (so that every backward of a step runs in "
            f"that step or the next), got S={num_stages}, M={microbatches}"
        )


def warmup(num_stages: int, microbatches: int, stage: int, lead: int = 1) -> int:
    """Forwards rank ``stage`` runs ahead of its backwards (and backwards it spills)."""
    check(num_stages, microbatches, lead)
    return lead * (num_stages - 1 - stage)


def lead_of(schedule: Schedule) -> int:
    """The lead of a 2BW window (``window(..., spill=True)`` per rank): rank 0 spills
    lead x (S - 1) backwards, read off its first backward's id."""
    if schedule.num_stages < 2:
        return 1
    first = next(a.microbatch for a in schedule.stages[0] if a.kind == "B")
    return -first // (schedule.num_stages - 1)


def window(
    num_stages: int, microbatches: int, stage: int, *, spill: bool, lead: int = 1
) -> tuple[Action, ...]:
    """Rank ``stage``'s actions in one step; ``spill``: the previous step's backwards are due."""
    w = warmup(num_stages, microbatches, stage, lead)
    out: list[Action] = []
    for i in range(microbatches):
        out.append(Action(stage, "F", i))
        if spill or i >= w:
            out.append(Action(stage, "B", i - w))
    return tuple(out)


def drain(num_stages: int, microbatches: int, stage: int, lead: int = 1) -> tuple[Action, ...]:
    """The backwards the last window left, by their ids in the step after it."""
    w = warmup(num_stages, microbatches, stage, lead)
    return tuple(Action(stage, "B", i) for i in range(-w, 0))


def unrolled(num_stages: int, microbatches: int, steps: int, lead: int = 1) -> Schedule:
    """``steps`` windows and the drain, with global micro-batch ids (step k's i is k*M + i)."""
    warmups = [warmup(num_stages, microbatches, s, lead) for s in range(num_stages)]
    flat = one_f_one_b(num_stages, steps * microbatches, warmups)
    return Schedule(flat.stages, flat.microbatches, f"{NAME} x {steps}")


def simulate_window(schedule: Schedule, costs: Costs, *, step: int = 0) -> StepReport:
    """A steady-state step of the stream: the fourth of five windows simulated back to back
    (costs repeat per step; the first windows fill the stream, which at the smallest M takes a
    whole window: rank 0's warm-up is as long as it), its actions by their ids in the window
    and its times from its first start. Step time and every stage's wall: the longest span of
    one rank's window (the period at which steps follow each other); compute: the window's
    action times."""
    from .simulator import Costs as CostsType
    from .simulator import simulate

    num, m, lead = schedule.num_stages, schedule.microbatches, lead_of(schedule)
    steps, k = 5, 3  # windows simulated, the one reported

    def tiled(table: tuple[tuple[float, ...], ...]) -> tuple[tuple[float, ...], ...]:
        return tuple(row * steps for row in table)

    run = simulate(
        unrolled(num, m, steps, lead),
        CostsType(
            tiled(costs.tau_f),
            tiled(costs.tau_b),
            costs.tau_c,
            None if costs.tau_w is None else tiled(costs.tau_w),
            costs.tau_wrap,
        ),
        step=step,
    )
    firsts = [2 * k * m - warmup(num, m, s, lead) for s in range(num)]  # window k's start
    starts = [run.timeline.start[s][a : a + 2 * m] for s, a in enumerate(firsts)]
    ends = [run.timeline.end[s][a : a + 2 * m] for s, a in enumerate(firsts)]
    t0 = min(st[0] for st in starts)
    span = max(en[-1] - st[0] for st, en in zip(starts, ends, strict=True))  # the period
    stages = tuple(
        StageStats(
            stage=s,
            compute=math.fsum(e - b for b, e in zip(starts[s], ends[s], strict=True)),
            wait=0.0,
            wall=span,
            peak_stash=warmup(num, m, s, lead) + 1,
        )
        for s in range(num)
    )
    timeline = Timeline(
        schedule.stages,
        tuple(tuple(t - t0 for t in st) for st in starts),
        tuple(tuple(t - t0 for t in en) for en in ends),
    )
    return StepReport(step, NAME, m, span, stages, (), timeline, source="simulator")
