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

from .gridform import Grid, Ints, Serial

Floats = NDArray[np.float64]
Table = Sequence[Sequence[float]] | Floats  # per rank and micro-batch
Messages = list[tuple[tuple[float, ...], tuple[float, ...]]]


def _table(
    split: bool, chunks: int, tau_f: Table, tau_b: Table, tau_w: Table | float | None
) -> Floats:
    """Per rank its costs: F, then B (or I = B - W, then W), M each, divided by chunks;
    ``tau_w`` a number: W is that share of B (``b * share``)."""
    f, b = np.asarray(tau_f, np.float64), np.asarray(tau_b, np.float64)
    s_, m = f.shape
    table = np.empty((s_, (3 if split else 2) * m))
    fwd, back, rest = table[:, :m], table[:, m : 2 * m], table[:, 2 * m :]
    fwd[:] = f
    if split:
        if tau_w is None:
            raise ValueError("a split-backward schedule needs W times (tau_w)")
        if isinstance(tau_w, float):
            np.multiply(b, tau_w, out=rest)
        else:
            rest[:] = np.asarray(tau_w, np.float64)
        np.subtract(b, rest, out=back)
    else:
        back[:] = b
    if chunks > 1:
        table /= chunks
    return table


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
    tau_f: Table,
    tau_b: Table,
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
    times = np.empty((length + 2, s_))  # a row of zeros (when ranks are free first), the ends
    times[0] = 0.0
    ends = times[1:]
    ends[length] = -1.0
    flat = ends.reshape(-1)
    free = times[0]
    r = np.empty(s_)
    mask = np.empty(s_, np.bool_)
    plain = _plain(table, np.delete(hop, s_))
    serial, idle = grid.serial, grid.idle
    take, add, maximum, copyto = flat.take, np.add, np.maximum, np.copyto
    for p, (d, h, c, st, en) in enumerate(zip(grid.dep, arrive, cost, starts, ends, strict=False)):
        if p in idle:  # r = -1.0 + -inf: never later than free (nor NaN)
            copyto(st, free)
            add(free, c, out=en)
            free = en
            continue
        take(d, out=r)
        add(r, h, out=r)
        if p in serial:
            _same_row(plain, serial[p], d, take, r, h, c, free, st, en, mask)
        elif plain:
            maximum(free, r, out=st)
            add(st, c, out=en)
        else:
            _step(False, r, free, c, st, en, mask)
        free = en
    waits = np.zeros((length, s_))
    before = times[:length]
    np.subtract(starts, before, out=waits, where=starts > before)
    waited: list[float] = np.add.accumulate(waits, axis=0, out=waits)[-1].tolist()
    return GridTimes(grid, starts, ends, waited, hop)


# A row whose same-row inputs chain at most this deep is swept (depth + 1) times as a whole
# (each sweep's inputs are final one level further); deeper, its chains run rank by rank.
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


def _same_row(
    plain: bool,
    serial: Serial,
    d: Ints,
    take: Callable[..., Any],
    r: Floats,
    h: Floats,
    c: Floats,
    free: Floats,
    st: Floats,
    en: Floats,
    mask: NDArray[np.bool_],
) -> None:
    """A row with same-row inputs: swept again while one changed (``_SWEEPS``), or every rank
    at once and then, rank by rank in ``chain`` order, each one whose input is made in the row
    (``prod``: that rank, -1: none) from its producer's end."""
    chain, prod, depth = serial
    if depth <= _SWEEPS:
        for _ in range(depth):
            _step(plain, r, free, c, st, en, mask)
            take(d, out=r)
            np.add(r, h, out=r)
        _step(plain, r, free, c, st, en, mask)
        return
    _step(plain, r, free, c, st, en, mask)
    start, end = st.tolist(), en.tolist()
    hop, cost, was = h.tolist(), c.tolist(), free.tolist()
    for s in chain:
        x = end[prod[s]] + hop[s]
        t = was[s]
        if x > t:
            t = x
        start[s] = t
        end[s] = t + cost[s]
    st[:] = start
    en[:] = end
