"""Replaying schedules, and validate (a replay with zero costs: the deadlock check).

Replaying runs each rank's actions in order, each once its rank is free and its input has
arrived: ``start = max(free, arrival)``, ``end = start + cost``, ``arrival = ready + hop`` (the
producer's end plus the link's time). Three ways run it, with the same floating-point operations
in the same order, hence the same times to the bit:

- The grid (``grid``): a generator's schedule (``Schedule.rows``) as rows of every rank's p-th
  action, replayed a row at a time with numpy; the same operations per element.
- The run plan (``plans``): every action in one fixed order that puts each one after the action
  it waits for, so a single pass (``_run_plan``) needs no waiting and no bookkeeping.
- The event replay (``eventreplay``), for everything else and to name a deadlock.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import chain, compress, repeat
from operator import add, eq, sub, truediv

from .actions import Schedule, _gc_paused
from .compiled import (
    _NO_INPUT,
    Compiled,
    Pick,
    Plan,
    _getter,
    _stream_of,
    compile_schedule,
    handed_over,
)
from .eventreplay import _event_replay
from .grid import GridTimes, run_grid
from .gridform import Grid, grid_of
from .plans import _plan_of, _rank_order, _transpose


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
    split: bool,
    chunks: int,
    tau_f: Sequence[Sequence[float]],
    tau_b: Sequence[Sequence[float]],
    tau_w: Sequence[Sequence[float]] | None,
) -> list[float]:
    """Costs indexed by ``Columns.key``: F, B, I, W tables, each S x M, divided by chunks."""
    flat = [*chain.from_iterable(tau_f), *chain.from_iterable(tau_b)]
    if split:
        if tau_w is None:
            raise ValueError("a split-backward schedule needs W times (tau_w)")
        w = list(chain.from_iterable(tau_w))
        flat += [b - x for b, x in zip(flat[len(w) :], w, strict=True)] + w
    if chunks > 1:
        flat = list(map(truediv, flat, repeat(chunks)))
    return flat


def _run_costs(
    plan: Plan,
    split: bool,
    chunks: int,
    tau_f: Sequence[Sequence[float]],
    tau_b: Sequence[Sequence[float]],
    tau_w: Sequence[Sequence[float]] | None,
) -> Sequence[float]:
    """Each action's cost in the plan's run order: the same values as _flat_costs."""
    if plan.keys is not None:
        return plan.keys(_flat_costs(split, chunks, tau_f, tau_b, tau_w))
    if split and tau_w is None:
        raise ValueError("a split-backward schedule needs W times (tau_w)")
    rows = []
    for s, pick in enumerate(plan.cost_rows):
        if split:
            w = tau_w[s]  # type: ignore[index]
            table = [*tau_f[s], *map(sub, tau_b[s], w), *w]
        else:
            table = [*tau_f[s], *tau_b[s]]
        if chunks > 1:
            table = list(map(truediv, table, repeat(chunks)))
        rows.append(pick(table))
    return _transpose(rows, plan.split)


@dataclass(frozen=True)
class _Times:
    """A replay's raw result: per rank starts and ends, waits, and the queues' times. From a
    plan: ``ends`` in run order (after one leading entry) and ``queues`` if asked for; from the
    event replay: flat ``starts`` and ``arrivals`` that ``picks`` read."""

    start: list[list[float]]
    end: list[list[float]]
    waited: list[float]
    ends: list[float]
    hops: list[float]
    plan: Plan | None
    queues: list[tuple[tuple[float, ...], tuple[float, ...]]] | None = None
    starts: list[float] = field(default_factory=list)
    arrivals: list[float] = field(default_factory=list)
    picks: tuple[Pick, ...] = ()

    def step_time(self) -> float:
        """The last end of any rank."""
        return max((en[-1] for en in self.end if en), default=0.0)

    def queue_times(self) -> list[tuple[tuple[float, ...], tuple[float, ...]]]:
        """Per queue, its messages' arrivals and the times their consumers took them."""
        if self.queues is not None:
            return self.queues
        plan = self.plan
        if plan is None:
            return [(pick(self.arrivals), pick(self.starts)) for pick in self.picks]
        which = range(len(plan.pairs))
        return _queue_times(plan, which, self.start, self.end, self.hops)

    def arrived(self) -> list[float]:
        """Arrivals by flat index (-1.0: no input)."""
        plan = self.plan
        if plan is None:
            return self.arrivals
        n, num_stages = len(plan.back), len(self.start)
        came = map(self.ends.__getitem__, map(add, range(1, n + 1), plan.back))
        ar = list(map(add, came, map(self.hops.__getitem__, plan.link)))
        none = compress(range(n), map(eq, plan.link, repeat(num_stages)))
        deque(map(ar.__setitem__, none, repeat(_NO_INPUT)), maxlen=0)  # a generator's "none"
        return list(chain.from_iterable(_rank_order(ar, plan.split, num_stages, 0)))


def _queue_times(
    plan: Plan,
    which: Sequence[int],
    start: list[list[float]],
    end: list[list[float]],
    hops: list[float],
) -> list[tuple[tuple[float, ...], tuple[float, ...]]]:
    """Queues ``which``: arrivals (the producer's end plus the hop: the addition the replay
    made) and the consumers' starts."""
    out = []
    for q in which:
        src, dst = plan.pairs[q]
        arrived = tuple(map(add, plan.producers[q](end[src]), repeat(hops[plan.links[q]])))
        out.append((arrived, plan.consumers[q](start[dst])))
    return out


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
    run = _replay(schedule, tau_f, tau_b, tau_c, compiled, tau_w, tau_wrap)
    return Replay(run.start, run.end, run.waited, run.arrived())


@_gc_paused
def _replay(
    schedule: Schedule,
    tau_f: Sequence[Sequence[float]],
    tau_b: Sequence[Sequence[float]],
    tau_c: Sequence[float],
    compiled: Compiled | None,
    tau_w: Sequence[Sequence[float]] | None,
    tau_wrap: float | None,
    queues: bool = False,
    vectorised: bool = True,
) -> _Times | GridTimes:
    """replay() without building the flat arrivals; ``queues``: with the queues' times (the
    simulator takes those instead). A generator's schedule replays as a grid (``grid``) if it
    has one, unless ``compiled`` has no run plan (the event replay); ``vectorised=False``: as
    any other (its run plan's scalar pass), the same times."""
    chunks = schedule.chunks
    hops = _hops(tau_c, tau_wrap)
    grid = grid_for(schedule) if vectorised else None
    if grid is not None and (compiled is None or _plan_of(compiled) is not None):
        return run_grid(grid, tau_f, tau_b, tau_w if grid.split else None, chunks, hops)
    code = compiled if compiled is not None else compile_schedule(schedule)
    plan = _plan_of(code)
    if plan is not None:
        costs = _run_costs(plan, code.split, chunks, tau_f, tau_b, tau_w)
        return _run_plan(plan, costs, hops, schedule.num_stages, queues)
    cols = code.columns
    assert cols is not None  # only a generator's form comes without, and it has a plan
    flat = _flat_costs(code.split, chunks, tau_f, tau_b, tau_w)
    start, end, waited, st, arrived = _event_replay(schedule, code, flat, hops)
    if "picks" not in code._memo:
        code._memo["picks"] = tuple(map(_getter, cols.consumers))
    return _Times(
        start, end, waited, [], hops, None, starts=st, arrivals=arrived, picks=code._memo["picks"]
    )


def _hops(tau_c: Sequence[float], tau_wrap: float | None) -> list[float]:
    """Hop time by link: h < S-1 ranks h, h+1; S-1 the wrap-around (default: the largest
    ``tau_c``); S no input (-inf); -1 the same rank (free)."""
    wrap = max(tau_c, default=0.0) if tau_wrap is None else tau_wrap
    return [*tau_c, wrap, -math.inf, 0.0]


# Fewest ranks for the grid: a row's numpy calls cost about as much as the scalar pass over
# 16 actions (1F1B, 32 x 1024: grid 41 ms, scalar 59; even at 16 ranks, slower below).
GRID_MIN_STAGES = 16


def grid_for(schedule: Schedule) -> Grid | None:
    """The grid of a generator's schedule of GRID_MIN_STAGES ranks or more that hands over its
    run plan (None for any other, or if it has none), made once. Like that plan, and unlike a
    flat form (no input: ready at -1.0), an action without input never waits: the same times
    unless costs below zero take a rank's times below -1.0."""
    rows = schedule.rows
    if rows is None or not rows.rowwise or len(rows.kinds) < GRID_MIN_STAGES:
        return None
    if not handed_over(schedule):
        return None
    if "grid" not in rows.memo:
        rows.memo["grid"] = grid_of(
            rows, schedule.microbatches, schedule.chunks, schedule.placement
        )
    grid: Grid | None = rows.memo["grid"]
    return grid


def _run_plan(
    plan: Plan, costs: Sequence[float], hops: list[float], num_stages: int, queues: bool
) -> _Times:
    """Replay in the plan's run order (see ``plans``): one pass, no waiting. With
    ``queues``, the queues' times too."""
    last = [0.0] * num_stages  # when each rank is free
    waited = [0.0] * num_stages
    st: list[float] = []
    en = [_NO_INPUT]  # en[j + 1]: the end of the j-th action; en[0]: "no input"
    for b, h, c, s in zip(plan.back, plan.link, costs, plan.ranks, strict=True):
        t = last[s]
        r = en[b] + hops[h]  # en[b] = en[len(en) + b]: the end of the (j + b)-th action
        if r > t:
            waited[s] += r - t
            t = r
        st.append(t)
        t += c
        en.append(t)
        last[s] = t
    if not queues:
        starts = _rank_order(st, plan.split, num_stages, 0)
        return _Times(starts, _rank_order(en, plan.split, num_stages, 1), waited, en, hops, plan)
    # Each rank's lists, then the queues whose later rank that was, while their times are
    # still in the cache (the run order scatters a rank's times over memory).
    when: list[list[int]] = [[] for _ in range(num_stages)]
    for q, (src, dst) in enumerate(plan.pairs):
        when[max(src, dst)].append(q)
    start: list[list[float]] = []
    end: list[list[float]] = []
    times: list[tuple[tuple[float, ...], tuple[float, ...]]] = [((), ())] * len(plan.pairs)
    b = plan.split * num_stages
    mid = b + num_stages - 1
    for s in range(num_stages):
        row = st[s:b:num_stages]
        row += st[mid - s :: num_stages]
        start.append(row)
        row = en[1 + s : 1 + b : num_stages]
        row += en[1 + mid - s :: num_stages]
        end.append(row)
        for q, got in zip(when[s], _queue_times(plan, when[s], start, end, hops), strict=True):
            times[q] = got
    return _Times(start, end, waited, en, hops, plan, times)


def validate(schedule: Schedule, max_stash: int | Sequence[int] | None = None) -> Compiled:
    """Raise ScheduleError unless every rank runs its actions once, in order, without deadlock.

    ``max_stash`` (one bound, or one per rank) also bounds each rank's peak stash. A 2BW
    window (core.twobw) is checked as two steps of its stream and returns that form (same
    peak stash per rank).
    """
    schedule = _stream_of(schedule)
    code = compile_schedule(schedule, max_stash)
    zeros = [[0.0] * schedule.microbatches] * schedule.num_stages
    _replay(schedule, zeros, zeros, [0.0] * (schedule.num_stages - 1), code, zeros, None)
    return code
