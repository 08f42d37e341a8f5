"""Schedule switcher: try another schedule when the simulator predicts it is faster; keep it
only if measured steps got faster.

Loop: measure ``window`` steps on the current plan (after ``settle`` steps following any change
of schedule, M or partition). Predict the step time of the same partition and M under each
schedule in ``allowed`` with the simulator, from the per-layer times measured in those steps
(their mean; ``controllers.estimates.predict_step_time``; a split backward gives W the
simulator's ``W_SHARE`` of each backward). If the fastest other schedule is predicted at least
``margin`` faster, its activation stash fits (below) and that switch is not banned, propose
``SetSchedule``. Then measure ``window`` steps under it: keep it if the mean step time fell by
``min_gain``, else roll back to the previous schedule and ban that switch (from, to) for
``ban_steps`` steps (``None``: for good). A prediction is only a prediction: a runtime whose
zero-bubble steps pay more per action than the simulator knows is caught by the trial.

A trial is void (no ban, no rollback) if the plan changes under it for another reason: the
switch was refused, or M or the partition changed. ``AdaptivePolicy`` lets a trial finish
before anything else changes (unless the layer costs change under it and a move is due: then
``void`` rolls it back, no verdict, no ban), and switches only when no move or M trial is
under way.

Memory: rank s stashes the activations of up to ``peak[s]`` micro-batches (the validator's
``Compiled.peak``) for each layer it holds. A switch may raise the largest ``peak[s] x layers
on s`` over the ranks by at most ``max_stash_growth`` (1.0: never more than now). ZB-H1 holds
min(S, M) micro-batches on every rank, what 1F1B holds on its first, so with even stages it
fits; GPipe holds all M on every rank.

Only schedules of one model chunk per rank take part (the runtime cannot re-cut the model
into chunks between steps); a plan on a chunked schedule is left alone.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from adaptive_pp.core.decisions import Keep, Plan, SetSchedule
from adaptive_pp.core.report import StepReport
from adaptive_pp.core.schedules import SCHEDULE_NAMES, make_schedule

from .base import (
    Proposal,
    Proposer,
    ban_end,
    check_state,
    is_banned,
    judge_trial,
    verdict_stands,
)
from .estimates import compiled_schedule, measured_layers, predict_step_time


def _one_chunk(name: str) -> bool:
    return name in SCHEDULE_NAMES and make_schedule(name, 1, 1).chunks == 1


@dataclass(frozen=True)
class SwitchConfig:
    """Knobs of the schedule switcher (see the module docstring)."""

    allowed: tuple[str, ...] = ("1f1b", "zb-h1")
    margin: float = 0.03
    min_gain: float = 0.01
    window: int = 3
    settle: int = 1
    ban_steps: int | None = 1000
    max_stash_growth: float = 1.0

    def __post_init__(self) -> None:
        for name in self.allowed:
            if not _one_chunk(name):
                raise ValueError(
                    f"allowed schedule {name!r}: the switcher picks among the runtime's "
                    f"schedules of one model chunk per rank ({', '.join(_runnable())})"
                )
        if self.window < 1 or self.settle < 0:
            raise ValueError(f"need window >= 1 and settle >= 0, got {self.window}, {self.settle}")
        if self.margin < 0 or self.min_gain < 0 or self.max_stash_growth < 1.0:
            raise ValueError(
                "need margin >= 0, min_gain >= 0 and max_stash_growth >= 1, got "
                f"{self.margin}, {self.min_gain}, {self.max_stash_growth}"
            )
        if self.ban_steps is not None and self.ban_steps < 1:
            raise ValueError(f"ban_steps must be >= 1 or None, got {self.ban_steps}")


def _runnable() -> list[str]:
    return [n for n in SCHEDULE_NAMES if _one_chunk(n)]


def stash_load(plan: Plan, schedule: str) -> int:
    """Largest ``peak stashed micro-batches x layers held`` over the ranks of ``plan`` under
    ``schedule`` (a rank's activation memory, in layer-micro-batches)."""
    part = plan.partition
    _, code = compiled_schedule(schedule, part.num_stages, plan.microbatches)
    return max(peak * part.sizes[s] for s, peak in enumerate(code.peak))


class ScheduleSwitcher(Proposer):
    """Switches to a schedule predicted faster; keeps it only if measured steps got faster."""

    def __init__(self, config: SwitchConfig | None = None) -> None:
        """Start measuring the current plan."""
        self.config = config or SwitchConfig()
        self.phase = "measure"
        self.samples: list[float] = []
        self.layers: list[list[list[float]]] = []  # per sample, per layer [forward, backward]
        self.skip = 0
        self.baseline = 0.0
        self.trial_from = ""
        self.trial_to = ""
        self.bans: dict[str, int | None] = {}  # "from->to" -> step the ban ends (None: never)
        self.seen = 0
        self.last: tuple[str, int, tuple[int, ...]] | None = None

    @property
    def busy(self) -> bool:
        """Whether a trial of another schedule is under way (others should not change the plan)."""
        return self.phase == "trial"

    def observe(self, report: StepReport, plan: Plan) -> None:
        """Record one step's time and per-layer times; restart measuring if the plan changed."""
        self.seen += 1
        key = (plan.schedule, plan.microbatches, plan.partition.bounds)
        if self.phase == "trial" and plan.schedule != self.trial_to:
            self.phase = "measure"  # the switch was refused or overridden: the trial is void
        if key != self.last:
            if self.phase == "trial" and (
                self.samples or self.last is None or key[1:] != self.last[1:]
            ):
                self.phase = "measure"  # M or the partition changed during the trial: void
            self.samples, self.layers, self.skip = [], [], self.config.settle
            self.last = key
        if report.schedule != plan.schedule or report.microbatches != plan.microbatches:
            return
        if report.num_stages != plan.num_stages:
            return
        if self.skip > 0:
            self.skip -= 1
            return
        times = measured_layers(report, plan)
        self.samples.append(report.step_time)
        self.layers.append([[0.0, 0.0] if x is None else [x[0], x[1]] for x in times])
        if self.phase == "measure":
            del self.samples[: -self.config.window]
            del self.layers[: -self.config.window]

    def verdict_stands(self) -> bool:
        """Whether the trial's verdict is the same without its last sample (see base)."""
        c = self.config
        return verdict_stands(self.samples, c.window, self.baseline, c.min_gain)

    def propose(self, plan: Plan) -> Proposal:
        """The switch (or rollback) to make now, or Keep with the reason; changes no state."""
        c = self.config
        name = plan.schedule
        if len(self.samples) < c.window:
            return Proposal(Keep(f"measuring schedule {name}"))
        mean = math.fsum(self.samples[: c.window]) / c.window
        if self.phase == "trial":
            kept, change = judge_trial(mean, self.baseline, c.min_gain)
            if kept:
                why = (
                    f"schedule {name} kept: {self.baseline * 1e3:.2f} -> {mean * 1e3:.2f} ms "
                    f"({change:+.1%})"
                )
                return Proposal(Keep(why), "accept")
            why = (
                f"roll back to schedule {self.trial_from}: {name} took {mean * 1e3:.2f} ms vs "
                f"{self.baseline * 1e3:.2f} ms ({change:+.1%})"
            )
            return Proposal(SetSchedule(self.trial_from, why), "rollback")
        if plan.num_stages < 2:
            return Proposal(Keep("one stage: every schedule runs alike"))
        if not _one_chunk(name):
            return Proposal(Keep(f"schedule {name} holds several model chunks per rank: kept"))
        return self._choose(plan)

    def _choose(self, plan: Plan) -> Proposal:
        """The best allowed schedule by prediction, if it clears the margin, fits and is not
        banned."""
        c, name = self.config, plan.schedule
        n = len(self.samples)
        f = [math.fsum(s[i][0] for s in self.layers) / n for i in range(plan.partition.num_layers)]
        b = [math.fsum(s[i][1] for s in self.layers) / n for i in range(plan.partition.num_layers)]

        def predict(schedule: str) -> float:
            return predict_step_time(plan.partition, plan.microbatches, schedule, f, b)

        now = predict(name)
        options = sorted((predict(o), o) for o in c.allowed if o != name)
        faster = [(t, o) for t, o in options if now - t >= c.margin * now]
        if not faster:
            best = f"{options[0][1]} {options[0][0] * 1e3:.2f} ms" if options else "none"
            why = f"no schedule beats {name} ({now * 1e3:.2f} ms) by {c.margin:.0%}: best {best}"
            return Proposal(Keep(why))
        limit = stash_load(plan, name) * c.max_stash_growth
        reasons = []
        for t, other in faster:
            if self.banned(name, other):
                reasons.append(f"{other} was slower; not retried yet")
            elif stash_load(plan, other) > limit:
                reasons.append(f"{other} would stash more activations than allowed")
            else:
                why = (
                    f"schedule {other} predicted {now * 1e3:.2f} -> {t * 1e3:.2f} ms "
                    f"({(t - now) / now:+.1%}); try it (from {name})"
                )
                return Proposal(SetSchedule(other, why), "try")
        return Proposal(Keep("; ".join(reasons)))

    def void(self, why: str) -> Proposal:
        """Roll the trial under way back without a verdict (no ban): ``why`` it is void."""
        back = SetSchedule(self.trial_from, f"roll back to schedule {self.trial_from}: {why}")
        return Proposal(back, "void")

    def commit(self, proposal: Proposal) -> None:
        """Note that ``proposal`` was applied (call once per proposal that is acted on)."""
        d = proposal.decision
        if proposal.note == "void":
            self.phase = "measure"
        elif proposal.note == "try" and isinstance(d, SetSchedule):
            self.phase = "trial"
            self.baseline = math.fsum(self.samples) / len(self.samples)
            self.trial_from = self.last[0] if self.last else d.schedule
            self.trial_to = d.schedule
            self.samples, self.layers = [], []
        elif proposal.note == "accept":
            self.phase = "measure"
            del self.samples[: -self.config.window]
            del self.layers[: -self.config.window]
        elif proposal.note == "rollback":
            self.phase = "measure"
            self.bans[f"{self.trial_from}->{self.trial_to}"] = ban_end(
                self.seen, self.config.ban_steps
            )

    def banned(self, src: str, dst: str) -> bool:
        """Whether the switch ``src`` -> ``dst`` was rolled back and its ban has not run out."""
        return is_banned(self.bans, f"{src}->{dst}", self.seen)

    def state_dict(self) -> dict[str, Any]:
        """JSON-ready state (the config is not included: pass it to the constructor)."""
        return {
            "kind": "schedule_switcher",
            "version": 1,
            "phase": self.phase,
            "samples": list(self.samples),
            "layers": [[list(x) for x in sample] for sample in self.layers],
            "skip": self.skip,
            "baseline": self.baseline,
            "trial_from": self.trial_from,
            "trial_to": self.trial_to,
            "bans": [[k, until] for k, until in sorted(self.bans.items())],
            "seen": self.seen,
            "last": None if self.last is None else [self.last[0], self.last[1], list(self.last[2])],
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what state_dict returned."""
        check_state(state, "schedule_switcher")
        if state["phase"] not in ("measure", "trial"):
            raise ValueError(f"unknown switcher phase {state['phase']!r}")
        self.phase = str(state["phase"])
        self.samples = [float(x) for x in state["samples"]]
        self.layers = [[[float(v) for v in x] for x in sample] for sample in state["layers"]]
        self.skip = int(state["skip"])
        self.baseline = float(state["baseline"])
        self.trial_from, self.trial_to = str(state["trial_from"]), str(state["trial_to"])
        self.bans = {str(k): None if u is None else int(u) for k, u in state["bans"]}
        self.seen = int(state["seen"])
        last = state["last"]
        self.last = (
            None if last is None else (str(last[0]), int(last[1]), tuple(int(x) for x in last[2]))
        )
