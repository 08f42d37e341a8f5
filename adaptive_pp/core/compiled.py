"""Checking schedules: the flat form, compile_schedule and the compiled form (Compiled).

See ``adaptive_pp.core.actions`` for the dependency rules checked here. compile_schedule checks
each rank's list and builds the flat form (``Columns``) the replay reads; a generator's schedule
skips the checks and hands over its run plan instead (``hand_over``; the plans themselves are
built in ``plans``, replayed in ``flow``). peak_stash gives each rank's most stashed activations.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from itertools import accumulate
from operator import add, itemgetter
from typing import Any

from .actions import (
    _PLACEMENT_OF,
    Action,
    Kind,
    Schedule,
    ScheduleError,
    _check_sizes,
    _gc_paused,
    _ordered_positions,
    _placements,
    _unit_positions,
    _unit_positions_slow,
    virtual_stage,
)

# --- the flat form --------------------------------------------------------------------------------
#
# Flat form: the actions of all ranks in one list (rank s owns offsets[s]:offsets[s+1]). Each
# action waits on one *slot* and fills one. With VS virtual stages, M micro-batches, A = VS*M:
#   [0, A)            activation of (virtual stage v, micro-batch m) at v*M + m
#   [A, 2A)           its input gradient (from B or I) at A + v*M + m
#   [2A, 2A + M)      "no input" (the gradient after the last virtual stage), ready at -1.0
#   [2A + M, 3A + M)  W's, at 2A + M + v*M + m (nobody waits on them)
#   [3A + M, 3A + 2M) "no input" (the activation before the first virtual stage), ready at -1.0
# So F needs (v-1)*M + m (for v = 0 negative: Python's index from the end lands in the last
# block), B and I need A + (v+1)*M + m, W needs 2A + m. An action without input "arrives" at
# -1.0, before any rank is free (times are >= 0), so it never waits; Replay.arrived says -1.0.

_KIND_INDEX = {"F": 0, "B": 1, "I": 2, "W": 3}
_STASH = {"F": 1, "B": -1, "I": 0, "W": -1}
_NO_INPUT = -1.0


def _slot_count(vs_count: int, m_count: int) -> int:
    """Number of slots of the flat form (see above)."""
    return 3 * vs_count * m_count + 2 * m_count


def _ready(vs_count: int, m_count: int) -> list[float | None]:
    """Slots before the replay: the "no input" blocks ready at -1.0, the others empty."""
    a = vs_count * m_count
    blank = [_NO_INPUT] * m_count
    return [*[None] * (2 * a), *blank, *[None] * a, *blank]


Pick = Callable[[Sequence[float]], tuple[float, ...]]
Feed = Callable[[Sequence[float]], Iterable[float]]
Row = Callable[[Sequence[float]], Sequence[float]]  # reads a rank's costs from its table


def _getter(indices: Sequence[int]) -> Pick:
    """``itemgetter(*indices)``, a tuple even for one index (itemgetter of one is not)."""
    if len(indices) == 1:
        one = indices[0]
        return lambda xs: (xs[one],)
    return itemgetter(*indices)


@dataclass(frozen=True)
class Columns:
    """The flat form, one entry per action (see above)."""

    need: list[int]  # slot each action waits on
    out: list[int]  # slot each action fills
    key: list[int]  # cost index ((kind * S) + rank) * M + m, kinds F B I W (see flow._flat_costs)
    link: list[int]  # link its input crosses: h = ranks h,h+1; S-1 = wrap; -1 = same rank/none
    producer: list[int]  # per slot, the rank whose action fills it (-1: none)
    stride: int  # S * M: key // stride is the kind
    consumers: tuple[list[int], ...]  # per queue (Compiled.queues), the actions taking its messages


@dataclass(frozen=True)
class Plan:
    """The actions in run order (see ``plans``), as the replay loop reads them.

    The j-th action waits on the ``(j + back[j])``-th (``back[j] = -j - 1``, or ``link[j]``
    = S: on nothing), its input crosses link ``link[j]``, it runs on rank ``ranks[j]``. Its
    cost: ``keys`` picks them in run order from _flat_costs' tables, or (a generator's plan)
    ``cost_rows[s]`` picks rank s's, in its order, from that rank's own table (F, then B or I,
    then W, M each). Per queue (Compiled.queues): ``consumers`` picks its consumers' starts
    from the destination rank's starts, ``producers`` its producers' ends (in order, maybe as
    an iterator) from the source rank's ends, ``links`` the link they cross, ``pairs`` those
    ranks.
    """

    split: int  # columns before it run ranks ascending, the others descending
    length: int  # actions per rank (every rank runs as many)
    back: Sequence[int]  # producer's run position minus the action's (< 0)
    link: Sequence[int]
    ranks: Sequence[int]
    consumers: tuple[Pick, ...]
    producers: tuple[Feed, ...]
    links: tuple[int, ...]
    pairs: tuple[tuple[int, int], ...]  # per queue, its source and destination rank
    keys: Pick | None = None
    cost_rows: Sequence[Row] = ()


@dataclass(frozen=True)
class Compiled:
    """A checked schedule: the stash peak per rank, where each rank's actions start in the flat
    order (``offsets``), the message queues (source, destination, act or grad; in report order),
    whether a backward is split, and how to replay it: the flat form (``columns``; None for a
    generator's schedule) and the run plan (``plan``; for the flat form built on first use, when
    one exists)."""

    peak: tuple[int, ...]
    offsets: tuple[int, ...]
    queues: tuple[tuple[int, int, str], ...]
    split: bool
    columns: Columns | None = None
    plan: Plan | None = None
    _memo: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)


_HINTS: dict[int, tuple[weakref.ref[Schedule], Callable[[], Compiled]]] = {}


def hand_over(schedule: Schedule, build: Callable[[], Compiled]) -> Schedule:
    """Let a generator give ``schedule``'s compiled form (``build()``, on demand: a run plan,
    valid by construction), skipping the checks."""
    key = id(schedule)
    _HINTS[key] = (weakref.ref(schedule, lambda _: _HINTS.pop(key, None)), build)
    return schedule


def handed_over(schedule: Schedule) -> bool:
    """Whether a generator handed over ``schedule``'s run plan (see hand_over)."""
    hint = _HINTS.get(id(schedule))
    return hint is not None and hint[0]() is schedule


def _link(a: int, b: int, num_stages: int) -> int:
    if a == b:
        return -1
    if abs(a - b) == 1:
        return min(a, b)
    return num_stages - 1  # the wrap-around link S-1 <-> 0 of interleaved placement


def _check_rank(s: int, acts: Sequence[Action], m_count: int, chunks: int) -> None:
    """Find and raise the first fault of rank ``s``'s list, in execution order (slow path)."""
    seen: dict[tuple[str, int, int], int] = {}
    for a in acts:
        if a.stage != s:
            raise ScheduleError(f"stage {s}: action {a} belongs to stage {a.stage}", s, a)
        if a.kind not in _KIND_INDEX:
            raise ScheduleError(f"stage {s}: action {a} has unknown kind {a.kind!r}", s, a)
        if not 0 <= a.microbatch < m_count:
            raise ScheduleError(
                f"stage {s}: action {a} names micro-batch {a.microbatch}, outside 0..{m_count - 1}",
                s,
                a,
            )
        if not 0 <= a.chunk < chunks:
            raise ScheduleError(
                f"stage {s}: action {a} names chunk {a.chunk}, but ranks hold chunks "
                f"0..{chunks - 1}",
                s,
                a,
            )
        m, c = a.microbatch, a.chunk
        if (a.kind, m, c) in seen:
            raise ScheduleError(f"stage {s}: action {a} appears twice", s, a)
        fwd = Action(s, "F", m, c)
        if a.kind in "BI" and ("F", m, c) not in seen:
            raise ScheduleError(f"stage {s}: backward {a} comes before its forward {fwd}", s, a)
        other: Kind = "I" if a.kind == "B" else "B"
        if a.kind in "BI" and (other, m, c) in seen:
            raise ScheduleError(
                f"stage {s}: action {a} repeats the backward {Action(s, other, m, c)}: "
                "a micro-batch takes either B or both I and W",
                s,
                a,
            )
        if a.kind == "W" and ("I", m, c) not in seen:
            why = "instead of B" if ("B", m, c) in seen else "before its input gradient"
            raise ScheduleError(
                f"stage {s}: weight gradient {a} comes {why} {Action(s, 'I', m, c)}", s, a
            )
        seen[(a.kind, m, c)] = 1
    for c in range(chunks):
        for m in range(m_count):
            for kind, present in (("F", True), ("B", ("I", m, c) not in seen)):
                if present and (kind, m, c) not in seen:
                    missing = Action(s, kind, m, c)  # type: ignore[arg-type]
                    raise ScheduleError(f"stage {s}: action {missing} is missing", s, missing)
            if ("I", m, c) in seen and ("W", m, c) not in seen:
                missing = Action(s, "W", m, c)
                raise ScheduleError(f"stage {s}: action {missing} is missing", s, missing)


def compile_schedule(schedule: Schedule, max_stash: int | Sequence[int] | None = None) -> Compiled:
    """Check each rank's list (every F once, then B or I and W once, per chunk and micro-batch;
    W after its I; chunks in range); return the compiled form. ``max_stash`` bounds the peak."""
    hint = _HINTS.get(id(schedule))
    if hint is not None and hint[0]() is schedule:
        code = _gc_paused(hint[1])()  # a generator's schedule: valid as built
    else:
        code = _compile(schedule)
    if max_stash is not None:
        num_stages = schedule.num_stages
        bound = [max_stash] * num_stages if isinstance(max_stash, int) else list(max_stash)
        for s, (p, b) in enumerate(zip(code.peak, bound, strict=True)):
            if p > b:
                worst = _peak_action(schedule.stages[s])
                raise ScheduleError(
                    f"stage {s}: stashes {p} activations at {worst}, over the bound {b}", s, worst
                )
    return code


@_gc_paused
def _compile(schedule: Schedule) -> Compiled:
    """Check every rank's list and build the flat form (see compile_schedule)."""
    num_stages, m_count, chunks = schedule.num_stages, schedule.microbatches, schedule.chunks
    _check_sizes(num_stages, m_count, chunks)
    if schedule.placement not in _PLACEMENT_OF:
        raise ValueError(f"unknown placement {schedule.placement!r}; choose loop or v")
    vs_count, units = num_stages * chunks, chunks * m_count
    acts = vs_count * m_count  # slots of each kind (see the flat form)
    where = _placements(num_stages, chunks, schedule.placement)
    producer = [-1] * _slot_count(vs_count, m_count)
    need: list[int] = []
    out: list[int] = []
    key: list[int] = []
    link: list[int] = []
    offsets, peaks = [0], []
    groups: dict[tuple[int, int, str], list[int]] = {}
    split = False
    stride = num_stages * m_count
    for s, acts_s in enumerate(schedule.stages):
        base = offsets[-1]
        ranks, kinds, mbs, chs = zip(*acts_s, strict=True) if acts_s else ((), (), (), ())
        unit_ids = mbs if chunks == 1 else [c * m_count + m for c, m in zip(chs, mbs, strict=True)]
        # Fast path (one chunk): _ordered_positions also checks the micro-batch ids.
        ok = chunks == 1 and ranks.count(s) == len(acts_s) == chs.count(0)
        found = _ordered_positions(kinds, unit_ids, units) if ok else None
        if found is None:
            ok = (
                len(acts_s) >= 2 * units
                and ranks.count(s) == len(acts_s)
                and 0 <= min(chs) <= max(chs) < chunks
                and 0 <= min(mbs) <= max(mbs) < m_count
            )
            found = _ordered_positions(kinds, unit_ids, units) if ok and chunks > 1 else None
        if found is None and ok:
            found = _unit_positions(acts_s, kinds, unit_ids, units)
        if found is None:
            _check_rank(s, acts_s, m_count, chunks)  # raises unless valid but irregular
            found = _unit_positions_slow(kinds, unit_ids, units)
        split = split or "I" in kinds
        # Per (kind, chunk): input slot base, output slot base, cost base, link.
        table: dict[tuple[str, int], tuple[int, int, int, int]] = {}
        for c in range(chunks):
            v = virtual_stage(s, c, num_stages, schedule.placement)
            up = where[v - 1][0] if v > 0 else s
            down = where[v + 1][0] if v + 1 < vs_count else s
            cost = s * m_count
            table["F", c] = ((v - 1) * m_count, v * m_count, cost, _link(up, s, num_stages))
            back_in, back_link = acts + (v + 1) * m_count, _link(down, s, num_stages)
            table["B", c] = (back_in, acts + v * m_count, stride + cost, back_link)
            table["I", c] = (back_in, acts + v * m_count, 2 * stride + cost, back_link)
            table["W", c] = (2 * acts, 2 * acts + (v + 1) * m_count, 3 * stride + cost, -1)
            for kind, src, positions in (("act", up, found[0]), ("grad", down, found[1])):
                if src != s:
                    lo = c * m_count
                    groups.setdefault((src, s, kind), []).extend(
                        map(base.__add__, positions[lo : lo + m_count])
                    )
        if chunks == 1:
            cols = [{k: table[k, 0][col] for k in "FBIW"} for col in range(4)]
            need.extend(map(add, map(cols[0].__getitem__, kinds), mbs))
            out.extend(map(add, map(cols[1].__getitem__, kinds), mbs))
            if all(cols[2][k] == cols[1][k] for k in set(kinds)):  # F and B: key = out
                key.extend(out[base:])
            else:
                key.extend(map(add, map(cols[2].__getitem__, kinds), mbs))
            link.extend(map(cols[3].__getitem__, kinds))
        else:
            rows = list(map(table.__getitem__, zip(kinds, chs, strict=True)))
            for col, dest in ((0, need), (1, out), (2, key)):
                dest.extend(map(add, map(itemgetter(col), rows), mbs))
            link.extend(map(itemgetter(3), rows))
        peaks.append(max(accumulate(map(_STASH.__getitem__, kinds)), default=0))
        offsets.append(base + len(acts_s))
    for v, (r, _) in enumerate(where):  # who fills each activation and gradient slot
        producer[v * m_count : (v + 1) * m_count] = [r] * m_count
        producer[acts + v * m_count : acts + (v + 1) * m_count] = [r] * m_count
    queues = _queues(groups)
    consumers = tuple(groups[q] for q in queues)
    columns = Columns(need, out, key, link, producer, stride, consumers)
    return Compiled(tuple(peaks), tuple(offsets), queues, split, columns)


def _queues(groups: dict[tuple[int, int, str], Any]) -> tuple[tuple[int, int, str], ...]:
    """The message queues in report order: by link, activations first."""
    return tuple(sorted(groups, key=lambda g: (min(g[0], g[1]), g[2] != "act", g[0], g[1])))


def _peak_action(acts: Sequence[Action]) -> Action:
    live = list(accumulate(map(_STASH.__getitem__, (a.kind for a in acts))))
    return acts[live.index(max(live))]


def peak_stash(schedule: Schedule) -> list[int]:
    """Per rank, the most activations stashed at once (from an F until its B or W ends)."""
    return list(compile_schedule(_stream_of(schedule)).peak)


def _stream_of(schedule: Schedule) -> Schedule:
    """A 2BW window (its backwards reach into the previous step) as two steps of its stream;
    any other schedule as it is."""
    if schedule.name != "2bw":
        return schedule
    from .twobw import lead_of, unrolled

    return unrolled(schedule.num_stages, schedule.microbatches, 2, lead_of(schedule))
