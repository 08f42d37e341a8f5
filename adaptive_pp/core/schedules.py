"""Pipeline schedules as plain data: actions per rank, generators, text form and validator.

The types and their text form live in ``actions``, the validator and the replay in ``flow``,
the chunked and split-backward generators in ``zerobubble``; this module gathers them and
holds GPipe, 1F1B and ``make_schedule``. See ``actions`` for the rules.

Clock table of 1F1B for S=3, M=4 (one column per unit of time, forward and backward one unit
each)::

    stage 0: F0 F1 F2 .. .. B0 F3 B1 .. B2 .. B3
    stage 1: .. F0 F1 .. B0 F2 B1 F3 B2 .. B3 ..
    stage 2: .. .. F0 B0 F1 B1 F2 B2 F3 B3 .. ..

GPipe runs every forward first, then every backward, so stage s stashes all M activations;
1F1B stashes at most ``min(S - s, M)``.
"""

from __future__ import annotations

from functools import partial

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
    Kind,
    Placement,
    Schedule,
    ScheduleError,
    _actions,
    _check_sizes,
    _gc_paused,
    virtual_stage,
)
from .flow import (
    _NONE,
    Compiled,
    Flat,
    Replay,
    compile_schedule,
    hand_over,
    peak_stash,
    replay,
    validate,
)
from .zbv import zb_v
from .zerobubble import interleaved_1f1b, zb_h1

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
    mbs = [*range(microbatches), *range(microbatches)]
    stages = tuple(_actions(s, kinds, mbs) for s in range(num_stages))
    sched = Schedule(stages, microbatches, "gpipe")
    return hand_over(
        sched, partial(_flat_1f1b, num_stages, microbatches, [microbatches] * num_stages)
    )


def _one_f_one_b_order(warmup: int, microbatches: int) -> tuple[str, list[int]]:
    """Kinds and micro-batch ids of 1F1B with ``warmup`` leading forwards."""
    pairs = microbatches - warmup
    body = [0] * (2 * pairs)
    body[0::2] = range(warmup, microbatches)
    body[1::2] = range(pairs)
    kinds = "F" * warmup + "FB" * pairs + "B" * warmup
    return kinds, [*range(warmup), *body, *range(pairs, microbatches)]


@_gc_paused
def one_f_one_b(num_stages: int, microbatches: int) -> Schedule:
    """Non-interleaved 1F1B: min(S-s-1, M) warm-up forwards, then alternate F and B, then drain."""
    _check_sizes(num_stages, microbatches)
    stages, warmups = [], [min(num_stages - s - 1, microbatches) for s in range(num_stages)]
    for s in range(num_stages):
        kinds, mbs = _one_f_one_b_order(warmups[s], microbatches)
        stages.append(_actions(s, kinds, mbs))
    sched = Schedule(tuple(stages), microbatches, "1f1b")
    return hand_over(sched, partial(_flat_1f1b, num_stages, microbatches, warmups))


def _flat_1f1b(num_stages: int, m: int, warmups: list[int]) -> Flat:
    """compile_schedule's columns for ranks running ``warmups[s]`` forwards, then F and B in
    turn, then the remaining B (1F1B; GPipe: warm-up M), built from ranges."""
    need: list[int] = []
    out: list[int] = []
    link: list[int] = []
    offsets, peaks, groups, grad0 = [0], [], {}, num_stages * m
    for s, w in enumerate(warmups):
        first, last, base, p = s == 0, s == num_stages - 1, offsets[-1], m - w
        need += _turns(
            _NONE if first else (s - 1) * m, _NONE if last else grad0 + (s + 1) * m, w, m
        )
        out += _turns(s * m, grad0 + s * m, w, m)
        link += [-1 if first else s - 1] * w + [-1 if first else s - 1, -1 if last else s] * p
        link += [-1 if last else s] * w
        if not first:
            groups[s - 1, s, "act"] = [
                *range(base, base + w),
                *range(base + w, base + w + 2 * p, 2),
            ]
        if not last:
            back = range(base + w + 1, base + w + 2 * p, 2)
            groups[s + 1, s, "grad"] = [*back, *range(base + w + 2 * p, base + 2 * m)]
        peaks.append(w + 1 if p else w)
        offsets.append(base + 2 * m)
    return need, out, list(out), link, offsets, peaks, groups  # one chunk, F and B: key = out


def _turns(f0: int, b0: int, w: int, m: int) -> list[int]:
    """``f0 + mb`` for the forwards and ``b0 + mb`` for the backwards, in 1F1B order."""
    body = [0] * (2 * (m - w))
    body[0::2] = range(f0 + w, f0 + m)
    body[1::2] = range(b0, b0 + m - w)
    return [*range(f0, f0 + w), *body, *range(b0 + m - w, b0 + m)]


def make_schedule(name: str, num_stages: int, microbatches: int, chunks: int = 2) -> Schedule:
    """Build a schedule by name (see SIMULATED_SCHEDULE_NAMES); ``chunks`` is V of interleaved
    (zb-v always has 2 chunks per rank).

    Only SCHEDULE_NAMES run on the runtime today; the others are for validation and simulation.
    """
    key = name.lower().replace("-", "").replace("_", "")
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

        stages = tuple(window(num_stages, microbatches, s, spill=True) for s in range(num_stages))
        return Schedule(stages, microbatches, NAME)
    raise ValueError(
        f"unknown schedule {name!r}; choose one of {', '.join(SIMULATED_SCHEDULE_NAMES)}"
    )
