"""The measurements the built-in controllers share (the Controller protocol is in
``adaptive_pp.decisions``, the runtime's side of the contract; re-exported here)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from adaptive_pp.core.decisions import Controller, Decision, Keep, Plan
from adaptive_pp.core.report import StepReport

__all__ = [
    "Controller",
    "Hold",
    "Proposal",
    "Proposer",
    "busiest_bubble",
    "check_state",
    "imbalance",
]


class Hold:
    """The controller used when adaptivity is off: always keeps the plan."""

    def decide(self, report: StepReport, plan: Plan) -> Decision:
        """Always Keep."""
        return Keep("adaptivity off")

    def state_dict(self) -> dict[str, Any]:
        """No state."""
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Nothing to restore."""


@dataclass(frozen=True)
class Proposal:
    """What a controller would do now, and what its state should note if it is applied."""

    decision: Decision
    note: str = ""
    remaining: int = 0
    target: tuple[int, ...] = ()


class Proposer:
    """Base of controllers built from observe / propose / commit; ``decide`` runs all three."""

    def observe(self, report: StepReport, plan: Plan) -> None:
        """Take in one step's report."""
        raise NotImplementedError

    def propose(self, plan: Plan) -> Proposal:
        """What to do now, without changing state."""
        raise NotImplementedError

    def commit(self, proposal: Proposal) -> None:
        """Note ``proposal`` as applied."""
        raise NotImplementedError

    def decide(self, report: StepReport, plan: Plan) -> Decision:
        """Observe ``report``, propose, and note the proposal as applied."""
        self.observe(report, plan)
        proposal = self.propose(plan)
        self.commit(proposal)
        return proposal.decision


def imbalance(report: StepReport) -> float:
    """Largest stage compute time over the mean (1.0 when perfectly even or empty)."""
    compute = report.stage_compute
    if not compute:
        return 1.0
    mean = sum(compute) / len(compute)
    return max(compute) / mean if mean > 0 else 1.0


def busiest_bubble(report: StepReport) -> float:
    """Idle share of the busiest stage: the bubble that more micro-batches can shrink.

    Unlike ``report.bubble_fraction`` it leaves out the idle time lighter stages have because
    the stages are unbalanced, which raising M cannot remove.
    """
    if not report.stages:
        return 0.0
    busiest = max(report.stages, key=lambda s: s.compute)
    return busiest.bubble


def judge_trial(mean: float, baseline: float, min_gain: float) -> tuple[bool, float]:
    """A trial's verdict: whether its mean step time beat ``baseline`` by ``min_gain`` (then
    keep the change, else roll back), and the relative change (0.0 with no baseline)."""
    change = (mean - baseline) / baseline if baseline > 0 else 0.0
    return mean < baseline * (1.0 - min_gain), change


def verdict_stands(samples: Sequence[float], window: int, baseline: float, min_gain: float) -> bool:
    """Whether a trial's verdict on its first ``window`` samples is the same without the last
    of them (a sample that may show a skew starting rather than the trial): then it can be
    judged at once; else (or with one sample) the next step tells."""
    if window < 2 or len(samples) < window:
        return False
    full = judge_trial(math.fsum(samples[:window]) / window, baseline, min_gain)[0]
    less = judge_trial(math.fsum(samples[: window - 1]) / (window - 1), baseline, min_gain)[0]
    return full == less


def ban_end(seen: int, ban_steps: int | None) -> int | None:
    """The step a ban starting after ``seen`` steps ends (None: ``ban_steps`` None, never)."""
    return None if ban_steps is None else seen + ban_steps


def is_banned(bans: Mapping[Any, int | None], key: Any, seen: int) -> bool:
    """Whether ``key`` was rolled back and its ban (see ``ban_end``) has not run out."""
    if key not in bans:
        return False
    until = bans[key]
    return until is None or seen < until


def check_state(state: Mapping[str, Any], kind: str, version: int = 1) -> None:
    """Raise ValueError unless ``state`` came from a controller of ``kind`` (and ``version``)."""
    if state.get("kind") != kind or state.get("version") != version:
        raise ValueError(
            f"state is for {state.get('kind')!r} v{state.get('version')}, "
            f"expected {kind!r} v{version}"
        )
