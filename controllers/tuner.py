"""Micro-batch tuner: raise M while the bubble is large, keep a change only if steps got faster.

Loop: measure ``window`` steps at the current M (after ``settle`` steps following any change).
If the busiest stage's bubble is above ``target_bubble``, try the next M: the smallest divisor
of the global batch that is at least ``growth`` x M (so doubling where the batch allows); if its
estimated activation stash does not fit ``memory_cap``, the next larger divisor that fits. The
global batch is ``global_batch`` if set, else the samples per step the latest step report
carries (``StepReport.batch``, which the runtime fills); while neither is known, M stays.
Then measure ``window`` steps at the new M: keep it if the mean step time fell by
``min_gain``, else roll back to the previous M and ban the rejected M for ``ban_steps`` steps
(a while: 1000 by default; ``None`` bans it for good). While a larger M is banned the tuner
does not skip past it: step time against M has one minimum under an affine per-micro-batch
cost, so larger values would be slower still. The tuner only raises M; it never lowers it.

A trial is void (no ban, no rollback) if the plan changes under it for another reason: the
new M was refused, layers moved or the schedule changed. Measuring restarts after any change
of M, partition or schedule. ``AdaptivePolicy`` lets a trial finish before anything else,
unless the layer costs change under it and a move is due: then ``void`` rolls it back to the
previous M with no verdict and no ban.

Stash estimate for M: peak stashed micro-batches on any stage (from the schedule) x
``activation_bytes_per_sample`` x global_batch / M.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from adaptive_pp.core.decisions import Keep, Plan, SetMicrobatches
from adaptive_pp.core.report import StepReport

from .base import (
    Proposal,
    Proposer,
    ban_end,
    busiest_bubble,
    check_state,
    is_banned,
    judge_trial,
    verdict_stands,
)
from .estimates import compiled_schedule


@dataclass(frozen=True)
class TunerConfig:
    """Knobs of the micro-batch tuner; ``global_batch`` (samples per step): None takes it from
    the step reports (``StepReport.batch``)."""

    global_batch: int | None = None
    target_bubble: float = 0.10
    memory_cap: float | None = None
    activation_bytes_per_sample: float = 0.0
    growth: float = 2.0
    max_microbatches: int | None = None
    window: int = 3
    settle: int = 1
    min_gain: float = 0.01
    ban_steps: int | None = 1000

    def __post_init__(self) -> None:
        if self.global_batch is not None and self.global_batch < 1:
            raise ValueError(f"global_batch must be >= 1, got {self.global_batch}")
        if self.growth <= 1.0:
            raise ValueError(f"growth must be > 1, got {self.growth}")
        if self.window < 1 or self.settle < 0:
            raise ValueError(f"need window >= 1 and settle >= 0, got {self.window}, {self.settle}")
        if self.ban_steps is not None and self.ban_steps < 1:
            raise ValueError(f"ban_steps must be >= 1 or None, got {self.ban_steps}")


class MicrobatchTuner(Proposer):
    """Raises M while the bubble is large; keeps a change only if measured steps got faster."""

    def __init__(self, config: TunerConfig | None = None) -> None:
        """Start measuring the current M."""
        self.config = config or TunerConfig()
        self.reported = 0  # samples per step, from the latest report that carried them
        self.phase = "measure"
        self.samples: list[float] = []
        self.bubbles: list[float] = []
        self.skip = 0
        self.baseline = 0.0
        self.trial_from = 0
        self.trial_to = 0
        self.bans: dict[int, int | None] = {}
        self.seen = 0
        self.last: tuple[int, tuple[int, ...]] | None = None
        self.schedule: str | None = None  # the schedule the samples were taken under

    @property
    def busy(self) -> bool:
        """Whether a trial of a new M is under way (others should not change the plan)."""
        return self.phase == "trial"

    def observe(self, report: StepReport, plan: Plan) -> None:
        """Record one step's time and bubble; restart measuring if the plan changed."""
        self.seen += 1
        self.reported = report.batch if report.batch > 0 else self.reported
        key = (plan.microbatches, plan.partition.bounds)
        if self.phase == "trial" and plan.microbatches != self.trial_to:
            self.phase = "measure"  # the new M was refused or overridden: the trial is void
        if key != self.last or plan.schedule != self.schedule:
            if self.phase == "trial" and (
                self.samples
                or self.last is None
                or key[1] != self.last[1]
                or plan.schedule != self.schedule
            ):
                self.phase = "measure"  # the partition or schedule changed in the trial: void
            self.samples, self.bubbles, self.skip = [], [], self.config.settle
            self.last, self.schedule = key, plan.schedule
        if report.microbatches != plan.microbatches:
            return
        if self.skip > 0:
            self.skip -= 1
            return
        self.samples.append(report.step_time)
        self.bubbles.append(busiest_bubble(report))
        if self.phase == "measure":
            del self.samples[: -self.config.window]
            del self.bubbles[: -self.config.window]

    def verdict_stands(self) -> bool:
        """Whether the trial's verdict is the same without its last sample (see base)."""
        c = self.config
        return verdict_stands(self.samples, c.window, self.baseline, c.min_gain)

    def propose(self, plan: Plan) -> Proposal:
        """The change to make now, or Keep with the reason; changes no state."""
        c = self.config
        m = plan.microbatches
        if len(self.samples) < c.window:
            return Proposal(Keep(f"measuring M={m}"))
        mean = math.fsum(self.samples[: c.window]) / c.window
        if self.phase == "trial":
            kept, change = judge_trial(mean, self.baseline, c.min_gain)
            if kept:
                why = (
                    f"M={m} kept: {self.baseline * 1e3:.2f} -> {mean * 1e3:.2f} ms ({change:+.1%})"
                )
                return Proposal(Keep(why), "accept")
            why = (
                f"roll back to M={self.trial_from}: M={m} took {mean * 1e3:.2f} ms vs "
                f"{self.baseline * 1e3:.2f} ms ({change:+.1%})"
            )
            return Proposal(SetMicrobatches(self.trial_from, why), "rollback")
        bubble = math.fsum(self.bubbles) / len(self.bubbles)
        if bubble <= c.target_bubble:
            return Proposal(Keep(f"bubble {bubble:.1%} <= target {c.target_bubble:.1%}"))
        if not self.global_batch:
            return Proposal(Keep(f"bubble {bubble:.1%} but the batch size is unknown: M kept"))
        nxt = self.next_microbatches(m)
        if nxt is None:
            why = f"bubble {bubble:.1%} but no larger M divides {self.global_batch}"
            return Proposal(Keep(why))
        while nxt is not None:
            if self.banned(nxt):
                return Proposal(Keep(f"M={nxt} was slower; not retried yet"))
            stash = self.stash_bytes(plan, nxt)
            if c.memory_cap is None or stash <= c.memory_cap:
                why = f"bubble {bubble:.1%} > {c.target_bubble:.1%}; try M={nxt} (from {m})"
                return Proposal(SetMicrobatches(nxt, why), "try")
            nxt = self.next_microbatches(nxt, 1.0)
        return Proposal(Keep(f"no larger M keeps the activation stash under {c.memory_cap:.3g} B"))

    def void(self, why: str) -> Proposal:
        """Roll the trial under way back without a verdict (no ban): ``why`` it is void."""
        return Proposal(
            SetMicrobatches(self.trial_from, f"roll back to M={self.trial_from}: {why}"), "void"
        )

    def commit(self, proposal: Proposal) -> None:
        """Note that ``proposal`` was applied (call once per proposal that is acted on)."""
        d = proposal.decision
        if proposal.note == "void":
            self.phase = "measure"
        elif proposal.note == "try" and isinstance(d, SetMicrobatches):
            self.phase = "trial"
            self.baseline = math.fsum(self.samples) / len(self.samples)
            self.trial_from = self.last[0] if self.last else d.microbatches
            self.trial_to = d.microbatches
            self.samples, self.bubbles = [], []
        elif proposal.note == "accept":
            self.phase = "measure"
            del self.samples[: -self.config.window]
            del self.bubbles[: -self.config.window]
        elif proposal.note == "rollback":
            self.phase = "measure"
            self.bans[self.trial_to] = ban_end(self.seen, self.config.ban_steps)

    @property
    def global_batch(self) -> int:
        """Samples per step: the configured ones, else the latest report's (0: unknown)."""
        return self.config.global_batch or self.reported

    def banned(self, m: int) -> bool:
        """Whether ``m`` was rejected and its ban has not run out."""
        return is_banned(self.bans, m, self.seen)

    def next_microbatches(self, m: int, growth: float | None = None) -> int | None:
        """Smallest divisor of the global batch > ``m`` and >= growth x ``m`` (within max)."""
        c, batch = self.config, self.global_batch
        g = c.growth if growth is None else growth
        top = batch if c.max_microbatches is None else min(batch, c.max_microbatches)
        for d in range(max(m + 1, math.ceil(g * m)), top + 1):
            if batch % d == 0:
                return d
        return None

    def stash_bytes(self, plan: Plan, m: int) -> float:
        """Estimated peak activation bytes on one stage when running ``m`` micro-batches."""
        _, code = compiled_schedule(plan.schedule, plan.num_stages, m, plan.lead)
        per_mb = self.config.activation_bytes_per_sample * self.global_batch / m
        return max(code.peak) * per_mb

    def state_dict(self) -> dict[str, Any]:
        """JSON-ready state (the config is not included: pass it to the constructor)."""
        return {
            "kind": "microbatch_tuner",
            "version": 1,
            "phase": self.phase,
            "samples": list(self.samples),
            "bubbles": list(self.bubbles),
            "skip": self.skip,
            "baseline": self.baseline,
            "trial_from": self.trial_from,
            "trial_to": self.trial_to,
            "bans": [[m, until] for m, until in sorted(self.bans.items())],
            "seen": self.seen,
            "last": None if self.last is None else [self.last[0], list(self.last[1])],
            "schedule": self.schedule,
            "reported": self.reported,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what state_dict returned."""
        check_state(state, "microbatch_tuner")
        if state["phase"] not in ("measure", "trial"):
            raise ValueError(f"unknown tuner phase {state['phase']!r}")
        self.phase = str(state["phase"])
        self.samples = [float(x) for x in state["samples"]]
        self.bubbles = [float(x) for x in state["bubbles"]]
        self.skip = int(state["skip"])
        self.baseline = float(state["baseline"])
        self.trial_from, self.trial_to = int(state["trial_from"]), int(state["trial_to"])
        self.bans = {int(m): None if u is None else int(u) for m, u in state["bans"]}
        self.seen = int(state["seen"])
        last = state["last"]
        self.last = None if last is None else (int(last[0]), tuple(int(x) for x in last[1]))
        schedule = state.get("schedule")  # absent from states saved before schedule switching
        self.schedule = None if schedule is None else str(schedule)
        self.reported = int(state.get("reported", 0))  # absent before batches were reported
