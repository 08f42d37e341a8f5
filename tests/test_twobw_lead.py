"""PipeDream-2BW with a lead: each rank runs ``lead`` forwards ahead of the next, so a message
has time to arrive before it is needed. The stream, its plan, the hop it hides, its memory and
its numbers (the same update rule as lead 1)."""

from __future__ import annotations

import math

import pytest
import runtime_cases as rc
import twobw_cases as tc
from conftest import PoolFor
from hypothesis import given, settings
from hypothesis import strategies as st

from adaptive_pp import PipelineConfig
from adaptive_pp.core import twobw
from adaptive_pp.core.actions import Schedule
from adaptive_pp.core.compiled import peak_stash
from adaptive_pp.core.decisions import MoveLayers, SetMicrobatches
from adaptive_pp.core.report import StepReport
from adaptive_pp.core.schedules import make_schedule, one_f_one_b, validate
from adaptive_pp.core.simulator import Costs, simulate


def test_windows_and_drain_with_a_lead_are_one_stream_warmed_up_lead_times_deeper() -> None:
    """Step k's window with ids shifted by k*M, then the drain: every micro-batch's F and B
    once, lead x (S-1-s) forwards first on rank s, then F and B in turn; a valid schedule."""
    for s_count in range(1, 6):
        for lead in (1, 2, 3):
            for m in range(max(1, lead * (s_count - 1)), lead * (s_count - 1) + 3):
                for steps in range(1, 4):
                    n = steps * m
                    rows = []
                    for s in range(s_count):
                        acts = []
                        for k in range(steps):
                            window = twobw.window(s_count, m, s, spill=k > 0, lead=lead)
                            acts += [a._replace(microbatch=a.microbatch + k * m) for a in window]
                        drain = twobw.drain(s_count, m, s, lead)
                        acts += [a._replace(microbatch=a.microbatch + steps * m) for a in drain]
                        w = lead * (s_count - 1 - s)
                        kinds = "".join(a.kind for a in acts)
                        assert kinds == "F" * w + "FB" * (n - w) + "B" * w
                        assert [a.microbatch for a in acts if a.kind == "F"] == list(range(n))
                        assert [a.microbatch for a in acts if a.kind == "B"] == list(range(n))
                        rows.append(tuple(acts))
                    validate(Schedule(tuple(rows), n, "stream"))
                    assert tuple(rows) == twobw.unrolled(s_count, m, steps, lead).stages


def test_a_lead_needs_m_of_lead_times_the_stages_minus_one() -> None:
    with pytest.raises(ValueError, match=r"M >= 2 x \(S - 1\) \(lead 2\)"):
        twobw.window(4, 5, 0, spill=True, lead=2)
    with pytest.raises(ValueError, match="lead must be an int >= 1"):
        twobw.warmup(4, 6, 0, 0)
    with pytest.raises(ValueError, match="lead=2 is for schedule='2bw' only"):
        PipelineConfig(schedule="1f1b", lead=2)
    with pytest.raises(ValueError, match=r"M >= 2 x \(S - 1\)"):
        PipelineConfig(stages=4, microbatches=5, schedule="2bw", lead=2)
    with pytest.raises(ValueError, match="lead=2 is for 2bw only"):
        make_schedule("gpipe", 2, 2, lead=2)
    assert PipelineConfig(stages=4, microbatches=6, schedule="2bw", lead=2).lead == 2


@settings(max_examples=60, deadline=None)
@given(
    s_count=st.integers(1, 5),
    m=st.integers(1, 9),
    drops=st.lists(st.integers(1, 3), min_size=5, max_size=5),
    seed=st.integers(0, 1000),
)
def test_the_plan_of_other_warmups_simulates_as_the_plain_schedule(
    s_count: int, m: int, drops: list[int], seed: int
) -> None:
    """``one_f_one_b(..., warmups)`` hands the simulator a prebuilt plan: it must time every
    action as the plain actions (no plan) do, for any warm-ups it takes (each below the one
    before, or both M). Other warm-ups are refused."""
    import random

    warmups = [min(m, sum(drops[s + 1 : s_count])) for s in range(s_count)]
    fast = one_f_one_b(s_count, m, warmups)
    plain = Schedule(fast.stages, m, "plain")
    rng = random.Random(seed)
    costs = Costs.build(
        s_count,
        m,
        [[rng.uniform(1, 3) for _ in range(m)] for _ in range(s_count)],
        [[rng.uniform(2, 6) for _ in range(m)] for _ in range(s_count)],
        [rng.uniform(0, 1) for _ in range(max(0, s_count - 1))],
    )
    a, b = simulate(fast, costs), simulate(plain, costs)
    assert a.timeline.start == b.timeline.start and a.timeline.end == b.timeline.end
    assert list(a.peak_stash) == peak_stash(plain)
    if s_count > 1 and warmups[-2] < m:  # the last two ranks: same warm-up
        with pytest.raises(ValueError, match="warm-ups"):
            one_f_one_b(s_count, m, [*warmups[:-1], warmups[-2]])


def test_a_lead_of_two_hides_the_hops_of_the_steady_state() -> None:
    """Simulated: with hops of cost c, lead 1's period is the compute plus 2(S-1)/S hops per
    micro-batch; lead 2's is the compute alone."""
    s_count, m, f, b, c = 4, 12, 4.0, 8.0, 0.5
    costs = Costs.build(s_count, m, f, b, c)
    one = simulate(make_schedule("2bw", s_count, m), costs).step_time
    two = simulate(make_schedule("2bw", s_count, m, lead=2), costs).step_time
    assert math.isclose(two, m * (f + b))
    assert math.isclose(one, m * (f + b + 2 * c * (s_count - 1) / s_count))
    assert peak_stash(make_schedule("2bw", s_count, m, lead=2)) == [7, 5, 3, 1]


@pytest.mark.multiprocess
def test_lead_two_runs_its_window_with_twice_the_activations_of_lead_one(pools: PoolFor) -> None:
    """The report's timeline is lead 2's window (rank 0 spills 6 backwards); the peak stash is
    2(S-1-s) + 1 micro-batches, each as many bytes as lead 1's; the losses are lead 1's."""
    one = rc.Case(3, (4, 6, 5, 3, 4), (0, 1, 2, 3, 4), 6, "2bw", "sgd", 3)
    two = rc.Case(3, (4, 6, 5, 3, 4), (0, 1, 2, 3, 4), 6, "2bw", "sgd", 3, lead=2)
    ranks = {c.lead: pools(4).run(tc.train_pipelined, c, timeout=120) for c in (one, two)}
    reports = {lead: StepReport.from_dict(r[0]["report"]) for lead, r in ranks.items()}
    steady = make_schedule("2bw", 4, 6, lead=2)
    assert [list(a) for a in reports[2].timeline.actions] == [list(a) for a in steady.stages]
    assert [a.microbatch for a in reports[2].timeline.actions[0] if a.kind == "B"][:2] == [-6, -5]
    for s, (a, b) in enumerate(zip(reports[1].stages, reports[2].stages, strict=True)):
        assert (a.peak_stash, b.peak_stash) == (4 - s, 2 * (3 - s) + 1)
        assert a.peak_stash_bytes * b.peak_stash == b.peak_stash_bytes * a.peak_stash > 0
        assert a.weight_bytes == b.weight_bytes
    assert ranks[1][0]["losses"] == ranks[2][0]["losses"]
    rc.assert_matches_reference(two, ranks[2], reference=tc.train_reference(two))


@pytest.mark.multiprocess
def test_moves_and_m_changes_keep_the_lead_and_the_rule(pools: PoolFor) -> None:
    """Moves and an M change drain the stream; the next streams keep lead 2; still the rule."""
    widths = (5, 4, 6, 3, 5, 4, 3)
    case = rc.Case(11, widths, (0, 2, 4, 6), 4, "2bw", "adam", 6, per_microbatch=3, lead=2)
    changes = {2: [MoveLayers(0, 1, 1)], 3: [MoveLayers(2, 1, 1), SetMicrobatches(6)]}
    ranks = pools(3).run(tc.train_pipelined, case, 0, changes, timeout=120)
    rc.assert_matches_reference(case, ranks, reference=tc.train_reference(case, {3: 6}))
    assert ranks[0]["bounds"] == (0, 1, 5, 6) and ranks[0]["m"] == 6
    report = StepReport.from_dict(ranks[0]["report"])
    assert report.peak_stash[0] == 2 * 2 + 1


@pytest.mark.parametrize(("lead", "m"), [(1, 3), (2, 6), (2, 7)])
def test_the_simulated_window_is_a_period_of_the_long_stream(lead: int, m: int) -> None:
    """At the smallest M a rank's warm-up fills a whole window: the window the simulator
    reports is past the fill, one of the periods of a long stream (rank 0's window starts)."""
    s_count, windows = 4, 9
    costs = Costs.build(s_count, m * windows, 1.0, 2.0, 0.5)
    starts = simulate(twobw.unrolled(s_count, m, windows, lead), costs).timeline.start[0]
    periods = [starts[2 * m * (k + 1)] - starts[2 * m * k] for k in range(2, windows - 1)]
    got = simulate(make_schedule("2bw", s_count, m, lead=lead), Costs.build(4, m, 1.0, 2.0, 0.5))
    assert min(periods) - 1e-9 <= got.step_time <= max(periods) + 1e-9


@pytest.mark.multiprocess
def test_an_m_too_small_for_the_lead_is_refused_and_training_goes_on(pools: PoolFor) -> None:
    """Lead 2 on 3 stages needs M >= 4: SetMicrobatches(2) is refused on every rank before
    anything changes, and the run goes on as the rule says."""
    case = rc.Case(11, (5, 4, 6, 3), (0, 1, 2, 3), 4, "2bw", "sgd", 3, lead=2)
    ranks = pools(3).run(tc.train_refusing, case, SetMicrobatches(2), 1, timeout=120)
    for r in ranks:
        assert "2bw needs M >= 2 x (S - 1) (lead 2)" in r["refusal"] and r["m"] == 4
        assert r["plan"] == {
            "bounds": [0, 1, 2, 3],
            "microbatches": 4,
            "schedule": "2bw",
            "lead": 2,
        }
    rc.assert_matches_reference(case, ranks, reference=tc.train_reference(case))
