"""Schedule switching in closed loop (controllers.schedule, wired into AdaptivePolicy).

The harness simulates each step under the plan's schedule, so the switcher's prediction is
right unless the scenario has a per-action cost (``Scenario.action_cost``), which the split
backward of ZB-H1 pays for 3M actions per rank instead of 2M: then only the trial can tell.
"""

from __future__ import annotations

import itertools
import json
from dataclasses import replace

import pytest
from hypothesis import assume, example, given, settings
from hypothesis import strategies as st
from test_controllers_loop import BATCH, wild

from adaptive_pp.core.decisions import (
    Decision,
    Keep,
    MoveLayers,
    Plan,
    SetMicrobatches,
    SetSchedule,
)
from adaptive_pp.core.partition import Partition
from adaptive_pp.core.report import StepReport
from controllers import (
    AdaptivePolicy,
    Controller,
    MicrobatchTuner,
    ScheduleSwitcher,
    SwitchConfig,
    TunerConfig,
)
from controllers.harness import History, LayerCostModel, Scenario, measure, run, true_step_time
from controllers.schedule import stash_load

SETTLE_AND_WINDOW = SwitchConfig().settle + SwitchConfig().window


def _gain(sc: Scenario, plan: Plan, to: str) -> float:
    """True relative step-time gain of running ``plan`` under schedule ``to`` (mean costs)."""
    now = true_step_time(sc, plan, 0)
    return (now - true_step_time(sc, replace(plan, schedule=to), 0)) / now


def _switches(hist: History) -> list[tuple[int, str]]:
    """(step, schedule) of every SetSchedule decided."""
    return [
        (r.step, d.schedule)
        for r, d in zip(hist.reports, hist.decisions)
        if isinstance(d, SetSchedule)
    ]


@st.composite
def even_pipelines(draw: st.DrawFn, max_m: int = 8) -> tuple[Scenario, Plan]:
    """Equal layers on 1-4 stages (2-4 each), 1F1B, M up to ``max_m``, 0 or 5% noise."""
    stages = draw(st.integers(1, 4))
    layers = stages * draw(st.integers(2, 4))
    launch = draw(st.sampled_from([0.04e-3, 1e-3]))
    sc = Scenario(
        layers,
        BATCH,
        model=LayerCostModel(launch=launch),
        noise=draw(st.sampled_from([0.0, 0.05])),
        seed=draw(st.integers(0, 2**32 - 1)),
    )
    m = draw(st.sampled_from([m for m in (1, 2, 4, 8, 16, 32, 64) if m <= max_m]))
    return sc, Plan(Partition.even(layers, stages), m, "1f1b")


@settings(max_examples=40)
@given(even_pipelines())
def test_switches_to_zb_h1_within_a_few_steps_when_it_is_faster(
    case: tuple[Scenario, Plan],
) -> None:
    """ZB-H1 truly >= 8% faster: the policy switches after its first measuring window, keeps
    it (no rollback, no other switch in 60 steps) and ends faster."""
    sc, plan = case
    assume(_gain(sc, plan, "zb-h1") >= 0.08)
    hist = run(sc, AdaptivePolicy(), plan, 60)
    assert _switches(hist) == [(SETTLE_AND_WINDOW - 1, "zb-h1")]
    assert hist.final is not None and hist.final.schedule == "zb-h1"
    assert true_step_time(sc, hist.final, 60) < true_step_time(sc, plan, 60)
    assert hist.migrations() == []


@settings(max_examples=40)
@given(even_pipelines(max_m=64))
def test_switches_exactly_when_predicted_gain_clears_the_margin(
    case: tuple[Scenario, Plan],
) -> None:
    """No noise, no per-action cost (prediction = truth): a switch iff ZB-H1 is >= 3% faster;
    one stage or a large M (a small bubble) never switches; the end is never slower."""
    sc, plan = case
    sc = replace(sc, noise=0.0)
    gain = _gain(sc, plan, "zb-h1")
    assume(abs(gain - SwitchConfig().margin) > 1e-3)
    hist = run(sc, ScheduleSwitcher(), plan, 40)
    assert hist.final is not None
    if gain > SwitchConfig().margin:
        assert _switches(hist) == [(SETTLE_AND_WINDOW - 1, "zb-h1")]
    else:
        assert _switches(hist) == []
    assert true_step_time(sc, hist.final, 40) <= true_step_time(sc, plan, 40)


@pytest.mark.parametrize(("stages", "m"), [(1, 8), (1, 1), (2, 64), (3, 64)])
def test_never_switches_when_it_would_not_help(stages: int, m: int) -> None:
    """One stage (every schedule alike) or M = 64 (ZB-H1 < 3% faster), 5% noise, 300 steps."""
    sc = Scenario(4 * stages, BATCH, seed=stages)
    plan = Plan(Partition.even(4 * stages, stages), m)
    assert _gain(sc, plan, "zb-h1") < SwitchConfig().margin
    assert run(sc, AdaptivePolicy(), plan, 300).switches() == []


@settings(max_examples=25)
@given(even_pipelines(), st.floats(1.0, 3.0))
# A layer's last trial sample is off its estimate (noise) but cannot change the verdict: the
# rollback is not put off a step (it was, until the policy checked whether the verdict stands).
@example(case=(Scenario(9, BATCH, seed=3), Plan(Partition((0, 3, 6, 9)), 8)), more=1.0)
def test_a_switch_measured_slower_is_rolled_back_and_not_retried(
    case: tuple[Scenario, Plan], more: float
) -> None:
    """A per-action cost the prediction does not know makes ZB-H1 truly slower (by >= 2%):
    the switcher tries it once, rolls back after one window, and does not try it again."""
    sc, plan = case
    assume(plan.num_stages > 1 and _gain(sc, plan, "zb-h1") >= 0.05)
    cost = true_step_time(sc, plan, 0) * 0.005 / plan.microbatches
    while _gain(replace(sc, action_cost=cost), plan, "zb-h1") > -0.02:
        cost *= 1.5
    sc = replace(sc, action_cost=cost * more)
    hist = run(sc, AdaptivePolicy(), plan, 300)
    tried = SETTLE_AND_WINDOW - 1
    assert _switches(hist) == [(tried, "zb-h1"), (tried + SETTLE_AND_WINDOW, "1f1b")]
    assert hist.final is not None and hist.final.schedule == "1f1b"
    rollback = hist.decisions[tried + SETTLE_AND_WINDOW].reason
    assert rollback.startswith("roll back to schedule 1f1b: zb-h1 took")


def test_memory_limits_the_switch() -> None:
    """ZB-H1 holds min(S, M) micro-batches on every rank: as 1F1B's first rank, but more on
    a last rank with more layers. GPipe holds all M."""
    even = Plan(Partition.even(8, 4), 8)
    assert stash_load(even, "zb-h1") == stash_load(even, "1f1b") == 4 * 2
    assert stash_load(even, "gpipe") == 8 * 2
    heavy_last = Plan(Partition((0, 1, 2, 3, 8)), 8)
    assert stash_load(heavy_last, "1f1b") == 5 < stash_load(heavy_last, "zb-h1") == 4 * 5
    sc = Scenario(8, BATCH, layer_scale=(4.0, 4.0, 4.0, 1.0, 0.5, 0.5, 0.5, 0.5), noise=0.0)
    assert _gain(sc, heavy_last, "zb-h1") > 0.03
    hist = run(sc, ScheduleSwitcher(), heavy_last, 20)
    assert hist.switches() == []
    assert "zb-h1 would stash more activations than allowed" in hist.decisions[-1].reason
    hist = run(sc, ScheduleSwitcher(SwitchConfig(max_stash_growth=4.0)), heavy_last, 20)
    assert _switches(hist) == [(SETTLE_AND_WINDOW - 1, "zb-h1")]


def test_gpipe_is_left_for_zb_h1_and_chosen_only_when_allowed() -> None:
    sc = Scenario(8, BATCH, noise=0.0)
    gp = Plan(Partition.even(8, 4), 8, "gpipe")
    assert _switches(run(sc, ScheduleSwitcher(), gp, 20)) == [(SETTLE_AND_WINDOW - 1, "zb-h1")]
    # Allowed, GPipe never wins on time (it only stashes more): not chosen from 1F1B.
    config = SwitchConfig(allowed=("1f1b", "gpipe"), max_stash_growth=100.0)
    assert run(sc, ScheduleSwitcher(config), replace(gp, schedule="1f1b"), 20).switches() == []


def test_config_refuses_unknown_or_chunked_schedules() -> None:
    with pytest.raises(ValueError, match="one model chunk per rank"):
        SwitchConfig(allowed=("1f1b", "interleaved-1f1b"))
    with pytest.raises(ValueError, match="'zb-h9'"):
        SwitchConfig(allowed=("zb-h9",))
    with pytest.raises(ValueError, match="max_stash_growth"):
        SwitchConfig(max_stash_growth=0.5)


class _Watched(AdaptivePolicy):
    """Checks that every switch it tries leaves no move on its way or being checked."""

    def decide(self, report: StepReport, plan: Plan) -> Decision:
        d = super().decide(report, plan)
        if isinstance(d, SetSchedule) and not d.reason.startswith("roll back"):
            assert self.steady(), (report.step, d)
        return d


@settings(max_examples=25)
@given(wild())
def test_policy_changes_one_thing_at_a_time(case: tuple[Scenario, Plan]) -> None:
    """With moves, M trials and switches all on: each step changes at most one of partition,
    M and schedule, nothing else changes while a switch is on trial, and a switch is tried only
    when no move is on its way (planned again, or its layers' times being checked)."""
    sc, plan = case
    policy = _Watched(tuner=TunerConfig(global_batch=BATCH))
    hist = run(sc, policy, plan, 120)
    assert hist.final is not None
    for a, b in itertools.pairwise([*hist.plans, hist.final]):
        changed = (a.partition != b.partition, a.microbatches != b.microbatches)
        assert sum(changed) + (a.schedule != b.schedule) <= 1
    trial = False
    for d in hist.decisions:
        assert not (trial and isinstance(d, MoveLayers | SetMicrobatches)), d
        if isinstance(d, SetSchedule):
            trial = not d.reason.startswith("roll back")  # a try starts one, a rollback ends it
        elif isinstance(d, Keep) and d.reason.startswith("schedule") and "kept" in d.reason:
            trial = False


def test_state_round_trip_mid_trial_and_from_a_state_before_switching() -> None:
    sc = Scenario(8, BATCH, seed=5)
    plan = Plan(Partition.even(8, 4), 8)
    policy = AdaptivePolicy()
    first = run(sc, policy, plan, SETTLE_AND_WINDOW + 1)  # a trial of zb-h1 under way
    assert policy.switcher is not None and policy.switcher.busy
    assert first.final is not None
    restored = AdaptivePolicy()
    restored.load_state_dict(json.loads(json.dumps(policy.state_dict())))
    a = run(sc, policy, first.final, 20, start=SETTLE_AND_WINDOW + 1)
    b = run(sc, restored, first.final, 20, start=SETTLE_AND_WINDOW + 1)
    assert a.decisions == b.decisions
    old = {**AdaptivePolicy().state_dict(), "version": 1}
    del old["schedule"]
    AdaptivePolicy().load_state_dict(old)  # saved before schedule switching: a fresh switcher
    with pytest.raises(ValueError, match="schedule switching"):
        AdaptivePolicy(schedule=None).load_state_dict(policy.state_dict())


def test_the_tuner_measures_again_after_a_switch() -> None:
    """Step times from before a switch are not compared with those after it."""
    sc = Scenario(8, BATCH, noise=0.0)
    tuner = MicrobatchTuner(TunerConfig(global_batch=BATCH, window=3))
    plan = Plan(Partition.even(8, 4), 4)
    for step in range(3):
        tuner.observe(measure(sc, plan, step), plan)
    assert len(tuner.samples) == 2  # after one settling step
    zb = replace(plan, schedule="zb-h1")
    tuner.observe(measure(sc, zb, 3), zb)
    assert tuner.samples == []


def test_no_switch_while_the_rebalancer_measures_before_a_move() -> None:
    """A move judged within the noise is looked at again later (``pending``): until it is
    settled, the plan is not steady and the switcher waits."""
    sc = Scenario(8, BATCH, noise=0.0)
    plan = Plan(Partition.even(8, 4), 8)
    policy = AdaptivePolicy()
    hist = run(sc, policy, plan, SETTLE_AND_WINDOW - 1)
    policy.rebalancer.pending, policy.rebalancer.retry_left = True, 10  # as after "unsure"
    hist = run(sc, policy, plan, 3, start=SETTLE_AND_WINDOW - 1)
    assert hist.switches() == [] and not policy.steady()
    policy.rebalancer.pending = False
    hist = run(sc, policy, plan, 1, start=SETTLE_AND_WINDOW + 2)
    assert _switches(hist) == [(SETTLE_AND_WINDOW + 2, "zb-h1")]


def test_the_switcher_is_a_controller_on_its_own() -> None:
    assert isinstance(ScheduleSwitcher(), Controller)
    sc = Scenario(8, BATCH, noise=0.0)
    hist = run(sc, ScheduleSwitcher(), Plan(Partition.even(8, 1), 4), 10)
    assert hist.decisions[-1] == Keep("one stage: every schedule runs alike")
