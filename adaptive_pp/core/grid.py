"""The grid form of a generator's schedule and its replay a row at a time, with numpy.

A schedule whose ranks run equally many actions (L each) is an L x S grid: row p holds the
p-th action of every rank (a column of the run plans, see ``plans``). When every input comes
from an earlier row, a row's times are array operations over the S ranks, the scalar pass's
(``flow._run_plan``) on each element: ``r = end[producer] + hop``, ``start = r if r > free
else free``, ``end = start + cost``; hence the same times to the bit. A row where an input
comes from the same row (warm-up forwards, cool-down backwards) runs rank by rank, each
producer first. The waits are ``start - free`` where ``start > free`` (the scalar pass's
``r - t``), summed per rank in order (``np.add.accumulate``: one addition after another).

``start = maximum(free, r)`` is the same choice without NaN or negative zero (then ``r > free``
and ``r != free`` agree), so with such costs (``_plain``) one ``np.maximum`` does it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cached_property
from itertools import accumulate, pairwise
from typing import Any

import numpy as np
from numpy.typing import NDArray

from .actions import Placement, Rows, _placements, virtual_stage
from .compiled import _queues

Floats = NDArray[np.float64]
Ints = NDArray[np.int64]
Messages = list[tuple[tuple[float, ...], tuple[float, ...]]]
Serial = tuple[list[int], list[int], int]  # a row's rank order, same-row producers, depth

_KIND = np.full(256, -1, np.int64)  # letter -> its block in a rank's cost table (F, B or I, W)
_KIND[[ord("F"), ord("B"), ord("I"), ord("W")]] = [0, 1, 1, 2]
_STASH = np.zeros(256, np.int64)  # letter -> change of the stash (see compiled._STASH)
_STASH[[ord("F"), ord("B"), ord("W")]] = [1, -1, -1]


@dataclass(frozen=True)
class Grid:
    """A schedule as L x S arrays (row p: every rank's p-th action).

    ``dep[p, s]``: where the input of rank s's p-th action is made, as a flat index into the
    (L + 1) x S ends (row L: no input, ends -1.0); ``link``: the link it crosses (-1: same rank,
    S: no input, as ``flow``'s hops); ``key``: its cost in the rank's table (block * M + m);
    ``serial``: the rows with an input from the same row, with their ranks in a runnable order,
    each rank's same-row producer (-1: none) and how deep those chain. ``queues``: report
    order (see compiled); ``took``/``gave``: per message, flat indices of its consumer
    (starts) and producer (ends), queue after queue (``bounds``); ``peak``: the stash peak
    per rank.
    """

    num_stages: int
    length: int
    split: bool
    dep: Ints
    link: Ints
    key: Ints
    serial: dict[int, Serial]
    queues: tuple[tuple[int, int, str], ...]
    took: Ints
    gave: Ints
    bounds: list[int]
    peak: tuple[int, ...]


def grid_of(
    rows: Rows, m_count: int, chunks: int, placement: Placement, max_serial: float = 0.25
) -> Grid | None:
    """The grid of a generator's lists, or None when ranks differ in length, a backward is
    both full and split, an input comes from a later row, or more than ``max_serial`` of the
    rows have an input from their own row (GPipe: all; the scalar pass is faster)."""
    s_ = len(rows.kinds)
    length = len(rows.kinds[0]) if s_ else 0
    if not length or any(len(k) != length for k in rows.kinds):
        return None
    # Every array below is L x S (row p: the ranks' p-th actions), as the replay reads them.
    code = np.frombuffer("".join(rows.kinds).encode(), np.uint8).reshape(s_, length)
    code = np.ascontiguousarray(code.T)
    counts = np.bincount(code.reshape(-1), minlength=256)
    split = bool(counts[ord("I")] or counts[ord("W")])
    if split and counts[ord("B")]:
        return None
    block = _KIND[code]
    mbs = np.stack(rows.microbatches, axis=1).astype(np.int64, copy=False)
    chs = np.zeros_like(mbs) if rows.chunks is None else np.stack(rows.chunks, axis=1)
    rank = np.arange(s_)[None, :]
    # Where each (block, chunk, micro-batch) stands on each rank.
    unit = (block * chunks + chs) * m_count + mbs
    pos = np.full((s_, 3 * chunks * m_count), -1, np.int64)
    pos[rank.T, unit.T] = np.arange(length)  # rank by rank: writes close together
    if (pos[:, : 2 * chunks * m_count] < 0).any():
        return None
    vs_count = s_ * chunks
    vstage = [[virtual_stage(r, c, s_, placement) for c in range(chunks)] for r in range(s_)]
    where = np.array(_placements(s_, chunks, placement), np.int64)  # (rank, chunk) per vstage
    v = np.array(vstage, np.int64)[rank, chs]
    fwd, back = block == 0, block == 1
    has = (fwd & (v > 0)) | (back & (v < vs_count - 1))  # W: no input (its I is on the rank)
    src_v = np.where(has, np.where(fwd, v - 1, v + 1), 0)
    src, src_chunk = where[src_v, 0], where[src_v, 1]
    at = pos[src, (block * chunks + src_chunk) * m_count + mbs]
    here = np.arange(length)[:, None]
    if (has & (at > here)).any():
        return None
    serial = _serial(has & (at == here), src)
    if serial is None or len(serial) > max_serial * length:
        return None
    dep = np.where(has, at * s_ + src, length * s_)
    near = np.abs(src - rank) == 1
    link = np.where(src == rank, -1, np.where(near, np.minimum(src, rank), s_ - 1))
    link = np.where(has, link, s_)
    queues, took, gave, bounds = _messages(pos, vstage, where, m_count)
    peak = np.cumsum(_STASH[code], axis=0).max(axis=0)
    return Grid(
        s_,
        length,
        split,
        dep,
        link,
        block * m_count + mbs,
        serial,
        queues,
        took,
        gave,
        bounds,
        tuple(peak.tolist()),
    )


def _messages(
    pos: Ints, vstage: list[list[int]], where: Ints, m_count: int
) -> tuple[tuple[tuple[int, int, str], ...], Ints, Ints, list[int]]:
    """The queues in report order (see compiled._queues) and, message after message (by
    queue, then the consumer's chunk and micro-batch), where its consumer starts and its
    producer ends (flat indices), and where each queue's messages begin (and the end)."""
    s_, chunks, vs_count = len(vstage), len(vstage[0]), len(where)
    groups: dict[tuple[int, int, str], list[tuple[int, int, int, int]]] = {}
    for dst, row in enumerate(vstage):
        for c, v in enumerate(row):
            for blk, kind, sv in ((0, "act", v - 1), (1, "grad", v + 1)):
                if 0 <= sv < vs_count and where[sv, 0] != dst:
                    src, sc = int(where[sv, 0]), int(where[sv, 1])
                    got = (dst, (blk * chunks + c) * m_count, src, (blk * chunks + sc) * m_count)
                    groups.setdefault((src, dst, kind), []).append(got)
    queues = _queues(groups)
    blocks = np.array([b for q in queues for b in groups[q]], np.int64).reshape(-1, 4)
    ids = np.arange(m_count)
    took = pos[blocks[:, :1], blocks[:, 1:2] + ids] * s_ + blocks[:, :1]
    gave = pos[blocks[:, 2:3], blocks[:, 3:4] + ids] * s_ + blocks[:, 2:3]
    sizes = [0] + [len(groups[q]) * m_count for q in queues]
    return queues, took.reshape(-1), gave.reshape(-1), list(accumulate(sizes))


def _serial(same: NDArray[np.bool_], src: Ints) -> dict[int, Serial] | None:
    """Per row with a same-row input: its ranks, each after its same-row producer, per rank
    that producer (-1: none), and the longest chain of them; None if they make a cycle."""
    rows = np.flatnonzero(same.any(axis=1))
    on, prod = same[rows], src[rows]
    depth = np.zeros(on.shape, np.int64)
    for _ in range(on.shape[1] + 1):
        deeper = np.where(on, np.take_along_axis(depth, prod, axis=1) + 1, 0)
        if np.array_equal(deeper, depth):
            break
        depth = deeper
    else:
        return None
    order = np.argsort(depth, axis=1, kind="stable").tolist()
    producer = np.where(on, prod, -1).tolist()
    deepest = depth.max(axis=1, initial=0).tolist()
    return dict(zip(rows.tolist(), zip(order, producer, deepest, strict=True), strict=True))


def _table(
    split: bool,
    chunks: int,
    tau_f: Sequence[Sequence[float]],
    tau_b: Sequence[Sequence[float]],
    tau_w: Sequence[Sequence[float]] | float | None,
) -> Floats:
    """Per rank its costs: F, then B (or I = B - W, then W), M each, divided by chunks;
    ``tau_w`` a number: W is that share of B (``b * share``)."""
    f, b = np.asarray(tau_f, np.float64), np.asarray(tau_b, np.float64)
    if split:
        if tau_w is None:
            raise ValueError("a split-backward schedule needs W times (tau_w)")
        w = b * tau_w if isinstance(tau_w, float) else np.asarray(tau_w, np.float64)
        table = np.concatenate((f, b - w, w), axis=1)
    else:
        table = np.concatenate((f, b), axis=1)
    return table / chunks if chunks > 1 else table


def _plain(*arrays: Floats) -> bool:
    """No NaN and no sign bit (negative numbers, -0.0): np.maximum is the scalar choice."""
    return not any(np.signbit(a).any() or np.isnan(a).any() for a in arrays)


@dataclass(frozen=True)
class GridTimes:
    """A grid replay's result: ``starts`` (L x S), ``ends`` ((L + 1) x S, row L: -1.0, no
    input), ``waited`` per rank, and ``hops`` (as ``flow``'s, by link)."""

    grid: Grid
    starts: Floats
    ends: Floats
    waited: list[float]
    hops: Floats

    @cached_property
    def start(self) -> list[list[float]]:
        """Per rank its starts, in its order."""
        out: list[list[float]] = self.starts.T.tolist()
        return out

    @cached_property
    def end(self) -> list[list[float]]:
        """Per rank its ends, in its order."""
        out: list[list[float]] = self.ends[:-1].T.tolist()
        return out

    def step_time(self) -> float:
        """The last end of any rank."""
        return max(self.ends[self.grid.length - 1].tolist(), default=0.0)

    def _messages(self) -> tuple[list[float], list[float]]:
        g = self.grid
        with np.errstate(all="ignore"):
            arrived = self.ends.reshape(-1)[g.gave] + self.hops[g.link.reshape(-1)[g.took]]
        return arrived.tolist(), self.starts.reshape(-1)[g.took].tolist()

    def queue_times(self) -> Messages:
        """Per queue, its messages' arrivals (producer's end + hop) and their consumers' starts."""
        arrived, consumed = self._messages()
        b = self.grid.bounds
        return [(tuple(arrived[lo:hi]), tuple(consumed[lo:hi])) for lo, hi in pairwise(b)]

    def queue_parts(self) -> list[tuple[Callable[[], Any], Callable[[], Any]]]:
        """Per queue, functions giving its arrivals and its consumers' starts (computed for
        every queue on the first call)."""
        got: list[Messages] = []

        def part(q: int, i: int) -> Callable[[], Any]:
            def build() -> Any:
                if not got:
                    got.append(self.queue_times())
                return got[0][q][i]

            return build

        return [(part(q, 0), part(q, 1)) for q in range(len(self.grid.queues))]

    def arrived(self) -> list[float]:
        """Arrivals by flat index (rank after rank; -1.0: no input)."""
        g = self.grid
        with np.errstate(all="ignore"):
            ar = self.ends.reshape(-1)[g.dep] + self.hops[g.link]
        ar[g.link == g.num_stages] = -1.0
        out: list[float] = ar.T.reshape(-1).tolist()
        return out


@np.errstate(all="ignore")  # inf - inf and the like: NaN, silently, as in Python
def run_grid(
    grid: Grid,
    tau_f: Sequence[Sequence[float]],
    tau_b: Sequence[Sequence[float]],
    tau_w: Sequence[Sequence[float]] | float | None,
    chunks: int,
    hops: Sequence[float],
) -> GridTimes:
    """Replay ``grid`` row by row (see the module docstring); ``hops`` by link as flow's."""
    s_, length = grid.num_stages, grid.length
    table = _table(grid.split, chunks, tau_f, tau_b, tau_w)
    cost = table[np.arange(s_)[None, :], grid.key]
    hop = np.asarray(hops, np.float64)
    arrive = hop[grid.link]
    starts = np.empty((length, s_))
    ends = np.empty((length + 1, s_))
    ends[length] = -1.0
    flat = ends.reshape(-1)
    free = np.zeros(s_)
    r = np.empty(s_)
    mask = np.empty(s_, np.bool_)
    plain = _plain(table, np.delete(hop, s_))
    serial = grid.serial
    for p, (d, h, c, st, en) in enumerate(zip(grid.dep, arrive, cost, starts, ends, strict=False)):
        flat.take(d, out=r)
        r += h
        if p in serial:
            order, prod, depth = serial[p]
            if depth > _SWEEPS:
                _serial_row(order, prod, r, h, c, free, st, en)
                free = en
                continue
            for _ in range(depth):  # sweep the row again while a same-row input changed
                _step(plain, r, free, c, st, en, mask)
                flat.take(d, out=r)
                r += h
        _step(plain, r, free, c, st, en, mask)
        free = en
    before = np.concatenate((np.zeros((1, s_)), ends[: length - 1]))
    waits = np.where(starts > before, starts - before, 0.0)
    waited: list[float] = np.add.accumulate(waits, axis=0)[-1].tolist()
    return GridTimes(grid, starts, ends, waited, hop)


# A row whose same-row inputs chain at most this deep is swept (depth + 1) times as a whole
# (each sweep's inputs are final one level further); deeper, it runs rank by rank.
_SWEEPS = 6


def _step(
    plain: bool, r: Floats, free: Floats, c: Floats, st: Floats, en: Floats, mask: NDArray[np.bool_]
) -> None:
    """A row's starts and ends from its arrivals ``r`` (see run_grid)."""
    if plain:
        np.maximum(free, r, out=st)
    else:  # the scalar pass's choice itself: r only where r > free
        np.greater(r, free, out=mask)
        np.copyto(st, free)
        np.copyto(st, r, where=mask)
    np.add(st, c, out=en)


def _serial_row(
    order: list[int],
    prod: list[int],
    r: Floats,
    h: Floats,
    c: Floats,
    free: Floats,
    st: Floats,
    en: Floats,
) -> None:
    """One row rank by rank (``order``; ``prod``: each rank's same-row producer, -1: none)."""
    arrive, hop, cost, was = r.tolist(), h.tolist(), c.tolist(), free.tolist()
    start, end = [0.0] * len(arrive), [0.0] * len(arrive)
    for s in order:
        q = prod[s]
        x = end[q] + hop[s] if q >= 0 else arrive[s]
        t = was[s]
        if x > t:
            t = x
        start[s] = t
        end[s] = t + cost[s]
    st[:] = start
    en[:] = end
