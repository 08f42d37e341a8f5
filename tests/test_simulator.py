"""Tests for adaptive_pp.simulator: closed forms, hand-computed timelines, queues, bad costs."""

from __future__ import annotations

import math
from collections import Counter
from typing import Any

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from adaptive_pp.core.flow import grid_for
from adaptive_pp.core.report import StepReport
from adaptive_pp.core.schedules import (
    KINDS,
    Action,
    Schedule,
    gpipe,
    make_schedule,
    one_f_one_b,
    validate,
)
from adaptive_pp.core.simulator import (
    Costs,
    bubble_approx,
    bubble_exact,
    simulate,
    uniform_step_time,
)

NAMES = ("gpipe", "1f1b")
TOL = 1e-9

names_st = st.sampled_from(NAMES)
tau_st = st.floats(min_value=0.1, max_value=10.0, allow_nan=False, allow_infinity=False)


def run(name: str, num_stages: int, microbatches: int, *args: Any, **kwargs: Any) -> StepReport:
    """Simulate schedule ``name`` under ``Costs.build(S, M, *args, **kwargs)``."""
    schedule = make_schedule(name, num_stages, microbatches)
    return simulate(schedule, Costs.build(num_stages, microbatches, *args, **kwargs))


def starts(report: StepReport) -> list[list[float]]:
    """Start times per stage, in schedule order."""
    return [list(st_) for st_ in report.timeline.start]


# --- equal stages, no hop cost: the closed forms ---------------------------------------------


@given(
    name=names_st,
    num_stages=st.integers(1, 10),
    microbatches=st.integers(1, 32),
    tau_f=tau_st,
    tau_b=tau_st,
)
def test_uniform_closed_forms(
    name: str, num_stages: int, microbatches: int, tau_f: float, tau_b: float
) -> None:
    s_, m_ = num_stages, microbatches
    report = run(name, s_, m_, tau_f, tau_b, 0.0)
    step = (m_ + s_ - 1) * (tau_f + tau_b)
    assert report.step_time == pytest.approx(step, rel=TOL)
    assert uniform_step_time(s_, m_, tau_f, tau_b) == pytest.approx(step, rel=TOL)
    assert report.bubble_fraction == pytest.approx((s_ - 1) / (m_ + s_ - 1), rel=TOL, abs=TOL)
    assert bubble_exact(s_, m_) == pytest.approx((s_ - 1) / (m_ + s_ - 1), rel=TOL)
    expected_peak = tuple(m_ if name == "gpipe" else min(s_ - s, m_) for s in range(s_))
    assert report.peak_stash == expected_peak
    for u in report.utilization:
        assert u == pytest.approx(m_ * (tau_f + tau_b) / step, rel=TOL)
    for stats in report.stages:
        assert stats.compute == pytest.approx(m_ * (tau_f + tau_b), rel=TOL)
        assert stats.wall == report.step_time
    assert report.schedule == name
    assert report.microbatches == m_
    assert report.source == "simulator"


def test_bubble_formulas() -> None:
    assert bubble_exact(4, 16) == 3 / 19
    assert bubble_approx(4, 16) == 0.1875
    assert bubble_exact(1, 8) == 0.0
    assert bubble_approx(1, 8) == 0.0
    # The approximation over-states the exact bubble whenever S > 1.
    assert bubble_approx(8, 4) > bubble_exact(8, 4)


def test_1f1b_unit_costs_match_docstring_clock_table() -> None:
    # The 1F1B S=3, M=4 clock table of adaptive_pp.schedules, one unit per action:
    #   stage 0: F0 F1 F2 .. .. B0 F3 B1 .. B2 .. B3
    #   stage 1: .. F0 F1 .. B0 F2 B1 F3 B2 .. B3 ..
    #   stage 2: .. .. F0 B0 F1 B1 F2 B2 F3 B3 .. ..
    # read column by column, in each stage's action order (see tests/golden/1f1b_s3_m4.txt).
    report = run("1f1b", 3, 4, 1.0, 1.0)
    assert starts(report) == [
        [0, 1, 2, 5, 6, 7, 9, 11],  # 0F0 0F1 0F2 0B0 0F3 0B1 0B2 0B3
        [1, 2, 4, 5, 6, 7, 8, 10],  # 1F0 1F1 1B0 1F2 1B1 1F3 1B2 1B3
        [2, 3, 4, 5, 6, 7, 8, 9],  # 2F0 2B0 2F1 2B1 2F2 2B2 2F3 2B3
    ]
    assert report.step_time == 12.0


# --- hop cost ----------------------------------------------------------------------------------


@given(
    name=names_st,
    num_stages=st.integers(1, 8),
    microbatches=st.integers(1, 16),
    tau_f=tau_st,
    tau_b=tau_st,
    tau_c=st.floats(0.0, 5.0),
)
def test_hop_cost_never_speeds_up(
    name: str, num_stages: int, microbatches: int, tau_f: float, tau_b: float, tau_c: float
) -> None:
    free = run(name, num_stages, microbatches, tau_f, tau_b, 0.0).step_time
    paid = run(name, num_stages, microbatches, tau_f, tau_b, tau_c).step_time
    assert paid >= free * (1 - TOL)


@given(name=names_st, tau_f=tau_st, tau_b=tau_st, tau_c=st.floats(0.0, 5.0))
def test_two_stages_one_microbatch_is_serial(
    name: str, tau_f: float, tau_b: float, tau_c: float
) -> None:
    # S=2, M=1: 0F0, hop, 1F0, 1B0, hop, 0B0 -- nothing can overlap.
    report = run(name, 2, 1, tau_f, tau_b, tau_c)
    expected = tau_f + tau_c + tau_f + tau_b + tau_c + tau_b
    assert report.step_time == pytest.approx(expected, rel=TOL)
    assert starts(report)[1][0] == pytest.approx(tau_f + tau_c, rel=TOL)
    assert starts(report)[0][1] == pytest.approx(2 * tau_f + tau_b + 2 * tau_c, rel=TOL)


@given(
    num_stages=st.integers(1, 8),
    microbatches=st.integers(1, 16),
    tau_f=tau_st,
    tau_b=tau_st,
    tau_c=st.floats(0.0, 5.0),
)
def test_gpipe_closed_form_with_hops(
    num_stages: int, microbatches: int, tau_f: float, tau_b: float, tau_c: float
) -> None:
    # GPipe with equal stages and hop time c (tf, tb per action):
    # - Forwards: F(s, m) ends at (s + 1 + m) tf + s c. By induction: stage s is free after
    #   F(s, m-1) at (s + m) tf + s c, and F(s-1, m) arrives at (s + m) tf + (s-1) c + c -- the
    #   same instant, so F(s, m) starts then. The last forward, F(S-1, M-1), ends at
    #   T_F = (M + S - 1) tf + (S - 1) c.
    # - Backwards: B(s, m) ends at T_F + (S-1-s)(tb + c) + (m + 1) tb. The last stage starts its
    #   backwards at T_F; stage s < S-1 gets B(s+1, m)'s gradient at
    #   T_F + (S-1-s)(tb + c) + m tb, which is when it finishes B(s, m-1) (for m = 0 it has been
    #   idle since its own forwards ended at (s + M) tf + s c <= T_F).
    # Stage 0's last backward ends the step: (M + S - 1)(tf + tb) + 2 (S - 1) c.
    report = run("gpipe", num_stages, microbatches, tau_f, tau_b, tau_c)
    expected = (microbatches + num_stages - 1) * (tau_f + tau_b) + 2 * (num_stages - 1) * tau_c
    assert report.step_time == pytest.approx(expected, rel=TOL)


def test_1f1b_with_hops_hand_computed() -> None:
    # 1F1B, S=3, M=3, tf = tb = c = 1. Stage lists: 0: F0 F1 F2 B0 B1 B2,
    # 1: F0 F1 B0 F2 B1 B2, 2: F0 B0 F1 B1 F2 B2. An action starts at max(stage free,
    # input end + 1):
    #   0F0 0-1  0F1 1-2  0F2 2-3
    #   1F0 2-3 (0F0 1+1)  1F1 3-4 (0F1 2+1)
    #   2F0 4-5 (1F0 3+1)  2B0 5-6  2F1 6-7 (free 6)  2B1 7-8
    #   1B0 7-8 (2B0 6+1)  1F2 8-9 (free 8)  1B1 9-10 (2B1 8+1)
    #   2F2 10-11 (1F2 9+1)  2B2 11-12  1B2 13-14 (2B2 12+1)
    #   0B0 9-10 (1B0 8+1)  0B1 11-12 (1B1 10+1)  0B2 15-16 (1B2 14+1)
    # Step 16: more than the 10 of c = 0, and more than GPipe's form with hops (14), since the
    # F/B alternation puts extra round trips on the critical path.
    report = run("1f1b", 3, 3, 1.0, 1.0, 1.0)
    assert starts(report) == [
        [0, 1, 2, 9, 11, 15],
        [2, 3, 7, 8, 9, 13],
        [4, 5, 6, 7, 10, 11],
    ]
    assert report.step_time == 16.0
    assert run("1f1b", 3, 3, 1.0, 1.0, 0.0).step_time == 10.0


# --- heterogeneous stages ---------------------------------------------------------------------


@given(
    name=names_st,
    num_stages=st.integers(3, 8),
    microbatches=st.integers(1, 16),
    tau_f=tau_st,
    tau_b=tau_st,
)
def test_slow_stage_bounds_the_step(
    name: str, num_stages: int, microbatches: int, tau_f: float, tau_b: float
) -> None:
    report = run(name, num_stages, microbatches, tau_f, tau_b, 0.0, slowdown={2: 2.0})
    slow = 2 * microbatches * (tau_f + tau_b)
    assert report.stage_compute[2] == pytest.approx(slow, rel=TOL)
    assert report.step_time >= slow * (1 - TOL)
    # Stage 2 starts with F(2, 0), after F(0, 0) and F(1, 0); it ends with B(2, M-1), which
    # B(1, M-1) and B(0, M-1) must follow.
    assert report.step_time >= (slow + 2 * tau_f + 2 * tau_b) * (1 - TOL)
    # All stages share the wall time, so the stage with the most compute has the highest U.
    util = report.utilization
    assert all(util[2] > u for s, u in enumerate(util) if s != 2)
    balanced = run(name, num_stages, microbatches, tau_f, tau_b, 0.0)
    assert report.step_time >= balanced.step_time * (1 - TOL)


@pytest.mark.parametrize(
    ("name", "expected_starts", "step", "wait"),
    [
        (
            # 1F1B lists: 0: F0 F1 B0 B1, 1: F0 B0 F1 B1. With c = 0.25:
            #   0F0 0-1  0F1 1-3
            #   1F0 1.25-4.25 (0F0 1 + .25)  1B0 4.25-8.25  1F1 8.25-8.75 (free; 0F1 3.25)
            #   1B1 8.75-10.25
            #   0B0 8.5-10.5 (1B0 8.25 + .25)  0B1 10.5-11.5 (1B1 10.25 + .25 = free)
            "1f1b",
            [[0, 1, 8.5, 10.5], [1.25, 4.25, 8.25, 8.75]],
            11.5,
            # stage 0 idles 3 -> 8.5; stage 1 idles 0 -> 1.25
            (5.5, 1.25),
        ),
        (
            # GPipe lists: 0: F0 F1 B0 B1, 1: F0 F1 B0 B1. With c = 0.25:
            #   0F0 0-1  0F1 1-3
            #   1F0 1.25-4.25  1F1 4.25-4.75 (free; 0F1 3.25)  1B0 4.75-8.75  1B1 8.75-10.25
            #   0B0 9-11 (1B0 8.75 + .25)  0B1 11-12 (free; 1B1 10.5)
            "gpipe",
            [[0, 1, 9, 11], [1.25, 4.25, 4.75, 8.75]],
            12.0,
            (6.0, 1.25),
        ),
    ],
)
def test_per_microbatch_costs_hand_computed(
    name: str, expected_starts: list[list[float]], step: float, wait: tuple[float, ...]
) -> None:
    # Distinct cost for every (stage, micro-batch), skewed like MoE routing; exact in binary.
    tau_f = [[1.0, 2.0], [3.0, 0.5]]
    tau_b = [[2.0, 1.0], [4.0, 1.5]]
    report = run(name, 2, 2, tau_f, tau_b, 0.25)
    assert starts(report) == expected_starts
    assert report.step_time == step
    assert report.stage_compute == (6.0, 9.0)
    assert tuple(s.wait for s in report.stages) == wait
    for timing in report.timeline:
        table = tau_f if timing.kind == "F" else tau_b
        assert timing.end - timing.start == table[timing.stage][timing.microbatch]


@given(
    name=names_st,
    num_stages=st.integers(2, 5),
    microbatches=st.integers(1, 6),
    data=st.data(),
)
def test_cost_tables_are_indexed_stage_then_microbatch(
    name: str, num_stages: int, microbatches: int, data: st.DataObject
) -> None:
    cost = st.floats(0.0, 10.0)
    row = st.lists(cost, min_size=microbatches, max_size=microbatches)
    tau_f = data.draw(st.lists(row, min_size=num_stages, max_size=num_stages))
    tau_b = data.draw(st.lists(row, min_size=num_stages, max_size=num_stages))
    report = run(name, num_stages, microbatches, tau_f, tau_b, 0.5)
    for timing in report.timeline:
        table = tau_f if timing.kind == "F" else tau_b
        expected = table[timing.stage][timing.microbatch]
        assert timing.end - timing.start == pytest.approx(expected, rel=TOL, abs=TOL)
    for s in range(num_stages):
        assert report.stage_compute[s] == pytest.approx(sum(tau_f[s]) + sum(tau_b[s]), rel=TOL)


# --- timeline and queues under random costs --------------------------------------------------


@st.composite
def random_case(draw: st.DrawFn) -> tuple[Schedule, Costs]:
    """A generated schedule with random per-(stage, micro-batch) costs and hop times."""
    num_stages = draw(st.integers(1, 6))
    microbatches = draw(st.integers(1, 8))
    cost = st.floats(0.0, 5.0)
    row = st.lists(cost, min_size=microbatches, max_size=microbatches)
    table = st.lists(row, min_size=num_stages, max_size=num_stages)
    hops = st.lists(st.floats(0.0, 2.0), min_size=num_stages - 1, max_size=num_stages - 1)
    schedule = make_schedule(draw(names_st), num_stages, microbatches)
    return schedule, Costs.build(num_stages, microbatches, draw(table), draw(table), draw(hops))


def approx(x: float) -> Any:
    return pytest.approx(x, rel=TOL, abs=TOL)


@given(random_case())
def test_timeline_is_consistent(case: tuple[Schedule, Costs]) -> None:
    schedule, costs = case
    num_stages, m_count = schedule.num_stages, schedule.microbatches
    report = simulate(schedule, costs)
    timeline = report.timeline

    # Every action exactly once.
    counts = Counter(t.action for t in timeline)
    assert len(timeline) == 2 * num_stages * m_count
    assert set(counts) == {
        Action(s, k, m) for s in range(num_stages) for k in KINDS for m in range(m_count)
    }
    assert set(counts.values()) == {1}

    end = {t.action: t.end for t in timeline}
    for s, actions in enumerate(schedule):
        timings = timeline.stage(s)
        assert [t.action for t in timings] == list(actions)  # schedule order
        free = 0.0
        for t in timings:
            duration = (costs.tau_f if t.kind == "F" else costs.tau_b)[s][t.microbatch]
            assert t.end == approx(t.start + duration)
            assert t.start >= free  # no overlap on a stage
            ready = 0.0
            if t.kind == "F" and s > 0:
                ready = end[Action(s - 1, "F", t.microbatch)] + costs.tau_c[s - 1]
            elif t.kind == "B" and s < num_stages - 1:
                ready = end[Action(s + 1, "B", t.microbatch)] + costs.tau_c[s]
            assert t.start >= ready - TOL
            # As soon as possible: when both the stage and the input are ready, not later.
            assert t.start == approx(max(free, ready))
            free = t.end

    assert report.step_time == max(t.end for t in timeline)
    for s, stats in enumerate(report.stages):
        last_end = timeline.stage(s)[-1].end
        # Wait is the idle time before the stage's last action ends.
        assert stats.wait == approx(last_end - stats.compute)
        assert stats.wall == report.step_time
        assert stats.compute == approx(math.fsum(costs.tau_f[s]) + math.fsum(costs.tau_b[s]))


@given(random_case())
def test_step_time_bounds(case: tuple[Schedule, Costs]) -> None:
    schedule, costs = case
    report = simulate(schedule, costs)
    hops = math.fsum(costs.tau_c)
    # No stage can do its work faster than back to back.
    assert report.step_time >= max(report.stage_compute) * (1 - TOL)
    # Every micro-batch goes all the way down and back up.
    for m in range(schedule.microbatches):
        path = sum(costs.tau_f[s][m] + costs.tau_b[s][m] for s in range(schedule.num_stages))
        assert report.step_time >= (path + 2 * hops) * (1 - TOL) - TOL
    # Something is always computing or in flight: never slower than doing it all in series.
    serial = sum(report.stage_compute) + 2 * schedule.microbatches * hops
    assert report.step_time <= serial * (1 + TOL) + TOL


@given(random_case(), st.data())
def test_raising_one_cost_never_shortens_the_step(
    case: tuple[Schedule, Costs], data: st.DataObject
) -> None:
    schedule, costs = case
    before = simulate(schedule, costs).step_time
    s = data.draw(st.integers(0, schedule.num_stages - 1))
    m = data.draw(st.integers(0, schedule.microbatches - 1))
    delta = data.draw(st.floats(0.0, 5.0))
    which = data.draw(st.sampled_from(["tau_f", "tau_b", "tau_c"]))
    tau_f = [list(r) for r in costs.tau_f]
    tau_b = [list(r) for r in costs.tau_b]
    tau_c = list(costs.tau_c)
    if which == "tau_f":
        tau_f[s][m] += delta
    elif which == "tau_b":
        tau_b[s][m] += delta
    elif tau_c:
        tau_c[s % len(tau_c)] += delta
    bigger = Costs.build(schedule.num_stages, schedule.microbatches, tau_f, tau_b, tau_c)
    assert simulate(schedule, bigger).step_time >= before * (1 - TOL)


@given(random_case())
def test_queue_traces(case: tuple[Schedule, Costs]) -> None:
    schedule, costs = case
    report = simulate(schedule, costs)
    num_stages, m_count = schedule.num_stages, schedule.microbatches
    assert len(report.queues) == 2 * (num_stages - 1)
    times = {t.action: t for t in report.timeline}
    for hop, c in enumerate(costs.tau_c):
        act = report.queue(hop, hop + 1)
        grad = report.queue(hop + 1, hop)
        assert (act.kind, grad.kind) == ("act", "grad")
        for m in range(m_count):
            assert act.arrived[m] == approx(times[Action(hop, "F", m)].end + c)
            assert act.consumed[m] == times[Action(hop + 1, "F", m)].start
            assert grad.arrived[m] == approx(times[Action(hop + 1, "B", m)].end + c)
            assert grad.consumed[m] == times[Action(hop, "B", m)].start
        for q in (act, grad):
            assert all(c_ >= a - TOL for a, c_ in zip(q.arrived, q.consumed, strict=True))
            series = q.depth_series()
            assert len(series) == 2 * m_count
            assert all(depth >= 0 for _, depth in series)
            assert series[-1][1] == 0
            assert [t for t, _ in series] == sorted(t for t, _ in series)
            assert 1 <= q.max_depth <= m_count
    with pytest.raises(KeyError):
        report.queue(0, 0)


def test_gpipe_queue_deepens_behind_a_slow_stage() -> None:
    # GPipe, S=2, M=8, tf = tb = 1. Stage 0 sends micro-batch m at time m + 1.
    # Balanced: stage 1 takes each one the moment it arrives -> depth 1 at most (an arrival
    # counts before a same-instant consumption).
    # Stage 1 three times slower: it takes m at 1 + 3m (1, 4, 7, ...); at t = 8 all eight have
    # arrived and three were taken -> depth 5, the deepest.
    balanced = run("gpipe", 2, 8, 1.0, 1.0).queue(0, 1)
    slow = run("gpipe", 2, 8, 1.0, 1.0, slowdown={1: 3.0}).queue(0, 1)
    assert balanced.max_depth == 1
    assert slow.max_depth == 5
    assert slow.max_depth > balanced.max_depth
    assert slow.consumed == tuple(1.0 + 3 * m for m in range(8))
    assert slow.mean_depth(10.0) > balanced.mean_depth(10.0)


# --- Costs.build ------------------------------------------------------------------------------


def test_costs_build_expands_scalars_lists_and_tables() -> None:
    costs = Costs.build(3, 2, 1.5, [1.0, 2.0, 3.0], 0.25, slowdown={1: 2.0})
    assert costs.tau_f == ((1.5, 1.5), (3.0, 3.0), (1.5, 1.5))
    assert costs.tau_b == ((1.0, 1.0), (4.0, 4.0), (3.0, 3.0))
    assert costs.tau_c == (0.25, 0.25)  # hops are not slowed down
    assert (costs.num_stages, costs.microbatches) == (3, 2)

    table = Costs.build(2, 3, [[1, 2, 3], [4, 5, 6]], [7, [8, 9, 10]], [0.5], slowdown=[3.0])
    assert table.tau_f == ((3.0, 6.0, 9.0), (4.0, 5.0, 6.0))
    assert table.tau_b == ((21.0, 21.0, 21.0), (8.0, 9.0, 10.0))
    assert table.tau_c == (0.5,)

    # A one-stage pipeline has no hops.
    assert Costs.build(1, 4, 1.0, 1.0, 0.5).tau_c == ()


NAN, INF = math.nan, math.inf


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        ({"tau_f": -1.0}, r"tau_f\[stage 0, micro-batch 0\] must be a finite number >= 0"),
        ({"tau_b": NAN}, r"tau_b\[stage 0, micro-batch 0\].*nan"),
        ({"tau_f": [1.0, INF, 1.0]}, r"tau_f\[stage 1, micro-batch 0\].*inf"),
        (
            {"tau_b": [[1, 1, 1, 1], [1, 1, 1, 1], [1, 1, -2, 1]]},
            r"tau_b\[stage 2, micro-batch 2\].*-2",
        ),
        ({"tau_f": [[1, 1, 1, NAN], [1] * 4, [1] * 4]}, r"tau_f\[stage 0, micro-batch 3\]"),
        ({"tau_c": -0.5}, r"tau_c\[hop 0\]"),
        ({"tau_c": [0.1, INF]}, r"tau_c\[hop 1\]"),
        ({"tau_c": [0.1]}, r"tau_c: expected one value per hop \(2\), got 1"),
        ({"tau_c": [0.1, 0.1, 0.1]}, r"tau_c: expected one value per hop \(2\), got 3"),
        ({"tau_f": [1.0, 1.0]}, r"tau_f: expected one entry per stage \(3\), got 2"),
        ({"tau_b": [[1] * 4, [1] * 3, [1] * 4]}, r"tau_b\[stage 1\]: expected 4 micro-batch"),
        ({"tau_f": [[1] * 4, [1] * 4, [1] * 5]}, r"tau_f\[stage 2\]: expected 4 micro-batch"),
        ({"slowdown": {3: 2.0}}, r"slowdown names stage 3, but stages are 0\.\.2"),
        ({"slowdown": {-1: 2.0}}, r"slowdown names stage -1"),
        ({"slowdown": [1.0, 1.0, 1.0, 2.0]}, r"slowdown names stage 3"),
        ({"slowdown": {1: -2.0}}, r"slowdown of stage 1 must be a finite number >= 0"),
        ({"slowdown": {2: NAN}}, r"slowdown of stage 2"),
        ({"slowdown": {0: INF}}, r"slowdown of stage 0"),
    ],
)
def test_bad_costs(kwargs: dict[str, Any], pattern: str) -> None:
    args: dict[str, Any] = {"tau_f": 1.0, "tau_b": 2.0, "tau_c": 0.1, **kwargs}
    with pytest.raises(ValueError, match=pattern):
        Costs.build(3, 4, **args)


@pytest.mark.parametrize(("num_stages", "microbatches"), [(3, 5), (3, 3), (2, 4), (4, 4)])
def test_costs_must_match_schedule(num_stages: int, microbatches: int) -> None:
    costs = Costs.build(num_stages, microbatches, 1.0, 1.0)
    for schedule in (one_f_one_b(3, 4), gpipe(3, 4)):
        with pytest.raises(ValueError, match=r"schedule is 3 x 4"):
            simulate(schedule, costs)


def test_step_number_and_compiled_reuse() -> None:
    schedule = one_f_one_b(3, 4)
    costs = Costs.build(3, 4, 1.0, 2.0, 0.1)
    fresh = simulate(schedule, costs, step=7)
    reused = simulate(schedule, costs, step=7, compiled=validate(schedule))
    assert fresh.step == 7
    assert reused.step_time == fresh.step_time
    assert reused.to_dict() == fresh.to_dict()


@given(
    tau_f=st.floats(0.0, 10.0),
    tau_b=st.floats(0.0, 10.0),
    slowdown=st.lists(st.floats(0.0, 4.0), min_size=3, max_size=3),
)
def test_costs_arrays_are_the_tables(tau_f: float, tau_b: float, slowdown: list[float]) -> None:
    """The arrays Costs.build makes for single numbers hold the tables' numbers, bit for bit."""
    costs = Costs.build(3, 5, tau_f, tau_b, slowdown=slowdown)
    for array, table in zip(costs.arrays, (costs.tau_f, costs.tau_b), strict=True):
        assert array.shape == (3, 5) and array.tobytes() == np.asarray(table).tobytes()
    assert "arrays" not in vars(Costs.build(3, 5, [tau_f] * 3, tau_b))  # made when first read


def test_simulate_on_the_grid_is_the_scalar_pass() -> None:
    """16 ranks (the grid) with Costs.build's arrays: the report of the scalar pass."""
    slowdown = [1.0 + (s % 5) / 7 for s in range(16)]
    for name in ("1f1b", "zb-h1", "interleaved-1f1b", "zb-v"):
        schedule = make_schedule(name, 16, 128)
        costs = Costs.build(16, 128, 1.3, 2.9, [0.01 * s for s in range(15)], slowdown)
        assert grid_for(schedule) is not None and "arrays" in vars(costs)
        scalar = simulate(schedule, costs, compiled=validate(schedule))
        assert simulate(schedule, costs).to_dict() == scalar.to_dict()
