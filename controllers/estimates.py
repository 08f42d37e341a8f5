"""Per-layer cost estimates from step reports, and step-time predictions with the simulator.

Layer times are per step (all micro-batches together). Each layer keeps a running mean (an EMA
once it has ``window`` samples) plus a fast EMA; when the two drift apart by more than the
measured noise allows, the sample is held out of the mean for a step (one step off may be
noise); if the next step is off too, the layer's costs have changed and its mean restarts from
those two samples (a one-step confirmation), else the held sample joins the mean late. That
keeps estimates quiet under noise (a lone outlier never moves them) and quick after a real
shift. The noise level is the mean |difference| of consecutive samples. Each layer also keeps a
reference: its estimate from before its current run of off samples, so a shift that turns out
to belong to the stage (``controllers.costmodel``) can be undone.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from functools import lru_cache
from typing import Any

from adaptive_pp.core.decisions import Plan
from adaptive_pp.core.partition import Partition
from adaptive_pp.core.report import StepReport
from adaptive_pp.core.schedules import Compiled, Schedule, make_schedule, validate
from adaptive_pp.core.simulator import BACKWARD_RATIO, Costs, simulate

_FAST = 0.5  # weight of the newest sample in the fast EMA
_NOISE = 0.1  # weight of the newest sample in the noise EMA
_MAD_TO_SIGMA = math.sqrt(math.pi) / 2  # sigma from the mean |difference| of two samples

LayerTimes = list[tuple[float, float] | None]


def measured_layers(report: StepReport, plan: Plan) -> LayerTimes:
    """Per global layer, measured (forward, backward) seconds for the step, or None if unknown.

    Per-layer times are scaled so that each stage's layers add up to its ``compute`` (so it does
    not matter whether the runtime reports totals or per-micro-batch means). A stage without
    per-layer times spreads its compute evenly over the layers ``plan`` gives it.
    """
    out: LayerTimes = [None] * plan.partition.num_layers
    if report.num_stages != plan.num_stages:
        return out
    for s, st in enumerate(report.stages):
        ids = st.layers
        if ids and len(st.layer_forward) == len(ids) and len(st.layer_backward) == len(ids):
            total = math.fsum(st.layer_forward) + math.fsum(st.layer_backward)
            k = st.compute / total if total > 0 else 0.0
            for i, f, b in zip(ids, st.layer_forward, st.layer_backward, strict=True):
                if 0 <= i < len(out):
                    out[i] = (f * k, b * k)
        else:
            layers = plan.partition.layers(s)
            share = st.compute / len(layers) / (1.0 + BACKWARD_RATIO)
            for i in layers:
                out[i] = (share, share * BACKWARD_RATIO)
    return out


class LayerEstimator:
    """Smoothed per-layer (forward, backward) step times with change detection."""

    def __init__(self, window: int = 20, min_shift: float = 0.05, z: float = 4.0) -> None:
        """``window``: EMA length; a change needs a shift > max(min_shift, z x noise)."""
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        self.window, self.min_shift, self.z = window, min_shift, z
        self.dev: list[float] = []
        self.reset(0, 0)

    def reset(self, num_layers: int, microbatches: int) -> None:
        """Forget the estimates (not the noise level, if the layers are the same)."""
        self.microbatches = microbatches
        if num_layers != len(self.dev):
            self.dev = [0.0] * num_layers
        self.n = [0] * num_layers
        self.nd = [0] * num_layers  # samples of the noise level since its regime last changed
        self.f = [0.0] * num_layers
        self.b = [0.0] * num_layers
        self.fast = [0.0] * num_layers
        self.last = [0.0] * num_layers
        self.held = [-1.0] * num_layers  # noise level before a first off step, else -1
        self.off_f, self.off_b = [0.0] * num_layers, [0.0] * num_layers  # that off step's sample
        self.ref_f, self.ref_b = [0.0] * num_layers, [0.0] * num_layers
        self.ref_n, self.ref_dev = [0] * num_layers, [0.0] * num_layers
        self.shifted: list[int] = []  # layers whose cost changed in the last update

    @property
    def num_layers(self) -> int:
        """Number of layers tracked."""
        return len(self.n)

    def ready(self, samples: int = 1) -> bool:
        """Whether every layer has at least ``samples`` samples since its last restart."""
        return bool(self.n) and min(self.n) >= samples

    @property
    def unconfirmed(self) -> list[int]:
        """Layers whose last sample was off their estimate: a shift, or noise (next step tells)."""
        return [i for i, h in enumerate(self.held) if h >= 0.0]

    def pending(self) -> dict[int, tuple[float, float, float, float, float]]:
        """Per layer held off its estimate: its noise level before the jump and its off
        sample's forward, backward, fast average and last sample as ratios of its estimate
        (to carry into other bases: ``resume``)."""
        out = {}
        for i in self.unconfirmed:
            base = self.f[i] + self.b[i]
            if self.n[i] > 0 and self.f[i] > 0 and self.b[i] > 0:
                off = (self.off_f[i] / self.f[i], self.off_b[i] / self.b[i])
                out[i] = (self.held[i], *off, self.fast[i] / base, self.last[i] / base)
        return out

    def resume(self, pending: Mapping[int, tuple[float, float, float, float, float]]) -> None:
        """A layer off its estimate on the last step (``pending()`` of other bases) is off by
        the same ratios here: the next step confirms or reverts it, as if no switch came
        between."""
        for i, (level, rf, rb, fast, last) in pending.items():
            if self.n[i] > 0:
                base = self.f[i] + self.b[i]
                self.held[i] = level
                self.off_f[i], self.off_b[i] = self.f[i] * rf, self.b[i] * rb
                self.fast[i], self.last[i] = base * fast, base * last

    def update(self, times: LayerTimes, microbatches: int) -> bool:
        """Add one step's measurements (None: no sample); True if some layer's cost changed."""
        if len(times) != self.num_layers or microbatches != self.microbatches:
            self.reset(len(times), microbatches)
        changed = False
        self.shifted = []
        for i, x in enumerate(times):
            if x is None:
                continue
            if self.held[i] < 0.0:  # not in a run of off samples: this is the reference
                self.ref_f[i], self.ref_b[i] = self.f[i], self.b[i]
                self.ref_n[i], self.ref_dev[i] = self.n[i], self.dev[i]
            xf, xb = x
            total = xf + xb
            if self.n[i] == 0:
                self._restart(i, xf, xb)
                continue
            old = self.f[i] + self.b[i]
            self.fast[i] += _FAST * (total - self.fast[i])
            level = self.held[i] if self.held[i] >= 0.0 else self.dev[i]  # before any jump
            noise = _MAD_TO_SIGMA * level * math.sqrt(_FAST / (2.0 - _FAST))
            limit = max(self.min_shift, self.z * noise) * max(old, 1e-300)
            d = abs(total - self.last[i]) / max(self.last[i], 1e-300)
            held = self.held[i] >= 0.0
            if abs(self.fast[i] - old) > limit and not (held and self._transient(i, total, old)):
                if held:  # second step in a row, this sample off too: a real shift
                    self.dev[i] = self.held[i]  # the jump was not noise
                    self._restart(i, xf, xb, (self.off_f[i], self.off_b[i]))
                    self._noise_sample(i, d)  # but the two off samples' difference is
                    self.shifted.append(i)
                    changed = True
                    continue
                # One step off could be noise: hold the sample out of the estimate until the
                # next step tells (so a lone outlier never sways a decision), go on.
                self.held[i] = self.dev[i]
                self.off_f[i], self.off_b[i] = xf, xb
                self._noise_sample(i, d)
                self.last[i] = total
                continue
            if held:  # the step before was off, this one is not (or not alike): it was noise
                self._revert(i, old, limit / max(old, 1e-300))
                d = abs(total - old) / max(old, 1e-300)  # this sample against the estimate
                d = min(d, limit / max(old, 1e-300))
            self._noise_sample(i, d)
            self._fold(i, xf, xb)
            self.last[i] = total
        return changed

    def _transient(self, i: int, total: float, old: float) -> bool:
        """Whether layer ``i``'s off sample of the step before (held) was a transient, seen
        from this step's sample ``total``: a shift shows on both steps alike, a transient on
        one only, so the shift is real only if this sample is nearer the held one than the
        estimate ``old`` (in ratio), on the same side of it."""
        off = self.off_f[i] + self.off_b[i]
        if off <= 0 or total <= 0 or old <= 0 or (total - old) * (off - old) <= 0:
            return True
        return abs(math.log(total / old)) <= abs(math.log(total / off))

    def _revert(self, i: int, old: float, clip: float) -> None:
        """Layer ``i``'s held sample was noise: it joins the estimate clipped to ``clip`` (a
        relative offset) of ``old``, the noise level forgets the jump it taught, and the fast
        average restarts from the estimate (a transient leaves no trace to confirm later)."""
        off = self.off_f[i] + self.off_b[i]
        k = min(max(off, old * (1.0 - clip)), old * (1.0 + clip)) / off if off > 0 else 1.0
        self.dev[i] = self.held[i]
        self.held[i] = -1.0
        self._fold(i, self.off_f[i] * k, self.off_b[i] * k)
        self.fast[i] = self.f[i] + self.b[i]

    def _fold(self, i: int, xf: float, xb: float) -> None:
        """Add one sample to layer ``i``'s running mean (an EMA once it has ``window``)."""
        a = max(1.0 / (self.n[i] + 1), 1.0 / self.window)
        self.f[i] += a * (xf - self.f[i])
        self.b[i] += a * (xb - self.b[i])
        self.n[i] += 1

    def _noise_sample(self, i: int, d: float) -> None:
        # Running mean of |difference| since the last restart (with the old level as one
        # prior sample), then an EMA: the noise level follows a regime change quickly.
        w = 1.0 if self.dev[i] == 0.0 else max(1.0 / (self.nd[i] + 1), _NOISE)
        self.dev[i] += w * (d - self.dev[i])
        self.nd[i] += 1

    def observe_noise(self, i: int, total: float) -> None:
        """Learn layer ``i``'s noise level from a sample without changing its estimate."""
        if self.last[i] > 0:
            self._noise_sample(i, abs(total - self.last[i]) / self.last[i])
        self.last[i] = total

    def _restart(
        self, i: int, xf: float, xb: float, off: tuple[float, float] | None = None
    ) -> None:
        """Start layer ``i`` afresh from this sample (and ``off``, the step before it)."""
        if off is None:
            self.f[i], self.b[i], self.n[i] = xf, xb, 1
        else:
            self.f[i], self.b[i], self.n[i] = (xf + off[0]) / 2, (xb + off[1]) / 2, 2
        self.fast[i] = self.f[i] + self.b[i]
        self.last[i] = xf + xb
        self.held[i] = -1.0
        self.nd[i] = min(self.nd[i], self.n[i])

    def restore(self, i: int) -> None:
        """Undo layer ``i``'s current run of off samples: back to its reference estimate (the
        noise level keeps what the samples since taught, but not a jump)."""
        self.f[i], self.b[i], self.n[i] = self.ref_f[i], self.ref_b[i], self.ref_n[i]
        self.dev[i] = self.held[i] if self.held[i] >= 0.0 else self.dev[i]
        self.nd[i] = 1  # but the noise may have changed with the costs: learn it afresh
        self.calm(i)

    def calm(self, i: int) -> None:
        """Make layer ``i``'s next sample compare with its estimate (not with older samples)."""
        self.fast[i] = self.last[i] = self.f[i] + self.b[i]
        self.held[i] = -1.0

    def trust(self, i: int, samples: int) -> None:
        """Count layer ``i``'s estimate as resting on at most ``samples`` samples."""
        self.n[i] = min(self.n[i], samples)

    def rescale(self, i: int, k: float) -> None:
        """Multiply layer ``i``'s estimates (and its reference) by ``k``."""
        self.f[i] *= k
        self.b[i] *= k
        self.ref_f[i] *= k
        self.ref_b[i] *= k
        self.fast[i] *= k
        self.last[i] *= k

    def noise(self) -> float:
        """Estimated relative noise (sigma) of one measurement, the largest over layers."""
        return max((_MAD_TO_SIGMA * d for d in self.dev), default=0.0)

    def layer_noise(self, i: int) -> float:
        """Relative noise (sigma) of one sample of layer ``i`` before its current off run."""
        return _MAD_TO_SIGMA * (self.held[i] if self.held[i] >= 0.0 else self.dev[i])

    def errors(self) -> list[float]:
        """Per layer, the relative standard error of its estimate."""
        fallback = self.noise()
        return [
            (_MAD_TO_SIGMA * d if n > 1 else fallback)
            / math.sqrt(max(1, min(n, 2 * self.window - 1)))
            for n, d in zip(self.n, self.dev, strict=True)
        ]

    def state_dict(self) -> dict[str, Any]:
        """JSON-ready state."""
        return {
            "microbatches": self.microbatches,
            "n": list(self.n),
            "nd": list(self.nd),
            "f": list(self.f),
            "b": list(self.b),
            "fast": list(self.fast),
            "last": list(self.last),
            "dev": list(self.dev),
            "held": list(self.held),
            "off": [list(self.off_f), list(self.off_b)],
            "ref": [list(self.ref_f), list(self.ref_b), list(self.ref_n), list(self.ref_dev)],
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what state_dict returned."""
        self.microbatches = int(state["microbatches"])
        self.n = [int(x) for x in state["n"]]
        self.nd = [int(x) for x in state.get("nd", self.n)]  # absent before: as n
        self.f, self.b = [float(x) for x in state["f"]], [float(x) for x in state["b"]]
        self.fast = [float(x) for x in state["fast"]]
        self.last = [float(x) for x in state["last"]]
        self.dev = [float(x) for x in state["dev"]]
        self.held = [float(x) for x in state["held"]]
        off = state.get("off")  # absent from states saved before two-sample restarts
        self.off_f = [float(x) for x in off[0]] if off else [0.0] * len(self.n)
        self.off_b = [float(x) for x in off[1]] if off else [0.0] * len(self.n)
        ref_f, ref_b, ref_n, ref_dev = state["ref"]
        self.ref_f, self.ref_b = [float(x) for x in ref_f], [float(x) for x in ref_b]
        self.ref_n, self.ref_dev = [int(x) for x in ref_n], [float(x) for x in ref_dev]
        self.shifted = []
        lists = (self.f, self.b, self.fast, self.last, self.dev, self.held, self.ref_f, self.ref_n)
        if any(len(x) != len(self.n) for x in (*lists, self.off_f, self.off_b)):
            raise ValueError("estimator state: per-layer lists differ in length")


@lru_cache(maxsize=256)
def compiled_schedule(
    name: str, num_stages: int, microbatches: int, lead: int = 1
) -> tuple[Schedule, Compiled]:
    """A schedule and its checked form (cached: predictions simulate the same ones often);
    ``lead``: 2BW's (see core.twobw)."""
    schedule = make_schedule(name, num_stages, microbatches, lead=lead)
    return schedule, validate(schedule)


def predict_step_time(
    partition: Partition,
    microbatches: int,
    schedule: str,
    layer_f: Sequence[float],
    layer_b: Sequence[float],
    hop: float = 0.0,
    lead: int = 1,
) -> float:
    """Simulated step time with per-step layer times spread evenly over micro-batches
    (``lead``: 2BW's)."""
    sched, code = compiled_schedule(schedule, partition.num_stages, microbatches, lead)
    tau_f = tuple(
        (math.fsum(layer_f[i] for i in partition.layers(s)) / microbatches,) * microbatches
        for s in range(partition.num_stages)
    )
    tau_b = tuple(
        (math.fsum(layer_b[i] for i in partition.layers(s)) / microbatches,) * microbatches
        for s in range(partition.num_stages)
    )
    costs = Costs(tau_f, tau_b, (hop,) * (partition.num_stages - 1))
    return simulate(sched, costs, compiled=code).step_time
