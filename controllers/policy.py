"""The combined policy the runtime uses when adaptivity is on.

Order of precedence each step, one decision at most:

1. a micro-batch or schedule trial under way finishes first (keep or roll back), so its
   measurement is not confounded by another change; but if the layer costs changed under it
   (the rebalancer confirmed a shift this step) and a move is due, or the stages' imbalance
   rose clearly over the rebalancer's threshold since the trial began (a skew the trial's
   fresh estimates cannot show yet: a new M learns its layer costs afresh), the trial is
   void: it is rolled back unjudged (no ban) and a move can follow on the old plan;
2. otherwise the rebalancer moves layers if stages are uneven and a move pays off;
   while a layer's latest time is off its estimate but not yet confirmed (a skew may be
   starting), no trial starts, and none is judged whose verdict that last step decides: the
   next step tells;
3. otherwise the tuner may raise M;
4. otherwise, if the plan is steady (no move on its way or being checked), the switcher may
   try another schedule (``controllers.schedule``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from adaptive_pp.core.decisions import Decision, Keep, Plan
from adaptive_pp.core.report import StepReport

from .base import check_state
from .rebalancer import Rebalancer, RebalancerConfig
from .schedule import ScheduleSwitcher, SwitchConfig
from .tuner import MicrobatchTuner, TunerConfig

_SWITCH = SwitchConfig()


class AdaptivePolicy:
    """Rebalance first when stages are uneven; otherwise tune M; otherwise maybe switch the
    schedule; never two changes in one step."""

    def __init__(
        self,
        rebalancer: RebalancerConfig | None = None,
        tuner: TunerConfig | None = None,
        schedule: SwitchConfig | None = _SWITCH,
    ) -> None:
        """``tuner=None`` (the default here) keeps M fixed; ``schedule=None`` keeps the schedule
        (default: switch between 1f1b and zb-h1). ``default_policy()`` turns all three on."""
        self.rebalancer = Rebalancer(rebalancer)
        self.tuner = MicrobatchTuner(tuner) if tuner is not None else None
        self.switcher = ScheduleSwitcher(schedule) if schedule is not None else None
        self.trial_imbalance = 1.0  # the rebalancer's imbalance when the last trial began

    def decide(self, report: StepReport, plan: Plan) -> Decision:
        """Every controller observes every step; at most one of them acts."""
        self.rebalancer.observe(report, plan)
        if self.tuner is not None:
            self.tuner.observe(report, plan)
        if self.switcher is not None:
            self.switcher.observe(report, plan)
        r = self.rebalancer
        jumped = r.estimator.layers.unconfirmed
        for trial in (self.tuner, self.switcher):
            if trial is not None and trial.busy:
                if r.changed and r.propose(plan).note in ("move", "probe"):
                    # The costs changed under the trial and a move is due: roll it back unjudged.
                    proposal = trial.void("the costs changed and a move is due (trial void)")
                elif self._skewed():
                    why = f"stage imbalance rose to {r.last_imbalance:.3f} (trial void)"
                    proposal = trial.void(why)
                else:
                    proposal = trial.propose(plan)
                    if (
                        jumped
                        and proposal.note in ("accept", "rollback")
                        and not trial.verdict_stands()
                    ):
                        # Its last sample may show a skew, not the trial, and it decides the
                        # verdict: judge a step later.
                        return Keep(f"layer(s) {jumped} off their estimate: confirming first")
                trial.commit(proposal)
                return proposal.decision
        proposal = self.rebalancer.propose(plan)
        self.rebalancer.commit(proposal)
        if proposal.note in ("move", "probe"):
            return proposal.decision
        keep = proposal.decision
        if jumped:  # a skew may be starting: no trial now (the next step tells)
            return Keep(f"layer(s) {jumped} off their estimate: confirming next step")
        if self.tuner is not None:
            proposal = self.tuner.propose(plan)
            self.tuner.commit(proposal)
            self._began(proposal.decision)
            if self.switcher is None or not isinstance(proposal.decision, Keep):
                return proposal.decision
            keep = proposal.decision
        if self.switcher is None or not self.steady():
            return keep
        proposal = self.switcher.propose(plan)
        self.switcher.commit(proposal)
        self._began(proposal.decision)
        return keep if isinstance(proposal.decision, Keep) else proposal.decision

    def _began(self, decision: Decision) -> None:
        """Note the imbalance a trial (any decision of the tuner or switcher) begins at."""
        if not isinstance(decision, Keep):
            self.trial_imbalance = self.rebalancer.last_imbalance

    def _skewed(self) -> bool:
        """Whether the stages' imbalance rose clearly over the rebalancer's threshold since
        the trial under way began (M and the schedule change every stage alike; a skew does
        not)."""
        r = self.rebalancer
        bar = 1.0 + r.config.threshold
        return r.last_imbalance > max(bar, self.trial_imbalance * bar)

    def steady(self) -> bool:
        """Whether no move is on its way or being checked (the rebalancer's view)."""
        r = self.rebalancer
        return r.target is None and not r.pending and not r.estimator.probing

    def state_dict(self) -> dict[str, Any]:
        """JSON-ready state of the controllers."""
        return {
            "kind": "adaptive_policy",
            "version": 2,
            "rebalancer": self.rebalancer.state_dict(),
            "tuner": None if self.tuner is None else self.tuner.state_dict(),
            "schedule": None if self.switcher is None else self.switcher.state_dict(),
            "trial_imbalance": self.trial_imbalance,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what state_dict returned (from a policy built with the same configs).

        A version 1 state (before schedule switching) leaves the switcher fresh.
        """
        check_state(state, "adaptive_policy", 1 if state.get("version") == 1 else 2)
        if (state["tuner"] is None) != (self.tuner is None):
            raise ValueError("state and policy disagree on whether the tuner is on")
        switcher = state.get("schedule")
        if "schedule" in state and (switcher is None) != (self.switcher is None):
            raise ValueError("state and policy disagree on whether schedule switching is on")
        self.rebalancer.load_state_dict(state["rebalancer"])
        self.trial_imbalance = float(state.get("trial_imbalance", 1.0))  # absent before
        if self.tuner is not None:
            self.tuner.load_state_dict(state["tuner"])
        if self.switcher is not None and switcher is not None:
            self.switcher.load_state_dict(switcher)
        elif self.switcher is not None:
            self.switcher = ScheduleSwitcher(self.switcher.config)


def default_policy() -> AdaptivePolicy:
    """What ``PipelineConfig(adaptive=True)`` runs: the rebalancer, the micro-batch tuner and
    the schedule switcher, each with its default config. Nothing is model-specific: each
    layer's move size (``StageStats.layer_bytes``) and the batch size (``StepReport.batch``)
    come from the step reports."""
    return AdaptivePolicy(RebalancerConfig(), TunerConfig(), SwitchConfig())
