"""The grid form of a generator's schedule (replayed by ``grid``), built with array operations.

A schedule whose ranks run equally many actions (L each) is an L x S grid: row p holds the
p-th action of every rank. ``grid_of`` builds it from the generator's compact lists (``Rows``)
without a Python step per action: an action's input is fixed by its rank, kind and chunk (a
*class*, S x 3 x V of them), so small per-class tables give its producer's place, and one
array of where each (rank, kind, chunk, micro-batch) runs (``at``: its flat index into the
L x S grid, ``p * S + rank``) gives the row. The arrays are built rank-major (S x L, the
lists' own order) and turned to L x S, the order the replay reads, at the end.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from itertools import accumulate

import numpy as np
from numpy.typing import NDArray

from .actions import Placement, Rows, _placements, virtual_stage
from .compiled import _STASH as _STASH_OF
from .compiled import _queues

Ints = NDArray[np.int64]
Serial = tuple[list[int], list[int], int]  # a row's chained ranks in order, producers, depth

_KIND = np.full(256, -1, np.int64)  # letter -> its block in a rank's cost table (F, B or I, W)
_KIND[[ord("F"), ord("B"), ord("I"), ord("W")]] = [0, 1, 1, 2]
_STASH = np.zeros(256, np.int8)  # letter -> change of the stash, compiled._STASH's
_STASH[[ord(kind) for kind in _STASH_OF]] = list(_STASH_OF.values())


@dataclass(frozen=True)
class Grid:
    """A schedule as L x S arrays (row p: every rank's p-th action).

    ``dep[p, s]``: where the input of rank s's p-th action is made, as a flat index into the
    (L + 1) x S ends (row L: no input, ends -1.0); ``link``: the link it crosses (-1: same rank,
    S: no input, as ``flow``'s hops); ``key``: its cost, a flat index into the ranks' cost
    tables (S x blocks * M: F, then B or I and W, M each); ``serial``: the rows with an input
    from the same row, with the ranks that have one in a runnable order (each after its
    producer), each rank's same-row producer (-1: none) and how deep those chain; ``idle``:
    the rows where no action has an input (ZB-V's W rows). ``queues``: report order (see
    compiled); ``took``/``gave`` (made when first read, from ``at``, where each rank's
    (kind, chunk, micro-batch) runs, and ``blocks``, each queue's runs of M messages): per
    message, flat indices of its consumer (starts) and producer (ends), queue after queue
    (``bounds``); ``peak``: the stash peak per rank.
    """

    num_stages: int
    length: int
    split: bool
    dep: Ints
    link: Ints
    key: Ints
    serial: dict[int, Serial]
    idle: frozenset[int]
    queues: tuple[tuple[int, int, str], ...]
    at: Ints
    blocks: Ints
    bounds: list[int]
    peak: tuple[int, ...]

    @cached_property
    def took(self) -> Ints:
        """Per message, the flat index of its consumer's start."""
        return self._ends(0)

    @cached_property
    def gave(self) -> Ints:
        """Per message, the flat index of its producer's end."""
        return self._ends(1)

    def _ends(self, side: int) -> Ints:
        m_count = (self.bounds[-1] // len(self.blocks)) if len(self.blocks) else 0
        out: Ints = self.at.take(self.blocks[:, side : side + 1] + np.arange(m_count))
        return out.reshape(-1)


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
    text = "".join(rows.kinds)
    split = "I" in text or "W" in text
    if split and "B" in text:
        return None
    # Every array below is L x S (row p: the ranks' p-th actions), as the replay reads them.
    code = np.frombuffer(text.encode(), np.uint8).reshape(s_, length)
    cls = _KIND[np.ascontiguousarray(code.T)]  # the class: rank, kind (block), chunk
    mbs = np.stack(rows.microbatches, axis=1).astype(np.int64, copy=False)
    if chunks > 1:
        cls *= chunks
    if rows.chunks is not None:
        cls += np.stack(rows.chunks, axis=1, dtype=np.int8)
    cls += np.arange(0, 3 * chunks * s_, 3 * chunks)
    unit_count = 3 * chunks * m_count  # (kind, chunk, micro-batch) triples per rank
    tables = _classes(s_, chunks, placement, m_count, 3 if split else 2)
    spot = tables[0].take(cls)
    spot += mbs
    # at[rank * unit_count + unit]: where that unit runs, p * S + rank; M more: none (-1).
    at = np.full(s_ * unit_count + m_count, -1, np.int64)
    at[spot] = np.arange(length * s_).reshape(length, s_)
    if (at[: s_ * unit_count].reshape(s_, -1)[:, : 2 * chunks * m_count] < 0).any():
        return None
    tables[1].take(cls, out=spot, mode="clip")  # clip: no buffer (cls is in range)
    spot += mbs
    dep = at.take(spot)  # -1: no input
    ends = np.arange(s_, (length + 1) * s_, s_)[:, None]  # a row's first flat index past it
    if (dep >= ends).any():
        return None
    same = dep >= ends - s_
    serial = _serial(same, dep)
    if serial is None or len(serial) > max_serial * length:
        return None
    np.copyto(dep, length * s_, where=dep < 0)
    key = tables[2].take(cls, out=spot, mode="clip")
    key += mbs
    link = tables[3][cls]
    idle = frozenset(np.flatnonzero((link == s_).all(axis=1)).tolist())
    queues, blocks, bounds = _messages(s_, chunks, placement, m_count)
    peak = np.cumsum(_STASH[code], axis=1, dtype=np.int32).max(axis=1)
    return Grid(
        s_,
        length,
        split,
        dep,
        link,
        key,
        serial,
        idle,
        queues,
        at,
        blocks,
        bounds,
        tuple(peak.tolist()),
    )


def _classes(
    s_: int, chunks: int, placement: Placement, m_count: int, blocks: int
) -> tuple[Ints, Ints, Ints, NDArray[np.int32]]:
    """Per class (rank * 3V + block * V + chunk; blocks F, B or I, W): where its micro-batch 0
    stands in ``at`` (rank * 3VM + (block * V + chunk) * M), where its producer's does (no
    input: the "none" block past the ranks'), its cost's index in the rank's table (``blocks``
    blocks of M), and the link its input crosses (-1: the same rank, S: no input, S - 1: the
    wrap-around)."""
    vs_count, unit_count = s_ * chunks, 3 * chunks * m_count
    where = _placements(s_, chunks, placement)
    size = s_ * 3 * chunks
    unit, source, key, link = [0] * size, [s_ * unit_count] * size, [0] * size, [s_] * size
    for r in range(s_):
        for blk in range(3):
            for c in range(chunks):
                cls = (r * 3 + blk) * chunks + c
                unit[cls] = r * unit_count + (blk * chunks + c) * m_count
                key[cls] = (r * blocks + blk) * m_count
                v = virtual_stage(r, c, s_, placement)
                sv = v - 1 if blk == 0 else v + 1  # W: no input (its I is on the rank)
                if blk < 2 and 0 <= sv < vs_count:
                    src, sc = where[sv]
                    source[cls] = src * unit_count + (blk * chunks + sc) * m_count
                    near = abs(src - r) == 1
                    link[cls] = -1 if src == r else min(src, r) if near else s_ - 1
    ints = np.int64
    return (
        np.array(unit, ints),
        np.array(source, ints),
        np.array(key, ints),
        np.array(link, np.int32),
    )


def _messages(
    s_: int, chunks: int, placement: Placement, m_count: int
) -> tuple[tuple[tuple[int, int, str], ...], Ints, list[int]]:
    """The queues in report order (see compiled._queues); their messages (by queue, then the
    consumer's chunk, M micro-batches each) as blocks: where the consumer's and the producer's
    micro-batch 0 stand in ``at``; and where each queue's messages begin (and the end)."""
    where, vs_count = _placements(s_, chunks, placement), s_ * chunks
    unit_count = 3 * chunks * m_count
    groups: dict[tuple[int, int, str], list[tuple[int, int]]] = {}
    for dst in range(s_):
        for c in range(chunks):
            v = virtual_stage(dst, c, s_, placement)
            for blk, kind, sv in ((0, "act", v - 1), (1, "grad", v + 1)):
                if 0 <= sv < vs_count and where[sv][0] != dst:
                    src, sc = where[sv]
                    got = (
                        dst * unit_count + (blk * chunks + c) * m_count,
                        src * unit_count + (blk * chunks + sc) * m_count,
                    )
                    groups.setdefault((src, dst, kind), []).append(got)
    queues = _queues(groups)
    blocks = np.array([b for q in queues for b in groups[q]], np.int64).reshape(-1, 2)
    sizes = [0] + [len(groups[q]) * m_count for q in queues]
    return queues, blocks, list(accumulate(sizes))


def _serial(same: NDArray[np.bool_], dep: Ints) -> dict[int, Serial] | None:
    """Per row with a same-row input (``same``): its ranks, each after its same-row producer,
    per rank that producer (-1: none), and the longest chain of them (pointer jumping: after
    k rounds each rank knows 2^k links of its chain); None if they make a cycle."""
    s_ = same.shape[1]
    rows = np.flatnonzero(same.any(axis=1))
    on = same[rows]
    prod = dep[rows] % s_
    flat = np.arange(on.size).reshape(on.shape)
    nxt = np.where(on, prod + (flat - np.arange(s_)), flat).reshape(-1)  # flat: itself
    links = on.astype(np.int64).reshape(-1)
    for _ in range(s_.bit_length()):
        links += links[nxt]
        nxt = nxt[nxt]
    if on.reshape(-1)[nxt].any():  # not at a chain's start: a cycle
        return None
    depth = links.reshape(on.shape)
    order = np.argsort(depth, axis=1, kind="stable").tolist()  # depth 0 (no such input) first
    free = (s_ - on.sum(axis=1)).tolist()
    chains = [ranks[f:] for ranks, f in zip(order, free, strict=True)]
    producer = np.where(on, prod, -1).tolist()
    deepest = depth.max(axis=1, initial=0).tolist()
    return dict(zip(rows.tolist(), zip(chains, producer, deepest, strict=True), strict=True))
