"""Stage-wide readings of the cost model: when a whole stage's layers changed alike, its device.

A device that slows down (or recovers) changes the time of every layer on its stage by one
factor; costlier layers change their own times only. ``CostModel`` asks two questions each step:

1. Is a stage off as a whole? Per stage, the mean over its layers of log(sample / (speed x
   base)) is compared with the noise of that mean (each layer's noise level / sqrt(k) for k
   layers): beyond ``max(min_shift, 3 sigma)``, with every layer off the same way by a third of
   the mean at least, on two steps in a row, the stage shifted (a shift of one layer shows
   through its own ``LayerEstimator``; a stage-wide one this way sooner, by averaging).
2. Was the shift the device? Every layer's mean of its last two samples is compared with its
   estimate from before the shift. If they agree on one factor R (the layers weighed by their
   precision, so the quiet ones count most; each within ``max(min_shift, z sigma)`` of R by its
   own noise, which is never taken below the typical layer's), R is beyond the noise of that
   mean and ``min_shift``, every estimate rested on 3 samples or more, and no layer on
   another stage moved by about R, the device changed: the speed becomes the stage's time over
   the sum of its bases and the layers keep their old bases. The new speed counts as read after
   two samples and is averaged over ``settle`` steps (the bases wait meanwhile; their noise
   levels keep learning). Otherwise the change stays with the layers that shifted.

A reading from a stage-wide shift is a guess until a layer moves on or off the stage: costlier
layers of that stage fit the same data. ``CostModel.folded`` gives that other reading, and the
probe of the first move decides between them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from .estimates import LayerEstimator, LayerTimes

_Z_STAGE = 3.0  # a stage-wide offset beyond this many sigmas of its mean, twice in a row, is real
# Samples every estimate must rest on before a stage-wide shift can be read as the device: 3,
# not ``settle`` (5), as a job's first step is often an outlier (one-time costs) that restarts
# the estimates from steps 1-2, and a skew on step 5 then found 4 and was read as costlier
# layers (a route of three moves instead of two, measured live in bench_adaptive); each
# layer's noise is never taken below the typical layer's, which pools all their samples.
_YOUNG = 3


class StageReadings:
    """Stage-wide shifts and device readings (see the module docstring); ``CostModel`` holds
    the state."""

    layers: LayerEstimator
    speed: list[float]
    nspeed: list[int]
    where: list[int]
    probe_from: list[int]
    guess: list[float]
    serr: list[float]
    prev: list[float | None]
    jump: list[float]
    settle: int
    min_shift: float
    z: float
    note: str

    @property
    def base(self) -> list[float]:
        """Per layer, the estimated step time (forward + backward) at speed 1."""
        return [f + b for f, b in zip(self.layers.f, self.layers.b, strict=True)]

    def _stage_jumps(self, raw: Sequence[float | None], feed: LayerTimes) -> set[int]:
        """Stages whose layers together are off their estimates (before this step's samples
        join them), beyond what the noise of their mean allows and each by a third of the mean
        at least, this step and the last (same way, beyond the last step's limit: the jump
        itself must not raise the bar): a stage-wide shift, told from noise sooner than one
        layer's (the noise of a mean of k layers is 1/sqrt(k) of one's) and not from one
        layer's outlier."""
        est, out = self.layers, set()
        for s in range(len(self.speed)):
            ids = [i for i in self._steady(s, raw) if feed[i] is not None]
            ref = [est.f[i] + est.b[i] for i in ids]
            if len(ids) < 2 or self.nspeed[s] < self.settle or min(ref) <= 0:
                self.jump[s] = 0.0
                continue
            logs = [
                math.log((raw[i] or 0.0) / self.speed[s] / x) for i, x in zip(ids, ref, strict=True)
            ]
            r = math.fsum(logs) / len(ids)
            sigma = math.sqrt(math.fsum(est.layer_noise(i) ** 2 for i in ids)) / len(ids)
            limit = abs(self.jump[s]) or max(math.log1p(self.min_shift), _Z_STAGE * sigma)
            alike = min(x * r for x in logs) >= r * r / 3  # each layer off the same way
            if abs(r) <= limit or not alike:
                self.jump[s] = 0.0
            elif self.jump[s] * r > 0:
                out.add(s)
                self.jump[s] = 0.0
            else:
                self.jump[s] = math.copysign(limit, r)  # off once: the next step tells
        return out

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
        # Each layer's last two samples (a shift shows on two steps in a row): their mean.
        two = [self.prev[i] is not None for i in ids]
        sample = [
            ((raw[i] or 0.0) + (self.prev[i] or 0.0)) / 2 if both else raw[i] or 0.0
            for i, both in zip(ids, two, strict=True)
        ]
        if not ids or min(sample) <= 0 or min(ref) <= 0:
            return
        if min(est.ref_n[i] for i in ids) < min(self.settle, _YOUNG):
            return  # estimates too young to tell (their noise level is not known yet)
        logs = [math.log(x / self.speed[s] / r) for x, r in zip(sample, ref, strict=True)]
        big = math.log1p(self.min_shift)
        # Each layer's offset with its own noise (of a mean of two samples where there are two):
        # the quiet layers weigh most, and each must agree with the common factor by its own.
        # (A noise level learned from a few samples can be far too low: none counts as below
        # the typical layer's; the estimate the offset is taken from has its own error.)
        typical = sorted(est.layer_noise(i) for i in range(est.num_layers))[est.num_layers // 2]
        sd = [
            max(est.layer_noise(i), typical, 1e-3)
            * math.sqrt(1 / (2 if t else 1) + 1 / est.ref_n[i])
            for i, t in zip(ids, two, strict=True)
        ]
        weight = [1 / x**2 for x in sd]
        mean = math.fsum(w * x for w, x in zip(weight, logs, strict=True)) / math.fsum(weight)
        tol = max(big, self.z * max(est.layer_noise(i) for i in ids))
        if abs(mean) < max(big, self.z / math.sqrt(math.fsum(weight))):
            return
        if any(abs(x - mean) > max(big, self.z * e) for x, e in zip(logs, sd, strict=True)):
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
        self.guess[s] = self.guess[s] or self.speed[s]
        self.speed[s] = math.fsum(sample) / math.fsum(ref)
        self.nspeed[s] = 2 if all(two) else 1
        self.serr[s] = 0.0  # read from the whole stage: its error is that of its samples
        for i, w in enumerate(self.where):
            if w == s and self.probe_from[i] >= 0:
                self.probe_from[i] = -1
                est.calm(i)
        self.note = f"stage {s} device x{math.exp(mean):.2f} (speed {self.speed[s]:.2f})"
