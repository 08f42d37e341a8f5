"""Checking and replaying schedules: the flat form, the validator and the event replay.

See ``adaptive_pp.core.actions`` for the dependency rules this module enforces.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import accumulate, chain, repeat
from operator import add, itemgetter, truediv
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

# --- checking and replaying ---------------------------------------------------------------------
#
# Flat form: the actions of all ranks in one list (rank s owns offsets[s]:offsets[s+1]). Each
# action waits on at most one *slot* filled by another action: slot v*M + m holds the
# activation of (virtual stage v, micro-batch m), slot (VS + v)*M + m its input gradient
# (from B or I), slots from 2*VS*M on take the W's (nobody waits on them).

_KIND_INDEX = {"F": 0, "B": 1, "I": 2, "W": 3}
_STASH = {"F": 1, "B": -1, "I": 0, "W": -1}
_NONE = -(1 << 62)  # "no input" base: plus any micro-batch id it stays negative


@dataclass(frozen=True)
class Compiled:
    """A checked schedule in flat form (see above); ``peak`` is the stash peak per rank."""

    peak: tuple[int, ...]
    offsets: tuple[int, ...]
    need: list[int]  # slot each action waits on (negative: none)
    out: list[int]  # slot each action fills
    key: list[int]  # cost index ((kind * S) + rank) * M + m, kinds F B I W
    link: list[int]  # link its input crosses: h = ranks h,h+1; S-1 = wrap; -1 = same rank/none
    producer: list[int]  # per slot, the rank whose action fills it (-1: none)
    queues: tuple[tuple[int, int, str, list[int]], ...]  # (src, dst, act|grad, consumers)
    split: bool


# Per-rank columns: need, out, key, link, offsets, stash peaks, queue consumers.
_Columns = list[int]
Flat = tuple[_Columns, _Columns, _Columns, _Columns, _Columns, _Columns, dict[Any, _Columns]]
_HINTS: dict[int, tuple[weakref.ref[Schedule], Callable[[], Flat]]] = {}


def hand_over(schedule: Schedule, build: Callable[[], Flat]) -> Schedule:
    """Let a generator give ``schedule``'s columns (``build()``, on demand), skipping the checks."""
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


@_gc_paused
def compile_schedule(schedule: Schedule, max_stash: int | Sequence[int] | None = None) -> Compiled:
    """Check each rank's list (every F once, then B or I and W once, per chunk and micro-batch;
    W after its I; chunks in range); return the flat form. ``max_stash`` bounds the peak."""
    num_stages, m_count, chunks = schedule.num_stages, schedule.microbatches, schedule.chunks
    _check_sizes(num_stages, m_count, chunks)
    if schedule.placement not in _PLACEMENT_OF:
        raise ValueError(f"unknown placement {schedule.placement!r}; choose loop or v")
    vs_count, vm = num_stages * chunks, chunks * m_count
    grad0, dummy = vs_count * m_count, 2 * vs_count * m_count
    where = _placements(num_stages, chunks, schedule.placement)
    producer = [-1] * (dummy + m_count)
    hint, split = _HINTS.get(id(schedule)), False
    if hint is not None and hint[0]() is not schedule:
        hint = None
    flat: Flat = hint[1]() if hint is not None else ([], [], [], [], [0], [], {})
    need, out, key, link, offsets, peaks, groups = flat  # a generator's (valid as built) or:
    for s, acts in enumerate(schedule.stages if hint is None else ()):
        base = offsets[-1]
        ranks, kinds, mbs, chs = zip(*acts, strict=True) if acts else ((), (), (), ())
        units = mbs if chunks == 1 else [c * m_count + m for c, m in zip(chs, mbs, strict=True)]
        # Fast path (one chunk): _ordered_positions also checks the micro-batch ids.
        ok = chunks == 1 and ranks.count(s) == len(acts) == chs.count(0)
        found = _ordered_positions(kinds, units, vm) if ok else None
        if found is None:
            ok = (
                len(acts) >= 2 * vm
                and ranks.count(s) == len(acts)
                and 0 <= min(chs) <= max(chs) < chunks
                and 0 <= min(mbs) <= max(mbs) < m_count
            )
            found = _ordered_positions(kinds, units, vm) if ok and chunks > 1 else None
        if found is None and ok:
            found = _unit_positions(acts, kinds, units, vm)
        if found is None:
            _check_rank(s, acts, m_count, chunks)  # raises unless valid but irregular
            found = _unit_positions_slow(kinds, units, vm)
        split = split or "I" in kinds
        # Per (kind, chunk): input slot base, output slot base, cost base, link.
        table: dict[tuple[str, int], tuple[int, int, int, int]] = {}
        for c in range(chunks):
            v = virtual_stage(s, c, num_stages, schedule.placement)
            up = where[v - 1][0] if v > 0 else s
            down = where[v + 1][0] if v + 1 < vs_count else s
            cost = s * m_count
            table["F", c] = (
                (v - 1) * m_count if v > 0 else _NONE,
                v * m_count,
                cost,
                _link(up, s, num_stages),
            )
            back_in = grad0 + (v + 1) * m_count if v + 1 < vs_count else _NONE
            back_link = _link(down, s, num_stages)
            stride = num_stages * m_count
            table["B", c] = (back_in, grad0 + v * m_count, stride + cost, back_link)
            table["I", c] = (back_in, grad0 + v * m_count, 2 * stride + cost, back_link)
            table["W", c] = (_NONE, dummy, 3 * stride + cost, -1)
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
        offsets.append(base + len(acts))
    for v, (r, _) in enumerate(where):  # who fills each activation and gradient slot
        producer[v * m_count : (v + 1) * m_count] = [r] * m_count
        producer[grad0 + v * m_count : grad0 + (v + 1) * m_count] = [r] * m_count
    peak = tuple(peaks)
    if max_stash is not None:
        bound = [max_stash] * num_stages if isinstance(max_stash, int) else list(max_stash)
        for s, (p, b) in enumerate(zip(peak, bound, strict=True)):
            if p > b:
                worst = _peak_action(schedule.stages[s])
                raise ScheduleError(
                    f"stage {s}: stashes {p} activations at {worst}, over the bound {b}", s, worst
                )
    ordered = sorted(groups, key=lambda g: (min(g[0], g[1]), g[2] != "act", g[0], g[1]))
    queues = tuple((src, dst, kind, groups[src, dst, kind]) for src, dst, kind in ordered)
    return Compiled(peak, tuple(offsets), need, out, key, link, producer, queues, split)


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
    code: Compiled,
    chunks: int,
    tau_f: Sequence[Sequence[float]],
    tau_b: Sequence[Sequence[float]],
    tau_w: Sequence[Sequence[float]] | None,
) -> list[float]:
    """Costs indexed by ``Compiled.key``: F, B, I, W tables, each S x M, divided by chunks."""
    flat = [*chain.from_iterable(tau_f), *chain.from_iterable(tau_b)]
    if code.split:
        if tau_w is None:
            raise ValueError("a split-backward schedule needs W times (tau_w)")
        w = list(chain.from_iterable(tau_w))
        flat += [b - x for b, x in zip(flat[len(w) :], w, strict=True)] + w
    if chunks > 1:
        flat = list(map(truediv, flat, repeat(chunks)))
    return flat


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
    code = compiled if compiled is not None else compile_schedule(schedule)
    num_stages = schedule.num_stages
    flat = _flat_costs(code, schedule.chunks, tau_f, tau_b, tau_w)
    wrap = max(tau_c, default=0.0) if tau_wrap is None else tau_wrap
    hops = [*tau_c, wrap, 0.0]  # link S-1 is the wrap-around, link -1 (same rank) is free
    need, out, key, link, producer = code.need, code.out, code.key, code.link, code.producer
    offsets = code.offsets
    ends = offsets[1:]
    cur = list(offsets[:-1])
    free = [0.0] * num_stages
    waited = [0.0] * num_stages
    ready = [-1.0] * len(producer)
    n = offsets[-1]
    st = [0.0] * n
    en = [0.0] * n
    arrived = [-1.0] * n
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
            if k >= 0:
                r = ready[k]
                if r < 0:
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
                r += hops[link[i]]
                arrived[i] = r
                if r > t:
                    w += r - t
                    t = r
            st[i] = t
            t += flat[key[i]]
            o = out[i]
            ready[o] = t
            en[i] = t
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
    starts = [st[offsets[s] : ends[s]] for s in range(num_stages)]
    finish = [en[offsets[s] : ends[s]] for s in range(num_stages)]
    return Replay(starts, finish, waited, arrived)


def _raise_deadlock(schedule: Schedule, code: Compiled, cur: list[int], ready: list[float]) -> None:
    """Advance every rank as far as it can go, then name each stuck rank's action and input."""
    ends, need, out = code.offsets[1:], code.need, code.out
    moved = True
    while moved:
        moved = False
        for s in range(schedule.num_stages):
            i = cur[s]
            while i < ends[s] and (need[i] < 0 or ready[need[i]] >= 0):
                ready[out[i]] = 0.0
                i += 1
            moved = moved or i > cur[s]
            cur[s] = i
    flat = [a for acts in schedule.stages for a in acts]
    stuck = [s for s in range(schedule.num_stages) if cur[s] < ends[s]]
    waits = []
    for s in stuck:
        k = need[cur[s]]
        p = code.producer[k]
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
    replay(schedule, zeros, zeros, [0.0] * (schedule.num_stages - 1), code, tau_w=zeros)
    return code
