"""Serve requests and measure them: one M, or a sweep of M with the choice for a target."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy.typing as npt

from adaptive_pp.core.report import StepReport
from controllers.serving import ServingChoice, ServingTarget, choose_microbatches, figures

from .client import PipelineClient
from .reporting import RunDir

MakeBatch = Callable[[int], npt.NDArray[Any]]
"""Request index -> the request's input batch."""


def serve_requests(
    client: PipelineClient,
    make_batch: MakeBatch,
    microbatches: int,
    requests: int,
    *,
    warmup: int = 1,
    run: RunDir | None = None,
) -> list[StepReport]:
    """Run ``warmup`` unmeasured requests, then ``requests`` measured ones; their reports."""
    for i in range(warmup):
        client.infer(make_batch(i), microbatches)
    reports = []
    for i in range(requests):
        report = client.infer(make_batch(warmup + i), microbatches).report
        if run is not None:
            run.append(report)
        reports.append(report)
    return reports


def sweep(
    client: PipelineClient,
    make_batch: MakeBatch,
    candidates: Iterable[int],
    requests: int,
    *,
    target: ServingTarget | None = None,
    warmup: int = 1,
    run: RunDir | None = None,
    progress: Callable[[str], None] | None = None,
) -> tuple[dict[int, list[StepReport]], ServingChoice]:
    """Serve ``requests`` requests at each candidate M; the reports per M and the chosen M."""
    by_m: dict[int, list[StepReport]] = {}
    for m in candidates:
        by_m[m] = serve_requests(client, make_batch, m, requests, warmup=warmup, run=run)
        if progress is not None:
            progress(row(by_m[m]))
    choice = choose_microbatches([r for rs in by_m.values() for r in rs], target)
    return by_m, choice


def row(reports: Sequence[StepReport]) -> str:
    """One text line of one M's figures."""
    f = figures(reports)
    return (
        f"M={f.microbatches:3d}  p50 {f.p50 * 1e3:7.2f} ms  p99 {f.p99 * 1e3:7.2f} ms  "
        f"bubble {f.bubble:6.1%}  {f.throughput:9.0f} samples/s  ({f.requests} requests)"
    )
