"""The combined policy the runtime uses when adaptivity is on.

Order of precedence each step, one decision at most:

1. a micro-batch trial under way finishes first (keep or roll back), so its measurement is not
   confounded by a migration;
2. otherwise the rebalancer moves layers if stages are uneven and a move pays off;
3. otherwise the tuner may raise M.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from adaptive_pp.core.decisions import Decision, Plan
from adaptive_pp.core.report import StepReport

from .base import check_state
from .rebalancer import Rebalancer, RebalancerConfig
from .tuner import MicrobatchTuner, TunerConfig


class AdaptivePolicy:
    """Rebalance first when stages are uneven; otherwise tune M; never both in one step."""

    def __init__(
        self, rebalancer: RebalancerConfig | None = None, tuner: TunerConfig | None = None
    ) -> None:
        """``tuner=None`` keeps M fixed (the tuner needs the global batch size)."""
        self.rebalancer = Rebalancer(rebalancer)
        self.tuner = MicrobatchTuner(tuner) if tuner is not None else None

    def decide(self, report: StepReport, plan: Plan) -> Decision:
        """Both controllers observe every step; at most one of them acts."""
        self.rebalancer.observe(report, plan)
        if self.tuner is not None:
            self.tuner.observe(report, plan)
            if self.tuner.busy:
                proposal = self.tuner.propose(plan)
                self.tuner.commit(proposal)
                return proposal.decision
        proposal = self.rebalancer.propose(plan)
        self.rebalancer.commit(proposal)
        if self.tuner is None or proposal.note == "move":
            return proposal.decision
        proposal = self.tuner.propose(plan)
        self.tuner.commit(proposal)
        return proposal.decision

    def state_dict(self) -> dict[str, Any]:
        """JSON-ready state of both controllers."""
        return {
            "kind": "adaptive_policy",
            "version": 1,
            "rebalancer": self.rebalancer.state_dict(),
            "tuner": None if self.tuner is None else self.tuner.state_dict(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what state_dict returned (from a policy built with the same configs)."""
        check_state(state, "adaptive_policy")
        self.rebalancer.load_state_dict(state["rebalancer"])
        if (state["tuner"] is None) != (self.tuner is None):
            raise ValueError("state and policy disagree on whether the tuner is on")
        if self.tuner is not None:
            self.tuner.load_state_dict(state["tuner"])
