"""Checking and replaying schedules: the flat form, the validator, the run plan and the replay.

See ``adaptive_pp.core.actions`` for the dependency rules this module enforces.

Replaying runs each rank's actions in order, each once its rank is free and its input has
arrived: ``start = max(free, arrival)``, ``end = start + cost``, ``arrival = ready + hop`` (the
producer's end plus the link's time). Two ways run it, with the same floating-point operations
in the same order, hence the same times to the bit:

- The run plan (``Plan``): every action in one fixed order that puts each one after the action
  it waits for, so a single pass needs no waiting and no bookkeeping: column by column (the
  p-th action of every rank), ranks ascending in the first ``split`` columns and descending in
  the others. A forward waits on the rank before it and a backward on the rank after it; in the
  generated schedules a wait inside one column is a forward's in the warm-up columns or a
  backward's in the cool-down ones, and ``split`` (where rank 0 runs its first backward) lies
  between. The generators hand over their plan built from ranges (valid by construction; the
  tests compare it with the flat form's); any other schedule whose ranks run equally many
  actions gets one from its flat form when every input comes earlier in that order.
- The event replay, for everything else and to name a deadlock: run a rank until it waits for
  a slot nobody filled yet, then run that slot's producer (depth first) and come back once it
  filled it; a wait on a rank already waiting closes a cycle: deadlock.
"""

from __future__ import annotations

import math
import weakref
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial
from itertools import accumulate, chain, compress, repeat
from operator import add, eq, itemgetter, lt, sub, truediv
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
    key: list[int]  # cost index ((kind * S) + rank) * M + m, kinds F B I W (see _flat_costs)
    link: list[int]  # link its input crosses: h = ranks h,h+1; S-1 = wrap; -1 = same rank/none
    producer: list[int]  # per slot, the rank whose action fills it (-1: none)
    stride: int  # S * M: key // stride is the kind
    consumers: tuple[list[int], ...]  # per queue (Compiled.queues), the actions taking its messages


@dataclass(frozen=True)
class Plan:
    """The actions in run order (see the module docstring), as the replay loop reads them.

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
    cost_rows: Sequence[Pick] = ()


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
    from .twobw import unrolled

    return unrolled(schedule.num_stages, schedule.microbatches, 2)


# --- run plans ------------------------------------------------------------------------------------


def _transpose(rows: Sequence[Sequence[Any]], split: int) -> list[Any]:
    """``rows[s][p]`` in run order: columns ``p < split`` ranks ascending, then descending
    (the inverse of _rank_order)."""
    num_stages = len(rows)
    b = split * num_stages
    mid = b + num_stages - 1
    out: list[Any] = [None] * (num_stages * len(rows[0]) if rows else 0)
    for s, row in enumerate(rows):
        out[s:b:num_stages] = row[:split]
    for s, row in enumerate(rows):
        out[mid - s :: num_stages] = row[split:]
    return out


def _run_positions(num_stages: int, length: int, split: int) -> list[list[int]]:
    """Per rank, the run position of its p-th action."""
    n, b = num_stages * length, split * num_stages
    return [
        [*range(s, b, num_stages), *range(b + num_stages - 1 - s, n, num_stages)]
        for s in range(num_stages)
    ]


def _run_ranks(num_stages: int, length: int, split: int) -> list[int]:
    """The rank of each action in run order."""
    up, down = list(range(num_stages)), list(range(num_stages - 1, -1, -1))
    return up * split + down * (length - split)


Stream = tuple[int, Sequence[range], int, Sequence[range]]
"""Actions of one rank that take their inputs from one rank: (rank, where they stand, producing
rank, where their producers stand), positions as ascending ranges; they pair up in order."""

Queue = tuple[Sequence[range], Sequence[int] | None, Sequence[range], Sequence[int] | None]
"""The messages of one queue: where their consumers stand on the destination rank and in which
order to report them (indices into those places, None: as they come), where their producers
stand on the source rank and in which order (the same messages)."""


def _planned(
    num_stages: int,
    split: int,
    length: int,
    streams: Sequence[Stream],
    queues: dict[tuple[int, int, str], Queue],
    links: Sequence[Sequence[int]],
    cost_keys: Sequence[Sequence[int]],
    peaks: Sequence[int],
    split_backward: bool,
) -> Compiled:
    """A generator's compiled form: every rank ``length`` actions long, inputs as ``streams``
    (an action in none has no input), ``queues`` by (source, destination, act or grad); per
    rank s in its order: ``links[s]`` the link each input crosses (S: no input), ``cost_keys[s]``
    the index into the rank's cost table (kind * M + micro-batch, kinds F, B or I, W)."""
    back = [-1] * (num_stages * length)  # in run order; no input: any earlier action will do
    for rank, own, src, prod in streams:
        runs = _runs(own, rank, num_stages, split)
        _place(back, runs, _differences(_runs(prod, src, num_stages, split), runs))
    order = _queues(queues)
    consumers: list[Pick] = []
    producers: list[Feed] = []
    getters: dict[int, Pick] = {}  # one per order (queues share them)

    def reorder(pick: Pick, perm: Sequence[int]) -> Pick:
        if id(perm) not in getters:
            getters[id(perm)] = _getter(perm)
        return partial(_then, pick, getters[id(perm)])

    for src, dst, kind in order:
        took, took_order, gave, gave_order = queues[src, dst, kind]
        pick: Pick = partial(_slices, took)
        consumers.append(pick if took_order is None else reorder(pick, took_order))
        if gave_order is None:  # read once, in order: no tuple needed
            producers.append(partial(_sliced, gave))
        else:
            producers.append(reorder(partial(_slices, gave), gave_order))
    plan = Plan(
        split,
        length,
        back,
        _transpose(links, split),
        _run_ranks(num_stages, length, split),
        tuple(consumers),
        tuple(producers),
        tuple(_link(src, dst, num_stages) for src, dst, _ in order),
        tuple((src, dst) for src, dst, _ in order),
        None,
        tuple(map(_getter, cost_keys)),
    )
    offsets = tuple(s * length for s in range(num_stages + 1))
    return Compiled(tuple(peaks), offsets, order, split_backward, None, plan)


def _then(first: Pick, then: Pick, values: Sequence[float]) -> tuple[float, ...]:
    return then(first(values))


def _chained(
    num_stages: int, fpos: Sequence[Sequence[range]], bpos: Sequence[Sequence[range]]
) -> tuple[list[Stream], dict[tuple[int, int, str], Queue]]:
    """Streams and queues of a one-chunk pipeline: rank s's forwards (at ``fpos[s]``, by
    micro-batch) take rank s-1's, its backwards (``bpos[s]``) rank s+1's."""
    streams: list[Stream] = []
    queues: dict[tuple[int, int, str], Queue] = {}
    for s in range(num_stages):
        if s:
            streams.append((s, fpos[s], s - 1, fpos[s - 1]))
            queues[s - 1, s, "act"] = (fpos[s], None, fpos[s - 1], None)
        if s < num_stages - 1:
            streams.append((s, bpos[s], s + 1, bpos[s + 1]))
            queues[s + 1, s, "grad"] = (bpos[s], None, bpos[s + 1], None)
    return streams, queues


def _runs(pieces: Sequence[range], rank: int, num_stages: int, split: int) -> list[range]:
    """The run positions of ``rank``'s actions at ``pieces`` (its positions, ascending ranges):
    p * S + rank before ``split``, p * S + S - 1 - rank from it."""
    out = []
    for x in pieces:
        lo, hi, step = x.start, x.stop, x.step
        if lo < split:  # the part before split
            out.append(
                range(lo * num_stages + rank, min(hi, split) * num_stages + rank, step * num_stages)
            )
            lo += -(-(split - lo) // step) * step  # the first position at or after split
        if lo < hi:
            back = num_stages - 1 - rank
            out.append(range(lo * num_stages + back, hi * num_stages + back, step * num_stages))
    return out


def _slices(pieces: Sequence[range], values: Sequence[float]) -> tuple[float, ...]:
    """``values`` at the positions ``pieces`` (ranges), in order."""
    return tuple(_sliced(pieces, values))


def _sliced(pieces: Sequence[range], values: Sequence[float]) -> Iterator[float]:
    return chain.from_iterable(values[x.start : x.stop : x.step] for x in pieces)


def _differences(xs: list[range], ys: list[range]) -> list[int]:
    """``x - y`` for the x's of ``xs`` and the y's of ``ys`` in turn (equally many), built
    piecewise: one shared int where both advance alike."""
    out: list[int] = []
    i = j = 0
    x, y = (xs[0], ys[0]) if xs else (range(0), range(0))
    while i < len(xs):
        k = min(len(x), len(y))
        step = x.step - y.step
        first = x.start - y.start
        out += [first] * k if not step else range(first, first + k * step, step)
        x, y = x[k:], y[k:]
        if not x:
            i += 1
            x = xs[i] if i < len(xs) else x
        if not y:
            j += 1
            y = ys[j] if j < len(ys) else y
    return out


def _place(row: list[int], pieces: Sequence[range], values: list[int]) -> None:
    i = 0
    for x in pieces:
        row[x.start : x.stop : x.step] = values[i : i + len(x)]
        i += len(x)


def _column_plan(code: Compiled) -> Plan | None:
    """The run plan of a flat form whose ranks run equally many actions, if that order runs
    every action after its input's producer (else None)."""
    cols, offsets = code.columns, code.offsets
    num_stages = len(offsets) - 1
    length = offsets[1]
    if cols is None or length < 2 or offsets != tuple(range(0, offsets[-1] + 1, length)):
        return None
    n = offsets[-1]
    split = next((p for p, k in enumerate(cols.key[:length]) if k >= cols.stride), length)

    def run_order(column: list[int]) -> list[int]:
        return _transpose([column[lo : lo + length] for lo in offsets[:-1]], split)

    out, need = run_order(cols.out), run_order(cols.need)
    owner = [-1] * len(cols.producer)  # run position of each slot's producer (-1: none)
    deque(map(owner.__setitem__, out, range(n)), maxlen=0)
    came = list(map(owner.__getitem__, need))
    if not all(map(lt, came, range(n))):
        return None
    at = list(chain.from_iterable(_run_positions(num_stages, length, split)))
    took = [list(map(at.__getitem__, c)) for c in cols.consumers]  # their run positions
    return Plan(
        split,
        length,
        list(map(sub, came, range(n))),  # no input: -j - 1, the "no input" entry (see _run_plan)
        run_order(cols.link),
        _run_ranks(num_stages, length, split),
        # A run position j is column j // S: the action's place in its rank's list.
        tuple(_getter([j // num_stages for j in t]) for t in took),
        tuple(_getter([came[j] // num_stages for j in t]) for t in took),
        tuple(_link(src, dst, num_stages) for src, dst, _ in code.queues),
        tuple((src, dst) for src, dst, _ in code.queues),
        _getter(run_order(cols.key)),
    )


def _plan_of(code: Compiled) -> Plan | None:
    if code.plan is not None:
        return code.plan
    if "plan" not in code._memo:
        code._memo["plan"] = _column_plan(code)
    plan: Plan | None = code._memo["plan"]
    return plan


# --- replaying --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Replay:
    """Times from replaying a schedule: ``start[s][i]``/``end[s][i]`` of stage s's i-th action.

    ``arrived[i]`` (flat index) is when action i's input reached its rank (-1.0: no input).
    """

    start: list[list[float]]
    end: list[list[float]]
    waited: list[float]
    arrived: list[float]


def _flat_costs(
    split: bool,
    chunks: int,
    tau_f: Sequence[Sequence[float]],
    tau_b: Sequence[Sequence[float]],
    tau_w: Sequence[Sequence[float]] | None,
) -> list[float]:
    """Costs indexed by ``Columns.key``: F, B, I, W tables, each S x M, divided by chunks."""
    flat = [*chain.from_iterable(tau_f), *chain.from_iterable(tau_b)]
    if split:
        if tau_w is None:
            raise ValueError("a split-backward schedule needs W times (tau_w)")
        w = list(chain.from_iterable(tau_w))
        flat += [b - x for b, x in zip(flat[len(w) :], w, strict=True)] + w
    if chunks > 1:
        flat = list(map(truediv, flat, repeat(chunks)))
    return flat


def _run_costs(
    plan: Plan,
    split: bool,
    chunks: int,
    tau_f: Sequence[Sequence[float]],
    tau_b: Sequence[Sequence[float]],
    tau_w: Sequence[Sequence[float]] | None,
) -> Sequence[float]:
    """Each action's cost in the plan's run order: the same values as _flat_costs."""
    if plan.keys is not None:
        return plan.keys(_flat_costs(split, chunks, tau_f, tau_b, tau_w))
    if split and tau_w is None:
        raise ValueError("a split-backward schedule needs W times (tau_w)")
    rows = []
    for s, pick in enumerate(plan.cost_rows):
        if split:
            w = tau_w[s]  # type: ignore[index]
            table = [*tau_f[s], *map(sub, tau_b[s], w), *w]
        else:
            table = [*tau_f[s], *tau_b[s]]
        if chunks > 1:
            table = list(map(truediv, table, repeat(chunks)))
        rows.append(pick(table))
    return _transpose(rows, plan.split)


@dataclass(frozen=True)
class _Times:
    """A replay's raw result: per rank starts and ends, waits, and the queues' times. From a
    plan: ``ends`` in run order (after one leading entry) and ``queues`` if asked for; from the
    event replay: flat ``starts`` and ``arrivals`` that ``picks`` read."""

    start: list[list[float]]
    end: list[list[float]]
    waited: list[float]
    ends: list[float]
    hops: list[float]
    plan: Plan | None
    queues: list[tuple[tuple[float, ...], tuple[float, ...]]] | None = None
    starts: list[float] = field(default_factory=list)
    arrivals: list[float] = field(default_factory=list)
    picks: tuple[Pick, ...] = ()

    def queue_times(self) -> list[tuple[tuple[float, ...], tuple[float, ...]]]:
        """Per queue, its messages' arrivals and the times their consumers took them."""
        if self.queues is not None:
            return self.queues
        plan = self.plan
        if plan is None:
            return [(pick(self.arrivals), pick(self.starts)) for pick in self.picks]
        which = range(len(plan.pairs))
        return _queue_times(plan, which, self.start, self.end, self.hops)

    def arrived(self) -> list[float]:
        """Arrivals by flat index (-1.0: no input)."""
        plan = self.plan
        if plan is None:
            return self.arrivals
        n, num_stages = len(plan.back), len(self.start)
        came = map(self.ends.__getitem__, map(add, range(1, n + 1), plan.back))
        ar = list(map(add, came, map(self.hops.__getitem__, plan.link)))
        none = compress(range(n), map(eq, plan.link, repeat(num_stages)))
        deque(map(ar.__setitem__, none, repeat(_NO_INPUT)), maxlen=0)  # a generator's "none"
        return list(chain.from_iterable(_rank_order(ar, plan.split, num_stages, 0)))


def _queue_times(
    plan: Plan,
    which: Sequence[int],
    start: list[list[float]],
    end: list[list[float]],
    hops: list[float],
) -> list[tuple[tuple[float, ...], tuple[float, ...]]]:
    """Queues ``which``: arrivals (the producer's end plus the hop: the addition the replay
    made) and the consumers' starts."""
    out = []
    for q in which:
        src, dst = plan.pairs[q]
        arrived = tuple(map(add, plan.producers[q](end[src]), repeat(hops[plan.links[q]])))
        out.append((arrived, plan.consumers[q](start[dst])))
    return out


def _rank_order(values: list[float], split: int, num_stages: int, skip: int) -> list[list[float]]:
    """A run-order list (after ``skip`` leading entries) per rank, in each rank's order: rank
    s is every num_stages-th action of each half."""
    b = skip + split * num_stages
    mid = b + num_stages - 1
    rows = []
    for s in range(num_stages):
        row = values[skip + s : b : num_stages]
        row += values[mid - s :: num_stages]
        rows.append(row)
    return rows


def replay(
    schedule: Schedule,
    tau_f: Sequence[Sequence[float]],
    tau_b: Sequence[Sequence[float]],
    tau_c: Sequence[float],
    compiled: Compiled | None = None,
    *,
    tau_w: Sequence[Sequence[float]] | None = None,
    tau_wrap: float | None = None,
) -> Replay:
    """Run each rank's actions in order, each once the rank is free and its input arrived.

    Costs are per rank and micro-batch: ``tau_f``, ``tau_b`` (the full backward; I runs
    ``tau_b - tau_w``, W runs ``tau_w``); a rank with V chunks spends 1/V of them per chunk.
    An input crossing ranks h, h+1 pays ``tau_c[h]``; the wrap-around link S-1 <-> 0 pays
    ``tau_wrap`` (default: the largest ``tau_c``); chunks on one rank pay nothing.
    Raises ScheduleError naming the stuck actions on deadlock.
    """
    run = _replay(schedule, tau_f, tau_b, tau_c, compiled, tau_w, tau_wrap)
    return Replay(run.start, run.end, run.waited, run.arrived())


@_gc_paused
def _replay(
    schedule: Schedule,
    tau_f: Sequence[Sequence[float]],
    tau_b: Sequence[Sequence[float]],
    tau_c: Sequence[float],
    compiled: Compiled | None,
    tau_w: Sequence[Sequence[float]] | None,
    tau_wrap: float | None,
    queues: bool = False,
) -> _Times:
    """replay() without building the flat arrivals; ``queues``: with the queues' times (the
    simulator takes those instead)."""
    code = compiled if compiled is not None else compile_schedule(schedule)
    chunks = schedule.chunks
    wrap = max(tau_c, default=0.0) if tau_wrap is None else tau_wrap
    # Link h < S-1: ranks h, h+1; S-1: the wrap-around; S: no input; -1: same rank (free).
    hops = [*tau_c, wrap, -math.inf, 0.0]
    plan = _plan_of(code)
    if plan is not None:
        costs = _run_costs(plan, code.split, chunks, tau_f, tau_b, tau_w)
        return _run_plan(plan, costs, hops, schedule.num_stages, queues)
    cols = code.columns
    assert cols is not None  # only a generator's form comes without, and it has a plan
    flat = _flat_costs(code.split, chunks, tau_f, tau_b, tau_w)
    start, end, waited, st, arrived = _event_replay(schedule, code, flat, hops)
    if "picks" not in code._memo:
        code._memo["picks"] = tuple(map(_getter, cols.consumers))
    return _Times(
        start, end, waited, [], hops, None, starts=st, arrivals=arrived, picks=code._memo["picks"]
    )


def _run_plan(
    plan: Plan, costs: Sequence[float], hops: list[float], num_stages: int, queues: bool
) -> _Times:
    """Replay in the plan's run order (see the module docstring): one pass, no waiting. With
    ``queues``, the queues' times too."""
    last = [0.0] * num_stages  # when each rank is free
    waited = [0.0] * num_stages
    st: list[float] = []
    en = [_NO_INPUT]  # en[j + 1]: the end of the j-th action; en[0]: "no input"
    for b, h, c, s in zip(plan.back, plan.link, costs, plan.ranks, strict=True):
        t = last[s]
        r = en[b] + hops[h]  # en[b] = en[len(en) + b]: the end of the (j + b)-th action
        if r > t:
            waited[s] += r - t
            t = r
        st.append(t)
        t += c
        en.append(t)
        last[s] = t
    if not queues:
        starts = _rank_order(st, plan.split, num_stages, 0)
        return _Times(starts, _rank_order(en, plan.split, num_stages, 1), waited, en, hops, plan)
    # Each rank's lists, then the queues whose later rank that was, while their times are
    # still in the cache (the run order scatters a rank's times over memory).
    when: list[list[int]] = [[] for _ in range(num_stages)]
    for q, (src, dst) in enumerate(plan.pairs):
        when[max(src, dst)].append(q)
    start: list[list[float]] = []
    end: list[list[float]] = []
    times: list[tuple[tuple[float, ...], tuple[float, ...]]] = [((), ())] * len(plan.pairs)
    b = plan.split * num_stages
    mid = b + num_stages - 1
    for s in range(num_stages):
        row = st[s:b:num_stages]
        row += st[mid - s :: num_stages]
        start.append(row)
        row = en[1 + s : 1 + b : num_stages]
        row += en[1 + mid - s :: num_stages]
        end.append(row)
        for q, got in zip(when[s], _queue_times(plan, when[s], start, end, hops), strict=True):
            times[q] = got
    return _Times(start, end, waited, en, hops, plan, times)


def _event_replay(
    schedule: Schedule, code: Compiled, flat: list[float], hops: list[float]
) -> tuple[list[list[float]], list[list[float]], list[float], list[float], list[float]]:
    """Replay by running ranks until they wait, depth first (see the module docstring); per rank
    starts and ends, waits, and flat starts and arrivals."""
    cols = code.columns
    assert cols is not None
    num_stages = schedule.num_stages
    need, out, producer = cols.need, cols.out, cols.producer
    cost = list(map(flat.__getitem__, cols.key))
    hop = list(map(hops.__getitem__, cols.link))
    offsets = code.offsets
    ends = offsets[1:]
    cur = list(offsets[:-1])
    free = [0.0] * num_stages
    waited = [0.0] * num_stages
    ready = _ready(num_stages * schedule.chunks, schedule.microbatches)
    st = [0.0] * offsets[-1]
    # Run a rank until it waits on a slot nobody filled yet, then run that slot's producer
    # (depth first) and come back once it filled the slot; a wait on a rank already waiting
    # (or on itself) closes a cycle: deadlock.
    stack: list[tuple[int, int]] = []
    waiting = [False] * num_stages
    deadlock = False
    s, nxt, want = 0, 0, -1
    i, e, t, w = cur[0], ends[0], 0.0, 0.0
    while True:
        if i < e:
            k = need[i]
            r = ready[k]
            if r is None:
                cur[s], free[s], waited[s] = i, t, w
                p = producer[k]
                if p == s or waiting[p]:
                    deadlock = True
                    break
                stack.append((s, k))
                waiting[s] = True
                want = k
                s = p
                i, e, t, w = cur[s], ends[s], free[s], waited[s]
                continue
            r += hop[i]
            if r > t:
                w += r - t
                t = r
            st[i] = t
            t += cost[i]
            o = out[i]
            ready[o] = t
            i += 1
            if o == want:
                cur[s], free[s], waited[s] = i, t, w
                s = stack.pop()[0]
                waiting[s] = False
                want = stack[-1][1] if stack else -1
                i, e, t, w = cur[s], ends[s], free[s], waited[s]
            continue
        cur[s], free[s], waited[s] = i, t, w
        if stack:  # pragma: no cover - a rank always fills what others wait on before it ends
            deadlock = True
            break
        while nxt < num_stages and cur[nxt] == ends[nxt]:
            nxt += 1
        if nxt == num_stages:
            break
        s = nxt
        i, e, t, w = cur[s], ends[s], free[s], waited[s]
    if deadlock:
        _raise_deadlock(schedule, code, cur, ready)
    # Ends as the loop added them (start + cost); arrivals from the filled slots (each is
    # filled once) plus the hop: the additions the loop made.
    en = list(map(add, st, cost))
    arrived = list(map(add, map(ready.__getitem__, need), hop))  # type: ignore[arg-type]
    starts = [st[offsets[s] : ends[s]] for s in range(num_stages)]
    finish = [en[offsets[s] : ends[s]] for s in range(num_stages)]
    return starts, finish, waited, st, arrived


def _raise_deadlock(
    schedule: Schedule, code: Compiled, cur: list[int], ready: list[float | None]
) -> None:
    """Advance every rank as far as it can go, then name each stuck rank's action and input."""
    cols = code.columns
    assert cols is not None
    ends, need, out = code.offsets[1:], cols.need, cols.out
    moved = True
    while moved:
        moved = False
        for s in range(schedule.num_stages):
            i = cur[s]
            while i < ends[s] and ready[need[i]] is not None:
                ready[out[i]] = 0.0
                i += 1
            moved = moved or i > cur[s]
            cur[s] = i
    flat = [a for acts in schedule.stages for a in acts]
    stuck = [s for s in range(schedule.num_stages) if cur[s] < ends[s]]
    waits = []
    for s in stuck:
        k = need[cur[s]]
        p = cols.producer[k]
        lo, hi = code.offsets[p], ends[p]
        dep = flat[lo + out[lo:hi].index(k)]
        waits.append(f"stage {s} waits at {flat[cur[s]]} for {dep}")
    first = flat[cur[stuck[0]]]
    raise ScheduleError(f"deadlock: {'; '.join(waits)}", stuck[0], first)


def validate(schedule: Schedule, max_stash: int | Sequence[int] | None = None) -> Compiled:
    """Raise ScheduleError unless every rank runs its actions once, in order, without deadlock.

    ``max_stash`` (one bound, or one per rank) also bounds each rank's peak stash. A 2BW
    window (core.twobw) is checked as two steps of its stream and returns that form (same
    peak stash per rank).
    """
    schedule = _stream_of(schedule)
    code = compile_schedule(schedule, max_stash)
    zeros = [[0.0] * schedule.microbatches] * schedule.num_stages
    _replay(schedule, zeros, zeros, [0.0] * (schedule.num_stages - 1), code, zeros, None)
    return code
