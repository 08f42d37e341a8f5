"""Micro-batch count for a served pipeline: p99 latency under a budget, bubble under a cap.

A pure function of measured serving reports (``StepReport`` per request, as
``adaptive_pp.serving`` writes them: ``extra["latencies"]`` holds each micro-batch's latency
in seconds) to a decision. For each M measured it takes the p99 over all micro-batch
latencies of its requests, the mean bubble and the throughput (samples / request wall time),
then:

- if some M meets both targets, the one of those with the highest throughput (binds: none);
- else, if some M meets the latency budget, the one of those with the lowest bubble (binds:
  the bubble cap); if none does but some meets the bubble cap, the one of those with the
  lowest p99 (binds: latency); if neither target is met anywhere, the lowest p99 (binds:
  both). Latency is the service's promise, so it is kept whenever it can be.

Deterministic; ties go to the smaller M.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, cast

from adaptive_pp.core.decisions import SetMicrobatches
from adaptive_pp.core.report import StepReport

Binding = Literal["none", "latency", "bubble", "both"]


@dataclass(frozen=True)
class ServingTarget:
    """What the service promises per micro-batch and how idle the stages may be."""

    latency_budget: float = 0.050
    """Seconds: the p99 of the latency of one micro-batch (sent to answered) must stay below."""
    max_bubble: float = 0.10
    """Idle share of all stage-time (``StepReport.bubble_fraction``) allowed, 0..1."""

    def __post_init__(self) -> None:
        if self.latency_budget <= 0 or not 0 < self.max_bubble <= 1:
            raise ValueError(f"a serving target needs budget > 0 and 0 < bubble <= 1: {self}")


@dataclass(frozen=True)
class ServingFigures:
    """One M's measurements over its requests."""

    microbatches: int
    requests: int
    p50: float
    p99: float
    bubble: float
    throughput: float
    """Samples per second: all samples over the sum of request wall times."""

    def meets(self, target: ServingTarget) -> tuple[bool, bool]:
        """(latency within budget, bubble within cap)."""
        return self.p99 <= target.latency_budget, self.bubble <= target.max_bubble

    def to_dict(self) -> dict[str, float | int]:
        return {
            "microbatches": self.microbatches,
            "requests": self.requests,
            "p50_ms": self.p50 * 1e3,
            "p99_ms": self.p99 * 1e3,
            "bubble": self.bubble,
            "throughput": self.throughput,
        }


@dataclass(frozen=True)
class ServingChoice:
    """The chosen M, which target binds (``none`` when both hold) and why."""

    microbatches: int
    binds: Binding
    reason: str
    figures: ServingFigures

    @property
    def decision(self) -> SetMicrobatches:
        """The choice as a runtime decision."""
        return SetMicrobatches(self.microbatches, self.reason)


def percentile(values: Iterable[float], q: float) -> float:
    """The q-th percentile (0..100), linear between closest ranks (numpy's default)."""
    xs = sorted(values)
    if not xs:
        return math.nan
    pos = (len(xs) - 1) * q / 100
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def latencies(report: StepReport) -> list[float]:
    """Per micro-batch latency (seconds) recorded in a serving report; [] if none."""
    extra = cast(Mapping[str, Any], report.extra)
    return [float(x) for x in extra.get("latencies", ())]


def figures(reports: Sequence[StepReport]) -> ServingFigures:
    """p50 / p99 latency, mean bubble and throughput of requests run with one M."""
    if not reports:
        raise ValueError("no serving reports to measure")
    ms = {r.microbatches for r in reports}
    if len(ms) != 1:
        raise ValueError(f"reports of one M expected, got M in {sorted(ms)}")
    lat = [x for r in reports for x in latencies(r)]
    if not lat:
        raise ValueError("serving reports without latencies (extra['latencies'])")
    wall = sum(float(r.extra.get("wall", r.step_time)) for r in reports)
    samples = sum(r.batch for r in reports)
    return ServingFigures(
        microbatches=ms.pop(),
        requests=len(reports),
        p50=percentile(lat, 50),
        p99=percentile(lat, 99),
        bubble=math.fsum(r.bubble_fraction for r in reports) / len(reports),
        throughput=samples / wall if wall > 0 else 0.0,
    )


def choose_microbatches(
    reports: Iterable[StepReport], target: ServingTarget | None = None
) -> ServingChoice:
    """Pick M from serving reports of several M (see the module docstring for the rule)."""
    target = target or ServingTarget()
    by_m: dict[int, list[StepReport]] = {}
    for r in reports:
        by_m.setdefault(r.microbatches, []).append(r)
    if not by_m:
        raise ValueError("no serving reports to choose M from")
    rows = [figures(by_m[m]) for m in sorted(by_m)]
    both = [f for f in rows if all(f.meets(target))]
    fast = [f for f in rows if f.meets(target)[0]]
    idle_ok = [f for f in rows if f.meets(target)[1]]
    budget, cap = target.latency_budget * 1e3, target.max_bubble
    binds: Binding
    if both:
        best = max(both, key=lambda f: (f.throughput, -f.microbatches))
        binds = "none"
        why = f"p99 {best.p99 * 1e3:.1f} ms <= {budget:g} ms and "
        why += f"bubble {best.bubble:.1%} <= {cap:.0%}"
        why += f"; the highest throughput of the {len(both)} M that meet both"
    elif fast:
        best = min(fast, key=lambda f: (f.bubble, f.microbatches))
        binds = "bubble"
        why = f"no M keeps the bubble under {cap:.0%} within the {budget:g} ms budget; "
        why += f"lowest bubble {best.bubble:.1%} (p99 {best.p99 * 1e3:.1f} ms)"
    elif idle_ok:
        best = min(idle_ok, key=lambda f: (f.p99, f.microbatches))
        binds = "latency"
        why = f"no M keeps p99 under {budget:g} ms with the bubble under {cap:.0%}; "
        why += f"lowest p99 {best.p99 * 1e3:.1f} ms (bubble {best.bubble:.1%})"
    else:
        best = min(rows, key=lambda f: (f.p99, f.microbatches))
        binds = "both"
        why = f"no M meets either target; lowest p99 {best.p99 * 1e3:.1f} ms "
        why += f"(bubble {best.bubble:.1%})"
    reason = f"M={best.microbatches}: {why}"
    return ServingChoice(best.microbatches, binds, reason, best)
