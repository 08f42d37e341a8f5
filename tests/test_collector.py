"""Integration: every rank exports spans and metrics over OTLP to a real collector (rotel-agent).

The collector prints what it receives (debug exporter); the test parses that output.
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import telemetry_cases as tc

from adaptive_pp.observability.otel import local_collector
from adaptive_pp.observability.telemetry import ERROR_METRICS, METRICS
from adaptive_pp.runtime.launch import launch

pytestmark = [pytest.mark.collector, pytest.mark.multiprocess]
STAGES = 3
NAME = re.compile(r"^\s*Name\s*: (\S+)$")  # a span ("Name : x") or a metric ("-> Name: x")
ATTR = re.compile(r"^\s*-> ([\w.]+): \w+\((.*)\)$")


@pytest.fixture()
def collector(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """A rotel-agent on free loopback ports that logs every span and metric to a file."""
    pytest.importorskip("rotel")
    log = tmp_path / "collector.log"
    with local_collector(log) as endpoint:
        yield endpoint, log


def parse(text: str) -> tuple[Counter[tuple[str, int, int]], set[tuple[str, int]]]:
    """(span name, resource rank, stage attribute) counts and (metric name, stage) pairs."""
    spans: Counter[tuple[str, int, int]] = Counter()
    metrics: set[tuple[str, int]] = set()
    rank, kind, name = -1, "", ""
    for line in text.splitlines():
        if line.startswith(("ResourceSpans", "ResourceMetrics")):
            kind, name = line[len("Resource") :].split()[0], ""
        elif m := NAME.match(line.replace("-> Name:", "Name :")):
            name = m.group(1)
        elif m := ATTR.match(line):
            key, value = m.groups()
            if key == "adaptive_pp.rank":
                rank = int(value)
            elif key == "adaptive_pp.stage" and name:
                if kind == "Spans":
                    spans[(name, rank, int(value))] += 1
                else:
                    metrics.add((name, int(value)))
    return spans, metrics


def wait_for(
    out: Path, done: Callable[[Counter[tuple[str, int, int]], set[tuple[str, int]]], bool]
) -> tuple[Counter[tuple[str, int, int]], set[tuple[str, int]]]:
    """parse(out) once ``done`` holds of it, or after 30 s."""
    deadline = time.monotonic() + 30
    while True:
        spans, metrics = parse(out.read_text())
        if done(spans, metrics) or time.monotonic() > deadline:
            return spans, metrics
        time.sleep(0.5)


def test_every_rank_exports_to_a_real_collector(collector: tuple[str, Path]) -> None:
    """3 stages, 4 steps with a migration and an M change, 1 failed step: everything arrives."""
    endpoint, out = collector
    launch(tc.job_otlp, STAGES, endpoint, timeout=240)
    want = {("adaptive_pp.step", r, r): tc.CASE.steps + 1 for r in range(STAGES)}
    for r in range(STAGES):
        want[("adaptive_pp.migration", r, r)] = 1
        want[("adaptive_pp.microbatches.change", r, r)] = 1
    every = set(METRICS) | set(ERROR_METRICS)  # the failed step counted an error
    spans, metrics = wait_for(
        out, lambda spans, metrics: dict(spans) == want and {n for n, _ in metrics} >= every
    )
    assert dict(spans) == want
    for r in range(STAGES):
        assert {n for n, s in metrics if s == r} == every, f"stage {r}"


# A process that records a failed step, then leaves without calling shutdown: by an uncaught
# exception (the SDK's atexit shutdown must export) or by os._exit after flush_global (launch's
# ranks leave so).
EXIT_SCRIPT = """
import os, sys
from adaptive_pp.observability.otel import flush_global, setup_otlp
from adaptive_pp.observability.telemetry import Telemetry

setup_otlp(sys.argv[1], attributes={"adaptive_pp.rank": 0}, export_interval_s=3600)
tel = Telemetry(0, enabled=True)
try:
    with tel.step(0, 2, "1f1b", (0, 1)):
        raise RuntimeError("the step failed")
finally:
    if sys.argv[2] == "os_exit":
        flush_global()
        os._exit(3)
"""


@pytest.mark.parametrize("leave", ["exception", "os_exit"])
def test_a_process_that_dies_exports_what_it_recorded(
    collector: tuple[str, Path], leave: str
) -> None:
    """Spans and metrics of a failed step arrive though the process never called shutdown."""
    endpoint, out = collector
    done = subprocess.run(
        [sys.executable, "-c", EXIT_SCRIPT, endpoint, leave],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == (1 if leave == "exception" else 3), done.stderr
    want = {("adaptive_pp.step", 0, 0): 1}
    spans, metrics = wait_for(out, lambda spans, metrics: dict(spans) == want and bool(metrics))
    assert dict(spans) == want
    assert {n for n, _ in metrics} == set(ERROR_METRICS)  # the step recorded nothing else
