"""Rebalancer: move whole boundary layers between neighbouring stages when stages are uneven.

Trigger (hysteresis): imbalance = max stage compute / mean, measured each step. The rebalancer
arms after ``patience`` consecutive steps above ``1 + threshold`` and disarms below
``1 + release``; after a move it waits ``cooldown`` steps before the trigger may start another.

Planning: costs come from ``CostModel``: each layer's base cost (the report's per-layer times,
smoothed) times the speed of the stage it sits on, so a slow device's slowness stays with the
device and an MoE layer's with the layer (see ``controllers.costmodel``). A new destination is
chosen only once every layer has ``min_samples`` samples since its cost last changed, and every
stage speed as many (up to ``min_samples``) since it was last learned. A change of the costs
restarts its layers from the two samples that confirmed it (a one-step confirmation), so with
the defaults a skew first seen on step t is planned for after step t + 1.
Candidate destinations: every split whose costliest stage is within ``slack`` of the exact
min-max split of the estimates, every single move of 1..``max_layers_per_move`` layers across
each boundary, and the best of these polished by hill-climbing (one or two boundaries shifted
by a layer at a time). Each is simulated. Its cost is the migrations to get there
(``coordination_cost`` per move plus the moving layers' bytes over ``bandwidth``: the bytes the
step reports measure, ``StageStats.layer_bytes``, unless ``bytes_per_layer`` overrides them). A
destination qualifies if it beats the current plan's predicted step time by ``margin`` plus
``confidence`` standard errors of the estimates, and its gain over ``horizon`` steps exceeds
its cost. Of those predicted within ``margin`` of the fastest, the one needing the fewest moves
wins, then the largest net benefit. While a stage's speed rests on a stage-wide shift no move
has checked, the other reading (its layers got costlier) is planned for too, and the one
promising more is followed; its first move tells which was right.

A decision is one move: a destination that needs several is reached over the next steps
without waiting for the trigger again, each move once the layers moved before it have been
checked against their predicted time (one step on their new stage, two if the first is
unclear); if the check shows a wrong speed reading, it plans again at once. If the best gain
clears ``margin`` but not the noise allowance, the rebalancer keeps measuring and looks again
every ``retry_unsure`` steps (at most ``max_unsure`` times) before giving up; if no move pays,
it looks again after ``retry_after`` steps (sooner while a change of the costs is fresh), or
as soon as the costs change.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any

from adaptive_pp.core.decisions import Keep, MoveLayers, Plan
from adaptive_pp.core.partition import Partition
from adaptive_pp.core.report import StepReport

from .base import Proposal, Proposer, check_state, imbalance
from .costmodel import CostModel
from .estimates import measured_layers
from .search import first_moves, nudges, route, single_moves

Times = dict[tuple[int, ...], float]  # predicted step time per partition (bounds)
_FRESH = 5  # steps after a change of the costs during which "no move pays" is looked at again


@dataclass(frozen=True)
class _Pick:
    """The destination one reading of the costs leads to (``dest`` None: none qualifies)."""

    now: float  # predicted time of the current partition
    predict: Callable[[Partition], float]
    close: float | None  # best gain that clears the margin but not the noise
    dest: tuple[int, ...] | None = None
    gain: float = 0.0  # relative to now
    net: float = 0.0  # seconds over the horizon, migration paid


@dataclass(frozen=True)
class RebalancerConfig:
    """Knobs of the rebalancer; times in seconds, sizes in bytes."""

    threshold: float = 0.10
    release: float = 0.05
    patience: int = 2
    min_samples: int = 2
    cooldown: int = 3
    retry_after: int = 10
    retry_unsure: int = 1
    max_unsure: int = 10
    max_layers_per_move: int = 8
    # 2%, not 1%: the cost model's predictions are off by 1-2% for plans that differ only off
    # the bottleneck stages (the pipeline's fill and drain), and at 1% a slow device read within
    # ~7% of its true speed moved layers back and forth between near-equal splits.
    margin: float = 0.02
    confidence: float = 1.5
    slack: float = 0.25
    max_candidates: int = 48
    horizon: int = 1000
    bytes_per_layer: float | tuple[float, ...] | None = None
    bandwidth: float = 50e9
    coordination_cost: float = 0.05
    hop_cost: float = 0.0
    window: int = 50

    def __post_init__(self) -> None:
        if not 0 <= self.release <= self.threshold:
            raise ValueError(
                f"need 0 <= release <= threshold, got {self.release}, {self.threshold}"
            )
        for name in ("patience", "min_samples", "max_layers_per_move", "window", "max_candidates"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in (
            "cooldown",
            "retry_after",
            "retry_unsure",
            "max_unsure",
            "horizon",
            "margin",
            "confidence",
        ):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.bandwidth <= 0 or self.slack < 0:
            raise ValueError(
                f"need bandwidth > 0 and slack >= 0, got {self.bandwidth}, {self.slack}"
            )

    def layer_bytes(self, layer: int) -> float | None:
        """Bytes to ship when ``layer`` moves (parameters, optimizer state, buffers), if set
        here; None: as the step reports measure them (``StageStats.layer_bytes``)."""
        b = self.bytes_per_layer
        if b is None:
            return None
        return float(b) if isinstance(b, int | float) else float(b[layer])


class Rebalancer(Proposer):
    """Moves boundary layers to even out measured stage times (see the module docstring)."""

    def __init__(self, config: RebalancerConfig | None = None) -> None:
        """Start disarmed, with no estimates."""
        self.config = config or RebalancerConfig()
        self.estimator = CostModel(self.config.window)
        self.streak = 0
        self.armed = False
        self.cooldown_left = 0
        self.retry_left = 0
        self.pending = False
        self.target: tuple[int, ...] | None = None
        self.unsure = 0
        self.last_imbalance = 1.0
        self.moves = 0
        self.changed = False  # whether the last report changed the cost model
        self.fresh = 0  # steps the cost model has counted as fresh since it last changed
        self.reported: list[float] = []  # per layer, its bytes as last reported (0: never)

    def observe(self, report: StepReport, plan: Plan) -> None:
        """Update estimates and the trigger from one step's report."""
        c = self.config
        self.cooldown_left = max(0, self.cooldown_left - 1)
        self.retry_left = max(0, self.retry_left - 1)
        self.changed = False
        if report.num_stages != plan.num_stages:
            return
        times = measured_layers(report, plan)
        self._note_bytes(report, plan.partition.num_layers)
        self.changed = self.estimator.update(
            times, plan.partition, plan.microbatches, plan.schedule
        )
        self.fresh = max(0, self.fresh - 1)
        if self.changed:
            self.fresh = _FRESH
            self.retry_left = 0  # costs changed: look again now, from scratch
            # Even if on the way; and always if the last moves rested on a wrong speed reading.
            self.pending = self.pending or self.target is not None or self.estimator.corrected
            self.target = None
        self.last_imbalance = imb = imbalance(report)
        self.streak = self.streak + 1 if imb > 1.0 + c.threshold else 0
        if self.streak >= c.patience:
            self.armed = True
        if imb < 1.0 + c.release:
            self.armed = False

    def propose(self, plan: Plan) -> Proposal:
        """The move to make now, or Keep with the reason; changes no state."""
        if plan.num_stages < 2:
            return Proposal(Keep("one stage: nothing to balance"))
        if not self.pending and self.target is None:
            if not self.armed:
                return Proposal(Keep(f"imbalance {self.last_imbalance:.3f} within threshold"))
            if self.cooldown_left > 0:
                return Proposal(Keep(f"cooldown: {self.cooldown_left} step(s) left"))
        if self.target is None and self.retry_left > 0:
            return Proposal(Keep(f"next look in {self.retry_left} step(s)"))
        if self.estimator.num_layers != plan.partition.num_layers or not self.estimator.ready():
            return Proposal(Keep("no per-layer estimates yet"))
        if self.target is None and not self.estimator.ready(self.config.min_samples):
            return Proposal(Keep("layer costs changed: measuring them"))
        if self.estimator.probing:
            return Proposal(Keep("checking the moved layers' times against the prediction"))
        return self._plan(plan)

    def commit(self, proposal: Proposal) -> None:
        """Note that ``proposal`` was applied (call once per proposal that is acted on)."""
        c = self.config
        if proposal.note in ("move", "probe"):
            self.moves += 1
            self.cooldown_left = c.cooldown
            self.streak = 0
            self.armed = False
            self.pending = proposal.note == "probe"  # plan again once the move is checked
            self.target = proposal.target if proposal.remaining > 0 else None
            self.unsure = 0
        elif proposal.note == "unsure":
            self.retry_left = c.retry_unsure
            self.unsure += 1
            self.pending = self.unsure <= c.max_unsure
            self.unsure = self.unsure if self.pending else 0  # give up until triggered again
            self.target = None
        elif proposal.note == "none":
            # Estimates a change has just restarted may still be off: look again soon.
            self.retry_left = c.retry_unsure if self.fresh else c.retry_after
            self.pending = False
            self.target = None
            self.unsure = 0

    def _plan(self, plan: Plan) -> Proposal:
        part, est = plan.partition, self.estimator
        predict, times = self._predictor(est, plan)
        now = predict(part)
        goal = self.target
        if goal is not None and len(goal) == len(part.bounds) and goal[-1] == part.bounds[-1]:
            t_goal = predict(Partition(goal))
            if goal != part.bounds and t_goal < now:
                why = (
                    f"on to [{Partition(goal)}]: predicted {now * 1e3:.2f} -> {t_goal * 1e3:.2f} ms"
                )
                return self._move_toward(part, Partition(goal), predict, why)
        picks = [self._choose(est, plan, predict, times)]
        alt = est.folded()  # a stage-wide shift no move has checked: costlier layers, or device?
        if alt is not None:
            picks.append(self._choose(alt, plan, *self._predictor(alt, plan)))
        chosen = [p for p in picks if p.dest is not None]
        if not chosen:
            close = max((p.close for p in picks if p.close is not None), default=None)
            if close is not None:
                why = f"best predicted gain {close:.1%} is within the noise: measuring more"
                return Proposal(Keep(why), "unsure")
            why = (
                f"no move beats {now * 1e3:.2f} ms by {self.config.margin:.0%} and pays for itself"
            )
            return Proposal(Keep(why), "none")
        # Both readings fit the data until a layer moves: follow the one promising more; the
        # first move tells which is right (its layers' time on their new stage), then plan again.
        pick = max(chosen, key=lambda p: (p.gain, p is picks[0]))
        assert pick.dest is not None
        dest = Partition(pick.dest)
        t = pick.predict(dest)
        how = self._speeds() if pick is picks[0] else "; read as costlier layers (a move tells)"
        why = (
            f"imbalance {self.last_imbalance:.3f}; target [{dest}] predicted "
            f"{pick.now * 1e3:.2f} -> {t * 1e3:.2f} ms ({(t - pick.now) / pick.now:+.1%}), "
            f"net {pick.net:.3g} s over {self.config.horizon} steps{how}"
        )
        move = self._move_toward(part, dest, pick.predict, why)
        return move if pick is picks[0] else replace(move, note="probe", remaining=0)

    def _predictor(
        self, model: CostModel, plan: Plan
    ) -> tuple[Callable[[Partition], float], Times]:
        """Step-time prediction under ``model`` for plan's M and schedule (memoised in times)."""
        times: Times = {}

        def predict(p: Partition) -> float:
            if p.bounds not in times:
                times[p.bounds] = model.predict(p, plan.microbatches, plan.schedule, hop, plan.lead)
            return times[p.bounds]

        hop = self.config.hop_cost
        return predict, times

    def _choose(
        self, model: CostModel, plan: Plan, predict: Callable[[Partition], float], times: Times
    ) -> _Pick:
        """The best destination under ``model`` that clears the margin, the noise and its cost."""
        c, part = self.config, plan.partition
        now = predict(part)
        self._search(model, part, predict, times)
        qualified: list[tuple[float, int, tuple[int, ...]]] = []  # (-net, moves, bounds)
        close: float | None = None  # best gain that clears the margin but not the noise
        for bounds, t in times.items():
            if bounds == part.bounds or now - t < c.margin * now:
                continue
            dest = Partition(bounds)
            moves = route(part, dest, c.max_layers_per_move)
            net = (now - t) * c.horizon - self._migration_cost(part, dest, len(moves))
            if net <= 0:
                continue
            err = model.gain_error(part, dest, plan.microbatches)
            if now - t < (c.margin + c.confidence * err) * now:
                close = max(close or 0.0, (now - t) / now)
                continue
            qualified.append((-net, len(moves), bounds))
        if not qualified:
            return _Pick(now, predict, close)
        # Destinations within the margin of the best predicted time are as good: fewest moves.
        fastest = min(times[b] for _, _, b in qualified)
        best = min(
            qualified, key=lambda q: (times[q[2]] > fastest + c.margin * now, q[1], q[0], q[2])
        )
        return _Pick(now, predict, close, best[2], (now - times[best[2]]) / now, -best[0])

    def _speeds(self) -> str:
        """The learned stage speeds for a reason, if any differs from 1."""
        speed = self.estimator.speed
        if all(k == 1.0 for k in speed):
            return ""
        return "; stage speeds " + " ".join(f"{k:.2f}" for k in speed)

    def _move_toward(
        self, part: Partition, dest: Partition, predict: Callable[[Partition], float], why: str
    ) -> Proposal:
        """The first move on the route to ``dest``: of those possible now, the fastest."""
        k = self.config.max_layers_per_move
        options = first_moves(part.bounds, dest.bounds, k)
        src, dst, count = min(options, key=lambda mv: (predict(part.move(*mv)), mv))
        remaining = len(route(part.move(src, dst, count), dest, k))
        return Proposal(MoveLayers(src, dst, count, why), "move", remaining, dest.bounds)

    def _search(
        self,
        model: CostModel,
        part: Partition,
        predict: Callable[[Partition], float],
        times: Times,
    ) -> None:
        """Simulate the candidate destinations (``predict`` records them in ``times``)."""
        c = self.config
        for p in model.candidates(part.num_stages, c.slack, c.max_candidates):
            predict(p)
        for p in single_moves(part, c.max_layers_per_move):
            predict(p)
        best = min((t, bounds) for bounds, t in times.items())
        for _ in range(2 * part.num_stages):
            near = nudges(Partition(best[1]))
            step = min(((predict(p), p.bounds) for p in near), default=best)
            if step >= best:
                break
            best = step

    def _note_bytes(self, report: StepReport, num_layers: int) -> None:
        """Keep each layer's move size from the report (where the stage measured it)."""
        if len(self.reported) != num_layers:
            self.reported = [0.0] * num_layers
        for st in report.stages:
            if len(st.layer_bytes) == len(st.layers):
                for i, size in zip(st.layers, st.layer_bytes, strict=True):
                    if 0 <= i < num_layers:
                        self.reported[i] = float(size)

    def move_bytes(self, layer: int) -> float:
        """Bytes a move of ``layer`` ships: the config's figure if it sets one, else the last
        report's (0 if no report measured it: then only ``coordination_cost`` counts)."""
        size = self.config.layer_bytes(layer)
        if size is not None:
            return size
        return self.reported[layer] if 0 <= layer < len(self.reported) else 0.0

    def _migration_cost(self, part: Partition, dest: Partition, num_moves: int) -> float:
        """Seconds to migrate: coordination per move plus the moving layers' bytes / bandwidth."""
        c = self.config
        moved = 0.0
        for a, z in zip(part.bounds[1:-1], dest.bounds[1:-1], strict=True):
            moved += math.fsum(self.move_bytes(i) for i in range(min(a, z), max(a, z)))
        return num_moves * c.coordination_cost + moved / c.bandwidth

    def state_dict(self) -> dict[str, Any]:
        """JSON-ready state (the config is not included: pass it to the constructor)."""
        return {
            "kind": "rebalancer",
            "version": 2,
            "streak": self.streak,
            "armed": self.armed,
            "cooldown_left": self.cooldown_left,
            "retry_left": self.retry_left,
            "pending": self.pending,
            "target": None if self.target is None else list(self.target),
            "unsure": self.unsure,
            "last_imbalance": self.last_imbalance,
            "moves": self.moves,
            "fresh": self.fresh,
            "reported": list(self.reported),
            "estimator": self.estimator.state_dict(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what state_dict returned."""
        check_state(state, "rebalancer", 2)
        self.streak = int(state["streak"])
        self.armed = bool(state["armed"])
        self.cooldown_left = int(state["cooldown_left"])
        self.retry_left = int(state["retry_left"])
        self.pending = bool(state["pending"])
        target = state["target"]
        self.target = None if target is None else tuple(int(x) for x in target)
        self.unsure = int(state["unsure"])
        self.last_imbalance = float(state["last_imbalance"])
        self.moves = int(state["moves"])
        self.fresh = int(state.get("fresh", 0))
        self.reported = [float(x) for x in state.get("reported", [])]  # absent before v2's bytes
        self.estimator.load_state_dict(state["estimator"])
