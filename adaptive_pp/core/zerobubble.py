"""Chunked and split-backward schedules: interleaved 1F1B and ZB-H1 (ZB-V: core/zbv.py).

The runtime runs both: ZB-H1 (split backward, one chunk per rank) and interleaved 1F1B
(``Schedule.chunks > 1``: one StageWorker per chunk, see runtime/local.py).

Both generators hand their compiled form (a run plan, see ``plans``) to the validator, built
from ranges: where each rank runs the F and the B or I of each virtual stage and micro-batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from operator import itemgetter
from typing import Any, TypeVar

import numpy as np

from .actions import Ints, Rows, Schedule, ScheduleError, _check_sizes, _gc_paused
from .compiled import Compiled, Pick, Row, _getter, _link, hand_over
from .plans import Queue, Stream, _chained, _planned

T = TypeVar("T")


@_gc_paused
def interleaved_1f1b(num_stages: int, microbatches: int, chunks: int = 2) -> Schedule:
    """Megatron's interleaved 1F1B: V = ``chunks`` model chunks per rank, looping placement.

    Micro-batches go through in rounds of S: rank r runs forwards of chunk 0 for S micro-batches,
    then chunk 1 for the same S, ..., then the next round; backwards likewise, chunks in reverse.
    Warm-up: ``(V - 1) * S + 2 * (S - 1 - r)`` forwards (capped at M * V), as Megatron and
    torch do, then one forward and one backward in turn, then the remaining backwards.
    Needs ``M % S == 0`` (Megatron's and torch's condition), else ScheduleError.
    """
    _check_sizes(num_stages, microbatches, chunks)
    if microbatches % num_stages:
        raise ScheduleError(
            f"interleaved 1F1B needs micro-batches ({microbatches}) to be a multiple of the "
            f"stages ({num_stages})"
        )
    fc, fm, bc = map(np.array, _interleaved_order(num_stages, microbatches, chunks))
    kinds, mbs, chs = [], [], []
    for r in range(num_stages):
        warmup, n = _interleaved_warmup(num_stages, microbatches, chunks, r)
        kinds.append("F" * warmup + "FB" * n + "B" * warmup)
        mbs.append(_steady_array(fm, fm, warmup, n))
        chs.append(_steady_array(fc, bc, warmup, n))
    rows = Rows(tuple(kinds), tuple(mbs), tuple(chs))
    sched = Schedule.generated(rows, microbatches, "interleaved-1f1b", chunks, "loop")
    return hand_over(sched, partial(_plan_interleaved, num_stages, microbatches, chunks))


def _interleaved_order(s_: int, m: int, v_: int) -> tuple[list[int], list[int], list[int]]:
    """Chunk and micro-batch of each rank's k-th forward, and the chunk of its k-th backward."""
    total, group = m * v_, s_ * v_
    fc = [(k // s_) % v_ for k in range(total)]
    fm = [(k // group) * s_ + k % s_ for k in range(total)]
    return fc, fm, [v_ - 1 - c for c in fc]  # backwards: same micro-batches, chunks in reverse


def _interleaved_warmup(s_: int, m: int, v_: int, r: int) -> tuple[int, int]:
    """Rank r's warm-up forwards and its F/B pairs."""
    total = m * v_
    warmup = min((v_ - 1) * s_ + 2 * (s_ - 1 - r), total) if v_ > 1 else min(s_ - 1 - r, total)
    return warmup, total - warmup


def _seq(picked: int | tuple[int, ...]) -> list[int]:
    """itemgetter's result as a list (one index gives the bare item)."""
    return list(picked) if isinstance(picked, tuple) else [picked]


def _steady(fwd: Sequence[T], bwd: Sequence[T], warmup: int, n: int) -> list[T]:
    """``fwd[:warmup]``, then ``fwd[warmup + j]``, ``bwd[j]`` for j < n, then ``bwd[n:]``."""
    body: list[T] = [fwd[0]] * (2 * n) if n else []
    body[0::2] = fwd[warmup:]
    body[1::2] = bwd[:n]
    return [*fwd[:warmup], *body, *bwd[n:]]


def _steady_array(fwd: Ints, bwd: Ints, warmup: int, n: int) -> Ints:
    """_steady of two int arrays, as an array."""
    out = np.empty(len(fwd) + len(bwd), np.int64)
    out[:warmup] = fwd[:warmup]
    out[warmup : warmup + 2 * n : 2] = fwd[warmup:]
    out[warmup + 1 : warmup + 2 * n : 2] = bwd[:n]
    out[warmup + 2 * n :] = bwd[n:]
    return out


def _steady_pick(
    pick_f: Pick, pick_b: Pick, warmup: int, n: int, table: Sequence[float]
) -> list[float]:
    """A rank's costs in its order (see _steady) from its table."""
    return _steady(pick_f(table), pick_b(table), warmup, n)


def _forwards_at(k0: int, k1: int, warmup: int) -> list[range]:
    """Where a rank's forwards k0..k1-1 stand: the k-th at k during the warm-up (k < warmup),
    then every other place from there."""
    out = [range(k0, min(k1, warmup))] if k0 < warmup else []
    if k1 > warmup:
        a = max(k0, warmup)
        out.append(range(warmup + 2 * (a - warmup), warmup + 2 * (k1 - warmup), 2))
    return out


def _backwards_at(k0: int, k1: int, warmup: int, n: int) -> list[range]:
    """Where a rank's backwards k0..k1-1 stand: the k-th at warmup + 2k + 1 while F and B take
    turns (k < n), then one after the other."""
    out = [range(warmup + 1 + 2 * k0, warmup + 1 + 2 * min(k1, n), 2)] if k0 < n else []
    if k1 > n:
        out.append(range(warmup + n + max(k0, n), warmup + n + k1))
    return out


def _plan_interleaved(s_: int, m: int, v_: int) -> Compiled:
    """interleaved_1f1b's compiled form: virtual stage v = c * S + r on rank r.

    Every rank runs the forwards in one order (k = 0..MV-1) and the backwards in one order, so
    rank r's k-th forward takes rank r-1's k-th forward, and rank 0's (chunk c > 0) takes rank
    S-1's (k-S)-th (chunk c-1, same micro-batch); backwards likewise the other way round.
    """
    fc, fm, bc = _interleaved_order(s_, m, v_)
    total, rnd = m * v_, s_ * v_  # forwards per rank; per round of S micro-batches
    # A rank's cost table: F then B, M each; the k-th forward's and backward's entries.
    pick_f, pick_b = _getter(fm), _getter([m + x for x in fm])
    fwd, back, links, peaks = [], [], [], []
    keys: list[Row] = []
    by_fc, by_bc = itemgetter(*fc), itemgetter(*bc)  # per forward/backward, its chunk's entry
    for r in range(s_):
        warmup, n = _interleaved_warmup(s_, m, v_, r)
        fwd.append(_forwards_at(0, total, warmup))
        back.append(_backwards_at(0, total, warmup, n))
        # The link each input crosses (S: no input; -1: from the same rank, free).
        up = [_link((r - 1) % s_, r, s_) if r or c else s_ for c in range(v_)]
        down = [_link((r + 1) % s_, r, s_) if r < s_ - 1 or c < v_ - 1 else s_ for c in range(v_)]
        if len({*up}) == len({*down}) == 1:  # every chunk's the same (ranks 0 < r < S-1)
            links.append([up[0]] * warmup + [up[0], down[0]] * n + [down[0]] * (total - n))
        else:
            links.append(_steady(_seq(by_fc(up)), _seq(by_bc(down)), warmup, n))
        keys.append(partial(_steady_pick, pick_f, pick_b, warmup, n))
        peaks.append(warmup + 1 if n else warmup)
    streams: list[Stream] = []
    queues: dict[tuple[int, int, str], Queue] = {}
    last = s_ - 1
    w0, n0 = _interleaved_warmup(s_, m, v_, 0)
    wl, nl = _interleaved_warmup(s_, m, v_, last)
    # The queues' messages in report order (by chunk, then micro-batch), as runs of places.
    fby = [_by_chunk(s_, m, v_, r, True) for r in range(s_)]
    bby = [_by_chunk(s_, m, v_, r, False) for r in range(s_)]
    for r in range(1, s_):
        streams.append((r, fwd[r], r - 1, fwd[r - 1]))
        queues[r - 1, r, "act"] = (_joined(fby[r]), None, _joined(fby[r - 1]), None)
    for r in range(last):
        streams.append((r, back[r], r + 1, back[r + 1]))
        queues[r + 1, r, "grad"] = (_joined(bby[r]), None, _joined(bby[r + 1]), None)
    if v_ > 1:  # around the ring: rank 0's chunks c > 0 from rank S-1's c - 1, and back
        later = range(s_, total, rnd)  # per round, the first forward of chunk 1 (to the end)
        streams.append((
            0,
            [x for k in later for x in _forwards_at(k, k + rnd - s_, w0)],
            last,
            [x for k in later for x in _forwards_at(k - s_, k + rnd - 2 * s_, wl)],
        ))  # fmt: skip
        streams.append((
            last,
            [x for k in later for x in _backwards_at(k, k + rnd - s_, wl, nl)],
            0,
            [x for k in later for x in _backwards_at(k - s_, k + rnd - 2 * s_, w0, n0)],
        ))  # fmt: skip
        if s_ > 1:  # (chunk, micro-batch) order; the producer: one chunk before (after)
            queues[last, 0, "act"] = (_joined(fby[0][1:]), None, _joined(fby[last][:-1]), None)
            queues[0, last, "grad"] = (_joined(bby[last][:-1]), None, _joined(bby[0][1:]), None)
    split = w0 + 1 if n0 else w0  # where rank 0 runs its first B
    return _planned(s_, split, 2 * total, streams, queues, links, keys, peaks, False)


def _by_chunk(s_: int, m: int, v_: int, r: int, forward: bool) -> list[list[range]]:
    """Per chunk, where rank r's forwards (else backwards) of it stand, by micro-batch: chunk
    c's forwards of round g (micro-batches g*S..g*S+S-1) are the rank's k-th for k = g*S*V +
    c*S + i; its backwards, those of forward chunk V-1-c (the same k)."""
    w, n = _interleaved_warmup(s_, m, v_, r)
    out = []
    for c in range(v_):
        pieces: list[range] = []
        for k in range((c if forward else v_ - 1 - c) * s_, m * v_, s_ * v_):
            e = k + s_
            if forward and e <= w:  # warm-up: the k-th forward at k
                pieces.append(range(k, e))
            elif forward and k >= w:  # then every other place
                pieces.append(range(2 * k - w, 2 * e - w, 2))
            elif not forward and e <= n:  # F and B take turns: the k-th B at w + 2k + 1
                pieces.append(range(w + 1 + 2 * k, w + 1 + 2 * e, 2))
            elif not forward and k >= n:  # then one after the other
                pieces.append(range(w + n + k, w + n + e))
            else:
                pieces += _forwards_at(k, e, w) if forward else _backwards_at(k, e, w, n)
        out.append(pieces)
    return out


def _joined(per_chunk: list[list[range]]) -> list[range]:
    return [x for pieces in per_chunk for x in pieces]


@_gc_paused
def zb_h1(num_stages: int, microbatches: int) -> Schedule:
    """ZB-H1 (Qi et al. 2023, "Zero Bubble Pipeline Parallelism", section 2.1).

    1F1B with the backward split into I (input gradient, on the critical path) and W (weight
    gradient): rank r runs ``min(S - 1 - r, M)`` warm-up forwards, then per micro-batch k
    ``F(k + warm-up)`` (while any are left) and ``I(k)``, and from the (r+1)-th I on also the
    oldest pending W; the remaining W's close the step. Delaying rank r's W's by r makes every
    rank keep ``min(S, M)`` micro-batches in flight (F to W), rank 0's 1F1B peak, while the
    delayed W's fill the cool-down bubble.
    """
    _check_sizes(num_stages, microbatches)
    ids = np.arange(microbatches)  # micro-batch ids, shared by every rank's list
    kinds, mbs = [], []
    for r in range(num_stages):
        order, length, spots = _layout(_zb_segments(num_stages, microbatches, r))
        kinds.append(order)
        mbs.append(_fill_array(length, spots, ids))
    sched = Schedule.generated(Rows(tuple(kinds), tuple(mbs)), microbatches, "zb-h1")
    return hand_over(sched, partial(_plan_zb_h1, num_stages, microbatches))


Segment = tuple[str, int, dict[str, int]]  # kinds repeated n times, first micro-batch per kind
Spots = dict[str, list[tuple[range, int]]]  # per kind: (positions, first micro-batch) pieces


def _zb_segments(s_: int, m: int, r: int) -> list[Segment]:
    """Rank r's ZB-H1 list as segments (see zb_h1): warm-up forwards, then per step k the
    forward of k + warm-up while k < M - warm-up, I(k), W(k - r) from k = r on; the last W's."""
    w = min(s_ - 1 - r, m)
    fwd_end, w_start = m - w, min(r, m)  # steps with a forward: k < fwd_end; with a W: k >= r
    segs: list[Segment] = [("F", w, {"F": 0}), ("FI", min(fwd_end, w_start), {"F": w, "I": 0})]
    if fwd_end <= w_start:
        segs.append(("I", w_start - fwd_end, {"I": fwd_end}))
        segs.append(("IW", m - w_start, {"I": w_start, "W": w_start - r}))
    else:  # here w_start = r < fwd_end
        segs.append(("FIW", fwd_end - r, {"F": r + w, "I": r, "W": 0}))
        segs.append(("IW", m - fwd_end, {"I": fwd_end, "W": fwd_end - r}))
    segs.append(("W", w_start, {"W": m - w_start}))
    return [seg for seg in segs if seg[1] > 0]


def _layout(segs: list[Segment], tokens: str = "FBIW") -> tuple[str, int, Spots]:
    """The string of ``segs``' tokens (kinds here; kinds and chunks in ZB-V's, see zbv), its
    length and where each token stands (in micro-batch order)."""
    kinds, pos = [], 0
    spots: Spots = {t: [] for t in tokens}
    for pattern, n, first in segs:
        q = len(pattern)
        for i, kind in enumerate(pattern):
            spots[kind].append((range(pos + i, pos + q * n, q), first[kind]))
        kinds.append(pattern * n)
        pos += q * n
    return "".join(kinds), pos, spots


def _fill(
    length: int, spots: Spots, table: Sequence[T], base: dict[str, int] | None = None
) -> list[T]:
    """Per position, ``table[base[kind] + micro-batch]`` (base 0 for a kind not given)."""
    row: list[Any] = [0] * length
    for kind, pieces in spots.items():
        for where, first in pieces:
            lo = (base or {}).get(kind, 0) + first
            row[where.start : where.stop : where.step] = table[lo : lo + len(where)]
    return row


def _fill_array(length: int, spots: Spots, ids: Ints) -> Ints:
    """_fill of micro-batch ids (no bases), as an array."""
    row = np.zeros(length, np.int64)
    for pieces in spots.values():
        for where, first in pieces:
            row[where.start : where.stop : where.step] = ids[first : first + len(where)]
    return row


def _plan_zb_h1(s_: int, m: int) -> Compiled:
    """zb_h1's compiled form."""
    fpos, ipos, links = [], [], []
    keys: list[Row] = []  # each reads the rank's costs from its table (F, I, W; M each)
    for r in range(s_):
        _, length, spots = _layout(_zb_segments(s_, m, r))
        fpos.append([where for where, _ in spots["F"]])
        ipos.append([where for where, _ in spots["I"]])
        up, down = r - 1 if r else s_, r if r < s_ - 1 else s_  # S: no input (as every W)
        link = [s_] * length
        for kind, hop in (("F", up), ("I", down)):
            for where, _ in spots[kind]:
                link[where.start : where.stop : where.step] = [hop] * len(where)
        links.append(link)
        keys.append(partial(_fill, length, spots, base={"I": m, "W": 2 * m}))  # F, I, W
    w0 = min(s_ - 1, m)
    split = w0 + 1 if w0 < m else w0  # where rank 0 runs its first I
    peaks = [min(s_, m)] * s_
    streams, queues = _chained(s_, fpos, ipos)
    return _planned(s_, split, 3 * m, streams, queues, links, keys, peaks, True)
