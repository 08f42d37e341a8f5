"""Candidate partitions for the rebalancer, and routes of single moves between partitions.

Stage speeds: a stage's cost is its speed factor times the sum of its layers' base costs
(``controllers.costmodel``); ``None`` means every stage runs at speed 1.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from itertools import accumulate, pairwise

from adaptive_pp.core.partition import Partition

Move = tuple[int, int, int]  # (src, dst, count)


def single_moves(part: Partition, max_count: int) -> list[Partition]:
    """Every partition one move away: each boundary, each direction, 1..max_count layers."""
    out = []
    sizes = part.sizes
    for s in range(part.num_stages - 1):
        for src, dst in ((s, s + 1), (s + 1, s)):
            for count in range(1, min(max_count, sizes[src] - 1) + 1):
                out.append(part.move(src, dst, count))
    return out


def nudges(part: Partition) -> list[Partition]:
    """Every partition with one or two boundaries shifted by one layer (no stage emptied)."""
    inner = range(1, part.num_stages)
    shifts: list[tuple[tuple[int, int], ...]] = [((i, d),) for i in inner for d in (-1, 1)]
    shifts += [
        ((i, d), (j, e)) for i in inner for j in inner if i < j for d in (-1, 1) for e in (-1, 1)
    ]
    out = []
    for shift in shifts:
        b = list(part.bounds)
        for i, d in shift:
            b[i] += d
        if all(x < y for x, y in pairwise(b)):
            out.append(Partition(tuple(b)))
    return out


def stage_loads(
    part: Partition, costs: Sequence[float], speeds: Sequence[float] | None = None
) -> list[float]:
    """Each stage's cost: its speed x the sum of its layers' base ``costs``."""
    loads = part.stage_costs(costs)
    return loads if speeds is None else [k * x for k, x in zip(speeds, loads, strict=True)]


def near_balanced(
    costs: Sequence[float],
    num_stages: int,
    slack: float = 0.1,
    limit: int = 48,
    speeds: Sequence[float] | None = None,
) -> list[Partition]:
    """Up to ``limit`` partitions whose costliest stage is within ``slack`` of the min-max optimum.

    The exact min-max split comes first; the search tries each stage's end nearest an even
    share of what is left first, so when there are more than ``limit`` the evener ones are kept.
    """
    k = [1.0] * num_stages if speeds is None else [float(x) for x in speeds]
    best = Partition.balanced(costs, num_stages, speeds)
    cap = max(stage_loads(best, costs, k)) * (1.0 + slack) * (1.0 + 1e-12)
    prefix = [0.0, *accumulate(float(c) for c in costs)]
    # inv[s]: sum of 1 / speed over stages s..; those stages can take cap x inv[s] of base cost.
    inv = [math.fsum(1.0 / x for x in k[s:]) for s in range(num_stages)]
    n = len(costs)
    found: list[tuple[int, ...]] = [best.bounds]
    bounds = [0]

    def extend(stage: int) -> None:
        start = bounds[-1]
        left = num_stages - stage  # stages still to place, this one included
        if left == 1:
            if k[stage] * (prefix[n] - prefix[start]) <= cap:
                cand = (*bounds, n)
                if cand != best.bounds:
                    found.append(cand)
            return
        share = (prefix[n] - prefix[start]) / (k[stage] * inv[stage])
        ends = [
            e
            for e in range(start + 1, n - left + 2)
            if k[stage] * (prefix[e] - prefix[start]) <= cap
            and prefix[n] - prefix[e] <= cap * inv[stage + 1]
        ]
        ends.sort(key=lambda e: (abs(prefix[e] - prefix[start] - share), e))
        for e in ends:
            if len(found) >= limit:
                return
            bounds.append(e)
            extend(stage + 1)
            bounds.pop()

    extend(0)
    return [Partition(b) for b in found[:limit]]


def route(current: Partition, target: Partition, max_count: int) -> list[Move]:
    """Moves ``(src, dst, count)`` turning ``current`` into ``target``, no stage ever empty.

    Each boundary moves straight toward its target (at most ``max_count`` layers a move), so
    no layer moves twice; the first boundary that can move without emptying a stage goes next
    (one always can: the rightmost boundary moving right, or the leftmost moving left).
    """
    bounds = list(current.bounds)
    moves: list[Move] = []
    while True:
        options = first_moves(bounds, target.bounds, max_count)
        if not options:
            return moves
        src, dst, count = options[0]
        i = max(src, dst)
        bounds[i] += count if src == i else -count
        moves.append(options[0])


def first_moves(bounds: Sequence[int], goal: Sequence[int], max_count: int) -> list[Move]:
    """Every move that takes one boundary toward ``goal`` now without emptying a stage."""
    out: list[Move] = []
    for i in range(1, len(bounds) - 1):
        diff = goal[i] - bounds[i]
        delta = max(-max_count, min(max_count, diff))
        if delta and bounds[i - 1] < bounds[i] + delta < bounds[i + 1]:
            out.append((i, i - 1, delta) if delta > 0 else (i - 1, i, -delta))
    return out
