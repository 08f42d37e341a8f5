"""The grid form (adaptive_pp.core.gridform.grid_of, built with array operations) against a
plain construction action by action, field for field: every generator's lists, and the same
lists with a few actions swapped within a rank (inputs from later rows, other same-row chains,
no grid at all), random S, M and chunks."""

from __future__ import annotations

from itertools import accumulate
from typing import Any

import numpy as np
from hypothesis import example, given, settings
from hypothesis import strategies as st

from adaptive_pp.core.actions import Placement, Rows, locate, virtual_stage
from adaptive_pp.core.compiled import _queues
from adaptive_pp.core.gridform import _serial, grid_of
from adaptive_pp.core.schedules import SCHEDULE_NAMES, make_schedule

_BLOCK = {"F": 0, "B": 1, "I": 1, "W": 2}
_STASH = {"F": 1, "B": -1, "I": 0, "W": -1}


def reference(
    rows: Rows, m_count: int, chunks: int, placement: Placement, max_serial: float
) -> dict[str, Any] | None:
    """grid_of's fields, one action at a time (None where grid_of gives None)."""
    s_ = len(rows.kinds)
    length = len(rows.kinds[0]) if s_ else 0
    if not length or any(len(k) != length for k in rows.kinds):
        return None
    text = "".join(rows.kinds)
    split = "I" in text or "W" in text
    if split and "B" in text:
        return None
    acts = []  # per rank: (block, chunk, micro-batch) in order
    for r in range(s_):
        chs = [0] * length if rows.chunks is None else rows.chunks[r].tolist()
        mbs = rows.microbatches[r].tolist()
        acts.append([(_BLOCK[k], c, m) for k, c, m in zip(rows.kinds[r], chs, mbs, strict=True)])
    pos = [{a: p for p, a in enumerate(row)} for row in acts]
    every = [(b, c, m) for b in (0, 1) for c in range(chunks) for m in range(m_count)]
    if any(u not in pos[r] for r in range(s_) for u in every):
        return None
    dep = np.full((length, s_), length * s_)
    link = np.full((length, s_), s_)
    key = np.zeros((length, s_), np.int64)
    producers: dict[int, list[int]] = {}
    for r, row in enumerate(acts):
        for p, (b, c, m) in enumerate(row):
            key[p, r] = (r * (3 if split else 2) + b) * m_count + m
            sv = virtual_stage(r, c, s_, placement) + (-1 if b == 0 else 1)
            if b == 2 or not 0 <= sv < s_ * chunks:
                continue
            src, sc = locate(sv, s_, placement)
            at = pos[src][b, sc, m]
            if at > p:
                return None
            if at == p:
                producers.setdefault(p, [-1] * s_)[r] = src
            dep[p, r] = at * s_ + src
            link[p, r] = -1 if src == r else min(src, r) if abs(src - r) == 1 else s_ - 1
    serial = {}
    for p, prod in sorted(producers.items()):
        depth = []
        for r in range(s_):
            d, q = 0, prod[r]
            while q >= 0:
                d, q = d + 1, prod[q]
                if d > s_:
                    return None  # a cycle
            depth.append(d)
        chain = [r for r in sorted(range(s_), key=depth.__getitem__) if prod[r] >= 0]
        serial[p] = (chain, prod, max(depth))
    if len(serial) > max_serial * length:
        return None
    groups: dict[tuple[int, int, str], list[tuple[int, int]]] = {}
    for dst in range(s_):
        for c in range(chunks):
            v = virtual_stage(dst, c, s_, placement)
            for b, kind, sv in ((0, "act", v - 1), (1, "grad", v + 1)):
                if 0 <= sv < s_ * chunks and locate(sv, s_, placement)[0] != dst:
                    src, sc = locate(sv, s_, placement)
                    for m in range(m_count):
                        message = (pos[dst][b, c, m] * s_ + dst, pos[src][b, sc, m] * s_ + src)
                        groups.setdefault((src, dst, kind), []).append(message)
    queues = _queues(groups)
    return {
        "num_stages": s_,
        "length": length,
        "split": split,
        "dep": dep,
        "link": link,
        "key": key,
        "serial": serial,
        "idle": frozenset(np.flatnonzero((link == s_).all(axis=1)).tolist()),
        "queues": queues,
        "took": [t for q in queues for t, _ in groups[q]],
        "gave": [g for q in queues for _, g in groups[q]],
        "bounds": list(accumulate([0] + [len(groups[q]) for q in queues])),
        "peak": tuple(max(accumulate(map(_STASH.__getitem__, k))) for k in rows.kinds),
    }


def swapped(rows: Rows, swaps: list[tuple[int, float, int]]) -> Rows:
    """``rows`` with, per (rank, x, k), rank's action at fraction x of its list swapped with
    the one k places on (wrapping around)."""
    kinds = [list(k) for k in rows.kinds]
    mbs = [a.copy() for a in rows.microbatches]
    chs = None if rows.chunks is None else [a.copy() for a in rows.chunks]
    for r, x, k in swaps:
        r %= len(kinds)
        i = int(x * (len(kinds[r]) - 1))
        j = (i + k) % len(kinds[r])
        kinds[r][i], kinds[r][j] = kinds[r][j], kinds[r][i]
        for arrays in (mbs, chs) if chs is not None else (mbs,):
            arrays[r][[i, j]] = arrays[r][[j, i]]
    chunks = None if chs is None else tuple(chs)
    return Rows(tuple("".join(k) for k in kinds), tuple(mbs), chunks)


@settings(max_examples=400)
@given(
    st.sampled_from(SCHEDULE_NAMES),
    st.integers(1, 9),
    st.integers(1, 20),
    st.integers(1, 3),
    st.lists(st.tuples(st.integers(0, 8), st.floats(0, 1), st.integers(1, 40)), max_size=2),
    st.sampled_from([0.0, 0.25, 1.0, 1.0, 1.0]),
)
@example("1f1b", 2, 2, 1, [(0, 0.0, 1)], 1.0)  # rank 1's first F: from the next row, rank 0
def test_grid_of_is_the_plain_construction(
    name: str,
    num: int,
    m: int,
    chunks: int,
    swaps: list[tuple[int, float, int]],
    max_serial: float,
) -> None:
    if name == "interleaved-1f1b":
        m = num * (1 + m % 3)
    sched = make_schedule(name, num, m, chunks)
    rows = sched.rows
    assert rows is not None
    rows = swapped(rows, swaps)
    grid = grid_of(rows, m, sched.chunks, sched.placement, max_serial)
    want = reference(rows, m, sched.chunks, sched.placement, max_serial)
    assert (grid is None) == (want is None)
    if grid is None or want is None:
        return
    for field, value in want.items():
        got = getattr(grid, field)
        if isinstance(got, np.ndarray):
            assert got.shape == np.shape(value) and np.array_equal(got, value), field
        else:
            assert got == value, field


def test_serial_orders_chains_and_refuses_cycles() -> None:
    """Rows of 4 ranks (dep: flat indices, 4 per row): row 0 a chain 0 -> 1 -> 2 (rank 3 from
    an earlier row), row 1 none, row 2 rank 3 -> 2 -> 1 -> 0; then a cycle 1 <-> 2."""
    same = np.zeros((3, 4), np.bool_)
    dep = np.full((3, 4), -1, np.int64)
    same[0, 1:3] = same[2, :3] = True
    dep[0, 1:3] = [0, 1]
    dep[2, :3] = [9, 10, 11]
    got = _serial(same, dep)
    assert got == {0: ([1, 2], [-1, 0, 1, -1], 2), 2: ([2, 1, 0], [1, 2, 3, -1], 3)}
    same[1, 1:3] = True
    dep[1, 1:3] = [6, 5]
    assert _serial(same, dep) is None
