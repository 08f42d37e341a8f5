"""The combined policy in closed loop: ``default_policy()`` (what ``PipelineConfig(adaptive=True)``
runs) and what it takes from the step reports instead of settings: each layer's move size
(``StageStats.layer_bytes``) and the batch size (``StepReport.batch``)."""

from __future__ import annotations

import json
from dataclasses import replace

from hypothesis import given, settings
from hypothesis import strategies as st
from test_controllers_loop import BATCH, scenarios, settled, wild

from adaptive_pp.core.decisions import (
    Keep,
    MoveLayers,
    Plan,
    SetMicrobatches,
    SetSchedule,
    apply,
    to_dict,
)
from adaptive_pp.core.partition import Partition
from controllers import (
    MicrobatchTuner,
    Rebalancer,
    RebalancerConfig,
    SwitchConfig,
    TunerConfig,
    default_policy,
)
from controllers.harness import (
    DeviceSlowdown,
    History,
    LayerCostModel,
    Scenario,
    Slowdown,
    best_plan,
    measure,
    run,
    true_step_time,
)


def test_the_default_policy_runs_all_three_controllers_with_their_defaults() -> None:
    policy = default_policy()
    assert policy.rebalancer.config == RebalancerConfig()
    assert policy.tuner is not None and policy.tuner.config == TunerConfig()
    assert policy.switcher is not None and policy.switcher.config == SwitchConfig()
    # Nothing model-specific is set: move sizes and the batch size come from the reports.
    assert RebalancerConfig().bytes_per_layer is None and TunerConfig().global_batch is None


def test_the_harness_reports_layer_bytes_and_the_batch_like_the_runtime() -> None:
    sc = Scenario(6, BATCH, layer_scale=(1.0, 2.0, 1.0, 0.5, 1.0, 1.0), bytes_per_layer=1e6)
    rep = measure(sc, Plan(Partition((0, 2, 6)), 4), 0)
    assert rep.batch == BATCH
    assert [st.layer_bytes for st in rep.stages] == [
        (10**6, 2 * 10**6),
        (10**6, 5 * 10**5, 10**6, 10**6),
    ]


def _first_move(sc: Scenario, config: RebalancerConfig | None = None) -> int | None:
    hist = run(sc, Rebalancer(config), Plan(Partition.even(8, 2), 4), 30)
    moves = hist.migrations()
    return moves[0] if moves else None


def test_the_rebalancer_prices_a_move_by_the_bytes_the_reports_measure() -> None:
    """Layers too big to ship over the link in the gain's lifetime stay; small ones move;
    ``bytes_per_layer`` overrides what the reports say."""
    sc = Scenario(8, 16, (Slowdown((6, 7), 3.0, 0),), noise=0.0)
    assert _first_move(sc) is not None  # 0.7 GB a layer: 14 ms at 50 GB/s, the gain pays
    huge = replace(sc, bytes_per_layer=1e15)  # 20000 s a layer
    assert _first_move(huge) is None
    assert _first_move(huge, RebalancerConfig(bytes_per_layer=0.7e9)) is not None
    assert _first_move(sc, RebalancerConfig(bytes_per_layer=1e15)) is None
    bare = Rebalancer()
    plan = Plan(Partition.even(8, 2), 4)
    for step in range(30):  # no layer_bytes in the reports: only the coordination cost counts
        rep = measure(huge, plan, step)
        rep = replace(rep, stages=tuple(replace(s, layer_bytes=()) for s in rep.stages))
        plan = apply(plan, bare.decide(rep, plan))
    assert bare.moves > 0 and bare.move_bytes(7) == 0.0


def test_the_tuner_takes_the_batch_size_from_the_reports() -> None:
    sc = Scenario(8, 48, noise=0.0)
    tuner, plan = MicrobatchTuner(), Plan(Partition.even(8, 4), 4)
    tries = [d for d in run(sc, tuner, plan, 30).decisions if isinstance(d, SetMicrobatches)]
    assert tries and tries[0].microbatches == 8 and all(48 % d.microbatches == 0 for d in tries)
    assert tuner.global_batch == 48
    blind = MicrobatchTuner()
    for step in range(10):  # reports that do not know the batch size: M stays
        d = blind.decide(replace(measure(sc, plan, step), batch=0), plan)
        assert isinstance(d, Keep)
    assert "batch size is unknown" in d.reason
    assert MicrobatchTuner(TunerConfig(global_batch=96)).next_microbatches(4) == 8


def test_a_skew_during_a_trial_voids_it_and_the_move_follows() -> None:
    """ZB-H1 is on trial (steps 4-7) when a device slows down at step 5: the stage imbalance
    jumps on that step (a schedule changes every stage alike), so the trial is rolled back
    unjudged (no ban) at once, the jump is confirmed on the old schedule's first step, and the
    layers move: within 5% of the best 2 steps after the skew."""
    sc = Scenario(8, BATCH, (DeviceSlowdown(1, 2.0, 5),), seed=5)
    hist = run(sc, default_policy(), Plan(Partition.even(8, 4), 32), 20)
    changes = [(r.step, d) for r, d in zip(hist.reports, hist.decisions) if not isinstance(d, Keep)]
    assert isinstance(changes[0][1], SetSchedule) and changes[0][0] == 3  # the trial
    step, back = changes[1]
    assert step == 5 and isinstance(back, SetSchedule) and back.schedule == "1f1b"
    assert "trial void" in back.reason
    assert changes[2][0] == 6 and isinstance(changes[2][1], MoveLayers)
    plan = hist.plans[7]
    assert true_step_time(sc, plan, 7) <= 1.05 * best_plan(sc, plan, 7)[1]


@settings(max_examples=50)
@given(wild())
def test_policy_never_emits_an_invalid_plan(case: tuple[Scenario, Plan]) -> None:
    """The default policy under anything: every decision applies (run raises otherwise)."""
    sc, plan = case
    hist = run(sc, default_policy(), plan, 150)
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
    hist = run(sc, MicrobatchTuner(), plan, 80)  # the batch size from the reports
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
    """Checkpoint the default policy mid-run (through JSON), restore into a fresh one: same
    future."""
    sc, plan = settled(*case)
    policy = default_policy()
    first = run(sc, policy, plan, split)
    assert first.final is not None
    restored = default_policy()
    restored.load_state_dict(json.loads(json.dumps(policy.state_dict())))
    a = run(sc, policy, first.final, 100, start=split)
    b = run(sc, restored, first.final, 100, start=split)
    assert [to_dict(d) for d in a.decisions] == [to_dict(d) for d in b.decisions]


@settings(max_examples=15)
@given(scenarios(kinds=("slow", "moe", "drift", "device")))
def test_same_inputs_same_decisions(case: tuple[Scenario, Plan]) -> None:
    """Two runs of the same scenario and seed decide identically."""
    sc, plan = settled(*case)
    runs = [run(sc, default_policy(), plan, 150) for _ in "ab"]
    assert [to_dict(d) for d in runs[0].decisions] == [to_dict(d) for d in runs[1].decisions]
    assert runs[0].plans == runs[1].plans
