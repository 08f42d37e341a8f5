"""The grid replay (adaptive_pp.core.grid, numpy row by row) against the scalar pass, to the bit.

Every generated schedule, random costs (ties, zeros, and also values the fast path may not
take: negative zero, negative numbers, NaN, infinity): starts, ends, waits, arrivals and the
queues' times must be the scalar pass's (a run plan's ``flow._run_plan``, else the event
replay) bit for bit. Also: the deferred fields (a generator's ``Schedule.stages``, the
simulator's timeline and queue traces) read, compare, copy and pickle as built ones.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import pickle
import struct
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from adaptive_pp.core import flow
from adaptive_pp.core import grid as grid_module
from adaptive_pp.core.compiled import handed_over
from adaptive_pp.core.grid import run_grid
from adaptive_pp.core.gridform import grid_of
from adaptive_pp.core.report import QueueTrace, StepReport, Timeline
from adaptive_pp.core.schedules import (
    SCHEDULE_NAMES,
    Schedule,
    compile_schedule,
    make_schedule,
    validate,
)
from adaptive_pp.core.simulator import Costs, simulate

plain = st.one_of(st.sampled_from([0.0, 0.5, 1.0, 2.0, 3.25]), st.floats(0.0, 5.0))
odd = st.sampled_from([-0.0, -1.5, math.inf, math.nan, 0.0, 1.0])


def bits(values: Any) -> Any:
    """Nested lists/tuples of floats as their bit patterns (-0.0 and 0.0 told apart); every NaN
    alike (the sign of inf - inf's NaN is the hardware's, and no cost Costs.build accepts makes
    one)."""
    if isinstance(values, float):
        return b"nan" if math.isnan(values) else struct.pack("<d", values)
    return [bits(v) for v in values]


@st.composite
def cases(draw: st.DrawFn, costs: st.SearchStrategy[float] = plain) -> dict[str, Any]:
    """A generated schedule (up to 7 ranks x 16 micro-batches) and random costs."""
    name = draw(st.sampled_from(SCHEDULE_NAMES))
    num = draw(st.integers(1, 7))
    chunks = draw(st.integers(1, 3)) if name == "interleaved-1f1b" else 2
    m = num * draw(st.integers(1, 3)) if name == "interleaved-1f1b" else draw(st.integers(1, 16))
    table = st.lists(st.lists(costs, min_size=m, max_size=m), min_size=num, max_size=num)
    tau_b = draw(table)
    share = draw(st.sampled_from([0.0, 0.25, 0.44, 1.0]))
    return {
        "schedule": make_schedule(name, num, m, chunks),
        "tau_f": draw(table),
        "tau_b": tau_b,
        "tau_w": [[b * share for b in row] for row in tau_b],
        "tau_c": draw(st.lists(costs, min_size=num - 1, max_size=num - 1)),
        "tau_wrap": draw(st.one_of(st.none(), costs)),
    }


def scalar(case: dict[str, Any]) -> Any:
    """The scalar pass (no grid) of the case."""
    sched = case["schedule"]
    code = compile_schedule(sched)
    run = flow._replay(
        sched,
        case["tau_f"],
        case["tau_b"],
        case["tau_c"],
        code,
        case["tau_w"] if code.split else None,
        case["tau_wrap"],
        queues=True,
        vectorised=False,
    )
    assert not isinstance(run, flow.GridTimes)
    return code, run


def check_grid_is_the_scalar_pass(case: dict[str, Any], flat_too: bool = True) -> None:
    """``flat_too``: also where the scalar pass replays a flat form (ZB-V below 2S - 1
    micro-batches: no run plan handed over), whose "no input" arrives at -1.0, not never."""
    sched = case["schedule"]
    rows = sched.rows
    assert rows is not None  # every generator gives its compact form
    grid = grid_of(rows, sched.microbatches, sched.chunks, sched.placement, max_serial=1.0)
    assert handed_over(sched) == (
        sched.name != "zb-v" or sched.microbatches >= 2 * sched.num_stages - 1
    )
    if grid is None or not (flat_too or handed_over(sched)):
        assert not handed_over(sched)  # only without a run plan may an input come later
        return
    code, want = scalar(case)
    hops = flow._hops(case["tau_c"], case["tau_wrap"])
    got = run_grid(grid, case["tau_f"], case["tau_b"], case["tau_w"], sched.chunks, hops)
    assert bits(got.start) == bits(want.start)
    assert bits(got.end) == bits(want.end)
    assert bits(got.waited) == bits(want.waited)
    assert bits(got.arrived()) == bits(want.arrived())
    assert grid.queues == code.queues and grid.peak == code.peak and grid.split == code.split
    assert bits(got.queue_times()) == bits(want.queue_times())
    assert bits(got.step_time()) == bits(want.step_time())


@settings(max_examples=300)
@given(cases())
def test_grid_is_the_scalar_pass_to_the_bit(case: dict[str, Any]) -> None:
    check_grid_is_the_scalar_pass(case)


@settings(max_examples=150)
@given(cases(st.one_of(plain, odd)))
def test_grid_is_the_scalar_pass_with_odd_costs(case: dict[str, Any]) -> None:
    """Negative zero, negative numbers, NaN, infinity: the grid's exact path (no np.maximum).
    Against a generator's run plan only: below zero, a flat form's "no input" (-1.0) counts."""
    check_grid_is_the_scalar_pass(case, flat_too=False)


@settings(max_examples=150)
@given(cases(st.one_of(plain, odd)))
def test_rows_run_rank_by_rank_are_the_scalar_pass(case: dict[str, Any]) -> None:
    """Every row with a same-row input run as the deep ones are (every rank at once, then the
    chained ranks one by one), not swept: small cases chain too shallow to get there."""
    sweeps = grid_module._SWEEPS
    grid_module._SWEEPS = 0
    try:
        check_grid_is_the_scalar_pass(case, flat_too=False)
    finally:
        grid_module._SWEEPS = sweeps


def test_grid_at_size_every_schedule() -> None:
    """One 8 x 32 case per schedule with random costs, rows with same-row inputs included."""
    import random

    for name in SCHEDULE_NAMES:
        rnd = random.Random(name)
        num, m = 8, 32
        tau_f = [[rnd.choice([0.5, 1.0, rnd.random()]) for _ in range(m)] for _ in range(num)]
        tau_b = [[2 * x + rnd.random() for x in row] for row in tau_f]
        tau_w = [[b * rnd.random() for b in row] for row in tau_b]
        case = {
            "schedule": make_schedule(name, num, m),
            "tau_f": tau_f,
            "tau_b": tau_b,
            "tau_w": tau_w,
            "tau_c": [rnd.random() / 4 for _ in range(num - 1)],
            "tau_wrap": None,
        }
        rows = case["schedule"].rows
        assert rows is not None
        grid = grid_of(rows, m, case["schedule"].chunks, case["schedule"].placement, 1.0)
        assert grid is not None and grid.serial  # some rows run rank by rank
        check_grid_is_the_scalar_pass(case)


def test_simulate_takes_the_grid_except_for_gpipe() -> None:
    """The simulator replays every generator's schedule of 16 ranks or more but GPipe's (every
    row has an input from its own row: the scalar pass is faster) as a grid."""
    for name in SCHEDULE_NAMES:
        sched = make_schedule(name, flow.GRID_MIN_STAGES, 128)
        assert (flow.grid_for(sched) is None) == (name == "gpipe")
        assert flow.grid_for(make_schedule(name, flow.GRID_MIN_STAGES - 1, 30)) is None


# --- deferred fields ---------------------------------------------------------------------------


def test_a_generated_schedule_reads_compares_and_pickles_as_a_built_one() -> None:
    for name in SCHEDULE_NAMES:
        sched = make_schedule(name, 4, 8)
        assert "stages" not in vars(sched)  # not built yet
        assert sched.num_stages == 4 and sched.split_backward == (name in ("zb-h1", "zb-v"))
        assert "stages" not in vars(sched)
        built = Schedule(
            sched.stages, sched.microbatches, sched.name, sched.chunks, sched.placement
        )
        assert sched == built and hash(sched) == hash(built) and repr(sched) == repr(built)
        assert Schedule.from_text(sched.to_text(), name=name) == sched
        fresh = make_schedule(name, 4, 8)
        for other in (pickle.loads(pickle.dumps(fresh)), copy.deepcopy(make_schedule(name, 4, 8))):
            assert other == built and other.stages == built.stages
            assert other.rows is None and "stages" in vars(other)  # a built copy
        assert dataclasses.replace(make_schedule(name, 4, 8), name="x") == dataclasses.replace(
            built, name="x"
        )
        validate(sched)


def test_a_simulated_report_reads_compares_and_pickles_as_a_built_one() -> None:
    for name in SCHEDULE_NAMES:
        sched = make_schedule(name, 4, 8)
        costs = Costs.build(4, 8, 1.0, 2.4, 0.1)
        report = simulate(sched, costs)
        assert "start" not in vars(report.timeline) and "arrived" not in vars(report.queues[0])
        plain_copy = Schedule(sched.stages, 8, name, sched.chunks, sched.placement)
        want = simulate(plain_copy, costs)  # the scalar pass (a flat form's plan), built
        again = pickle.loads(pickle.dumps(simulate(sched, costs)))
        assert report == want and again == want
        assert report.to_dict() == want.to_dict()
        assert StepReport.from_dict(report.to_dict()).to_dict() == want.to_dict()
        assert [q.max_depth for q in report.queues] == [q.max_depth for q in want.queues]
    assert Timeline() == Timeline((), (), ()) and Timeline().actions == ()
    trace = QueueTrace(0, 1, "act", (1.0,), (2.0,))
    assert trace.arrived == (1.0,) and pickle.loads(pickle.dumps(trace)) == trace
