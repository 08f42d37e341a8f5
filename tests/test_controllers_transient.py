"""Closed-loop properties for transients: one step much slower (every stage, or one), then back.

A transient (OS noise on a host, a neighbour's burst) is no change of the costs: it must cause
no move. Each property runs the same scenario twice, with and without the transient, on the
same per-step random draws, and asserts that the controller's moves (their reasons aside,
which quote estimates) are the same: the transient changed none. (A transient of one stage
during a trial of M or schedule may void the trial, which its measurement cannot judge: that
rolls it back without a verdict, and it is tried again later; no layer moves.)

Cases: the scenarios of ``test_controllers_loop`` (a slow stage, a slow device or MoE skew at
AT), settled as there; the transient comes 20 steps before AT (moves compared up to AT) or
60 steps after it (after convergence, where the rebalancer is often armed: the best split for a
skew can stay over its 10% threshold; compared over 40 steps). A transient while moves are on
their way is not covered: one on the step a moved layer is checked on misjudges the check.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from test_controllers_loop import AT, CONTROLLERS, examples, scenarios, settled

from adaptive_pp.core.decisions import Controller, MoveLayers, Plan
from adaptive_pp.core.partition import Partition
from controllers import Rebalancer, default_policy
from controllers.harness import DeviceSlowdown, Scenario, run

WINDOW = 40  # steps from the transient over which the moves must match

each_controller = pytest.mark.parametrize("make", list(CONTROLLERS.values()), ids=list(CONTROLLERS))


def changes(sc: Scenario, make: Callable[[], Controller], plan: Plan, start: int) -> list[str]:
    """The moves from ``start`` for WINDOW steps, or up to the skew (AT) if that comes sooner
    (step: decision)."""
    end = AT if start < AT else start + WINDOW
    hist = run(sc, make(), plan, end)
    return [
        f"{r.step}: {replace(d, reason='')}"  # the reason quotes estimates, which may differ
        for r, d in zip(hist.reports, hist.decisions, strict=True)
        if r.step >= start and isinstance(d, MoveLayers)
    ]


def check_transient(
    case: tuple[Scenario, Plan],
    make: Callable[[], Controller],
    at: int,
    factor: float,
    stage: int | None,
) -> None:
    """A one-step slowdown by ``factor`` at step ``at`` (of ``stage``'s device, or of every
    stage if None) changes none of the moves from ``at`` on."""
    sc, plan = settled(*case, make)
    stages = range(plan.num_stages) if stage is None else [stage % plan.num_stages]
    blip = tuple(DeviceSlowdown(s, factor, at, at + 1) for s in stages)
    calm = changes(sc, make, plan, at)
    hit = changes(replace(sc, effects=sc.effects + blip), make, plan, at)
    assert hit == calm, (calm, hit)


transient_cases = dict(
    case=scenarios(kinds=("slow", "device", "moe")),
    after=st.sampled_from([-20, 60]),
    factor=st.floats(1.2, 4.0),
    stage=st.none() | st.integers(0, 3),
)


@each_controller
@settings(max_examples=examples(60))
@given(**transient_cases)
@example(  # found on the old estimator: a layer's fast average, still off the step after a
    # one-step 3x slowdown of stage 1, was taken for a confirmed shift (stage 1's device x2),
    # and the armed rebalancer (the best split for a 3x slow stage 0 is 20% imbalanced) moved
    # layers off stage 1 at once (and back 8 steps later)
    case=(
        Scenario(8, 64, (DeviceSlowdown(0, 3.0, AT),), seed=3),
        Plan(Partition.from_sizes([2, 2, 2, 2]), 8),
    ),
    after=60,
    factor=3.0,
    stage=1,
)
def test_a_one_step_transient_causes_no_move(
    make: Callable[[], Controller],
    case: tuple[Scenario, Plan],
    after: int,
    factor: float,
    stage: int | None,
) -> None:
    """Every stage (or one) 1.2x-4x slower for one step, ``after`` steps after a skew appeared
    (at AT): the moves from that step on are those of the same run without it."""
    check_transient(case, make, AT + after, factor, stage)


def test_transients_reach_both_controllers() -> None:
    """The properties above do run both controllers (the guard against an empty matrix)."""
    assert set(CONTROLLERS.values()) == {Rebalancer, default_policy}
