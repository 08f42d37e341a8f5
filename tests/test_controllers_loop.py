"""Closed-loop properties: controllers against the simulator with skewed, drifting, noisy costs.

Models are small (8-16 layers, 2-4 stages, M in 4..16, global batch 64). Skews: layers that get
slower (a step or a drift; their cost travels with them), MoE skew (likewise), and a slow device
(``DeviceSlowdown``: whatever layers sit on that stage run slower). "Best" is the exact min-max
split of the true mean costs (a stage's cost: its device factor x the sum of its layers' costs),
simulated at the same M. Noise: each layer's time per step x uniform(0.95, 1.05), seeded per
step.
"""

from __future__ import annotations

import json
from dataclasses import replace

from hypothesis import assume, example, given, settings
from hypothesis import strategies as st

from adaptive_pp.core.decisions import Keep, Plan, SetMicrobatches, to_dict
from adaptive_pp.core.partition import Partition
from controllers import AdaptivePolicy, MicrobatchTuner, Rebalancer, RebalancerConfig, TunerConfig
from controllers.harness import (
    DeviceSlowdown,
    Drift,
    Effect,
    History,
    LayerCostModel,
    MoESkew,
    Scenario,
    Slowdown,
    best_plan,
    optimal_plan,
    run,
    true_imbalance,
    true_step_time,
)

AT = 30  # step at which the skew appears (drift: starts, and ends 100 steps later)
BATCH = 64


@st.composite
def scenarios(draw: st.DrawFn, kinds: tuple[str, ...] = ("slow", "moe")) -> tuple[Scenario, Plan]:
    """A model, its starting plan (M and partition; the partition is settled later), one effect."""
    layers = draw(st.integers(8, 16))
    stages = draw(st.integers(2, min(4, layers // 2)))
    m = draw(st.sampled_from([4, 8, 16]))
    uneven = draw(st.booleans())
    scale = draw(st.lists(st.floats(0.5, 2.0), min_size=layers, max_size=layers)) if uneven else []
    sc = Scenario(layers, BATCH, layer_scale=tuple(scale), seed=draw(st.integers(0, 2**32 - 1)))
    plan = Plan(Partition.balanced(sc.expected_forward(0, m), stages), m)
    stage = draw(st.integers(0, stages - 1))
    kind = draw(st.sampled_from(kinds))
    factor = draw(st.floats(1.1, 3.0))
    effect: Effect
    if kind == "slow":
        effect = Slowdown((stage,), factor, AT)
    elif kind == "moe":
        effect = MoESkew((stage,), AT, 8, draw(st.floats(0.2, 0.7)))
    elif kind == "device":
        effect = DeviceSlowdown(stage, factor, AT)
    else:
        effect = Drift((stage,), factor, AT, AT + 100)
    return replace(sc, effects=(effect,)), plan


def settled(sc: Scenario, plan: Plan) -> tuple[Scenario, Plan]:
    """Start from the fastest split for the pre-skew costs; aim the effect at one of its stages."""
    plan = optimal_plan(sc, plan, 0)
    effects: list[Effect] = []
    for e in sc.effects:
        if isinstance(e, DeviceSlowdown):
            effects.append(e)  # already a stage
        else:
            effects.append(replace(e, layers=tuple(plan.partition.layers(e.layers[0]))))
    return replace(sc, effects=tuple(effects)), plan


def moves_between(hist: History, start: int, end: int) -> list[int]:
    """Steps in ``[start, end)`` after which layers moved."""
    return [s for s in hist.migrations() if start <= s < end]


def check_reaches_best(case: tuple[Scenario, Plan]) -> int:
    """Run 220 steps past the skew; assert within 5% of best after <= 5 moves; return the moves."""
    sc, plan = settled(*case)
    end = AT + 220
    assume(true_imbalance(sc, plan, end) > 1.12)
    hist = run(sc, Rebalancer(), plan, end)
    best = best_plan(sc, plan, end)[1]
    reached = next(
        (
            s
            for s in range(AT, end + 1)
            if true_step_time(sc, hist.plans[s] if s < end else hist.final, s) <= 1.05 * best
        ),
        None,
    )
    assert reached is not None, f"never within 5% of best; moved after steps {hist.migrations()}"
    moves = len(moves_between(hist, AT, reached))
    assert moves <= 5
    assert hist.final is not None and true_step_time(sc, hist.final, end) <= 1.05 * best
    return moves


@settings(max_examples=80)
@given(scenarios())
@example(  # MoE on all of stage 0, read as a slow device: the move overshoots by a layer, and
    # the correction back to speed 1 left it 0.9999999999999999, which gain_error counted as a
    # learned speed, so the follow-up gain (6%) stayed "within the noise" for good.
    (
        Scenario(
            num_layers=9,
            global_batch=64,
            effects=(MoESkew(layers=(0,), at=30, experts=8, hot_share=0.328125),),
            model=LayerCostModel(launch=4e-05, per_sample=0.00036, backward_ratio=2.4),
            noise=0.05,
            seed=8,
        ),
        Plan(Partition((0, 4, 9)), 8, "1f1b"),
    )
)
def test_reaches_the_best_split_within_five_decisions_after_a_skew(
    case: tuple[Scenario, Plan],
) -> None:
    """A slow stage (1.1x-3x) or an MoE stage: within 5% of best after at most 5 moves.

    Only skews that push the true imbalance clearly over the 10% threshold count: below it,
    the rebalancer tolerates the imbalance by design (see the trigger tests).
    """
    check_reaches_best(case)


@settings(max_examples=80)
@given(scenarios(kinds=("device",)))
def test_slow_device_reaches_the_best_split_within_five_decisions(
    case: tuple[Scenario, Plan],
) -> None:
    """A device 1.1x-3x slower (layers moved onto it slow down, layers leaving it speed up):
    within 5% of the best split for the slow device after at most 5 moves (same filter)."""
    check_reaches_best(case)


@settings(max_examples=50)
@given(scenarios(), st.integers(0, 2**32 - 1))
def test_noise_alone_moves_nothing(case: tuple[Scenario, Plan], seed: int) -> None:
    """5% noise on the fastest split (found by trying all) with steady costs: no migration in
    300 steps."""
    sc, plan = case
    sc = replace(sc, effects=(), seed=seed)
    plan = optimal_plan(sc, plan, 0)
    assert run(sc, Rebalancer(), plan, 300).migrations() == []


@settings(max_examples=50)
@given(scenarios(kinds=("device",)), st.integers(0, 2**32 - 1))
def test_a_device_slow_from_the_start_costs_at_most_one_probe(
    case: tuple[Scenario, Plan], seed: int
) -> None:
    """A device slow from the first step, on the fastest split for it (found by trying all),
    5% noise: with no history its slowness looks like costlier layers, so one move may probe
    it, and one more undo that; no others in 300 steps, and the end within 5% of the best."""
    sc, plan = case
    sc = replace(sc, effects=tuple(replace(e, at=0) for e in sc.effects), seed=seed)
    plan = optimal_plan(sc, plan, 0)
    hist = run(sc, Rebalancer(), plan, 300)
    assert len(hist.migrations()) <= 2, hist.migrations()
    best = true_step_time(sc, plan, 0)
    assert hist.final is not None and true_step_time(sc, hist.final, 300) <= 1.05 * best


def check_calm(case: tuple[Scenario, Plan]) -> None:
    """150 steps after the costs stop changing: <= 3 moves in 300 steps, none back to a split
    it left in that time."""
    sc, plan = settled(*case)
    calm = AT + 100 + 150
    hist = run(sc, Rebalancer(), plan, calm + 300)
    late = moves_between(hist, calm, calm + 300)
    assert len(late) <= 3
    left = set()
    for s in late:
        left.add(hist.plans[s].partition)
        after = hist.plans[s + 1] if s + 1 < len(hist.plans) else hist.final
        assert after is not None and after.partition not in left


@settings(max_examples=40)
@given(scenarios(kinds=("slow", "moe", "drift")))
def test_no_oscillation_after_convergence(case: tuple[Scenario, Plan]) -> None:
    """150 steps after the costs stop changing: <= 3 moves in 300 steps, none back to a split
    it left in that time (one migration per 100 steps at most, on average)."""
    check_calm(case)


@settings(max_examples=30)
@given(scenarios(kinds=("device",)))
def test_no_oscillation_on_a_slow_device(case: tuple[Scenario, Plan]) -> None:
    """The same for a slow device: <= 3 moves in the 300 steps after 250 calm ones, no return."""
    check_calm(case)


@st.composite
def wild(draw: st.DrawFn) -> tuple[Scenario, Plan]:
    """Any partition and M, one to three effects of any kind at any time, any layers."""
    sizes = draw(st.lists(st.integers(1, 5), min_size=2, max_size=4))
    layers = sum(sizes)
    m = draw(st.sampled_from([1, 2, 4, 8, 16]))
    effects: list[Effect] = []
    for _ in range(draw(st.integers(1, 3))):
        ids = tuple(draw(st.lists(st.integers(0, layers - 1), min_size=1, max_size=layers)))
        at = draw(st.integers(0, 80))
        factor = draw(st.floats(0.3, 5.0))
        effects.append(
            draw(
                st.sampled_from(
                    [
                        Slowdown(ids, factor, at),
                        Drift(ids, factor, at, at + 50),
                        MoESkew(ids, at),
                        DeviceSlowdown(ids[0] % len(sizes), factor, at),
                    ]
                )
            )
        )
    noise = draw(st.sampled_from([0.0, 0.05, 0.2]))
    model = LayerCostModel(launch=draw(st.sampled_from([0.04e-3, 1e-3, 4e-3])))
    sc = Scenario(layers, BATCH, tuple(effects), model=model, noise=noise, seed=draw(st.integers()))
    return sc, Plan(Partition.from_sizes(sizes), m, draw(st.sampled_from(["1f1b", "gpipe"])))


@settings(max_examples=50)
@given(wild())
def test_policy_never_emits_an_invalid_plan(case: tuple[Scenario, Plan]) -> None:
    """The combined policy under anything: every decision applies (run raises otherwise)."""
    sc, plan = case
    policy = AdaptivePolicy(RebalancerConfig(cooldown=3), TunerConfig(global_batch=BATCH))
    hist = run(sc, policy, plan, 150)
    for p, d in zip(hist.plans, hist.decisions, strict=True):
        assert BATCH % p.microbatches == 0 or p.microbatches == plan.microbatches
        assert not (isinstance(d, SetMicrobatches) and BATCH % d.microbatches)


def trials(hist: History) -> list[tuple[int, int, bool]]:
    """Each M the tuner tried: (from, to, kept)."""
    out = []
    trial: tuple[int, int] | None = None
    for p, d in zip(hist.plans, hist.decisions, strict=True):
        if isinstance(d, SetMicrobatches) and trial is None:
            trial = (p.microbatches, d.microbatches)
        elif trial is not None and isinstance(d, SetMicrobatches):
            assert d.microbatches == trial[0]  # a rollback returns to where the trial began
            out.append((*trial, False))
            trial = None
        elif trial is not None and isinstance(d, Keep) and "kept" in d.reason:
            out.append((*trial, True))
            trial = None
    return out


@settings(max_examples=50)
@given(
    st.sampled_from([0.2e-3, 1e-3, 2e-3, 4e-3]),
    st.integers(2, 4),
    st.sampled_from([1, 2, 4]),
    st.sampled_from([0.0, 0.05]),
    st.integers(0, 2**32 - 1),
)
def test_tuner_keeps_only_improvements_and_rolls_back(
    launch: float, stages: int, m: int, noise: float, seed: int
) -> None:
    """Kept M values were faster, rejected ones were not (within noise); never retried."""
    sc = Scenario(4 * stages, BATCH, model=LayerCostModel(launch=launch), noise=noise, seed=seed)
    plan = Plan(Partition.even(4 * stages, stages), m)
    hist = run(sc, MicrobatchTuner(TunerConfig(global_batch=BATCH)), plan, 80)
    tried = trials(hist)
    assert tried
    slack = 0.04 if noise else 0.0
    for old, new, kept in tried:
        t_old = true_step_time(sc, replace(plan, microbatches=old), 0)
        t_new = true_step_time(sc, replace(plan, microbatches=new), 0)
        if kept:
            assert t_new < t_old * (1 + slack)
        else:
            assert t_new > t_old * (1 - 0.01 - slack)
    rejected = [new for _, new, kept in tried if not kept]
    assert len(rejected) == len(set(rejected))  # banned for the rest of the run (1000 steps)


@settings(max_examples=30)
@given(scenarios(kinds=("slow", "moe", "drift", "device")), st.integers(5, 120))
def test_state_dict_round_trip_gives_identical_decisions(
    case: tuple[Scenario, Plan], split: int
) -> None:
    """Checkpoint the policy mid-run (through JSON), restore into a fresh one: same future."""
    sc, plan = settled(*case)

    def make() -> AdaptivePolicy:
        return AdaptivePolicy(None, TunerConfig(global_batch=BATCH))

    policy = make()
    first = run(sc, policy, plan, split)
    assert first.final is not None
    restored = make()
    restored.load_state_dict(json.loads(json.dumps(policy.state_dict())))
    a = run(sc, policy, first.final, 100, start=split)
    b = run(sc, restored, first.final, 100, start=split)
    assert [to_dict(d) for d in a.decisions] == [to_dict(d) for d in b.decisions]


@settings(max_examples=15)
@given(scenarios(kinds=("slow", "moe", "drift", "device")))
def test_same_inputs_same_decisions(case: tuple[Scenario, Plan]) -> None:
    """Two runs of the same scenario and seed decide identically."""
    sc, plan = settled(*case)
    runs = [run(sc, AdaptivePolicy(None, TunerConfig(global_batch=BATCH)), plan, 150) for _ in "ab"]
    assert [to_dict(d) for d in runs[0].decisions] == [to_dict(d) for d in runs[1].decisions]
    assert runs[0].plans == runs[1].plans
