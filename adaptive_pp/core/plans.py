"""Run plans: every action in one order in which a single replay pass needs no waiting.

The order (``Plan``) puts each action after the action it waits for: column by column (the
p-th action of every rank), ranks ascending in the first ``split`` columns and descending in
the others. A forward waits on the rank before it and a backward on the rank after it; in the
generated schedules a wait inside one column is a forward's in the warm-up columns or a
backward's in the cool-down ones, and ``split`` (where rank 0 runs its first backward) lies
between. ZB-V (M >= 2S - 1) runs ranks ascending in every column (``split`` = the length): its
waits inside a column are chunk-1 input gradients, which run down the ranks. The generators
build their plan from ranges (``_planned``: valid by construction; the tests compare it with
the flat form's); any other schedule whose ranks run equally many actions gets one from its
flat form when every input comes earlier in either order (``_column_plan``).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from functools import partial
from itertools import chain
from operator import lt, sub
from typing import Any

from .compiled import Compiled, Feed, Pick, Plan, Row, _getter, _link, _queues


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
    cost_keys: Sequence[Sequence[int] | Row],
    peaks: Sequence[int],
    split_backward: bool,
) -> Compiled:
    """A generator's compiled form: every rank ``length`` actions long, inputs as ``streams``
    (an action in none has no input), ``queues`` by (source, destination, act or grad); per
    rank s in its order: ``links[s]`` the link each input crosses (S: no input), ``cost_keys[s]``
    the index into the rank's cost table (kind * M + micro-batch, kinds F, B or I, W), or the
    Row that reads them."""
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
        tuple(k if callable(k) else _getter(k) for k in cost_keys),
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


def _sliced(pieces: Sequence[range], values: Sequence[float]) -> list[float]:
    out: list[float] = []
    for x in pieces:
        out += values[x.start : x.stop : x.step]
    return out


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
    every action after its input's producer (else None): ranks ascending up to rank 0's first
    backward and descending from it, or else (ZB-V) ascending throughout."""
    cols, offsets = code.columns, code.offsets
    num_stages = len(offsets) - 1
    length = offsets[1]
    if cols is None or length < 2 or offsets != tuple(range(0, offsets[-1] + 1, length)):
        return None
    n = offsets[-1]
    first = next((p for p, k in enumerate(cols.key[:length]) if k >= cols.stride), length)
    for split in dict.fromkeys((first, length)):  # then every column ranks ascending (ZB-V)

        def run_order(column: list[int], split: int = split) -> list[int]:
            return _transpose([column[lo : lo + length] for lo in offsets[:-1]], split)

        out, need = run_order(cols.out), run_order(cols.need)
        owner = [-1] * len(cols.producer)  # run position of each slot's producer (-1: none)
        deque(map(owner.__setitem__, out, range(n)), maxlen=0)
        came = list(map(owner.__getitem__, need))
        if all(map(lt, came, range(n))):
            break
    else:
        return None
    at = list(chain.from_iterable(_run_positions(num_stages, length, split)))
    took = [list(map(at.__getitem__, c)) for c in cols.consumers]  # their run positions
    return Plan(
        split,
        length,
        list(map(sub, came, range(n))),  # no input: -j - 1, the "no input" entry (flow._run_plan)
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
