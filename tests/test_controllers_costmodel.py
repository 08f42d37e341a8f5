"""The rebalancer's cost model in isolation: layer cost x stage speed, stage-wide readings,
probes of moved layers and their corrections (controllers.costmodel, controllers.readings)."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
from test_controllers import _splits

from adaptive_pp.core.decisions import Plan
from adaptive_pp.core.partition import Partition
from controllers import CostModel, measured_layers
from controllers.harness import (
    DeviceSlowdown,
    MoESkew,
    Scenario,
    Slowdown,
    best_plan,
    measure,
    true_step_time,
)

# -- cost model: layer cost x stage speed ---------------------------------------------------


def _learn(sc: Scenario, plan: Plan, steps: range, model: CostModel) -> list[str]:
    notes = []
    for step in steps:
        model.update(measured_layers(measure(sc, plan, step), plan), plan.partition, 4)
        notes.append(model.note)
    return notes


def _predicts_every_split(sc: Scenario, model: CostModel, step: int, stages: int) -> None:
    for p in _splits(sc.num_layers, stages):
        want = true_step_time(sc, Plan(p, 4), step)
        assert model.predict(p, 4, "1f1b") == pytest.approx(want, rel=1e-9), p


def test_harness_device_slowdown_follows_the_stage_not_the_layer() -> None:
    sc = Scenario(8, 16, (DeviceSlowdown(1, 2.0, 3),), noise=0.0)
    a, b = Plan(Partition((0, 4, 8)), 4), Plan(Partition((0, 6, 8)), 4)
    assert sc.expected_forward(2, 4, a.partition)[4] == sc.expected_forward(2, 4)[4]
    assert sc.expected_forward(3, 4, a.partition)[4] == 2 * sc.expected_forward(3, 4)[4]
    assert sc.expected_forward(3, 4, b.partition)[4] == sc.expected_forward(3, 4)[4]
    assert best_plan(sc, a, 3)[0].partition.sizes[1] < 4


def test_a_first_step_outlier_does_not_keep_a_device_from_being_read() -> None:
    """A job's first step 1.8x slower everywhere (one-time costs): the estimates restart from
    steps 1-2, so a device slowing down at step 5 finds them on 4 samples; that is enough to
    read it as the device (stage speed 2) when it is confirmed (step 6), not as costlier
    layers (bench_adaptive, measured live: a route of three moves instead of two)."""
    warm = tuple(DeviceSlowdown(s, 1.8, 0, 1) for s in range(4))
    sc = Scenario(16, 64, (*warm, DeviceSlowdown(2, 2.0, 5)), seed=1)
    plan, model = Plan(Partition.even(16, 4), 4), CostModel()
    notes = _learn(sc, plan, range(7), model)
    assert any(n.startswith("cost of layer") for n in notes[1:3])  # the restart after step 0
    assert notes[6].startswith("stage 2 device")
    assert model.speed[2] == pytest.approx(2.0, rel=0.1) and model.speed[:2] == [1.0, 1.0]


def test_cost_model_reads_a_stage_wide_shift_as_the_device() -> None:
    sc = Scenario(8, 16, (DeviceSlowdown(1, 2.0, 5),), noise=0.0)
    plan, model = Plan(Partition((0, 4, 8)), 4), CostModel(settle=3)
    notes = _learn(sc, plan, range(12), model)
    assert "stage 1 device x2.00" in " ".join(notes)
    assert model.speed == pytest.approx([1.0, 2.0]) and model.ready(5)
    assert max(model.base) == pytest.approx(min(model.base))  # layers kept their cost
    _predicts_every_split(sc, model, 12, 2)  # layers leaving stage 1 get faster, joining slower
    assert model.candidates(2, 0.0, 1)[0].bounds == (0, 5, 8)  # fewer layers on the slow one
    part = Partition((0, 6, 8))  # move two layers off the slow device: prediction holds
    _learn(sc, replace(plan, partition=part), range(12, 16), model)
    assert not model.corrected and model.speed == pytest.approx([1.0, 2.0])


def test_cost_model_keeps_a_partial_shift_with_the_layers() -> None:
    sc = Scenario(8, 16, (Slowdown((6,), 3.0, 5),), noise=0.0)
    model = CostModel(settle=3)
    _learn(sc, Plan(Partition((0, 4, 8)), 4), range(12), model)
    assert model.speed == [1.0, 1.0]
    assert model.base[6] == pytest.approx(3 * model.base[5])
    _predicts_every_split(sc, model, 12, 2)


def test_cost_model_reads_a_shift_shared_with_another_stage_as_the_layers() -> None:
    # Stage 1's layers all get 2x costlier, but so do two layers on stage 0 (say, layers that
    # moved there earlier): not the device.
    sc = Scenario(8, 16, (Slowdown((2, 3, 4, 5, 6, 7), 2.0, 5),), noise=0.0)
    model = CostModel(settle=3)
    _learn(sc, Plan(Partition((0, 4, 8)), 4), range(12), model)
    assert model.speed == [1.0, 1.0]
    _predicts_every_split(sc, model, 12, 2)


def test_cost_model_corrects_a_misread_after_a_move() -> None:
    # Every layer of stage 1 gets 2x costlier: it looks like the device until a layer moves.
    sc = Scenario(8, 16, (Slowdown((4, 5, 6, 7), 2.0, 5),), noise=0.0)
    plan, model = Plan(Partition((0, 4, 8)), 4), CostModel(settle=3)
    _learn(sc, plan, range(10), model)
    assert model.speed == pytest.approx([1.0, 2.0])
    other = model.folded()  # until a layer moves, the other reading stays open
    assert other is not None and other.speed == [1.0, 1.0]
    assert other.base[4] == pytest.approx(2 * other.base[0])
    plan = replace(plan, partition=Partition((0, 5, 8)))  # layer 4 moves to stage 0
    notes = _learn(sc, plan, range(10, 11), model)  # one step on its new stage tells
    assert model.probing is False and model.corrected and "took x2.00" in notes[-1]
    assert model.speed == [1.0, 1.0] and model.folded() is None  # folded back into the layers
    assert model.base[4] == pytest.approx(2 * model.base[0])
    _predicts_every_split(sc, model, 12, 2)


@pytest.mark.parametrize("seed", range(3))
def test_cost_model_folds_a_misread_back_to_speed_one_under_noise(seed: int) -> None:
    sc = Scenario(8, 16, (Slowdown((4, 5, 6, 7), 2.0, 5),), noise=0.05, seed=seed)
    plan, model = Plan(Partition((0, 4, 8)), 4), CostModel(settle=3)
    _learn(sc, plan, range(12), model)
    assert model.speed[1] == pytest.approx(2.0, rel=0.05)
    _learn(sc, replace(plan, partition=Partition((0, 5, 8))), range(12, 13), model)
    assert model.corrected and model.speed == [1.0, 1.0]  # exactly: within the noise of 1


@pytest.mark.parametrize("factor", [1.84, 1.9, 2.2])
def test_cost_model_folds_a_misread_back_to_exactly_one_with_no_speed_error(factor: float) -> None:
    # 1.9: the learned speed x (1 / speed) is 0.9999999999999999, which speed_errors took for a
    # learned speed (with the stage's noise as its error): gains stayed "within the noise".
    sc = Scenario(8, 16, (Slowdown((4, 5, 6, 7), factor, 5),), noise=0.0)
    plan, model = Plan(Partition((0, 4, 8)), 4), CostModel(settle=3)
    _learn(sc, plan, range(12), model)
    assert model.speed[1] == pytest.approx(factor)
    _learn(sc, replace(plan, partition=Partition((0, 5, 8))), range(12, 13), model)
    assert model.corrected and model.speed == [1.0, 1.0]
    assert model.speed_errors() == [0.0, 0.0]


@pytest.mark.parametrize("seed", range(6))
def test_cost_model_does_not_read_noisy_young_estimates_as_a_device(seed: int) -> None:
    # MoE skew on three of stage 1's four layers restarts them; their new, larger noise is not
    # known yet, and no later noisy shift of the whole stage may pass for a device (seed 2 did
    # before each layer's offset had to agree with the common one within its own noise).
    sc = Scenario(8, 64, (MoESkew((4, 5, 6), 30, 8, 0.625),), seed=seed)
    plan, model = Plan(Partition((0, 4, 8)), 8), CostModel()
    for step in range(100):
        model.update(measured_layers(measure(sc, plan, step), plan), plan.partition, 8)
        assert model.speed == [1.0, 1.0], (step, model.note)


@pytest.mark.parametrize("seed", range(4))
def test_cost_model_keeps_an_moe_skew_on_a_whole_stage_near_its_factor(seed: int) -> None:
    # MoE skew on all of stage 1 (mean factor 3) looks like its device until a layer moves
    # (an unchecked reading: the other one stays open); noise does not make it wander after.
    sc = Scenario(8, 64, (MoESkew((4, 5, 6, 7), 30, 8, 0.625),), seed=seed)
    plan, model = Plan(Partition((0, 4, 8)), 8), CostModel()
    for step in range(100):
        model.update(measured_layers(measure(sc, plan, step), plan), plan.partition, 8)
        if step > 30 and model.speed[1] != 1.0:
            assert model.speed[0] == 1.0 and 2.4 < model.speed[1] < 3.6, (step, model.note)
            assert model.folded() is not None


def test_cost_model_learns_a_device_slow_from_the_start_from_a_move() -> None:
    sc = Scenario(9, 16, (DeviceSlowdown(2, 2.0, 0),), noise=0.0)
    plan, model = Plan(Partition((0, 3, 6, 9)), 4), CostModel(settle=3)
    _learn(sc, plan, range(8), model)
    assert model.speed == [1.0, 1.0, 1.0]  # no history: the layers look costlier
    plan = replace(plan, partition=Partition((0, 3, 7, 9)))  # layer 6 leaves the slow device
    _learn(sc, plan, range(8, 9), model)
    assert model.corrected and model.speed == pytest.approx([1.0, 1.0, 2.0])
    _predicts_every_split(sc, model, 10, 3)


def test_cost_model_ignores_noise_and_needs_settled_estimates_for_a_device_reading() -> None:
    sc = Scenario(12, 16, noise=0.05, seed=7)
    model = CostModel(settle=5)
    _learn(sc, Plan(Partition.even(12, 3), 4), range(200), model)
    assert model.speed == [1.0, 1.0, 1.0]


def test_cost_model_state_round_trips_at_every_step() -> None:
    sc = Scenario(8, 16, (DeviceSlowdown(1, 2.0, 3), Slowdown((2,), 1.5, 9)), noise=0.05)
    plans = [Partition((0, 4, 8))] * 8 + [Partition((0, 6, 8))] * 4 + [Partition((0, 3, 8))] * 6
    model = CostModel(settle=3)
    for k, part in enumerate(plans):
        saved = json.loads(json.dumps(model.state_dict()))
        twin = CostModel(settle=3)
        twin.load_state_dict(saved)
        for m in (model, twin):
            m.update(measured_layers(measure(sc, Plan(part, 4), k), Plan(part, 4)), part, 4)
        assert twin.state_dict() == model.state_dict()


# -- a new M: the other M's bases are kept, and a layer's own change carries over ------------


def _feed(model: CostModel, sc: Scenario, part: Partition, m: int, steps: range) -> None:
    plan = Plan(part, m)
    for step in steps:
        model.update(measured_layers(measure(sc, plan, step), plan), part, m)


def test_a_schedule_keeps_bases_of_its_own() -> None:
    """1F1B -> ZB-H1 -> 1F1B (a switch rolled back): the layer times ZB-H1 measures (I and W
    timed apart, per-action costs of their own: here every layer 1.4x) are no cost change,
    and back on 1F1B the bases learned there are ready at once, as they were."""
    sc, part = Scenario(6, 32, noise=0.0), Partition((0, 3, 6))
    model = CostModel()
    _feed(model, sc, part, 8, range(6))
    before = list(model.base)
    zb = Plan(part, 8, "zb-h1")
    for step in range(6, 9):
        raw = measured_layers(measure(sc, zb, step), zb)
        times = [None if x is None else (x[0] * 1.4, x[1] * 1.4) for x in raw]
        assert not model.update(times, part, 8, "zb-h1"), step
    assert model.base == pytest.approx([1.4 * x for x in before])
    plan = Plan(part, 8)
    assert not model.update(measured_layers(measure(sc, plan, 9), plan), part, 8, "1f1b")
    assert model.ready(6) and model.base == pytest.approx(before)
    twin = CostModel()
    twin.load_state_dict(json.loads(json.dumps(model.state_dict())))
    assert twin.state_dict() == model.state_dict()


def test_a_rolled_back_m_takes_up_its_bases_again() -> None:
    """M 8 -> 16 -> 8 (a tuner trial rolled back): back at 8, the bases learned there before
    the trial are ready at once (no samples to wait for), as they were."""
    sc, part = Scenario(6, 32, noise=0.0), Partition((0, 3, 6))
    model = CostModel()
    _feed(model, sc, part, 8, range(6))
    before = list(model.base)
    _feed(model, sc, part, 16, range(6, 9))
    assert model.base != pytest.approx(before)  # other per-call costs at M = 16
    model.update(measured_layers(measure(sc, Plan(part, 8), 9), Plan(part, 8)), part, 8)
    assert model.ready(6) and model.base == pytest.approx(before)
