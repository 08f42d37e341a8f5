"""Telemetry: OpenTelemetry spans and metrics (in-memory SDK), structlog context, OTLP setup."""

from __future__ import annotations

import dataclasses
import io
import json

import pytest
import structlog
import telemetry_cases as tc
from conftest import PoolFor

from adaptive_pp.core.schedules import make_schedule
from adaptive_pp.core.simulator import Costs, simulate
from adaptive_pp.observability import logs, otel
from adaptive_pp.observability.telemetry import ERROR_METRICS, ERROR_TYPE, METRICS, STAGE, Telemetry


def test_step_span_and_metrics_from_a_report() -> None:
    """A simulated report becomes one step span (with its figures) and every metric."""
    spans, tp, reader, mp = tc.in_memory()
    report = simulate(make_schedule("1f1b", 3, 6), Costs.build(3, 6, 1e-3, 2e-3, 1e-4))
    report = dataclasses.replace(
        report, events=("moved layers 3-3 from stage 1 to stage 0",), loss=0.25
    )
    tel = Telemetry(1, enabled=True, tracer_provider=tp, meter_provider=mp)
    with tel.step(7, 6, "1f1b", (0, 2, 4, 6)) as span:
        tel.record(span, report)
    (s,) = spans.get_finished_spans()
    assert s.name == "adaptive_pp.step"
    attrs = dict(s.attributes or {})
    assert attrs[STAGE] == 1 and attrs["adaptive_pp.step"] == 7
    assert attrs["adaptive_pp.partition"] == "0,2,4,6"
    assert attrs["adaptive_pp.bubble_fraction"] == pytest.approx(report.stages[1].bubble)
    assert [e.name for e in s.events] == ["adaptive_pp.event"]
    points = tc.metric_points(reader)
    assert set(points) == set(METRICS) - {"adaptive_pp.migrations"}
    assert all(a[STAGE] == 1 for pts in points.values() for a, _ in pts)
    depth = {a["adaptive_pp.queue"]: v for a, v in points["adaptive_pp.queue.depth"]}
    incoming = {q.kind: q.max_depth for q in report.queues if q.dst == 1}
    assert depth == incoming and set(depth) == {"act", "grad"}
    (util,) = points["adaptive_pp.stage.utilization"]
    assert util[1] == pytest.approx(report.stages[1].utilization)
    assert points["adaptive_pp.loss"] == [({STAGE: 1}, 0.25)]


def test_change_span_records_errors_and_counts_migrations() -> None:
    """A failed change ends its span with ERROR; a committed migration adds to the counter."""
    spans, tp, reader, mp = tc.in_memory()
    tel = Telemetry(0, enabled=True, tracer_provider=tp, meter_provider=mp)
    with tel.change("migration", 3, {"adaptive_pp.decision": "move"}):
        pass
    with pytest.raises(ValueError), tel.change("migration", 4, {}):
        raise ValueError("refused")
    ok, failed = spans.get_finished_spans()
    assert ok.name == failed.name == "adaptive_pp.migration"
    assert ok.status.status_code.name == "UNSET" and failed.status.status_code.name == "ERROR"
    assert [e.name for e in failed.events] == ["exception"]
    (counted,) = tc.metric_points(reader)["adaptive_pp.migrations"]
    assert counted[1] == 1


def test_disabled_telemetry_touches_no_provider() -> None:
    """Off: no span, no metric, even with providers at hand."""
    spans, tp, reader, mp = tc.in_memory()
    tel = Telemetry(0, enabled=False, tracer_provider=tp, meter_provider=mp)
    report = simulate(make_schedule("gpipe", 2, 2), Costs.build(2, 2, 1e-3, 2e-3))
    with tel.step(0, 2, "gpipe", (0, 1, 2)) as span:
        assert span is None
        tel.record(span, report)
    with tel.change("microbatches.change", 0, {}) as span:
        assert span is None
    with pytest.raises(KeyError), tel.step(1, 2, "gpipe", (0, 1, 2)):
        raise KeyError("failed")
    tel.error("PeerGone")
    assert tel.carrier() == {} and not tel.detail
    assert spans.get_finished_spans() == ()
    data = reader.get_metrics_data()
    assert data is None or not data.resource_metrics


def test_setup_otlp_needs_an_endpoint(monkeypatch: pytest.MonkeyPatch) -> None:
    """No argument and no OTEL_EXPORTER_OTLP_ENDPOINT: nothing is set up."""
    monkeypatch.delenv(otel.ENV_ENDPOINT, raising=False)
    assert otel.setup_otlp() is None


def test_setup_otlp_honours_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """The env var is used when no endpoint is passed; an explicit one wins."""
    monkeypatch.setenv(otel.ENV_ENDPOINT, "127.0.0.1:1")
    made = otel.setup_otlp(set_global=False, export_interval_s=3600)
    assert made is not None and made.endpoint == "http://127.0.0.1:1"
    made.shutdown()
    assert otel.resolve_endpoint("https://collector:4317") == "https://collector:4317"


@pytest.mark.multiprocess
def test_runtime_spans_metrics_and_logs(pools: PoolFor) -> None:
    """2 stages, a migration, an M change, then a failed step: spans, metrics, logs per rank."""
    results = pools(2).run(tc.job_in_memory)
    plain = pools(2).run(tc.job_plain)
    assert [r["losses"] for r in results] == plain  # telemetry changes nothing
    for rank, r in enumerate(results):
        names = [s["name"] for s in r["spans"]]
        assert names.count("adaptive_pp.step") == tc.CASE.steps + 1
        assert names.count("adaptive_pp.migration") == 1
        assert names.count("adaptive_pp.microbatches.change") == 1
        steps = {s["id"]: s for s in r["spans"] if s["name"] == "adaptive_pp.step"}
        for s in r["spans"]:
            assert s["attributes"][STAGE] == rank
            if s["name"] != "adaptive_pp.step":  # changes happen inside the step that decided
                assert s["parent"] in steps and s["status"] == "UNSET"
        *ok, failed = steps.values()
        assert [s["status"] for s in ok] == ["UNSET"] * tc.CASE.steps
        assert failed["status"] == "ERROR"
        assert failed["attributes"][ERROR_TYPE] == r["error_type"]
        ms = [s["attributes"]["adaptive_pp.microbatches"] for s in ok]
        assert ms == [2, 2, 4, 4]
        parts = [s["attributes"]["adaptive_pp.partition"] for s in ok]
        assert parts == ["0,2,5", "0,3,5", "0,3,5", "0,3,5"]
        assert set(r["metrics"]) == set(METRICS) | set(ERROR_METRICS)
        assert r["metrics"]["adaptive_pp.errors"] == [
            ({STAGE: rank, ERROR_TYPE: r["error_type"]}, 1)
        ]
        assert all(a[STAGE] == rank for pts in r["metrics"].values() for a, _ in pts)
        step_logs = [e for e in r["logs"] if e["event"] == "step"]
        assert [e["step"] for e in step_logs] == list(range(tc.CASE.steps))
        assert all(e["rank"] == rank and e["stage"] == rank for e in r["logs"])
        events = {e["event"] for e in r["logs"]}
        assert {"decision", "migration.begin", "migration.commit", "microbatches.change"} <= events


@pytest.mark.multiprocess
def test_a_step_is_one_trace_across_ranks_with_a_span_per_action(pools: PoolFor) -> None:
    """Stage 1's step span is a child of stage 0's; forward/backward/optimizer are children."""
    ranks = pools(2).run(tc.job_one_trace)
    steps = [{s["step"]: s for s in r if s["name"] == "adaptive_pp.step"} for r in ranks]
    assert set(steps[0]) == set(steps[1]) == {0, 1}
    for k in (0, 1):
        top, below = steps[0][k], steps[1][k]
        assert top["parent"] is None
        assert below["trace"] == top["trace"] and below["parent"] == top["id"]
    assert steps[0][0]["trace"] != steps[0][1]["trace"]  # one trace per step
    for r, spans in enumerate(ranks):
        ids = {s["id"]: s["step"] for s in steps[r].values()}
        children = [s for s in spans if s["name"] != "adaptive_pp.step"]
        assert all(s["parent"] in ids for s in children)
        for name, per_step in (
            ("adaptive_pp.forward", tc.CASE.microbatches),
            ("adaptive_pp.backward", tc.CASE.microbatches),
            ("adaptive_pp.optimizer", 1),
        ):
            made = [ids[s["parent"]] for s in children if s["name"] == name]
            assert sorted(made) == [0] * per_step + [1] * per_step, (r, name)


def test_configure_logging_renders_json_with_context() -> None:
    """The application-side setup: JSON lines with the bound rank/stage/step, level filtered."""
    stream = io.StringIO()
    try:
        logs.configure_logging("json", "info", stream)
        structlog.contextvars.bind_contextvars(rank=1, stage=1, step=4)
        log = structlog.get_logger("adaptive_pp.test")
        log.debug("hidden")
        log.info("decision", decision="move 1 layer")
    finally:
        structlog.contextvars.clear_contextvars()
        structlog.reset_defaults()
    (line,) = stream.getvalue().splitlines()
    event = json.loads(line)
    assert event["event"] == "decision" and event["level"] == "info"
    assert (event["rank"], event["stage"], event["step"]) == (1, 1, 4)
    with pytest.raises(ValueError, match="log format"):
        logs.configure_logging("xml")
