"""Timing what-if: replay a schedule with per-(stage, micro-batch) costs, no processes needed.

Each stage runs its actions in order, each as soon as the stage is free and its input has
arrived: ``F(s, m)`` needs ``F(s-1, m)`` plus the hop time, ``B(s, m)`` needs ``B(s+1, m)`` plus
the hop time. The result is a StepReport, the same type the runtime produces.

Split backward: I (input gradient) takes ``tau_b - tau_w`` and W ``tau_w``; without ``tau_w``
W takes ``W_SHARE`` of the backward. Chunks: costs stay per rank; each of a rank's V chunks
takes 1/V of them (chunks are equal shares of the rank's layers), and passing an activation
or gradient between two chunks of one rank is free. See ``schedules.replay``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property, partial
from itertools import repeat
from operator import itemgetter, mul
from typing import Any

import numpy as np
from numpy.typing import NDArray

from .actions import _gc_paused
from .flow import _hops, _replay, _Times, grid_for
from .grid import GridTimes, run_grid
from .report import QueueTrace, StageStats, StepReport, Timeline
from .schedules import Compiled, Schedule, compile_schedule

CostSpec = float | Sequence[float | Sequence[float]]

# Backward over forward time of a transformer block, measured for GPT blocks on an H100
# (docs/DESIGN.md): the emulated kernels' default and the controllers' fallback split.
BACKWARD_RATIO = 2.4
# W's share of the backward when it is split (I + W = B). With B = 2.4 F (above) this gives
# I = 1.344 F and W = 1.056 F, the split docs/DESIGN.md measures (I 1.3-1.4 F, W 1.0-1.1 F).
W_SHARE = 0.44


@dataclass(frozen=True)
class Costs:
    """Durations in seconds: ``tau_f[s][m]``, ``tau_b[s][m]`` and ``tau_c[hop]`` (S-1 hops).

    ``tau_w[s][m]`` is the weight-gradient part of ``tau_b`` for split-backward schedules
    (None: ``W_SHARE * tau_b``); ``tau_wrap`` the link S-1 -> 0 interleaved placement wraps
    around (None: the largest ``tau_c``).
    """

    tau_f: tuple[tuple[float, ...], ...]
    tau_b: tuple[tuple[float, ...], ...]
    tau_c: tuple[float, ...]
    tau_w: tuple[tuple[float, ...], ...] | None = None
    tau_wrap: float | None = None

    @property
    def num_stages(self) -> int:
        """Number of stages the costs describe."""
        return len(self.tau_f)

    @property
    def microbatches(self) -> int:
        """Number of micro-batches the costs describe."""
        return len(self.tau_f[0]) if self.tau_f else 0

    @cached_property
    def arrays(self) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
        """``tau_f`` and ``tau_b`` as S x M arrays, the same numbers (made once; ``build``
        makes those of a single number directly)."""
        return np.asarray(self.tau_f, np.float64), np.asarray(self.tau_b, np.float64)

    def w_table(self) -> tuple[tuple[float, ...], ...]:
        """W times per stage and micro-batch (``tau_w``, or ``W_SHARE`` of the backward)."""
        if self.tau_w is not None:
            return self.tau_w
        return tuple(tuple(map(mul, row, repeat(W_SHARE))) for row in self.tau_b)

    @classmethod
    def build(
        cls,
        num_stages: int,
        microbatches: int,
        tau_f: CostSpec,
        tau_b: CostSpec,
        tau_c: float | Sequence[float] = 0.0,
        slowdown: Mapping[int, float] | Sequence[float] | None = None,
        *,
        tau_w: CostSpec | None = None,
        w_share: float | None = None,
        tau_wrap: float | None = None,
    ) -> Costs:
        """Expand scalars, per-stage lists or S x M tables; ``slowdown`` scales whole stages.

        ``tau_w`` (W times, each at most its backward) or ``w_share`` (W = share x backward)
        split the backward for zero-bubble schedules; neither: ``W_SHARE``.
        """
        factors = _stage_factors(num_stages, slowdown)
        f = _table("tau_f", tau_f, num_stages, microbatches, factors)
        b = _table("tau_b", tau_b, num_stages, microbatches, factors)
        w = None
        if tau_w is not None and w_share is not None:
            raise ValueError("give tau_w or w_share, not both")
        if w_share is not None:
            if not 0.0 <= w_share <= 1.0:
                raise ValueError(f"w_share must be in [0, 1], got {w_share}")
            w = tuple(tuple(map(mul, row, repeat(w_share))) for row in b)
        elif tau_w is not None:
            w = _table("tau_w", tau_w, num_stages, microbatches, factors)
            for s, (wr, br) in enumerate(zip(w, b, strict=True)):
                for m, (x, y) in enumerate(zip(wr, br, strict=True)):
                    if x > y:
                        raise ValueError(
                            f"tau_w[stage {s}, micro-batch {m}] = {x} exceeds its backward {y}"
                        )
        if tau_wrap is not None:
            _check_cost("tau_wrap", tau_wrap)
        hops = max(0, num_stages - 1)
        c = (float(tau_c),) * hops if isinstance(tau_c, int | float) else tuple(map(float, tau_c))
        if len(c) != hops:
            raise ValueError(f"tau_c: expected one value per hop ({hops}), got {len(c)}")
        for i, x in enumerate(c):
            _check_cost(f"tau_c[hop {i}]", x)
        costs = cls(f, b, c, w, tau_wrap)
        if isinstance(tau_f, int | float) and isinstance(tau_b, int | float):
            per_stage = np.array(factors, np.float64)[:, None]  # x * k, as _table multiplies
            shape = (num_stages, microbatches)
            arrays = tuple(np.broadcast_to(float(x) * per_stage, shape) for x in (tau_f, tau_b))
            costs.__dict__["arrays"] = arrays  # Costs.arrays, already made
        return costs


def _check_cost(name: str, x: float) -> None:
    if not math.isfinite(x) or x < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {x}")


def _stage_factors(
    num_stages: int, slowdown: Mapping[int, float] | Sequence[float] | None
) -> list[float]:
    factors = [1.0] * num_stages
    if slowdown is None:
        return factors
    items = slowdown.items() if isinstance(slowdown, Mapping) else enumerate(slowdown)
    for s, k in items:
        if not 0 <= s < num_stages:
            raise ValueError(f"slowdown names stage {s}, but stages are 0..{num_stages - 1}")
        _check_cost(f"slowdown of stage {s}", float(k))
        factors[s] = float(k)
    return factors


def _row(name: str, spec: float | Sequence[float], microbatches: int) -> list[float]:
    if isinstance(spec, int | float):
        return [float(spec)] * microbatches
    vals = [float(x) for x in spec]
    if len(vals) != microbatches:
        raise ValueError(f"{name}: expected {microbatches} micro-batch costs, got {len(vals)}")
    return vals


def _table(
    name: str, spec: CostSpec, num_stages: int, microbatches: int, factors: list[float]
) -> tuple[tuple[float, ...], ...]:
    if isinstance(spec, int | float):
        _check_cost(f"{name}[stage 0, micro-batch 0]", float(spec))
        return tuple(tuple([float(spec) * k] * microbatches) for k in factors)
    else:
        if len(spec) != num_stages:
            raise ValueError(
                f"{name}: expected one entry per stage ({num_stages}), got {len(spec)}"
            )
        rows = [_row(f"{name}[stage {s}]", row, microbatches) for s, row in enumerate(spec)]
    for s, row in enumerate(rows):
        for m, x in enumerate(row):
            _check_cost(f"{name}[stage {s}, micro-batch {m}]", x)
    return tuple(tuple(x * factors[s] for x in row) for s, row in enumerate(rows))


@_gc_paused  # builds no reference cycles: a collection in the middle would only scan its lists
def simulate(
    schedule: Schedule, costs: Costs, *, step: int = 0, compiled: Compiled | None = None
) -> StepReport:
    """Replay ``schedule`` under ``costs``; raise ScheduleError on deadlock or a malformed list.

    Pass ``compiled`` (from ``schedules.validate``) to skip re-checking a schedule simulated often.
    """
    num_stages, m_count = schedule.num_stages, schedule.microbatches
    if costs.num_stages != num_stages or costs.microbatches != m_count:
        raise ValueError(
            f"costs are for {costs.num_stages} stages x {costs.microbatches} micro-batches, "
            f"schedule is {num_stages} x {m_count}"
        )
    if schedule.name == "2bw":  # a window of an unflushed stream: its steady state
        from .twobw import simulate_window

        return simulate_window(schedule, costs, step=step)
    grid = grid_for(schedule) if compiled is None else None
    if grid is not None:  # a generator's schedule as a grid: the report's lists on demand
        w_table = W_SHARE if costs.tau_w is None else costs.tau_w  # W = B * W_SHARE, as w_table
        hops = _hops(costs.tau_c, costs.tau_wrap)
        tau_f, tau_b = costs.arrays
        run = run_grid(grid, tau_f, tau_b, w_table, schedule.chunks, hops)
        return _report(schedule, costs, step, run, grid.peak, grid.queues, run.queue_parts())
    code = compiled if compiled is not None else compile_schedule(schedule)
    done = _replay(
        schedule,
        costs.tau_f,
        costs.tau_b,
        costs.tau_c,
        code,
        costs.w_table() if code.split else None,
        costs.tau_wrap,
        queues=True,
    )
    parts = [(partial(itemgetter(0), q), partial(itemgetter(1), q)) for q in done.queue_times()]
    return _report(schedule, costs, step, done, code.peak, code.queues, parts)


def _report(
    schedule: Schedule,
    costs: Costs,
    step: int,
    run: _Times | GridTimes,
    peak: Sequence[int],
    names: Sequence[tuple[int, int, str]],
    parts: Sequence[tuple[Callable[[], Any], Callable[[], Any]]],
) -> StepReport:
    """The StepReport of a replay: queues ``names`` with ``parts`` giving each one's arrivals
    and consumers' starts; the timeline's lists built when first read."""
    step_time = run.step_time()
    stages = tuple(
        StageStats(
            stage=s,
            compute=math.fsum(costs.tau_f[s]) + math.fsum(costs.tau_b[s]),
            wait=run.waited[s],
            wall=step_time,
            peak_stash=peak[s],
        )
        for s in range(schedule.num_stages)
    )
    # One trace per directed link and kind: "act" feeds F, "grad" feeds B or I, messages in
    # (chunk, micro-batch) order; chunks on one rank exchange no messages.
    queues = tuple(
        QueueTrace.deferring({"arrived": arrived, "consumed": consumed}, src=src, dst=dst, kind=k)
        for (src, dst, k), (arrived, consumed) in zip(names, parts, strict=True)
    )
    timeline = Timeline.deferring({
        "actions": lambda: schedule.stages,
        "start": lambda: tuple(run.start),
        "end": lambda: tuple(run.end),
    })  # fmt: skip
    return StepReport(
        step=step,
        schedule=schedule.name,
        microbatches=schedule.microbatches,
        step_time=step_time,
        stages=stages,
        queues=queues,
        timeline=timeline,
        source="simulator",
    )


def uniform_step_time(num_stages: int, microbatches: int, tau_f: float, tau_b: float) -> float:
    """Closed form for equal stages, no hop cost: (M + S - 1)(tau_f + tau_b)."""
    return (microbatches + num_stages - 1) * (tau_f + tau_b)


def bubble_exact(num_stages: int, microbatches: int) -> float:
    """Exact bubble fraction of GPipe and 1F1B with equal stages: (S-1)/(M+S-1)."""
    return (num_stages - 1) / (microbatches + num_stages - 1)


def bubble_approx(num_stages: int, microbatches: int) -> float:
    """The common approximation (S-1)/M (an upper bound, close when M >> S)."""
    return (num_stages - 1) / microbatches
