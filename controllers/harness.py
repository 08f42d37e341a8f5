"""Closed loop: run a controller against the simulator with drifting, skewed, noisy layer costs.

Cost model (calibrated on an H100, see docs/DESIGN.md): a layer's forward time per micro-batch is
affine in the micro-batch size, ``launch + per_sample * B / M``; backward is 2.4x forward.
Effects scale chosen layers: a step ``Slowdown``, a linear ``Drift``, or ``MoESkew`` (experts
spread over devices, so a micro-batch takes as long as its busiest expert: factor
``experts * share`` with the hot expert's share drawn per micro-batch); their cost travels with
the layers. ``DeviceSlowdown`` scales a stage instead: whatever layers sit on that stage's
device, now or after a move, run slower. Noise: each layer's time
in a step is multiplied by a factor uniform in ``[1 - noise, 1 + noise]``. Random draws come from
``random.Random`` seeded by (scenario seed, step), so any stretch of steps can be replayed.

Each step builds per-(stage, micro-batch) costs for the current plan from the layers it owns,
simulates it under the plan's schedule (a split backward gives W the simulator's ``W_SHARE``),
fills the per-layer fields of every StageStats with what was "measured" (times, and each
layer's move size: ``Scenario.layer_bytes``) and the batch size, as the runtime does, hands the
report to the controller and applies its decision (any Decision, through ``decisions.apply``).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field, replace
from itertools import combinations

from adaptive_pp.core.decisions import (
    Decision,
    MoveLayers,
    Plan,
    SetMicrobatches,
    SetSchedule,
    apply,
)
from adaptive_pp.core.partition import Partition
from adaptive_pp.core.report import StepReport
from adaptive_pp.core.simulator import BACKWARD_RATIO, W_SHARE, Costs, simulate

from .base import Controller
from .estimates import compiled_schedule


@dataclass(frozen=True)
class LayerCostModel:
    """Forward seconds per micro-batch = launch + per_sample x samples; backward = ratio x fwd."""

    launch: float = 0.04e-3
    per_sample: float = 0.36e-3
    backward_ratio: float = BACKWARD_RATIO

    def forward(self, samples: float) -> float:
        """Forward time of one layer on a micro-batch of ``samples``."""
        return self.launch + self.per_sample * samples


@dataclass(frozen=True)
class Slowdown:
    """``layers`` run ``factor`` times slower from step ``at`` on."""

    layers: tuple[int, ...]
    factor: float
    at: int = 0

    def expected(self, step: int) -> float:
        """Mean factor at ``step``."""
        return self.factor if step >= self.at else 1.0


@dataclass(frozen=True)
class Drift:
    """``layers`` slow down linearly from 1x at step ``start`` to ``factor`` at step ``end``."""

    layers: tuple[int, ...]
    factor: float
    start: int
    end: int

    def expected(self, step: int) -> float:
        """Factor at ``step``."""
        if step <= self.start:
            return 1.0
        frac = min(1.0, (step - self.start) / max(1, self.end - self.start))
        return 1.0 + (self.factor - 1.0) * frac


@dataclass(frozen=True)
class MoESkew:
    """From step ``at``, ``layers`` wait for their busiest expert, per micro-batch.

    The hot expert's share of assignments is uniform in ``[1/experts, hot_share]`` per
    micro-batch and layer, so the factor ``experts * share`` lies in ``[1, experts*hot_share]``.
    """

    layers: tuple[int, ...]
    at: int = 0
    experts: int = 8
    hot_share: float = 0.7

    def expected(self, step: int) -> float:
        """Mean factor at ``step``."""
        return (1.0 + self.experts * self.hot_share) / 2.0 if step >= self.at else 1.0

    def sample(self, step: int, rng: random.Random) -> float:
        """One micro-batch's factor at ``step``."""
        if step < self.at:
            return 1.0
        return self.experts * rng.uniform(1.0 / self.experts, self.hot_share)


@dataclass(frozen=True)
class DeviceSlowdown:
    """Stage ``stage``'s device runs ``factor`` times slower from step ``at`` on (until step
    ``until``, excluded, if set: a transient, say OS noise on its host), for any layer."""

    stage: int
    factor: float
    at: int = 0
    until: int | None = None

    def expected(self, step: int) -> float:
        """Factor at ``step``."""
        on = step >= self.at and (self.until is None or step < self.until)
        return self.factor if on else 1.0


Effect = Slowdown | Drift | MoESkew | DeviceSlowdown
LayerEffect = Slowdown | Drift | MoESkew


@dataclass(frozen=True)
class Scenario:
    """A model to train: per-layer costs, effects over time, noise and hop costs."""

    num_layers: int
    global_batch: int
    effects: tuple[Effect, ...] = ()
    layer_scale: tuple[float, ...] = ()
    model: LayerCostModel = field(default_factory=LayerCostModel)
    noise: float = 0.05
    hop_latency: float = 0.0
    hop_per_sample: float = 0.0
    seed: int = 0
    action_cost: float = 0.0
    """Seconds every action (F, B, I, W) takes besides its compute: a runtime's per-action host
    cost, which a split backward (I and W) pays 3M times per rank per step instead of 2M."""
    bytes_per_layer: float = 0.7e9
    """Bytes a move of a layer (of scale 1) ships, as the runtime reports them: a GPT-style
    block of width 2048 (50M parameters) with bf16 weights, an fp32 master copy and Adam's two
    moments, 14 bytes a parameter. A layer's ``layer_scale`` scales it like its cost."""

    def layer_bytes(self, layer: int) -> int:
        """Bytes a move of ``layer`` ships."""
        scale = self.layer_scale[layer] if self.layer_scale else 1.0
        return round(scale * self.bytes_per_layer)

    def base_forward(self, layer: int, microbatches: int) -> float:
        """Forward seconds of ``layer`` per micro-batch, before effects."""
        scale = self.layer_scale[layer] if self.layer_scale else 1.0
        return scale * self.model.forward(self.global_batch / microbatches)

    def stage_speeds(self, step: int, num_stages: int) -> list[float]:
        """Per stage, the factor its device slows every layer on it by at ``step``."""
        out = [1.0] * num_stages
        for e in self.effects:
            if isinstance(e, DeviceSlowdown) and 0 <= e.stage < num_stages:
                out[e.stage] *= e.expected(step)
        return out

    def _on_devices(self, values: list[float], step: int, part: Partition | None) -> list[float]:
        """Scale per-layer ``values`` by the speed of the stage each layer sits on in ``part``."""
        if part is None:
            return values
        speeds = self.stage_speeds(step, part.num_stages)
        return [x * speeds[part.stage_of(i)] for i, x in enumerate(values)]

    def expected_forward(
        self, step: int, microbatches: int, partition: Partition | None = None
    ) -> list[float]:
        """Per layer, the mean forward seconds per micro-batch at ``step`` (no noise).

        Device slowdowns apply to the layers ``partition`` puts on the slow stages; without a
        partition they are left out (the layers' own costs).
        """
        out = [self.base_forward(i, microbatches) for i in range(self.num_layers)]
        for e in self.layer_effects():
            k = e.expected(step)
            for i in e.layers:
                out[i] *= k
        return self._on_devices(out, step, partition)

    def layer_effects(self) -> list[LayerEffect]:
        """The effects whose cost travels with the layers."""
        return [e for e in self.effects if not isinstance(e, DeviceSlowdown)]

    def sample_forward(
        self, step: int, microbatches: int, partition: Partition | None = None
    ) -> list[list[float]]:
        """Per layer and micro-batch, this step's forward seconds (noise and skew drawn)."""
        rng = random.Random(f"{self.seed}:{step}")
        base = self._on_devices(
            [self.base_forward(i, microbatches) for i in range(self.num_layers)], step, partition
        )
        rows = [[x] * microbatches for x in base]
        for e in self.layer_effects():
            for i in e.layers:
                if isinstance(e, MoESkew):
                    rows[i] = [x * e.sample(step, rng) for x in rows[i]]
                else:
                    k = e.expected(step)
                    rows[i] = [x * k for x in rows[i]]
        for row in rows:
            k = rng.uniform(1.0 - self.noise, 1.0 + self.noise) if self.noise else 1.0
            row[:] = [x * k for x in row]
        return rows

    def hop(self, microbatches: int) -> float:
        """Seconds to send one micro-batch's activations (or gradients) one hop."""
        return self.hop_latency + self.hop_per_sample * self.global_batch / microbatches


def _report(scenario: Scenario, plan: Plan, fwd: list[list[float]], step: int) -> StepReport:
    """Simulate ``plan`` with per-layer, per-micro-batch forward times and fill layer fields."""
    part, m, ratio = plan.partition, plan.microbatches, scenario.model.backward_ratio
    tau_f = [
        [math.fsum(fwd[i][j] for i in part.layers(s)) for j in range(m)]
        for s in range(part.num_stages)
    ]
    tau_b = [[x * ratio for x in row] for row in tau_f]
    hops = (scenario.hop(m),) * (part.num_stages - 1)
    sched, code = compiled_schedule(plan.schedule, part.num_stages, m, plan.lead)
    tau_w = None
    if scenario.action_cost:
        o = scenario.action_cost
        if code.split:
            tau_w = tuple(tuple(x * W_SHARE + o for x in row) for row in tau_b)
        tau_f = [[x + o for x in row] for row in tau_f]
        tau_b = [[x + (2 * o if code.split else o) for x in row] for row in tau_b]
    costs = Costs(tuple(map(tuple, tau_f)), tuple(map(tuple, tau_b)), hops, tau_w)
    rep = simulate(sched, costs, step=step, compiled=code)
    stages = []
    for st in rep.stages:
        ids = tuple(part.layers(st.stage))
        lf = tuple(math.fsum(fwd[i]) for i in ids)
        lb = tuple(x * ratio for x in lf)
        size = tuple(scenario.layer_bytes(i) for i in ids)
        stages.append(
            replace(st, layers=ids, layer_forward=lf, layer_backward=lb, layer_bytes=size)
        )
    return replace(rep, stages=tuple(stages), partition=part.bounds, batch=scenario.global_batch)


def measure(scenario: Scenario, plan: Plan, step: int) -> StepReport:
    """What the runtime would report for ``step`` under ``plan`` (noise and skew drawn)."""
    fwd = scenario.sample_forward(step, plan.microbatches, plan.partition)
    return _report(scenario, plan, fwd, step)


def true_step_time(scenario: Scenario, plan: Plan, step: int) -> float:
    """Step time of ``plan`` at ``step`` with mean costs (no noise, no per-micro-batch skew)."""
    fwd = scenario.expected_forward(step, plan.microbatches, plan.partition)
    rows = [[x] * plan.microbatches for x in fwd]
    return _report(scenario, plan, rows, step).step_time


def best_plan(scenario: Scenario, plan: Plan, step: int) -> tuple[Plan, float]:
    """The exact min-max split of the mean costs at ``step`` (same M), and its step time.

    A stage's cost is its device's slowdown x the sum of its layers' own mean costs.
    """
    fwd = scenario.expected_forward(step, plan.microbatches)
    speeds = scenario.stage_speeds(step, plan.num_stages)
    best = replace(plan, partition=Partition.balanced(fwd, plan.num_stages, speeds))
    return best, true_step_time(scenario, best, step)


def true_imbalance(scenario: Scenario, plan: Plan, step: int) -> float:
    """Max stage cost over the mean under ``plan`` with mean costs at ``step``."""
    fwd = scenario.expected_forward(step, plan.microbatches, plan.partition)
    costs = plan.partition.stage_costs(fwd)
    return max(costs) * len(costs) / math.fsum(costs)


def optimal_plan(scenario: Scenario, plan: Plan, step: int, limit: int = 10_000) -> Plan:
    """The split with the least true step time at ``step`` (same M), by trying every one."""
    n, stages = scenario.num_layers, plan.num_stages
    if math.comb(n - 1, stages - 1) > limit:
        raise ValueError(f"{math.comb(n - 1, stages - 1)} splits to try: more than {limit}")
    splits = (Partition((0, *cut, n)) for cut in combinations(range(1, n), stages - 1))
    plans = (replace(plan, partition=p) for p in splits)
    return min(plans, key=lambda p: (true_step_time(scenario, p, step), p.partition.bounds))


@dataclass
class History:
    """Per step: the plan it ran, its report, and the decision taken after it."""

    plans: list[Plan] = field(default_factory=list)
    reports: list[StepReport] = field(default_factory=list)
    decisions: list[Decision] = field(default_factory=list)
    final: Plan | None = None

    def steps_with(
        self, kind: type[MoveLayers] | type[SetMicrobatches] | type[SetSchedule]
    ) -> list[int]:
        """Steps whose decision was of ``kind``."""
        return [
            r.step for r, d in zip(self.reports, self.decisions, strict=True) if isinstance(d, kind)
        ]

    def migrations(self) -> list[int]:
        """Steps after which layers moved."""
        return self.steps_with(MoveLayers)

    def switches(self) -> list[int]:
        """Steps after which the schedule changed (tries and rollbacks)."""
        return self.steps_with(SetSchedule)


def run(
    scenario: Scenario, controller: Controller, plan: Plan, steps: int, start: int = 0
) -> History:
    """Run steps ``start .. start + steps - 1``; apply raises if a decision is invalid."""
    hist = History()
    for step in range(start, start + steps):
        report = measure(scenario, plan, step)
        decision = controller.decide(report, plan)
        hist.plans.append(plan)
        hist.reports.append(report)
        hist.decisions.append(decision)
        plan = apply(plan, decision)
    hist.final = plan
    return hist
