"""Pipeline schedules as plain data: actions per rank, generators, text form and validator.

The types and their text form live in ``actions``, the checks in ``compiled``, the run plans in
``plans``, the replay and validate in ``flow`` (the event replay and deadlocks in
``eventreplay``), the chunked and split-backward generators in ``zerobubble``; this module
gathers them and holds GPipe, 1F1B and ``make_schedule``. See ``actions`` for the rules.

Clock table of 1F1B for S=3, M=4 (one column per unit of time, forward and backward one unit
each)::

    stage 0: F0 F1 F2 .. .. B0 F3 B1 .. B2 .. B3
    stage 1: .. F0 F1 .. B0 F2 B1 F3 B2 .. B3 ..
    stage 2: .. .. F0 B0 F1 B1 F2 B2 F3 B3 .. ..

GPipe runs every forward first, then every backward, so stage s stashes all M activations;
1F1B stashes at most ``min(S - s, M)``.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from functools import partial

import numpy as np

from .actions import (
    ALL_KINDS,
    ASYNC_SCHEDULES,
    CHUNKED_SCHEDULES,
    KINDS,
    PLACEMENTS,
    SCHEDULE_NAMES,
    SIMULATED_SCHEDULE_NAMES,
    SPLIT_BACKWARD_SCHEDULES,
    SPLIT_KINDS,
    Action,
    Ints,
    Kind,
    Placement,
    Rows,
    Schedule,
    ScheduleError,
    _check_sizes,
    _gc_paused,
    virtual_stage,
)
from .compiled import Compiled, compile_schedule, hand_over, peak_stash
from .flow import Replay, replay, validate
from .plans import _chained, _planned
from .zbv import zb_v
from .zerobubble import _steady, _steady_array, interleaved_1f1b, zb_h1

__all__ = [
    "ALL_KINDS",
    "ASYNC_SCHEDULES",
    "CHUNKED_SCHEDULES",
    "KINDS",
    "PLACEMENTS",
    "SCHEDULE_NAMES",
    "SIMULATED_SCHEDULE_NAMES",
    "SPLIT_BACKWARD_SCHEDULES",
    "SPLIT_KINDS",
    "Action",
    "Compiled",
    "Kind",
    "Placement",
    "Replay",
    "Schedule",
    "ScheduleError",
    "compile_schedule",
    "gpipe",
    "interleaved_1f1b",
    "make_schedule",
    "one_f_one_b",
    "peak_stash",
    "replay",
    "validate",
    "virtual_stage",
    "zb_h1",
    "zb_v",
]


@_gc_paused
def gpipe(num_stages: int, microbatches: int) -> Schedule:
    """GPipe: every stage runs all forwards, then all backwards (in micro-batch order)."""
    _check_sizes(num_stages, microbatches)
    kinds = "F" * microbatches + "B" * microbatches
    mbs = np.tile(np.arange(microbatches), 2)  # shared by every rank's list
    rows = Rows((kinds,) * num_stages, (mbs,) * num_stages, rowwise=False)  # rows all serial
    sched = Schedule.generated(rows, microbatches, "gpipe")
    return hand_over(
        sched, partial(_plan_1f1b, num_stages, microbatches, [microbatches] * num_stages)
    )


def _one_f_one_b_order(warmup: int, ids: Ints) -> tuple[str, Ints]:
    """Kinds and micro-batch ids of 1F1B with ``warmup`` leading forwards (``ids``: the M ids,
    shared by every rank's list)."""
    pairs = len(ids) - warmup
    return "F" * warmup + "FB" * pairs + "B" * warmup, _steady_array(ids, ids, warmup, pairs)


@_gc_paused
def one_f_one_b(
    num_stages: int, microbatches: int, warmups: Sequence[int] | None = None
) -> Schedule:
    """Non-interleaved 1F1B: min(S-s-1, M) warm-up forwards (or ``warmups[s]``, at most M and
    each below the one before unless both are M: the plan's order needs that), then alternate
    F and B, then drain."""
    _check_sizes(num_stages, microbatches)
    if warmups is None:
        warmups = [min(num_stages - s - 1, microbatches) for s in range(num_stages)]
    elif len(warmups) != num_stages or not all(
        0 <= b < a or b == a == microbatches
        for a, b in itertools.pairwise([microbatches + 1, *warmups])
    ):
        raise ValueError(
            f"1F1B warm-ups must be at most M={microbatches} and fall down the ranks: "
            f"{list(warmups)}"
        )
    ids = np.arange(microbatches)
    kinds, mbs = zip(*(_one_f_one_b_order(w, ids) for w in warmups), strict=True)
    sched = Schedule.generated(Rows(kinds, mbs), microbatches, "1f1b")
    return hand_over(sched, partial(_plan_1f1b, num_stages, microbatches, list(warmups)))


def _plan_1f1b(num_stages: int, m: int, warmups: list[int]) -> Compiled:
    """The compiled form (a run plan, see plans) of ranks running ``warmups[s]`` forwards, then
    F and B in turn, then the remaining B (1F1B; GPipe: warm-up M), built from ranges."""
    fpos, bpos, links, keys, peaks = [], [], [], [], []
    table = list(range(2 * m))  # a rank's costs: F then B, M each
    for s, w in enumerate(warmups):
        p = m - w
        fpos.append((range(w), range(w, w + 2 * p, 2)))
        bpos.append((range(w + 1, w + 2 * p, 2), range(w + 2 * p, 2 * m)))
        fwd, back = s - 1 if s else num_stages, s if s < num_stages - 1 else num_stages  # S: none
        links.append([fwd] * w + [fwd, back] * p + [back] * w)
        keys.append(_steady(table[:m], table[m:], w, p))
        peaks.append(w + 1 if p else w)
    split = warmups[0] + 1 if warmups[0] < m else m  # where rank 0 runs its first B
    streams, queues = _chained(num_stages, fpos, bpos)
    return _planned(num_stages, split, 2 * m, streams, queues, links, keys, peaks, False)


def make_schedule(
    name: str, num_stages: int, microbatches: int, chunks: int = 2, *, lead: int = 1
) -> Schedule:
    """Build a schedule by name (see SIMULATED_SCHEDULE_NAMES); ``chunks`` is V of interleaved
    (zb-v always has 2 chunks per rank); ``lead``: 2BW's forwards each rank runs ahead of the
    next (see core.twobw; 1 for every other schedule).

    Only SCHEDULE_NAMES run on the runtime today; the others are for validation and simulation.
    """
    key = name.lower().replace("-", "").replace("_", "")
    if lead != 1 and key != "2bw":
        raise ValueError(f"lead={lead} is for 2bw only (the schedule is {name})")
    if key == "1f1b":
        return one_f_one_b(num_stages, microbatches)
    if key == "gpipe":
        return gpipe(num_stages, microbatches)
    if key == "interleaved1f1b":
        return interleaved_1f1b(num_stages, microbatches, chunks)
    if key == "zbh1":
        return zb_h1(num_stages, microbatches)
    if key == "zbv":  # always 2 chunks per rank, V placement (core.zbv)
        return zb_v(num_stages, microbatches)
    if key == "2bw":  # one step's window of the unflushed stream (core.twobw)
        from .twobw import NAME, window

        stages = tuple(
            window(num_stages, microbatches, s, spill=True, lead=lead) for s in range(num_stages)
        )
        return Schedule(stages, microbatches, NAME)
    raise ValueError(
        f"unknown schedule {name!r}; choose one of {', '.join(SIMULATED_SCHEDULE_NAMES)}"
    )
