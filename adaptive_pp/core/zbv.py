"""ZB-V (Qi et al. 2024, "Pipeline Parallelism with Controllable Memory", section 6).

Two model chunks per rank in V placement (``Schedule.placement == "v"``): chunk 0 of rank r is
virtual stage r, chunk 1 is virtual stage 2S-1-r, so the model runs down the ranks and back up;
the first and the last virtual stage (the inputs and the loss) sit on rank 0 and the turn
(virtual stages S-1 and S) on rank S-1. The backward is split into I and W as in ZB-H1.

Rank r's order (the paper's Figure 6, as torch's ``ScheduleZBVZeroBubble`` builds it), with
``N = max(M, 2S - 1)`` micro-batches planned and those >= M dropped at the end:

* warm-up: ``2(S - r) - 1`` forwards of chunk 0, then r pairs (F chunk 1, F chunk 0), then
  ``S - r`` triples (F, I, W of chunk 1);
* steady: while chunk 0 has forwards left or chunk 1 lags: (F chunk 0 if any left, I and W of
  chunk 0, F, I and W of chunk 1);
* cool-down: r pairs (I chunk 0, I chunk 1), ``S - r`` pairs (I chunk 0, oldest W chunk 0),
  then the remaining W's of chunk 1, then of chunk 0.

Dropping the micro-batches >= M keeps the order deadlock-free (each micro-batch's actions
depend only on that micro-batch's), so any M >= 1 runs (the validator checks S in 1..8 and all
M in the tests). ``min_microbatches`` (2S - 1) is the smallest M with a full steady state; from
there on, with F = I = W = one unit per chunk and no hop cost, a step takes ``6M + S - 1`` units
(``zero_bubble_units``): every rank idles S - 1 units (r before its first action, S - 1 - r
after its last), half ZB-H1's ``2(S - 1)`` at the same costs ((S-1)(T_F + T_B - T_W) with
stage times T_F = T_W = 2, T_B = 4), the paper's "zero bubble" but for the fill. Peak stash:
at most ``2 min(M, S)`` chunk activations per rank (S stages' worth once M >= S: 1F1B's
peak, on rank 0), reached on every rank once M >= 2S - 1.

With ``M >= 2S - 1`` (nothing dropped) each rank's lists are built from segments of that order
and the generator hands its run plan (``plans``) to the validator; below, the lists come from
the step-by-step order and the event replay runs them.
"""

from __future__ import annotations

from functools import partial

import numpy as np

from .actions import Ints, Kind, Rows, Schedule, _check_sizes, _gc_paused
from .compiled import Compiled, hand_over
from .plans import Queue, Stream, _planned
from .zerobubble import Segment, _fill, _fill_array, _layout

NAME = "zb-v"


def min_microbatches(num_stages: int) -> int:
    """The smallest M for which ZB-V has a full steady state: ``2S - 1``."""
    return 2 * num_stages - 1


def zero_bubble_units(num_stages: int, microbatches: int) -> int:
    """Step time of ZB-V with F = I = W = 1 unit per chunk, for ``M >= min_microbatches(S)``."""
    if microbatches < min_microbatches(num_stages):
        raise ValueError(
            f"the closed form needs M >= 2S - 1 = {min_microbatches(num_stages)}, "
            f"got {microbatches}"
        )
    return 6 * microbatches + num_stages - 1


def _rank_order(rank: int, num_stages: int, n: int) -> list[tuple[Kind, int, int]]:
    """(kind, micro-batch, chunk) of rank ``rank`` planned for ``n`` micro-batches."""
    out: list[tuple[Kind, int, int]] = []
    f0 = f1 = b0 = b1 = 0
    for _ in range(2 * (num_stages - rank) - 1):
        out.append(("F", f0, 0))
        f0 += 1
    for _ in range(rank):
        out += [("F", f1, 1), ("F", f0, 0)]
        f0, f1 = f0 + 1, f1 + 1
    for _ in range(num_stages - rank):
        out += [("F", f1, 1), ("I", b1, 1), ("W", b1, 1)]
        f1, b1 = f1 + 1, b1 + 1
    while f1 < f0 or f0 < n:
        if f0 < n:
            out.append(("F", f0, 0))
            f0 += 1
        out += [("I", b0, 0), ("W", b0, 0), ("F", f1, 1), ("I", b1, 1), ("W", b1, 1)]
        b0, f1, b1 = b0 + 1, f1 + 1, b1 + 1
    w0, w1 = b0, b1
    for _ in range(rank):
        out += [("I", b0, 0), ("I", b1, 1)]
        b0, b1 = b0 + 1, b1 + 1
    for _ in range(num_stages - rank):
        out += [("I", b0, 0), ("W", w0, 0)]
        b0, w0 = b0 + 1, w0 + 1
    out += [("W", m, 1) for m in range(w1, b1)]
    out += [("W", m, 0) for m in range(w0, b0)]
    if not f0 == b0 == n or not f1 == b1 == n:  # pragma: no cover - an internal invariant
        raise AssertionError(f"zb-v rank {rank}: counts F {f0}/{f1}, I {b0}/{b1}, planned {n}")
    return out


@_gc_paused
def zb_v(num_stages: int, microbatches: int) -> Schedule:
    """ZB-V: 2 chunks per rank in V placement, F/I/W actions (see the module docstring).

    One stage is allowed (both chunks on rank 0, the turn a local hand-over).
    """
    _check_sizes(num_stages, microbatches, 2)
    n = max(microbatches, min_microbatches(num_stages))
    kinds: list[str] = []
    mbs: list[Ints] = []
    chs: list[Ints] = []
    if n == microbatches:  # nothing to drop: build each rank's lists from its segments
        ids = np.arange(microbatches)  # micro-batch ids, shared by every rank's list
        for r in range(num_stages):
            tokens, length, spots = _layout(_segments(num_stages, n, r), TOKENS)
            kinds.append(tokens.upper())
            mbs.append(_fill_array(length, spots, ids))
            chs.append(
                np.frombuffer(tokens.encode().translate(_CHUNK_OF), np.uint8).astype(np.int64)
            )
        rows = Rows(tuple(kinds), tuple(mbs), tuple(chs))
        sched = Schedule.generated(rows, microbatches, NAME, 2, "v")
        return hand_over(sched, partial(_plan_zb_v, num_stages, microbatches))
    for r in range(num_stages):
        order = [a for a in _rank_order(r, num_stages, n) if a[1] < microbatches]
        kinds.append("".join(a[0] for a in order))
        mbs.append(np.array([a[1] for a in order], np.int64))
        chs.append(np.array([a[2] for a in order], np.int64))
    rows = Rows(tuple(kinds), tuple(mbs), tuple(chs))
    return Schedule.generated(rows, microbatches, NAME, 2, "v")


# --- the layout from segments and the run plan (M >= 2S - 1: nothing dropped) --------------------
#
# Tokens name a kind and a chunk: upper case chunk 0 (F, I, W), lower case chunk 1 (f, i, w).

TOKENS = "FIWfiw"

_CHUNK_OF = bytes(int(chr(c).islower()) for c in range(256))  # token byte -> its chunk


def _segments(s_: int, n: int, r: int) -> list[Segment]:
    """Rank r's order (see _rank_order) as segments, for ``n >= 2S - 1`` micro-batches:
    warm-up, steady state with and then without a chunk-0 forward, cool-down."""
    k = n - 2 * s_ + r + 1  # steady steps with a chunk-0 forward
    segs: list[Segment] = [
        ("F", 2 * (s_ - r) - 1, {"F": 0}),
        ("fF", r, {"f": 0, "F": 2 * (s_ - r) - 1}),
        ("fiw", s_ - r, {"f": r, "i": 0, "w": 0}),
        ("FIWfiw", k, {"F": 2 * s_ - r - 1, "I": 0, "W": 0, "f": s_, "i": s_ - r, "w": s_ - r}),
        ("IWfiw", s_ - r - 1, {"I": k, "W": k, "f": s_ + k, "i": s_ - r + k, "w": s_ - r + k}),
        ("Ii", r, {"I": n - s_, "i": n - r}),
        ("IW", s_ - r, {"I": n - s_ + r, "W": n - s_}),
        ("w", r, {"w": n - r}),
        ("W", r, {"W": n - r}),
    ]
    return [seg for seg in segs if seg[1] > 0]


def _plan_zb_v(s_: int, m: int) -> Compiled:
    """zb_v's compiled form for ``M >= 2S - 1``: one pass over the columns, ranks ascending.

    Inputs: F (chunk 0) from rank r-1's, f (chunk 1) from rank r+1's, and on rank S-1 from
    its own F (the turn); i from rank r-1's (rank 0's: the loss, none), I from rank r+1's, on
    rank S-1 from its own i. In every column an input's producer runs in an earlier column or
    on a lower rank (the order's whole length is its ascending part: split = length).
    """
    last = s_ - 1
    base = {"F": 0, "f": 0, "I": m, "i": m, "W": 2 * m, "w": 2 * m}  # cost table: F, I, W; M each
    pos: list[dict[str, list[range]]] = []
    links, keys = [], []
    for r in range(s_):
        _, length, spots = _layout(_segments(s_, m, r), TOKENS)
        pos.append({t: [where for where, _ in pieces] for t, pieces in spots.items()})
        hop = {  # the link each token's input crosses (S: none; -1: the same rank)
            "F": r - 1 if r else s_,
            "f": r if r < last else -1,
            "i": r - 1 if r else s_,
            "I": r if r < last else -1,
        }
        link = [s_] * length
        for token, h in hop.items():
            for where, _ in spots[token]:
                link[where.start : where.stop : where.step] = [h] * len(where)
        links.append(link)
        keys.append(partial(_fill, length, spots, base=base))
    streams: list[Stream] = [(last, pos[last]["f"], last, pos[last]["F"])]
    streams.append((last, pos[last]["I"], last, pos[last]["i"]))
    queues: dict[tuple[int, int, str], Queue] = {}
    for r in range(last):  # link r: both chunks' activations and gradients
        up, down = pos[r], pos[r + 1]
        streams += [(r + 1, down["F"], r, up["F"]), (r, up["f"], r + 1, down["f"])]
        streams += [(r + 1, down["i"], r, up["i"]), (r, up["I"], r + 1, down["I"])]
        queues[r, r + 1, "act"] = (down["F"], None, up["F"], None)
        queues[r + 1, r, "act"] = (up["f"], None, down["f"], None)
        queues[r + 1, r, "grad"] = (up["I"], None, down["I"], None)
        queues[r, r + 1, "grad"] = (down["i"], None, up["i"], None)
    length = 6 * m
    split = 2 if s_ == 1 else length  # one rank: where it runs its first backward, as plans do
    return _planned(s_, split, length, streams, queues, links, keys, [2 * s_] * s_, True)
