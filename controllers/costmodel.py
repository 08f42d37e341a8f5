"""Cost model of the rebalancer: per-layer base cost x per-stage speed factor, learned online.

Model: layer ``i`` on stage ``s`` takes ``base[i] x speed[s]`` per step (forward and backward
alike). ``base`` travels with the layer (MoE routing skew, a layer that got costlier);
``speed`` stays with the stage (a slow or throttled device: layers moving onto it become
slower, layers leaving it faster). Speeds start at 1; ``base`` is smoothed and change-detected
per layer by ``LayerEstimator`` on the measured times divided by their stage's speed.

Which kind a change is, is read from the data, deterministically:

1. Stage-wide shift: every layer of a stage changed alike, so its device did
   (``controllers.readings``): the speed takes the factor, the layers keep their bases.
   Otherwise the change is per layer: those layers' bases restart from the new samples.
2. Moves. A layer that moves is predicted to cost ``base x speed[new stage]``; its first sample
   there is compared with that. If one of the two speeds is an unchecked stage-wide reading,
   the nearer of the two readings wins at once: undoing it (the layers got costlier, not the
   device) if that predicts the miss better, else it stands. Otherwise (a second sample too if
   the first is off by between one and two times the noise allowance), if the layers that
   moved together are off by a factor Q beyond the noise, the speed ratio of the two stages was
   wrong by Q and one speed is corrected: the reading that leaves more stages at speed 1 wins
   (a speed within the noise of 1, or within 10%, becomes 1), then the one calling a stage
   slower rather than faster. Layers whose base rested on the corrected
   speed are rescaled (their time where they were measured stays) and count as measured
   twice, so their next samples weigh in quickly.

3. A new M or schedule. Layer times per step depend on M (the per-call costs) and on the
   schedule (a split backward times I and W apart, with their own per-action costs), so the
   bases of each (M, schedule) are kept apart: the old one's are kept (the last four), the new
   one's taken up where they were left (a trial rolled back has its bases at once) or else
   learned afresh; the speeds stay (so does a device reading made under the other). A layer's
   own cost change made under the other is not carried over: it shows in the first samples,
   as any change (tried: carrying it let the one-time costs of a new M's first steps skew the
   restored bases by 10-15%).

A shift of every layer on one stage by one factor (say MoE skew hitting that stage's layers
alike) looks like a slow device until a layer moves: ``folded`` gives the other reading for
planning, the first move tells, the model is corrected, and the rebalancer plans again
(``corrected``).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping, Sequence
from typing import Any

from adaptive_pp.core.partition import Partition

from .estimates import LayerEstimator, LayerTimes, predict_step_time
from .readings import StageReadings
from .search import near_balanced

_PROBE = 1  # samples of a moved layer on its new stage before it is judged
SNAP = math.log(1.1)  # a corrected speed within 10% of 1 is 1
_READ = 2  # samples behind a new speed before moves are judged against it


class CostModel(StageReadings):
    """Per-layer base costs x per-stage speeds (see the module docstring)."""

    def __init__(
        self,
        window: int = 20,
        min_shift: float = 0.05,
        z: float = 4.0,
        settle: int = 5,
    ) -> None:
        """``window``, ``min_shift``, ``z``: see LayerEstimator; ``settle``: samples per speed."""
        self.layers = LayerEstimator(window, min_shift, z)
        self.min_shift, self.z, self.settle = min_shift, z, max(1, settle)
        self.speed: list[float] = []
        self.nspeed: list[int] = []  # samples behind each speed (settle or more: measured)
        self.where: list[int] = []  # each layer's stage at the last update
        self.probe_from: list[int] = []  # stage a layer on probation came from, else -1
        self.probe_n: list[int] = []
        self.probe_log: list[float] = []  # sum of log(sample / prediction) on probation
        self.serr: list[float] = []  # per stage: standard error of a speed a probe set (log)
        self.guess: list[float] = []  # per stage: its speed before a stage-wide shift no move
        # has checked yet (0: none)
        self.prev: list[float | None] = []  # each layer's raw time in the last update
        self.jump: list[float] = []  # per stage: if off last step, its limit (signed as the offset)
        self.bases: dict[str, dict[str, Any]] = {}  # per other "M/schedule": layer estimates
        self.schedule = ""  # the schedule the layer estimates were measured under
        self.note = ""  # what the last update concluded, for decision reasons
        self.corrected = False  # whether the last update found a speed reading wrong

    @property
    def num_layers(self) -> int:
        """Number of layers tracked."""
        return self.layers.num_layers

    @property
    def read(self) -> int:
        """Samples behind a new speed before layers that moved to or from it are judged."""
        return min(_READ, self.settle)

    @property
    def probing(self) -> bool:
        """Whether some moved layer's time on its new stage is still being checked."""
        return any(src >= 0 for src in self.probe_from)

    def ready(self, samples: int = 1) -> bool:
        """Whether every layer has ``samples`` samples and every speed min(samples, settle)."""
        need = min(samples, self.settle)
        return self.layers.ready(samples) and all(n >= need for n in self.nspeed)

    def _reset(self, part: Partition) -> None:
        self.speed = [1.0] * part.num_stages
        self.nspeed = [self.settle] * part.num_stages
        self.guess = [0.0] * part.num_stages
        self.serr = [0.0] * part.num_stages
        self.jump = [0.0] * part.num_stages
        self.prev = [None] * part.num_layers
        self.where = [part.stage_of(i) for i in range(part.num_layers)]
        self.bases = {}
        self._clear_probes()

    def _switch_bases(self, microbatches: int, schedule: str) -> None:
        """A new M or schedule: keep the bases of the old one; take up those last learned
        under the new one if any (a trial rolled back: no samples to wait for), else they
        restart. Costs that changed meanwhile show as usual (a confirmed shift restarts those
        layers)."""
        est = self.layers
        pending = est.pending()
        if est.ready():
            self.bases[f"{est.microbatches}/{self.schedule}"] = est.state_dict()
        saved = self.bases.pop(f"{microbatches}/{schedule}", None)
        if saved is not None:
            est.load_state_dict(saved)
            est.held = [-1.0] * est.num_layers
            est.resume(pending)
        else:
            est.reset(est.num_layers, microbatches)
        self.schedule = schedule
        while len(self.bases) > 4:  # the oldest go
            del self.bases[next(iter(self.bases))]

    def _clear_probes(self) -> None:
        n = len(self.where)
        self.probe_from, self.probe_n, self.probe_log = [-1] * n, [0] * n, [0.0] * n

    def update(
        self, times: LayerTimes, part: Partition, microbatches: int, schedule: str = "1f1b"
    ) -> bool:
        """Add one step's per-layer (raw) times under ``part``, measured at ``microbatches``
        under ``schedule``; True if the model changed."""
        self.note, self.corrected = "", False
        if part.num_stages != len(self.speed) or len(times) != len(self.where):
            self._reset(part)
            self.schedule = schedule
        elif microbatches != self.layers.microbatches or schedule != self.schedule:
            new_m, old_base = microbatches != self.layers.microbatches, self.base
            self._switch_bases(microbatches, schedule)  # speeds stay
            self._clear_probes()
            self.nspeed = [max(n, self.settle) for n in self.nspeed]
            if new_m:
                self.prev, self.jump = [None] * len(self.where), [0.0] * len(self.speed)
            else:  # a stage off last step stays off (relative); last samples in the new bases
                self.prev = [
                    p * b / a if p is not None and a > 0 and b > 0 else None
                    for p, a, b in zip(self.prev, old_base, self.base, strict=True)
                ]
        est = self.layers
        where = [part.stage_of(i) for i in range(part.num_layers)]
        known = est.num_layers == len(times) and microbatches == est.microbatches
        raw = [None if x is None else x[0] + x[1] for x in times]
        skip: set[int] = set()
        changed = False
        if known:
            for i, (old, new) in enumerate(zip(self.where, where, strict=True)):
                if old != new and est.n[i] > 0:
                    self.probe_from[i], self.probe_n[i], self.probe_log[i] = old, 0, 0.0
            self.where = where  # before settling and probation, which read it
            probing = {i for i, src in enumerate(self.probe_from) if src >= 0}
            skip = set(probing)
            for s in range(part.num_stages):
                if self.nspeed[s] < self.settle:
                    self._settle(s, self._steady(s, raw), raw)
                    skip.update(part.layers(s))
            changed = self._probation(raw)
            # A probe judged this step is data like any other: its sample joins the estimate.
            skip -= {i for i, src in enumerate(self.probe_from) if src < 0 and i in probing}
        self.where = where
        feed: LayerTimes = [
            None if x is None or i in skip else (x[0] / self.speed[w], x[1] / self.speed[w])
            for i, (x, w) in enumerate(zip(times, where, strict=True))
        ]
        jumps = self._stage_jumps(raw, feed) if known else set()
        est.update(feed, microbatches)
        for s in sorted({where[i] for i in est.shifted} | jumps):
            self._stage_shift(s, raw, feed)
        self.prev = raw
        if est.shifted and not self.note:
            self.note = f"cost of layer(s) {est.shifted} changed"
        return changed or bool(est.shifted) or self.note.startswith("stage")

    def _probation(self, raw: Sequence[float | None]) -> bool:
        """Check moved layers against their prediction; correct speeds if they are off."""
        est = self.layers
        groups: dict[tuple[int, int], list[int]] = {}
        for i, src in enumerate(self.probe_from):
            x, w = raw[i], self.where[i]
            base = est.f[i] + est.b[i]
            if src < 0 or x is None or base <= 0 or x <= 0 or self.nspeed[w] < self.read:
                continue
            self.probe_log[i] += math.log(x / self.speed[w] / base)
            self.probe_n[i] += 1
            if self.probe_n[i] >= _PROBE:
                groups.setdefault((src, self.where[i]), []).append(i)
        changed = False
        for (src, dst), ids in sorted(groups.items()):
            if any(self.probe_from[i] != src for i in ids):
                continue  # cancelled by an earlier correction this step
            count = sum(self.probe_n[i] for i in ids)
            log_q = math.fsum(self.probe_log[i] for i in ids) / count
            var = math.fsum(est.layer_noise(i) ** 2 for i in ids) / len(ids) / count
            if len(ids) > 1:  # the layers' spread tells a noise their history may not know yet
                logs = [self.probe_log[i] / self.probe_n[i] for i in ids]
                spread = math.fsum((x - log_q) ** 2 for x in logs) / (len(ids) - 1)
                var = max(var, spread / len(ids))
            errs = est.errors()
            var += math.fsum(errs[i] ** 2 for i in ids) / len(ids)
            tol = max(math.log1p(self.min_shift), self.z * math.sqrt(var))
            undo = self._undo(src, dst, log_q)
            guessed = bool(self.guess[src] or self.guess[dst])
            if not guessed and count < 2 * len(ids) and tol < abs(log_q) <= 2 * tol:
                continue  # one sample each, neither clearly off nor clearly on: one more
            for i in ids:
                self.probe_from[i] = -1
                est.calm(i)
            if undo is not None:
                self._set_speed(undo, self.guess[undo], src, dst, ids, log_q, tol / self.z)
                changed = self.corrected = True
            elif abs(log_q) > tol:
                self._correct(src, dst, ids, log_q, tol)
                changed = self.corrected = True
            self.guess[src] = self.guess[dst] = 0.0  # checked, either way
        return changed

    def _undo(self, src: int, dst: int, log_q: float) -> int | None:
        """The stage whose unchecked stage-wide reading the probe of layers moved src -> dst
        (off by exp(log_q)) says to undo: the one whose undoing predicts the miss better than
        keeping it (whatever the noise: of two readings of the same data, the nearer wins)."""
        for g, sign in ((src, 1.0), (dst, -1.0)):
            undo = sign * math.log(self.speed[g] / self.guess[g]) if self.guess[g] else 0.0
            if undo and abs(log_q - undo) < abs(log_q):
                return g
        return None

    def _correct(self, src: int, dst: int, moved: Sequence[int], log_q: float, tol: float) -> None:
        """Layers that moved src -> dst took exp(log_q) x their prediction: fix one speed."""
        q = math.exp(log_q)
        options = []
        for stage, k in ((dst, q), (src, 1.0 / q)):
            new = self.speed[stage] * k
            new = 1.0 if abs(math.log(new)) <= max(tol, SNAP) else new  # within the noise of 1
            speeds = [new if t == stage else x for t, x in enumerate(self.speed)]
            spread = math.fsum(abs(math.log(x)) for x in speeds)
            options.append((round(spread, 9), -new, stage, new))
        _, _, stage, new = min(options)
        self._set_speed(stage, new, src, dst, moved, log_q, tol / self.z)

    def _set_speed(
        self,
        stage: int,
        new: float,
        src: int,
        dst: int,
        moved: Sequence[int],
        log_q: float,
        err: float,
    ) -> None:
        """Correct ``stage``'s speed to ``new`` after the probe of ``moved`` (src -> dst),
        whose reading has standard error ``err`` (log): the speed is known no better than that,
        so gains that rest on it must clear it (``speed_errors``)."""
        est, q = self.layers, math.exp(log_q)
        k = new / self.speed[stage]
        # Set, not multiplied by k: a speed read as the default must be exactly 1.0 (x * (1 / x)
        # need not be), or speed_errors takes it for a learned one and gain_error grows.
        self.speed[stage] = new
        self.serr[stage] = 0.0 if new == 1.0 else err
        self.nspeed[stage] = max(self.nspeed[stage], self.settle)
        for i, w in enumerate(self.where):
            came_from = self.probe_from[i] == stage or (stage == src and i in moved)
            if (w == stage and i not in moved) or came_from:
                est.rescale(i, 1.0 / k)  # same time where it was measured
                est.trust(i, _READ)  # but a base that rests on few samples of the move
            if (w == stage or came_from) and self.probe_from[i] >= 0:
                self.probe_from[i] = -1
                est.calm(i)
        self.note = (
            f"layers {list(moved)} took x{q:.2f} their predicted time on stage {dst}: "
            f"stage {stage} speed -> {self.speed[stage]:.2f}"
        )

    def folded(self) -> CostModel | None:
        """The other reading of the stage-wide shifts no move has checked yet: the stage's
        layers got costlier, its device did not slow down (None if there is no such shift)."""
        if not any(self.guess):
            return None
        alt = copy.deepcopy(self)
        for s, prior in enumerate(self.guess):
            if prior:
                for i in (i for i, w in enumerate(self.where) if w == s):
                    alt.layers.rescale(i, self.speed[s] / prior)
                alt.speed[s], alt.guess[s] = prior, 0.0
        return alt

    def stage_of(self, part: Partition) -> list[int]:
        """Each layer's stage under ``part``."""
        return [s for s in range(part.num_stages) for _ in part.layers(s)]

    def predict(
        self, part: Partition, microbatches: int, schedule: str, hop: float = 0.0, lead: int = 1
    ) -> float:
        """Simulated step time of ``part``: each layer's base x the speed of its stage there
        (``lead``: 2BW's)."""
        est, where = self.layers, self.stage_of(part)
        f = [x * self.speed[s] for x, s in zip(est.f, where, strict=True)]
        b = [x * self.speed[s] for x, s in zip(est.b, where, strict=True)]
        return predict_step_time(part, microbatches, schedule, f, b, hop, lead)

    def candidates(self, num_stages: int, slack: float, limit: int) -> list[Partition]:
        """Splits whose costliest stage (base x speed) is within ``slack`` of the optimum."""
        return near_balanced(self.base, num_stages, slack, limit, self.speed)

    def speed_errors(self) -> list[float]:
        """Per stage, the relative standard error of its speed (0 for the default 1.0)."""
        est, out = self.layers, []
        for s, (k, n) in enumerate(zip(self.speed, self.nspeed, strict=True)):
            ids = [i for i, w in enumerate(self.where) if w == s]
            sigma = max((est.layer_noise(i) for i in ids), default=0.0)
            read = sigma / math.sqrt(max(1, n * len(ids)))
            out.append(0.0 if k == 1.0 else max(read, self.serr[s]))
        return out

    def gain_error(self, now: Partition, dest: Partition, microbatches: int) -> float:
        """Relative standard error of the predicted step-time gain of going from now to dest.

        A pipelined step takes about (sum of stage costs + (M - 1) x the largest) / M. The error
        comes from what the bottleneck stages (those within the noise of the largest) of the two
        plans do not share: layers' base errors, and the errors of their stages' speeds.
        """
        err, serr, base = self.layers.errors(), self.speed_errors(), self.base

        def heavy(p: Partition) -> tuple[list[float], list[float], float]:
            """Per layer its cost if on a bottleneck stage (else 0), per stage that, and the top."""
            where = self.stage_of(p)
            cost = [base[i] * self.speed[s] for i, s in enumerate(where)]
            totals = [math.fsum(cost[i] for i in p.layers(s)) for s in range(p.num_stages)]
            rel = [
                math.sqrt(math.fsum((cost[i] * err[i]) ** 2 for i in p.layers(s))) / t
                if t > 0
                else 0.0
                for s, t in enumerate(totals)
            ]
            top = max(totals)
            tol = max(0.02, 3.0 * max(rel))
            hot = [t >= top * (1 - tol) for t in totals]
            layer = [c if hot[s] else 0.0 for c, s in zip(cost, where, strict=True)]
            stage = [t if h else 0.0 for t, h in zip(totals, hot, strict=True)]
            return layer, stage, top

        l_now, s_now, top = heavy(now)
        l_dest, s_dest, _ = heavy(dest)
        var = math.fsum(((a - b) * e) ** 2 for a, b, e in zip(l_now, l_dest, err, strict=True))
        var += math.fsum(((a - b) * e) ** 2 for a, b, e in zip(s_now, s_dest, serr, strict=True))
        total = math.fsum(base[i] * self.speed[s] for i, s in enumerate(self.stage_of(now)))
        scale = total + (microbatches - 1) * top
        return (microbatches - 1) * math.sqrt(var) / scale if scale > 0 else 0.0

    def state_dict(self) -> dict[str, Any]:
        """JSON-ready state."""
        return {
            "layers": self.layers.state_dict(),
            "speed": list(self.speed),
            "nspeed": list(self.nspeed),
            "where": list(self.where),
            "probe": [list(self.probe_from), list(self.probe_n), list(self.probe_log)],
            "guess": list(self.guess),
            "serr": list(self.serr),
            "prev": list(self.prev),
            "jump": list(self.jump),
            "bases": [[k, b] for k, b in self.bases.items()],
            "schedule": self.schedule,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what state_dict returned."""
        self.layers.load_state_dict(state["layers"])
        self.speed = [float(x) for x in state["speed"]]
        self.nspeed = [int(x) for x in state["nspeed"]]
        self.where = [int(x) for x in state["where"]]
        probe_from, probe_n, probe_log = state["probe"]
        self.probe_from, self.probe_n = [int(x) for x in probe_from], [int(x) for x in probe_n]
        self.probe_log = [float(x) for x in probe_log]
        self.guess = [float(x) for x in state.get("guess", [0.0] * len(self.speed))]
        self.serr = [float(x) for x in state.get("serr", [0.0] * len(self.speed))]
        prev = state.get("prev", [None] * len(self.where))  # absent before stage-wide jumps
        self.prev = [None if x is None else float(x) for x in prev]
        self.jump = [float(x) for x in state.get("jump", [0.0] * len(self.speed))]
        # Keys "M/schedule"; states saved before schedules had bases of their own keyed by M.
        self.schedule = str(state.get("schedule", "1f1b"))
        self.bases = {
            k if isinstance(k, str) else f"{int(k)}/{self.schedule}": dict(b)
            for k, b in state.get("bases", [])
        }
        if len({len(self.speed), len(self.nspeed), len(self.guess)}) > 1 or len(
            self.probe_from
        ) != len(self.where):
            raise ValueError("cost model state: lists differ in length")
        self.note, self.corrected = "", False
