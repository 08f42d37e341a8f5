"""Closed-loop properties: controllers against the simulator with skewed, drifting, noisy costs.

Models are small (8-16 layers, 2-4 stages, M in 4..16, global batch 64). Skews: layers that get
slower (a step or a drift; their cost travels with them), MoE skew (likewise), and a slow device
(``DeviceSlowdown``: whatever layers sit on that stage run slower). "Best" is the exact min-max
split of the true mean costs (a stage's cost: its device factor x the sum of its layers' costs),
simulated at the M and under the schedule of the plan it is compared with. Noise: each layer's
time per step x uniform(0.95, 1.05), seeded per step.

Two controllers run every property: the ``Rebalancer`` alone with its defaults (M and schedule
fixed) and ``default_policy()`` (what ``PipelineConfig(adaptive=True)`` runs: rebalancer, tuner
and schedule switcher, all defaults; the harness reports the batch size and each layer's bytes
as the runtime does, so the tuner raises M while the bubble is large and the switcher may try
ZB-H1 before the skew, as in a real job).

"First evidence" of a skew is the first step whose report shows it: the effect's ``at`` (AT).
A step is "within 5%" if its plan's true step time is within 5% of the best's.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import replace

import pytest
from hypothesis import assume, example, given, settings
from hypothesis import strategies as st

from adaptive_pp.core.decisions import Controller, Plan
from adaptive_pp.core.partition import Partition
from controllers import Rebalancer, default_policy
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
END = AT + 220  # steps each convergence run lasts
BATCH = 64
CLEAR = 1.12  # true imbalance "clearly over" the rebalancer's 10% threshold
# Each property runs a quarter of its examples in the suite (about 2 minutes on 2 cores, with
# the fixed examples of hypothesis's CI profile); ADAPTIVE_PP_WIDE=1 runs them all.
WIDE = os.environ.get("ADAPTIVE_PP_WIDE") == "1"


def examples(n: int) -> int:
    """``n`` examples in a wide run, a quarter of them in the suite."""
    return n if WIDE else max(6, n // 4)


CONTROLLERS: dict[str, Callable[[], Controller]] = {
    "rebalancer": Rebalancer,
    "default_policy": default_policy,
}
each_controller = pytest.mark.parametrize("make", list(CONTROLLERS.values()), ids=list(CONTROLLERS))


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


def settled(
    sc: Scenario, plan: Plan, make: Callable[[], Controller] = Rebalancer
) -> tuple[Scenario, Plan]:
    """Start from the fastest split for the pre-skew costs (for the default policy: at the M and
    schedule it settles on); aim the effect at one of its stages."""
    plan = tuned(sc, plan) if make is default_policy else optimal_plan(sc, plan, 0)
    effects: list[Effect] = []
    for e in sc.effects:
        if isinstance(e, DeviceSlowdown):
            effects.append(e)  # already a stage
        else:
            effects.append(replace(e, layers=tuple(plan.partition.layers(e.layers[0]))))
    return replace(sc, effects=tuple(effects)), plan


def tuned(sc: Scenario, plan: Plan) -> Plan:
    """The fastest split for the M and schedule the default policy settles on for ``sc``
    (found noise-free): where a job that adapts would be once it is steady."""
    hist = run(replace(sc, noise=0.0), default_policy(), plan, 60)
    assert hist.final is not None
    return optimal_plan(sc, hist.final, 0)


def moves_between(hist: History, start: int, end: int) -> list[int]:
    """Steps in ``[start, end)`` after which layers moved."""
    return [s for s in hist.migrations() if start <= s < end]


def ratio(sc: Scenario, plan: Plan, step: int) -> float:
    """``plan``'s true step time at ``step`` over the best split's for its M and schedule."""
    return true_step_time(sc, plan, step) / best_plan(sc, plan, step)[1]


def plans(hist: History) -> list[Plan]:
    """The plan each step ran, then the final one."""
    assert hist.final is not None
    return [*hist.plans, hist.final]


def check_reaches_best(
    case: tuple[Scenario, Plan], make: Callable[[], Controller], bound: int = 5
) -> int:
    """Run 220 steps past the skew (AT); assert: within 5% of the best at most ``bound`` steps
    after AT, at most 5 moves on the way, and at the end; return the steps it took."""
    sc, plan = settled(*case, make)
    assume(true_imbalance(sc, plan, END) > CLEAR)
    hist = run(sc, make(), plan, END)
    ran = plans(hist)
    assume(true_imbalance(sc, ran[AT], END) > CLEAR)  # on the plan the skew hits
    reached = next((s for s in range(AT, END + 1) if ratio(sc, ran[s], s) <= 1.05), None)
    assert reached is not None, f"never within 5% of best; moved after steps {hist.migrations()}"
    assert reached - AT <= bound, (ratio(sc, ran[AT], AT), hist.migrations())
    assert len(moves_between(hist, AT, reached)) <= 5
    assert ratio(sc, ran[END], END) <= 1.05
    return reached - AT


@each_controller
@settings(max_examples=examples(80))
@given(case=scenarios(kinds=("slow",)))
def test_reaches_the_best_split_within_five_steps_after_a_skew(
    make: Callable[[], Controller], case: tuple[Scenario, Plan]
) -> None:
    """The layers of one stage 1.1x-3x slower: within 5% of the best at most 5 steps after the
    first report that shows it (AT), at most 5 moves on the way, and at the end.

    Only skews that push the true imbalance clearly over the rebalancer's 10% threshold (to
    over 1.12, on the plan they hit) count: below it, the rebalancer tolerates the imbalance by
    design (see the trigger tests). Steps: the jump is confirmed by the report of AT + 1 (one
    step off may be noise), read as the device until a layer moves, whose one step on its new
    stage tells; so a move after AT + 1, corrections and the rest of the route after AT + 2..4.
    """
    check_reaches_best(case, make)


@each_controller
@settings(max_examples=examples(60))
@given(case=scenarios(kinds=("moe",)))
@example(  # MoE on all of stage 0, read as a slow device: the move overshoots by a layer, and
    # the correction back to speed 1 left it 0.9999999999999999, which gain_error counted as a
    # learned speed, so the follow-up gain (6%) stayed "within the noise" for good.
    case=(
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
def test_reaches_the_best_split_soon_after_an_moe_skew(
    make: Callable[[], Controller], case: tuple[Scenario, Plan]
) -> None:
    """MoE skew on the layers of one stage (each micro-batch waits for its busiest expert):
    within 5% of the best at most 20 steps after AT, at most 5 moves on the way, and at the
    end (same filter).

    Not 5: the busiest expert is drawn per micro-batch, so an MoE layer's time is off by 5-15%
    from step to step at these M, and the two samples a change is first planned on (and the
    one a probe is judged on) can be off by as much: the first plan can land a little over 5%
    from the best, and what is left can stay within the noise for a while. Measured over 1800
    sampled cases per controller: 5 steps or fewer in 99% (default policy: 9 cases over 5,
    at most 11; the rebalancer alone: 10, at most 17, one run of unsure looks).
    """
    check_reaches_best(case, make, bound=20)


@each_controller
@settings(max_examples=examples(80))
@given(case=scenarios(kinds=("device",)))
def test_slow_device_reaches_the_best_split_within_five_steps(
    make: Callable[[], Controller], case: tuple[Scenario, Plan]
) -> None:
    """A device 1.1x-3x slower (layers moved onto it slow down, layers leaving it speed up):
    within 5% of the best split for the slow device at most 5 steps after the first report that
    shows it, at most 5 moves on the way, and at the end (same filter)."""
    check_reaches_best(case, make)


@each_controller
@settings(max_examples=examples(30))
@given(case=scenarios(kinds=("drift",)))
def test_follows_a_drift(make: Callable[[], Controller], case: tuple[Scenario, Plan]) -> None:
    """Layers of one stage slowing down linearly to 1.1x-3x over 100 steps (same filter on the
    final imbalance): no run of more than 10 steps whose plan is over 5% slower than the best
    while the true imbalance is clearly over the threshold (the first evidence there is).

    Not 5: a drift shows in the estimates only once it exceeds their noise band (a fast average
    off the estimate by max(5%, 4 sigma) on two steps in a row), by when the plan can already be
    a few steps into the run; a step skew shows on its first step.
    """
    sc, plan = settled(*case, make)
    assume(true_imbalance(sc, plan, END) > CLEAR)
    hist = run(sc, make(), plan, END)
    ran, longest, run_ = plans(hist), 0, 0
    for s in range(AT, END + 1):
        off = ratio(sc, ran[s], s) > 1.05 and true_imbalance(sc, ran[s], s) > CLEAR
        run_ = run_ + 1 if off else 0
        longest = max(longest, run_)
    assert longest <= 10, hist.migrations()
    assert ratio(sc, ran[END], END) <= 1.05


@settings(max_examples=examples(50))
@given(scenarios(), st.integers(0, 2**32 - 1))
def test_noise_alone_moves_nothing(case: tuple[Scenario, Plan], seed: int) -> None:
    """5% noise on the fastest split (found by trying all) with steady costs: no migration in
    300 steps."""
    sc, plan = case
    sc = replace(sc, effects=(), seed=seed)
    plan = optimal_plan(sc, plan, 0)
    assert run(sc, Rebalancer(), plan, 300).migrations() == []


@settings(max_examples=examples(30))
@given(scenarios(), st.integers(0, 2**32 - 1))
def test_noise_alone_moves_nothing_under_the_default_policy(
    case: tuple[Scenario, Plan], seed: int
) -> None:
    """The same for ``default_policy()``, from the fastest split for the M and schedule it
    settles on: its tuner and switcher may try again (new M: the layer estimates restart), but
    no layer moves in 300 steps."""
    sc, plan = case
    sc = replace(sc, effects=(), seed=seed)
    assert run(sc, default_policy(), tuned(sc, plan), 300).migrations() == []


@each_controller
@settings(max_examples=examples(40))
@given(case=scenarios(kinds=("device",)), seed=st.integers(0, 2**32 - 1))
def test_a_device_slow_from_the_start_costs_at_most_one_probe(
    make: Callable[[], Controller], case: tuple[Scenario, Plan], seed: int
) -> None:
    """A device slow from the first step, on the fastest split for it (found by trying all, for
    the M and schedule the controller settles on), 5% noise: with no history its slowness looks
    like costlier layers, so one move may probe it, and one more undo that; no others in 300
    steps, and the end within 5% of the best.

    The default policy may spend one move more (3): it starts at the M it settles on (16-32,
    bubble 2-5%), where the same imbalance promises more, so its first plan can be a route of
    several moves whose first does not touch the slow device; the probe is then its second move.
    Measured over 200 random cases (ADAPTIVE_PP_WIDE-style, 2026-12-01): no move in 153, one in
    17, two in 29, four in one: that case breaks this bound and is an open defect (issue #18's
    note), not covered by the suite's fixed examples. Not found again: 400 more random cases on
    the same code gave at most 3 moves (306, 22, 71, 1), and 500 after the estimator's
    transient fix (245ac26) at most 2 (358, 53, 89)."""
    sc, plan = case
    devices = [replace(e, at=0) for e in sc.effects if isinstance(e, DeviceSlowdown)]
    sc = replace(sc, effects=tuple(devices), seed=seed)
    plan = optimal_plan(sc, plan, 0) if make is Rebalancer else tuned(sc, plan)
    hist = run(sc, make(), plan, 300)
    assert len(hist.migrations()) <= (2 if make is Rebalancer else 3), hist.migrations()
    best = true_step_time(sc, plan, 0)
    assert hist.final is not None and true_step_time(sc, hist.final, 300) <= 1.05 * best


def check_calm(case: tuple[Scenario, Plan], make: Callable[[], Controller]) -> None:
    """150 steps after the costs stop changing: <= 3 moves in 300 steps, none back to a split
    it left in that time."""
    sc, plan = settled(*case, make)
    calm = AT + 100 + 150
    hist = run(sc, make(), plan, calm + 300)
    late = moves_between(hist, calm, calm + 300)
    assert len(late) <= 3
    left = set()
    for s in late:
        left.add(hist.plans[s].partition)
        after = hist.plans[s + 1] if s + 1 < len(hist.plans) else hist.final
        assert after is not None and after.partition not in left


@each_controller
@settings(max_examples=examples(30))
@given(case=scenarios(kinds=("slow", "moe", "drift")))
def test_no_oscillation_after_convergence(
    make: Callable[[], Controller], case: tuple[Scenario, Plan]
) -> None:
    """150 steps after the costs stop changing: <= 3 moves in 300 steps, none back to a split
    it left in that time (one migration per 100 steps at most, on average)."""
    check_calm(case, make)


@each_controller
@settings(max_examples=examples(25))
@given(case=scenarios(kinds=("device",)))
def test_no_oscillation_on_a_slow_device(
    make: Callable[[], Controller], case: tuple[Scenario, Plan]
) -> None:
    """The same for a slow device: <= 3 moves in the 300 steps after 250 calm ones, no return."""
    check_calm(case, make)


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
        options: list[Effect] = [
            Slowdown(ids, factor, at),
            Drift(ids, factor, at, at + 50),
            MoESkew(ids, at),
            DeviceSlowdown(ids[0] % len(sizes), factor, at),
        ]
        effects.append(draw(st.sampled_from(options)))
    noise = draw(st.sampled_from([0.0, 0.05, 0.2]))
    model = LayerCostModel(launch=draw(st.sampled_from([0.04e-3, 1e-3, 4e-3])))
    sc = Scenario(layers, BATCH, tuple(effects), model=model, noise=noise, seed=draw(st.integers()))
    return sc, Plan(Partition.from_sizes(sizes), m, draw(st.sampled_from(["1f1b", "gpipe"])))
