"""controllers.serving: M for a p99 latency budget and a bubble cap, and which one binds."""

from __future__ import annotations

from typing import Any, cast

import pytest

from adaptive_pp.core.report import StageStats, StepReport, StepTimes
from controllers.serving import (
    ServingTarget,
    choose_microbatches,
    figures,
    latencies,
    percentile,
)


def served(
    m: int, latency_ms: float, bubble: float, wall: float = 0.1, batch: int = 64
) -> StepReport:
    """A serving report of M=m: every micro-batch took ``latency_ms``, stages idle ``bubble``."""
    compute = wall * (1 - bubble)
    stages = tuple(StageStats(s, compute, wall - compute, wall, 0) for s in range(2))
    extra: dict[str, Any] = {"wall": wall, "latencies": [latency_ms * 1e-3] * m}
    return StepReport(0, "serve", m, wall, stages, extra=cast(StepTimes, extra), batch=batch)


def test_percentile_matches_numpy_linear() -> None:
    xs = [5.0, 1.0, 4.0, 2.0, 3.0]
    assert percentile(xs, 50) == 3.0
    assert percentile(xs, 99) == pytest.approx(4.96)
    assert percentile([7.0], 99) == 7.0


def test_figures_pool_latencies_and_average_bubble() -> None:
    reports = [served(4, 10, 0.2, wall=0.1), served(4, 30, 0.4, wall=0.3)]
    f = figures(reports)
    assert (f.microbatches, f.requests) == (4, 2)
    assert f.p50 == pytest.approx(0.020) and f.p99 == pytest.approx(0.030)
    assert f.bubble == pytest.approx(0.3)
    assert f.throughput == pytest.approx(128 / 0.4)
    assert latencies(reports[0]) == [0.01] * 4
    with pytest.raises(ValueError, match="reports of one M"):
        figures([served(1, 1, 0.1), served(2, 1, 0.1)])


def test_both_targets_met_picks_the_fastest_of_those() -> None:
    reports = [
        served(1, 80, 0.5),  # too slow, too idle
        served(4, 40, 0.08, wall=0.10),  # meets both
        served(8, 30, 0.05, wall=0.12),  # meets both, lower throughput
        served(16, 20, 0.04, wall=0.2),
    ]
    choice = choose_microbatches(reports)
    assert (choice.microbatches, choice.binds) == (4, "none")
    assert choice.decision.microbatches == 4 and "M=4" in choice.decision.reason


def test_bubble_binds_when_no_m_within_budget_is_busy_enough() -> None:
    reports = [served(1, 80, 0.5), served(4, 40, 0.3), served(8, 45, 0.2)]
    choice = choose_microbatches(reports)
    assert (choice.microbatches, choice.binds) == (8, "bubble")
    assert "no M keeps the bubble under 10%" in choice.reason


def test_latency_binds_when_only_slow_m_are_busy_enough() -> None:
    reports = [served(1, 90, 0.05), served(4, 70, 0.08), served(8, 60, 0.3)]
    choice = choose_microbatches(reports)
    assert (choice.microbatches, choice.binds) == (4, "latency")
    assert "no M keeps p99 under 50 ms" in choice.reason


def test_both_bind_when_nothing_meets_either_and_a_looser_target_changes_it() -> None:
    reports = [served(1, 90, 0.5), served(4, 70, 0.3)]
    assert choose_microbatches(reports).binds == "both"
    loose = choose_microbatches(reports, ServingTarget(latency_budget=0.1, max_bubble=0.5))
    assert (loose.binds, loose.microbatches) == ("none", 1)
    with pytest.raises(ValueError):
        ServingTarget(latency_budget=0)
    with pytest.raises(ValueError):
        choose_microbatches([])
