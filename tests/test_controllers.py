"""Controllers, one piece at a time: protocol, estimates, search, trigger, tuner, state."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from adaptive_pp.core.decisions import Decision, Keep, MoveLayers, Plan, SetMicrobatches, apply
from adaptive_pp.core.partition import Partition
from adaptive_pp.core.report import StageStats, StepReport
from controllers import (
    AdaptivePolicy,
    Controller,
    Hold,
    LayerEstimator,
    MicrobatchTuner,
    Rebalancer,
    RebalancerConfig,
    TunerConfig,
    busiest_bubble,
    imbalance,
    measured_layers,
    near_balanced,
    nudges,
    route,
)
from controllers.harness import (
    DeviceSlowdown,
    LayerCostModel,
    Scenario,
    Slowdown,
    measure,
    run,
)
from controllers.search import stage_loads


# Load adaptive_pp's submodules without running the package __init__ (which brings in the
# torch runtime), to check what the controller code itself imports.
def _report(compute: list[float], wall: float = 10.0, m: int = 4) -> StepReport:
    stages = tuple(StageStats(s, c, 0.0, wall, 1) for s, c in enumerate(compute))
    return StepReport(0, "1f1b", m, wall, stages)


partitions = st.lists(st.integers(1, 5), min_size=2, max_size=5).map(Partition.from_sizes)


# -- protocol and imports -------------------------------------------------------------------


class _Custom:
    def decide(self, report: StepReport, plan: Plan) -> Decision:
        return Keep()

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        pass


def test_builtin_and_user_controllers_satisfy_the_protocol() -> None:
    tuner = TunerConfig(global_batch=8)
    for c in (Hold(), Rebalancer(), MicrobatchTuner(tuner), AdaptivePolicy(None, tuner), _Custom()):
        assert isinstance(c, Controller)


def test_controllers_do_not_import_torch_distributed() -> None:
    code = (
        "import sys, controllers, controllers.harness\n"
        "print(sorted(m for m in sys.modules if m.split('.')[:2] == ['torch', 'distributed']))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# -- measurements ---------------------------------------------------------------------------


def test_imbalance_and_busiest_bubble() -> None:
    rep = _report([2.0, 4.0, 6.0])
    assert imbalance(rep) == pytest.approx(1.5)
    assert busiest_bubble(rep) == pytest.approx(0.4)
    assert imbalance(_report([0.0, 0.0])) == 1.0


def test_measured_layers_scales_to_stage_compute_and_falls_back_to_even_split() -> None:
    plan = Plan(Partition((0, 2, 3)), 4)
    with_layers = StageStats(0, 6.0, 0.0, 10.0, 1, (0, 1), (0.5, 1.0), (1.0, 0.5))
    rep = StepReport(0, "1f1b", 4, 10.0, (with_layers, StageStats(1, 3.4, 0.0, 10.0, 1)))
    got = measured_layers(rep, plan)
    assert got[0] == pytest.approx((1.0, 2.0)) and got[1] == pytest.approx((2.0, 1.0))
    assert got[2] == pytest.approx((1.0, 2.4))


def test_estimator_is_exact_without_noise_and_detects_a_shift() -> None:
    est = LayerEstimator(window=10)
    for _ in range(5):
        assert not est.update([(1.0, 2.0), (2.0, 4.0)], 4)
    assert est.f == [1.0, 2.0] and est.b == [2.0, 4.0] and est.errors() == [0.0, 0.0]
    changed = [est.update([(3.0, 6.0), (2.0, 4.0)], 4) for _ in range(2)]
    assert any(changed) and est.f[0] == 3.0
    assert not est.update([(3.0, 6.0), (2.0, 4.0)], 8) and est.n == [1, 1]  # new M: restart


# -- search ---------------------------------------------------------------------------------


@given(partitions, st.data(), st.integers(1, 4))
def test_route_reaches_the_target_one_valid_move_at_a_time(
    start: Partition, data: st.DataObject, k: int
) -> None:
    # Any partition of the same layers over the same stages, drawn directly (no filtering).
    cuts = data.draw(
        st.lists(
            st.integers(1, start.num_layers - 1),
            min_size=start.num_stages - 1,
            max_size=start.num_stages - 1,
            unique=True,
        )
    )
    target = Partition((0, *sorted(cuts), start.num_layers))
    plan = Plan(start, 1)
    moves = route(start, target, k)
    for src, dst, count in moves:
        assert 1 <= count <= k
        plan = apply(plan, MoveLayers(src, dst, count))  # raises if a stage would empty
    assert plan.partition == target
    shifts = [abs(a - b) for a, b in zip(start.bounds, target.bounds, strict=True)]
    assert len(moves) == sum(-(-d // k) for d in shifts)  # no layer moves twice


@given(partitions)
def test_nudges_shift_one_or_two_boundaries_by_one_layer(part: Partition) -> None:
    got = nudges(part)
    assert len({p.bounds for p in got}) == len(got) and part not in got
    for p in got:
        diffs = [abs(a - b) for a, b in zip(part.bounds, p.bounds, strict=True)]
        assert max(diffs) == 1 and 1 <= sum(diffs) <= 2


@settings(max_examples=30)
@given(
    st.lists(st.floats(0.1, 3.0), min_size=4, max_size=10),
    st.integers(2, 4),
    st.floats(0.0, 0.5),
)
def test_near_balanced_finds_every_split_within_slack(
    costs: list[float], stages: int, slack: float
) -> None:
    stages = min(stages, len(costs))
    got = near_balanced(costs, stages, slack, limit=10_000)
    best = max(Partition.balanced(costs, stages).stage_costs(costs))
    brute = {
        (0, *cut, len(costs))
        for cut in itertools.combinations(range(1, len(costs)), stages - 1)
        if max(Partition((0, *cut, len(costs))).stage_costs(costs)) <= best * (1 + slack) * 0.999
    }
    assert got[0] == Partition.balanced(costs, stages)
    assert len({p.bounds for p in got}) == len(got)
    assert brute <= {p.bounds for p in got}
    assert all(max(p.stage_costs(costs)) <= best * (1 + slack) * 1.001 for p in got)


def _splits(n: int, stages: int) -> list[Partition]:
    return [Partition((0, *cut, n)) for cut in itertools.combinations(range(1, n), stages - 1)]


speeds_lists = st.lists(st.floats(0.3, 3.0), min_size=4, max_size=4)


@settings(max_examples=40)
@given(st.lists(st.floats(0.1, 3.0), min_size=4, max_size=10), st.integers(2, 4), speeds_lists)
def test_balanced_with_stage_speeds_is_the_exact_min_max(
    costs: list[float], stages: int, speeds: list[float]
) -> None:
    k = speeds[:stages]
    got = max(stage_loads(Partition.balanced(costs, stages, k), costs, k))
    brute = min(max(stage_loads(p, costs, k)) for p in _splits(len(costs), stages))
    assert got == pytest.approx(brute, rel=1e-12)


@settings(max_examples=30)
@given(
    st.lists(st.floats(0.1, 3.0), min_size=4, max_size=9),
    st.integers(2, 4),
    st.floats(0.0, 0.5),
    speeds_lists,
)
def test_near_balanced_with_stage_speeds_finds_every_split_within_slack(
    costs: list[float], stages: int, slack: float, speeds: list[float]
) -> None:
    k = speeds[:stages]
    got = near_balanced(costs, stages, slack, limit=10_000, speeds=k)
    best = max(stage_loads(got[0], costs, k))
    splits = _splits(len(costs), stages)
    assert best == pytest.approx(min(max(stage_loads(p, costs, k)) for p in splits))
    brute = {
        p.bounds for p in splits if max(stage_loads(p, costs, k)) <= best * (1 + slack) * 0.999
    }
    assert len({p.bounds for p in got}) == len(got)
    assert brute <= {p.bounds for p in got}
    assert all(max(stage_loads(p, costs, k)) <= best * (1 + slack) * 1.001 for p in got)


# -- rebalancer trigger ---------------------------------------------------------------------


def _slowed(factor: float, at: int = 0) -> Scenario:
    return Scenario(8, 16, (Slowdown((6, 7), factor, at),), noise=0.0)


def test_rebalancer_waits_for_patience_then_moves_then_cools_down() -> None:
    config = RebalancerConfig(patience=3, cooldown=10, min_samples=1)
    hist = run(_slowed(3.0), Rebalancer(config), Plan(Partition.even(8, 2), 4), 40)
    moves = hist.migrations()
    assert moves and moves[0] == 2  # third step over the threshold
    careful = Rebalancer(RebalancerConfig(patience=3, min_samples=5))
    first = run(_slowed(3.0), careful, Plan(Partition.even(8, 2), 4), 40).migrations()[0]
    assert first == 4  # waits for five samples of each layer
    assert all(not isinstance(d, MoveLayers) for d in hist.decisions[moves[-1] + 1 :])
    assert hist.final is not None and hist.final.partition.sizes[1] < 4


def test_rebalancer_tolerates_imbalance_below_threshold() -> None:
    plan = Plan(Partition.even(8, 2), 4)
    hist = run(_slowed(1.3), Rebalancer(), plan, 30)  # imbalance 4.6 / 4.3 = 1.07
    assert not hist.migrations()
    eager = Rebalancer(RebalancerConfig(threshold=0.05, release=0.02))
    assert run(_slowed(1.3), eager, plan, 30).migrations() == []  # armed, but no move helps


def test_rebalancer_skips_moves_that_do_not_pay_for_themselves() -> None:
    plan = Plan(Partition.even(8, 2), 4)
    costly = RebalancerConfig(coordination_cost=1e6)
    assert not run(_slowed(3.0), Rebalancer(costly), plan, 30).migrations()
    slow_link = RebalancerConfig(bytes_per_layer=1e15, bandwidth=1e9)
    assert not run(_slowed(3.0), Rebalancer(slow_link), plan, 30).migrations()


def test_rebalancer_works_from_stage_totals_alone() -> None:
    sc = _slowed(3.0)
    plan = Plan(Partition.even(8, 2), 4)
    rebalancer = Rebalancer()
    for step in range(12):
        rep = measure(sc, plan, step)
        bare = replace(rep, stages=tuple(replace(s, layers=()) for s in rep.stages))
        plan = apply(plan, rebalancer.decide(bare, plan))
    assert plan.partition.sizes[1] < 4


def test_rebalancer_reaches_the_best_split_for_a_slow_device_in_three_steps() -> None:
    """The adaptive benchmark's case with the default config: 16 layers, 4 stages, stage 2's
    device 2x slower from step 5. The jump is confirmed on step 6 and read as the device; two
    moves follow (the second once the first one's layers were checked on their new stage, one
    step later): the best split runs from step 8 on, and nothing moves after."""
    sc = Scenario(16, 64, (DeviceSlowdown(2, 2.0, 5),), noise=0.05, seed=3)
    hist = run(sc, Rebalancer(), Plan(Partition.even(16, 4), 16), 45)
    assert hist.migrations() == [6, 7]
    assert "stage speeds 1.00 1.00 2." in hist.decisions[6].reason
    assert hist.plans[8].partition.bounds == (0, 5, 10, 12, 16)
    assert hist.final is not None and hist.final.partition.bounds == (0, 5, 10, 12, 16)


# -- tuner ----------------------------------------------------------------------------------


@given(st.integers(1, 96), st.integers(1, 96), st.floats(1.1, 4.0))
def test_tuner_only_proposes_divisors_of_the_global_batch(b: int, m: int, growth: float) -> None:
    tuner = MicrobatchTuner(TunerConfig(global_batch=b, growth=growth))
    nxt = tuner.next_microbatches(m)
    if nxt is not None:
        assert b % nxt == 0 and nxt >= growth * m and nxt > m
    else:
        assert all(b % d for d in range(max(m + 1, int(growth * m + 0.999999)), b + 1))


def _tuner_run(launch: float, **kw: Any) -> tuple[MicrobatchTuner, list[Decision]]:
    sc = Scenario(8, 64, model=LayerCostModel(launch=launch), noise=0.0)
    tuner = MicrobatchTuner(TunerConfig(global_batch=64, **kw))
    hist = run(sc, tuner, Plan(Partition.even(8, 4), 2), 60)
    return tuner, hist.decisions


def test_tuner_raises_m_keeps_gains_and_rolls_back_losses() -> None:
    tuner, decisions = _tuner_run(2e-3)  # launch cost large enough for an optimum at M=8
    sets = [d.microbatches for d in decisions if isinstance(d, SetMicrobatches)]
    assert sets == [4, 8, 16, 8]  # 16 was slower: back to 8, never retried
    assert tuner.banned(16) and not tuner.banned(8)


def test_tuner_respects_the_memory_cap() -> None:
    # 1F1B on 4 stages stashes min(4, M) micro-batches of 64/M samples, 1 MB a sample:
    # 64 MB at M=2 and M=4, 32 MB at M=8, less beyond.
    tuner, decisions = _tuner_run(0.0, activation_bytes_per_sample=1e6, memory_cap=32e6)
    sets = [d.microbatches for d in decisions if isinstance(d, SetMicrobatches)]
    assert sets[0] == 8  # 4 does not fit: skipped
    plan = Plan(Partition.even(8, 4), 2)
    assert tuner.stash_bytes(plan, 4) == 64e6
    assert all(tuner.stash_bytes(plan, m) <= 32e6 for m in sets)
    # 2BW stashes as 1F1B (4 in flight on stage 0 at M=8); with lead 2, 2 x 3 + 1 = 7.
    assert tuner.stash_bytes(Plan(plan.partition, 8, "2bw"), 8) == 4 * 8e6
    assert tuner.stash_bytes(Plan(plan.partition, 8, "2bw", 2), 8) == 7 * 8e6


def test_tuner_bans_expire_unless_for_good() -> None:
    tuner, _ = _tuner_run(2e-3, ban_steps=5)
    assert not tuner.banned(16)
    tuner, _ = _tuner_run(2e-3, ban_steps=None)
    tuner.seen += 10**9
    assert tuner.banned(16)


def test_tuner_trial_is_void_if_the_new_m_is_refused() -> None:
    sc = Scenario(8, 64, noise=0.0)
    tuner = MicrobatchTuner(TunerConfig(global_batch=64))
    plan = Plan(Partition.even(8, 4), 2)
    for step in range(20):
        tuner.decide(measure(sc, plan, step), plan)  # never applies anything
    assert not tuner.bans and tuner.phase == "measure"


def test_policy_never_moves_layers_during_a_trial() -> None:
    sc = Scenario(8, 64, (Slowdown((6, 7), 3.0, 4),), noise=0.0)
    policy = AdaptivePolicy(None, TunerConfig(global_batch=64))
    hist = run(sc, policy, Plan(Partition.even(8, 4), 2), 80)
    assert hist.migrations() and any(isinstance(d, SetMicrobatches) for d in hist.decisions)
    for plan, nxt in itertools.pairwise(hist.plans):
        assert plan.partition == nxt.partition or plan.microbatches == nxt.microbatches
    trial = None
    for plan, d in zip(hist.plans, hist.decisions, strict=True):
        if isinstance(d, SetMicrobatches) and trial is None:
            trial = d.microbatches
        elif isinstance(d, SetMicrobatches) or (trial is not None and "kept" in d.reason):
            trial = None
        assert not (trial is not None and isinstance(d, MoveLayers)), plan


# -- state ----------------------------------------------------------------------------------


def test_state_dicts_are_json_and_check_their_kind() -> None:
    sc = Scenario(8, 64, (Slowdown((6, 7), 3.0, 4),))
    policy = AdaptivePolicy(None, TunerConfig(global_batch=64))
    run(sc, policy, Plan(Partition.even(8, 4), 2), 30)
    state = json.loads(json.dumps(policy.state_dict()))
    fresh = AdaptivePolicy(None, TunerConfig(global_batch=64))
    fresh.load_state_dict(state)
    assert fresh.state_dict() == state
    with pytest.raises(ValueError, match="rebalancer"):
        Rebalancer().load_state_dict(state)
    with pytest.raises(ValueError, match="tuner"):
        AdaptivePolicy().load_state_dict(state)
