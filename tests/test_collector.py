"""Integration: every rank exports spans and metrics over OTLP to a real collector (rotel-agent).

The collector prints what it receives (debug exporter); the test parses that output.
"""

from __future__ import annotations

import re
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
import telemetry_cases as tc

from adaptive_pp.launch import launch
from adaptive_pp.otel import local_collector
from adaptive_pp.telemetry import METRICS

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


def test_every_rank_exports_to_a_real_collector(collector: tuple[str, Path]) -> None:
    """3 stages, 4 steps with a migration and an M change: all spans and metrics arrive."""
    endpoint, out = collector
    launch(tc.job_otlp, STAGES, endpoint, timeout=240)
    want = {("adaptive_pp.step", r, r): tc.CASE.steps for r in range(STAGES)}
    for r in range(STAGES):
        want[("adaptive_pp.migration", r, r)] = 1
        want[("adaptive_pp.microbatches.change", r, r)] = 1
    deadline = time.monotonic() + 30
    while True:
        spans, metrics = parse(out.read_text())
        names = {n for n, _ in metrics}
        if (dict(spans) == want and names >= set(METRICS)) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert dict(spans) == want
    for r in range(STAGES):
        assert {n for n, s in metrics if s == r} == set(METRICS), f"stage {r}"
