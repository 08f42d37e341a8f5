"""The replay (adaptive_pp.core.flow) against a plain reference event loop, to the bit.

The reference below is the replay rule written out the simplest way: go round the ranks, each
running its next actions while their inputs are there; an action starts at max(rank free,
producer's end + hop) and ends its cost later; a round with no progress left is a deadlock,
named like the validator does. The fast paths (a generator's run plan, the run plan of a flat
form, the event replay) must give exactly its times, and name the same deadlock.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from adaptive_pp.core import compiled, flow, plans, zbv
from adaptive_pp.core.report import StepReport
from adaptive_pp.core.schedules import (
    SCHEDULE_NAMES,
    Action,
    Schedule,
    ScheduleError,
    compile_schedule,
    make_schedule,
    replay,
    validate,
)
from adaptive_pp.core.simulator import Costs, simulate

Table = list[list[float]]


@dataclass
class Reference:
    """Per rank starts and ends, waits per rank, arrivals by flat index (-1.0: no input)."""

    start: list[list[float]]
    end: list[list[float]]
    waited: list[float]
    arrived: list[float]
    inputs: dict[Action, tuple[int, float]]  # consumer -> (producing rank, arrival)


def reference(
    schedule: Schedule,
    tau_f: Table,
    tau_b: Table,
    tau_c: list[float],
    tau_w: Table | None = None,
    tau_wrap: float | None = None,
) -> Reference:
    """Replay ``schedule`` by the rule, plainly (see the module docstring)."""
    num, chunks, vs = schedule.num_stages, schedule.chunks, schedule.num_virtual_stages
    wrap = max(tau_c, default=0.0) if tau_wrap is None else tau_wrap

    def hop(a: int, b: int) -> float:
        if a == b:
            return 0.0
        return tau_c[min(a, b)] if abs(a - b) == 1 else wrap

    def cost(a: Action) -> float:
        s, m = a.stage, a.microbatch
        if a.kind == "F":
            x = tau_f[s][m]
        elif a.kind == "B":
            x = tau_b[s][m]
        elif a.kind == "I":
            assert tau_w is not None
            x = tau_b[s][m] - tau_w[s][m]
        else:
            assert tau_w is not None
            x = tau_w[s][m]
        return x / chunks if chunks > 1 else x

    def needs(a: Action) -> tuple[str, int, int] | None:
        v = schedule.virtual_stage(a.stage, a.chunk)
        if a.kind == "F":
            return ("act", v - 1, a.microbatch) if v > 0 else None
        if a.kind in "BI":
            return ("grad", v + 1, a.microbatch) if v + 1 < vs else None
        return None

    stages = schedule.stages
    done: dict[tuple[str, int, int], float] = {}
    free, waited, at = [0.0] * num, [0.0] * num, [0] * num
    start: list[list[float]] = [[] for _ in range(num)]
    end: list[list[float]] = [[] for _ in range(num)]
    arrived: list[list[float]] = [[] for _ in range(num)]
    inputs: dict[Action, tuple[int, float]] = {}
    progress = True
    while progress:
        progress = False
        for s in range(num):
            while at[s] < len(stages[s]):
                a = stages[s][at[s]]
                need = needs(a)
                if need is not None and need not in done:
                    break
                t = free[s]
                if need is None:
                    arrived[s].append(-1.0)
                else:
                    src = schedule.locate(need[1])[0]
                    r = done[need] + hop(src, s)
                    arrived[s].append(r)
                    inputs[a] = (src, r)
                    if r > t:
                        waited[s] += r - t
                        t = r
                start[s].append(t)
                t = t + cost(a)
                end[s].append(t)
                free[s] = t
                v = schedule.virtual_stage(s, a.chunk)
                if a.kind == "F":
                    done["act", v, a.microbatch] = t
                elif a.kind in "BI":
                    done["grad", v, a.microbatch] = t
                at[s] += 1
                progress = True
    stuck = [s for s in range(num) if at[s] < len(stages[s])]
    if stuck:
        waits = []
        for s in stuck:
            a = stages[s][at[s]]
            need = needs(a)
            assert need is not None
            src, chunk = schedule.locate(need[1])
            kinds = "F" if need[0] == "act" else "BI"
            dep = next(
                b
                for b in stages[src]
                if b.kind in kinds and b.microbatch == a.microbatch and b.chunk == chunk
            )
            waits.append(f"stage {s} waits at {a} for {dep}")
        first = stages[stuck[0]][at[stuck[0]]]
        raise ScheduleError(f"deadlock: {'; '.join(waits)}", stuck[0], first)
    flat = [x for row in arrived for x in row]
    return Reference(start, end, waited, flat, inputs)


def expected_report(schedule: Schedule, costs: Costs, ref: Reference) -> dict[str, Any]:
    """What simulate() must report, from the reference: step, stages' waits, queues."""
    step = max((row[-1] for row in ref.end if row), default=0.0)
    queues: dict[tuple[int, int, str], list[tuple[int, int, float, float]]] = {}
    starts = {a: t for acts, row in zip(schedule.stages, ref.start) for a, t in zip(acts, row)}
    for a, (src, arrival) in ref.inputs.items():
        if src != a.stage:
            kind = "act" if a.kind == "F" else "grad"
            queues.setdefault((src, a.stage, kind), []).append(
                (a.chunk, a.microbatch, arrival, starts[a])
            )
    order = sorted(queues, key=lambda q: (min(q[0], q[1]), q[2] != "act", q[0], q[1]))
    traces = []
    for q in order:
        msgs = sorted(queues[q])
        traces.append((*q, tuple(m[2] for m in msgs), tuple(m[3] for m in msgs)))
    return {"step": step, "waits": ref.waited, "queues": traces}


# --- strategies -------------------------------------------------------------------------------


def generator_plans(schedule: Schedule) -> bool:
    """Whether the generator hands over a run plan: every schedule but ZB-V with M < 2S - 1
    (micro-batches dropped from a longer order), whose flat form the event loop replays."""
    return schedule.name != "zb-v" or schedule.microbatches >= 2 * schedule.num_stages - 1


cost_st = st.one_of(st.sampled_from([0.0, 0.5, 1.0, 2.0, 3.25]), st.floats(0.0, 5.0))


@st.composite
def cases(draw: st.DrawFn, names: tuple[str, ...] = SCHEDULE_NAMES) -> dict[str, Any]:
    """A generated schedule and random costs: ties (repeated round values) and plain floats."""
    name = draw(st.sampled_from(names))
    num = draw(st.integers(1, 6))
    chunks = draw(st.integers(1, 3)) if name == "interleaved-1f1b" else 2
    m = num * draw(st.integers(1, 3)) if name == "interleaved-1f1b" else draw(st.integers(1, 10))
    row = st.lists(cost_st, min_size=m, max_size=m)
    table = st.lists(row, min_size=num, max_size=num)
    tau_f, tau_b = draw(table), draw(table)
    share = draw(st.lists(st.lists(st.sampled_from([0.0, 0.25, 0.5, 1.0]), min_size=m,
                                   max_size=m), min_size=num, max_size=num))  # fmt: skip
    tau_w = [[b * x for b, x in zip(rb, rx)] for rb, rx in zip(tau_b, share)]
    tau_c = draw(st.lists(cost_st, min_size=num - 1, max_size=num - 1))
    wrap = draw(st.one_of(st.none(), cost_st))
    schedule = make_schedule(name, num, m, chunks)
    return {
        "schedule": schedule,
        "tau_f": tau_f,
        "tau_b": tau_b,
        "tau_c": tau_c,
        "tau_w": tau_w if schedule.split_backward else None,
        "tau_wrap": wrap,
    }


def copy_of(schedule: Schedule) -> Schedule:
    """The same lists in a new object: compiled from its flat form, not a generator's plan."""
    return Schedule(
        schedule.stages, schedule.microbatches, schedule.name, schedule.chunks, schedule.placement
    )


def times(run: flow.Replay) -> tuple[Any, ...]:
    return run.start, run.end, run.waited, run.arrived


def reference_times(ref: Reference) -> tuple[Any, ...]:
    return ref.start, ref.end, ref.waited, ref.arrived


def event_replay(schedule: Schedule, case: dict[str, Any]) -> flow.Replay:
    """replay() through the event loop (no run plan)."""
    code = compile_schedule(copy_of(schedule))
    code._memo["plan"] = None
    return replay(
        schedule,
        case["tau_f"],
        case["tau_b"],
        case["tau_c"],
        code,
        tau_w=case["tau_w"],
        tau_wrap=case["tau_wrap"],
    )


def replay_case(schedule: Schedule, case: dict[str, Any]) -> flow.Replay:
    return replay(
        schedule,
        case["tau_f"],
        case["tau_b"],
        case["tau_c"],
        tau_w=case["tau_w"],
        tau_wrap=case["tau_wrap"],
    )


# --- the three paths against the reference -----------------------------------------------------


@given(cases())
def test_replay_is_the_reference_to_the_bit(case: dict[str, Any]) -> None:
    schedule = case["schedule"]
    want = reference_times(
        reference(
            schedule,
            case["tau_f"],
            case["tau_b"],
            case["tau_c"],
            case["tau_w"],
            case["tau_wrap"],
        )
    )
    planned = generator_plans(schedule)
    assert (compile_schedule(schedule).plan is not None) == planned  # the generator's run plan
    assert times(replay_case(schedule, case)) == want
    copy = copy_of(schedule)
    if planned:
        assert plans._plan_of(compile_schedule(copy)) is not None  # the flat form's run plan
    assert times(replay_case(copy, case)) == want
    assert times(event_replay(schedule, case)) == want


@given(cases())
def test_simulate_reports_the_reference(case: dict[str, Any]) -> None:
    schedule = case["schedule"]
    costs = Costs.build(
        schedule.num_stages,
        schedule.microbatches,
        case["tau_f"],
        case["tau_b"],
        case["tau_c"],
        tau_w=case["tau_w"],
        tau_wrap=case["tau_wrap"],
    )
    ref = reference(
        schedule, case["tau_f"], case["tau_b"], case["tau_c"], costs.w_table(), case["tau_wrap"]
    )
    want = expected_report(schedule, costs, ref)
    for sched in (schedule, copy_of(schedule)):
        report = simulate(sched, costs)
        assert report.step_time == want["step"]
        assert [s.wait for s in report.stages] == want["waits"]
        assert [list(row) for row in report.timeline.start] == ref.start
        assert [list(row) for row in report.timeline.end] == ref.end
        assert [(q.src, q.dst, q.kind, q.arrived, q.consumed) for q in report.queues] == want[
            "queues"
        ]
        again = simulate(sched, costs, compiled=validate(sched))  # a compiled form reused
        assert again.to_dict() == report.to_dict()
    code = compile_schedule(copy_of(schedule))
    code._memo["plan"] = None  # the event replay's report
    assert simulate(copy_of(schedule), costs, compiled=code).to_dict() == report.to_dict()


# --- a generator's plan is its flat form's ----------------------------------------------------


def producers(plan: compiled.Plan, num_stages: int) -> list[int | None]:
    """Per run position, the run position of its input's producer (None: no input)."""
    out: list[int | None] = []
    for j, (b, h) in enumerate(zip(plan.back, plan.link)):
        out.append(None if h == num_stages or j + b < 0 else j + b)
    return out


@given(cases())
def test_generated_plan_is_the_flat_forms(case: dict[str, Any]) -> None:
    """The run plan a generator builds from ranges equals the one derived from its checked flat
    form: same order, same inputs and links, same costs, same queues (a wrong builder fails)."""
    schedule = case["schedule"]
    assume(generator_plans(schedule))
    num = schedule.num_stages
    built = compile_schedule(schedule)
    flat = compiled._compile(copy_of(schedule))
    plan, derived = built.plan, plans._column_plan(flat)
    assert plan is not None and derived is not None
    assert (built.peak, built.offsets, built.queues, built.split) == (
        flat.peak,
        flat.offsets,
        flat.queues,
        flat.split,
    )
    assert (plan.split, plan.length, list(plan.ranks)) == (
        derived.split,
        derived.length,
        list(derived.ranks),
    )
    came = producers(plan, num)
    assert came == producers(derived, num)
    assert [h for h, c in zip(plan.link, came) if c is not None] == [
        h for h, c in zip(derived.link, came) if c is not None
    ]
    places = list(range(plan.length))  # the pickers read one rank's list: where they read
    for pick, other in zip(plan.consumers, derived.consumers, strict=True):
        assert pick(places) == other(places)
    for pick, other in zip(plan.producers, derived.producers, strict=True):
        assert tuple(pick(places)) == tuple(other(places))
    assert (plan.links, plan.pairs) == (derived.links, derived.pairs)
    args = (schedule.chunks, case["tau_f"], case["tau_b"], case["tau_w"])
    assert list(flow._run_costs(plan, built.split, *args)) == list(
        flow._run_costs(derived, flat.split, *args)
    )


# --- broken schedules: the same deadlock, named the same ------------------------------------


@given(cases(), st.randoms(use_true_random=False))
def test_reordered_ranks_replay_or_deadlock_like_the_reference(
    case: dict[str, Any], rnd: random.Random
) -> None:
    """Move one action of one rank elsewhere in its list: the validator either rejects the
    rank on its own, or the replay gives the reference's times or its deadlock error."""
    schedule = case["schedule"]
    stages = [list(acts) for acts in schedule.stages]
    s = rnd.randrange(len(stages))
    a = stages[s].pop(rnd.randrange(len(stages[s])))
    stages[s].insert(rnd.randrange(len(stages[s]) + 1), a)
    broken = Schedule(
        tuple(map(tuple, stages)),
        schedule.microbatches,
        "broken",
        schedule.chunks,
        schedule.placement,
    )
    try:
        compile_schedule(broken)
    except ScheduleError:
        with pytest.raises(ScheduleError):
            validate(broken)
        return
    args = (case["tau_f"], case["tau_b"], case["tau_c"], case["tau_w"], case["tau_wrap"])
    try:
        want: Any = reference_times(reference(broken, *args))
    except ScheduleError as err:
        want = (str(err), err.stage, err.action)
    for run in (lambda: replay_case(broken, case), lambda: event_replay(broken, case)):
        try:
            got: Any = times(run())
        except ScheduleError as err:
            got = (str(err), err.stage, err.action)
        assert got == want
    if isinstance(want[0], str):
        with pytest.raises(ScheduleError, match="deadlock"):
            validate(broken)


def test_deadlock_error_is_named_as_before() -> None:
    """The validator's message for a crossed pair (tests/test_schedules.py has more)."""
    broken = Schedule.from_text("0: 0F0 0B0 0F1 0B1\n1: 1F0 1F1 1B0 1B1")
    with pytest.raises(ScheduleError) as info:
        validate(broken)
    assert str(info.value) == "deadlock: stage 0 waits at 0B0 for 1B0; stage 1 waits at 1F1 for 0F1"
    assert (info.value.stage, info.value.action) == (0, Action(0, "B", 0))
    zeros = [[0.0] * 2] * 2
    with pytest.raises(ScheduleError) as ref:
        reference(broken, zeros, zeros, [0.0])
    assert str(ref.value) == str(info.value)


def test_report_from_a_plan_matches_the_flat_form_at_size() -> None:
    """One mid-size case per schedule, all three paths, every report field."""
    for name in SCHEDULE_NAMES:
        schedule = make_schedule(name, 8, 16, 2)
        rnd = random.Random(name)
        tau_f = [[rnd.choice([0.5, 1.0, rnd.random()]) for _ in range(16)] for _ in range(8)]
        tau_b = [[2 * x + rnd.random() for x in row] for row in tau_f]
        costs = Costs.build(8, 16, tau_f, tau_b, [rnd.random() for _ in range(7)])
        report = simulate(schedule, costs)
        code = compile_schedule(copy_of(schedule))
        assert simulate(copy_of(schedule), costs).to_dict() == report.to_dict()
        code._memo["plan"] = None
        event: StepReport = simulate(copy_of(schedule), costs, compiled=code)
        assert event.to_dict() == report.to_dict()


@given(st.integers(1, 8), st.integers(0, 12))
def test_zb_v_lists_from_segments_are_its_rank_order(num: int, extra: int) -> None:
    """ZB-V built from segments (M >= 2S - 1, its run plan's case) lists each rank's actions
    in the order of the step-by-step rule (zbv._rank_order)."""
    m = 2 * num - 1 + extra
    schedule = make_schedule("zb-v", num, m)
    assert compile_schedule(schedule).plan is not None
    for r, acts in enumerate(schedule.stages):
        want = [Action(r, kind, mb, chunk) for kind, mb, chunk in zbv._rank_order(r, num, m)]
        assert list(acts) == want
