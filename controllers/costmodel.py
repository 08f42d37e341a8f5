"""Cost model of the rebalancer: per-layer base cost x per-stage speed factor, learned online.

Model: layer ``i`` on stage ``s`` takes ``base[i] x speed[s]`` per step (forward and backward
alike). ``base`` travels with the layer (MoE routing skew, a layer that got costlier);
``speed`` stays with the stage (a slow or throttled device: layers moving onto it become
slower, layers leaving it faster). Speeds start at 1; ``base`` is smoothed and change-detected
per layer by ``LayerEstimator`` on the measured times divided by their stage's speed.

Which kind a change is, is read from the data, deterministically:

1. Stage-wide shift. When some layer's cost changes (``LayerEstimator`` confirms a shift), the
   latest sample of every layer on its stage is compared with that layer's estimate from before.
   If they all moved by the same factor R (each within ``max(min_shift, z x noise)`` of R in
   log terms, ``|R - 1| >= min_shift``), each of those estimates rested on ``settle`` samples or
   more, and no layer on another stage moved by about R, the device changed: ``speed[s] *= R``
   and the layers keep their old bases. The new speed is averaged over ``settle`` steps (stage
   time over the sum of its bases) before it counts as measured; meanwhile the bases wait, and
   only the layers' noise levels keep learning. Otherwise the change is per
   layer: those layers' bases restart from the new samples.
2. Moves. A layer that moves is predicted to cost ``base x speed[new stage]``; its first two
   samples there are compared with that. If the layers that moved together are off by a factor
   Q beyond the noise, the speed ratio of the two stages was wrong by Q and one speed is
   corrected: the reading that leaves more stages at speed 1 wins (a speed within the noise of
   1 becomes 1), then the one calling a stage slower rather than faster. Layers whose base
   rested on the corrected speed are rescaled (their time where they were measured stays) and
   count as measured twice, so the rebalancer measures them again before its next plan.

A shift of every layer on one stage by one factor (say MoE skew hitting that stage's layers
alike) looks like a slow device until a layer moves: the first move tells, the model is
corrected, and the rebalancer plans again (``corrected``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from adaptive_pp.core.partition import Partition

from .estimates import LayerEstimator, LayerTimes, predict_step_time
from .search import near_balanced

_PROBE = 2  # samples of a moved layer on its new stage before it is judged


class CostModel:
    """Per-layer base costs x per-stage speeds (see the module docstring)."""

    def __init__(
        self, window: int = 20, min_shift: float = 0.05, z: float = 4.0, settle: int = 5
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
        self.note = ""  # what the last update concluded, for decision reasons
        self.corrected = False  # whether the last update found a speed reading wrong

    @property
    def num_layers(self) -> int:
        """Number of layers tracked."""
        return self.layers.num_layers

    @property
    def base(self) -> list[float]:
        """Per layer, the estimated step time (forward + backward) at speed 1."""
        return [f + b for f, b in zip(self.layers.f, self.layers.b, strict=True)]

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
        self.where = [part.stage_of(i) for i in range(part.num_layers)]
        self._clear_probes()

    def _clear_probes(self) -> None:
        n = len(self.where)
        self.probe_from, self.probe_n, self.probe_log = [-1] * n, [0] * n, [0.0] * n

    def update(self, times: LayerTimes, part: Partition, microbatches: int) -> bool:
        """Add one step's per-layer (raw) times under ``part``; True if the model changed."""
        self.note, self.corrected = "", False
        if part.num_stages != len(self.speed) or len(times) != len(self.where):
            self._reset(part)
        elif microbatches != self.layers.microbatches:  # new M: bases restart, speeds stay
            self._clear_probes()
            self.nspeed = [max(n, self.settle) for n in self.nspeed]
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
            skip = {i for i, src in enumerate(self.probe_from) if src >= 0}
            for s in range(part.num_stages):
                if self.nspeed[s] < self.settle:
                    self._settle(s, self._steady(s, raw), raw)
                    skip.update(part.layers(s))
            changed = self._probation(raw)
        self.where = where
        feed: LayerTimes = [
            None if x is None or i in skip else (x[0] / self.speed[w], x[1] / self.speed[w])
            for i, (x, w) in enumerate(zip(times, where, strict=True))
        ]
        est.update(feed, microbatches)
        for s in sorted({where[i] for i in est.shifted}):
            self._stage_shift(s, raw, feed)
        if est.shifted and not self.note:
            self.note = f"cost of layer(s) {est.shifted} changed"
        return changed or bool(est.shifted)

    def _steady(self, s: int, raw: Sequence[float | None]) -> list[int]:
        """Layers on stage ``s`` with a sample and an estimate, not on probation."""
        est = self.layers
        return [
            i
            for i, w in enumerate(self.where)
            if w == s and raw[i] is not None and est.n[i] > 0 and self.probe_from[i] < 0
        ]

    def _settle(self, s: int, ids: Sequence[int], raw: Sequence[float | None]) -> None:
        """One more sample of a new speed: stage time over the sum of its layers' bases."""
        base = self.base
        total = math.fsum(base[i] for i in ids)
        if total > 0:
            r = math.fsum(raw[i] or 0.0 for i in ids) / total
            self.speed[s] += (r - self.speed[s]) / (self.nspeed[s] + 1)
        self.nspeed[s] += 1
        for i in ids:  # the bases wait, but their noise levels keep learning
            self.layers.observe_noise(i, (raw[i] or 0.0) / self.speed[s])

    def _stage_shift(self, s: int, raw: Sequence[float | None], feed: LayerTimes) -> None:
        """A layer on stage ``s`` changed: if the whole stage moved alike, it is the device."""
        est = self.layers
        ids = [i for i in self._steady(s, raw) if feed[i] is not None]
        ref = [est.ref_f[i] + est.ref_b[i] for i in ids]
        sample = [raw[i] or 0.0 for i in ids]
        if not ids or min(sample) <= 0 or min(ref) <= 0:
            return
        if min(est.ref_n[i] for i in ids) < self.settle:
            return  # estimates too young to tell (their noise level is not known yet)
        logs = [math.log(x / self.speed[s] / r) for x, r in zip(sample, ref, strict=True)]
        big = math.log1p(self.min_shift)
        mean = math.fsum(logs) / len(logs)
        tol = max(big, self.z * max(est.layer_noise(i) for i in ids))
        if abs(mean) < big or any(abs(x - mean) > tol for x in logs):
            return
        for j, w in enumerate(self.where):
            x, r = feed[j], est.ref_f[j] + est.ref_b[j]
            if w == s or x is None or est.ref_n[j] == 0 or r <= 0 or x[0] + x[1] <= 0:
                continue
            q = math.log((x[0] + x[1]) / r)
            if abs(q) > tol and abs(q - mean) < abs(q):
                return  # a neighbour moved with it: the layers changed, not the device
        for i in ids:
            est.restore(i)
        self.speed[s] = math.fsum(sample) / math.fsum(ref)
        self.nspeed[s] = 1
        for i, w in enumerate(self.where):
            if w == s and self.probe_from[i] >= 0:
                self.probe_from[i] = -1
                est.calm(i)
        self.note = f"stage {s} device x{math.exp(mean):.2f} (speed {self.speed[s]:.2f})"

    def _probation(self, raw: Sequence[float | None]) -> bool:
        """Check moved layers against their prediction; correct speeds if they are off."""
        est = self.layers
        groups: dict[tuple[int, int], list[int]] = {}
        for i, src in enumerate(self.probe_from):
            x, w = raw[i], self.where[i]
            base = est.f[i] + est.b[i]
            if src < 0 or x is None or base <= 0 or x <= 0 or self.nspeed[w] < self.settle:
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
            errs = est.errors()
            var += math.fsum(errs[i] ** 2 for i in ids) / len(ids)
            tol = max(math.log1p(self.min_shift), self.z * math.sqrt(var))
            for i in ids:
                self.probe_from[i] = -1
                est.calm(i)
            if abs(log_q) > tol:
                self._correct(src, dst, ids, log_q, tol)
                changed = self.corrected = True
        return changed

    def _correct(self, src: int, dst: int, moved: Sequence[int], log_q: float, tol: float) -> None:
        """Layers that moved src -> dst took exp(log_q) x their prediction: fix one speed."""
        est, q = self.layers, math.exp(log_q)
        options = []
        for stage, k in ((dst, q), (src, 1.0 / q)):
            new = self.speed[stage] * k
            new = 1.0 if abs(math.log(new)) <= tol else new  # within the noise of the default
            speeds = [new if t == stage else x for t, x in enumerate(self.speed)]
            spread = math.fsum(abs(math.log(x)) for x in speeds)
            options.append((round(spread, 9), -new, stage, new))
        _, _, stage, new = min(options)
        k = new / self.speed[stage]
        # Set, not multiplied by k: a speed read as the default must be exactly 1.0 (x * (1 / x)
        # need not be), or speed_errors takes it for a learned one and gain_error grows.
        self.speed[stage] = new
        self.nspeed[stage] = max(self.nspeed[stage], self.settle)
        for i, w in enumerate(self.where):
            came_from = self.probe_from[i] == stage or (stage == src and i in moved)
            if (w == stage and i not in moved) or came_from:
                est.rescale(i, 1.0 / k)  # same time where it was measured
                est.trust(i, _PROBE)  # but a base that rests on a few samples of the move
            if (w == stage or came_from) and self.probe_from[i] >= 0:
                self.probe_from[i] = -1
                est.calm(i)
        self.note = (
            f"layers {list(moved)} took x{q:.2f} their predicted time on stage {dst}: "
            f"stage {stage} speed -> {self.speed[stage]:.2f}"
        )

    def stage_of(self, part: Partition) -> list[int]:
        """Each layer's stage under ``part``."""
        return [s for s in range(part.num_stages) for _ in part.layers(s)]

    def predict(self, part: Partition, microbatches: int, schedule: str, hop: float = 0.0) -> float:
        """Simulated step time of ``part``: each layer's base x the speed of its stage there."""
        est, where = self.layers, self.stage_of(part)
        f = [x * self.speed[s] for x, s in zip(est.f, where, strict=True)]
        b = [x * self.speed[s] for x, s in zip(est.b, where, strict=True)]
        return predict_step_time(part, microbatches, schedule, f, b, hop)

    def candidates(self, num_stages: int, slack: float, limit: int) -> list[Partition]:
        """Splits whose costliest stage (base x speed) is within ``slack`` of the optimum."""
        return near_balanced(self.base, num_stages, slack, limit, self.speed)

    def speed_errors(self) -> list[float]:
        """Per stage, the relative standard error of its speed (0 for the default 1.0)."""
        est, out = self.layers, []
        for s, (k, n) in enumerate(zip(self.speed, self.nspeed, strict=True)):
            ids = [i for i, w in enumerate(self.where) if w == s]
            sigma = max((est.layer_noise(i) for i in ids), default=0.0)
            out.append(0.0 if k == 1.0 else sigma / math.sqrt(max(1, n * len(ids))))
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
        if len(self.speed) != len(self.nspeed) or len(self.probe_from) != len(self.where):
            raise ValueError("cost model state: lists differ in length")
        self.note, self.corrected = "", False
