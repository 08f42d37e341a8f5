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

from .actions import (
    ALL_KINDS,
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
    virtual_stage,
)
from .flow import Compiled, Replay, compile_schedule, peak_stash, replay, validate
from .zerobubble import interleaved_1f1b, zb_h1

__all__ = [
    "ALL_KINDS",
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
]


def gpipe(num_stages: int, microbatches: int) -> Schedule:
    """GPipe: every stage runs all forwards, then all backwards (in micro-batch order)."""
    _check_sizes(num_stages, microbatches)
    kinds = "F" * microbatches + "B" * microbatches
    mbs = [*range(microbatches), *range(microbatches)]
    return Schedule(
        tuple(_actions(s, kinds, mbs) for s in range(num_stages)), microbatches, "gpipe"
    )


def _one_f_one_b_order(warmup: int, microbatches: int) -> tuple[str, list[int]]:
    """Kinds and micro-batch ids of 1F1B with ``warmup`` leading forwards."""
    pairs = microbatches - warmup
    body = [0] * (2 * pairs)
    body[0::2] = range(warmup, microbatches)
    body[1::2] = range(pairs)
    kinds = "F" * warmup + "FB" * pairs + "B" * warmup
    return kinds, [*range(warmup), *body, *range(pairs, microbatches)]


def one_f_one_b(num_stages: int, microbatches: int) -> Schedule:
    """Non-interleaved 1F1B: min(S-s-1, M) warm-up forwards, then alternate F and B, then drain."""
    _check_sizes(num_stages, microbatches)
    stages = []
    for s in range(num_stages):
        kinds, mbs = _one_f_one_b_order(min(num_stages - s - 1, microbatches), microbatches)
        stages.append(_actions(s, kinds, mbs))
    return Schedule(tuple(stages), microbatches, "1f1b")


def make_schedule(name: str, num_stages: int, microbatches: int, chunks: int = 2) -> Schedule:
    """Build a schedule by name (see SIMULATED_SCHEDULE_NAMES); ``chunks`` is V of interleaved.

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
    raise ValueError(
        f"unknown schedule {name!r}; choose one of {', '.join(SIMULATED_SCHEDULE_NAMES)}"
    )
