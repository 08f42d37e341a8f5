"""The replay of a generator's schedule as a grid (``gridform``) a row at a time, with numpy.

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
from itertools import pairwise
from typing import Any

import numpy as np
from numpy.typing import NDArray

from .gridform import Grid

Floats = NDArray[np.float64]
Messages = list[tuple[tuple[float, ...], tuple[float, ...]]]


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
    cost = table.reshape(-1).take(grid.key)
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
