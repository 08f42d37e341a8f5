"""Telemetry and OTLP helpers, in one process with in-memory SDK exporters (no stage processes).

Error path, health gauges, one trace per step across stages, per-action child spans, flushing.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Iterator, Sequence
from typing import Any

import pytest
import structlog
import telemetry_cases as tc
from opentelemetry import metrics, trace
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import (
    MetricExporter,
    MetricExportResult,
    MetricsData,
    PeriodicExportingMetricReader,
)
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from adaptive_pp.core.errors import NonFiniteLoss
from adaptive_pp.core.schedules import make_schedule
from adaptive_pp.core.simulator import Costs, simulate
from adaptive_pp.emulation import demo
from adaptive_pp.observability import otel
from adaptive_pp.observability.telemetry import ERROR_TYPE, MICROBATCH, STAGE, Telemetry

BOUNDS = (0, 2, 4)


def _telemetry(stage: int = 1, **kw: Any) -> tuple[Telemetry, InMemorySpanExporter, Any]:
    spans, tp, reader, mp = tc.in_memory()
    return (
        Telemetry(stage, enabled=True, tracer_provider=tp, meter_provider=mp, **kw),
        spans,
        reader,
    )


def _by_name(spans: InMemorySpanExporter) -> dict[str, list[ReadableSpan]]:
    out: dict[str, list[ReadableSpan]] = {}
    for s in spans.get_finished_spans():
        out.setdefault(s.name, []).append(s)
    return out


# -- error path ----------------------------------------------------------------------------------


def test_a_failing_step_ends_its_span_with_error_and_counts_it() -> None:
    """ERROR status, the exception event, error.type on the span, one on adaptive_pp.errors."""
    tel, spans, reader = _telemetry()
    with tel.step(0, 2, "1f1b", BOUNDS):
        pass
    assert "adaptive_pp.errors" not in tc.metric_points(reader)  # a good step counts nothing
    with pytest.raises(NonFiniteLoss), tel.step(1, 2, "1f1b", BOUNDS):
        raise NonFiniteLoss("the loss of micro-batch 1 is nan", stage=1, microbatch=1)
    ok, failed = spans.get_finished_spans()
    assert ok.status.status_code.name == "UNSET" and ERROR_TYPE not in (ok.attributes or {})
    assert failed.status.status_code.name == "ERROR"
    assert "nan" in (failed.status.description or "")
    (event,) = failed.events
    assert event.name == "exception"
    assert (event.attributes or {})["exception.type"] == "adaptive_pp.errors.NonFiniteLoss"
    assert (failed.attributes or {})[ERROR_TYPE] == "NonFiniteLoss"
    errors = tc.metric_points(reader)["adaptive_pp.errors"]
    assert errors == [({STAGE: 1, ERROR_TYPE: "NonFiniteLoss"}, 1)]


def test_error_counts_by_type_and_stage() -> None:
    """error() outside a step: one data point per error type, each with the stage."""
    tel, spans, reader = _telemetry(stage=2)
    for kind in ("PeerGone", "PipelineTimeout", "PeerGone"):
        tel.error(kind)
    errors = {a[ERROR_TYPE]: v for a, v in tc.metric_points(reader)["adaptive_pp.errors"]}
    assert errors == {"PeerGone": 2, "PipelineTimeout": 1}
    assert all(a[STAGE] == 2 for a, _ in tc.metric_points(reader)["adaptive_pp.errors"])
    assert spans.get_finished_spans() == ()


# -- health gauges -------------------------------------------------------------------------------


def test_record_sets_the_loss_and_the_time_of_the_last_completed_step() -> None:
    """adaptive_pp.loss is the report's loss; last_completed is unix time at record()."""
    tel, _, reader = _telemetry(stage=0)
    report = simulate(make_schedule("1f1b", 2, 2), Costs.build(2, 2, 1e-3, 2e-3))
    before = time.time()
    with tel.step(0, 2, "1f1b", BOUNDS) as span:
        tel.record(span, dataclasses.replace(report, loss=0.75))
    after = time.time()
    points = tc.metric_points(reader)
    assert points["adaptive_pp.loss"] == [({STAGE: 0}, 0.75)]
    ((attrs, completed),) = points["adaptive_pp.step.last_completed"]
    assert attrs == {STAGE: 0} and before <= completed <= after


def test_a_report_without_a_loss_sets_no_loss() -> None:
    """A simulated report has no loss: no made-up value on the gauge."""
    tel, _, reader = _telemetry(stage=0)
    report = simulate(make_schedule("1f1b", 2, 2), Costs.build(2, 2, 1e-3, 2e-3))
    with tel.step(0, 2, "1f1b", BOUNDS) as span:
        tel.record(span, report)
    points = tc.metric_points(reader)
    assert "adaptive_pp.loss" not in points and "adaptive_pp.step.last_completed" in points


# -- one trace per step --------------------------------------------------------------------------


def test_stage_1_joins_the_trace_of_stage_0s_step() -> None:
    """Two stages, each with its own provider as in its own process: one trace, stage 0 parent."""
    tel0, spans0, _ = _telemetry(stage=0)
    tel1, spans1, _ = _telemetry(stage=1)
    with tel0.step(5, 2, "1f1b", BOUNDS):
        carrier = tel0.carrier()
    assert set(carrier) == {"traceparent"}
    # Outside stage 0's block, so only the carrier can link them.
    with tel1.step(5, 2, "1f1b", BOUNDS, parent=carrier):
        pass
    with tel1.step(6, 2, "1f1b", BOUNDS):
        pass
    (s0,) = spans0.get_finished_spans()
    joined, alone = spans1.get_finished_spans()
    assert joined.context.trace_id == s0.context.trace_id
    assert joined.parent is not None and joined.parent.span_id == s0.context.span_id
    assert joined.parent.is_remote
    assert alone.parent is None and alone.context.trace_id != s0.context.trace_id
    assert carrier["traceparent"].split("-")[1:3] == [
        f"{s0.context.trace_id:032x}",
        f"{s0.context.span_id:016x}",
    ]


def test_an_empty_carrier_leaves_the_step_in_the_current_context() -> None:
    """parent={} (stage 0 had nothing to send): the step is a child of the caller's span."""
    tel, spans, _ = _telemetry()
    outer = tel.tracer.start_span("user.epoch")
    with trace.use_span(outer, end_on_exit=True), tel.step(0, 2, "1f1b", BOUNDS, parent={}):
        pass
    step, user = spans.get_finished_spans()
    assert step.parent is not None and step.parent.span_id == user.context.span_id


def test_the_carrier_is_empty_off_outside_a_step_or_without_an_sdk() -> None:
    """Nothing to propagate: disabled, no current span, or the API's no-op tracer."""
    tel, _, _ = _telemetry()
    assert tel.carrier() == {}
    with tel.tracer.start_as_current_span("user.epoch"):  # off: not even the caller's span
        assert Telemetry(0, enabled=False).carrier() == {}
    no_sdk = Telemetry(
        0,
        enabled=True,
        tracer_provider=trace.NoOpTracerProvider(),
        meter_provider=metrics.NoOpMeterProvider(),
    )
    with no_sdk.step(0, 2, "1f1b", BOUNDS):
        assert no_sdk.carrier() == {}


# -- per-action child spans ----------------------------------------------------------------------

# Stage 1 of 1F1B on 2 stages, M=2, as StageLog records it: seconds since the step's t0.
ACTIONS = make_schedule("1f1b", 2, 2).stages[1]
STARTS = [0.010, 0.02005, 0.0300005, 0.040]
ENDS = [0.020, 0.030, 0.035, 0.050]
OPTIMIZER = (0.051, 0.053)


def _children(tel: Telemetry, spans: InMemorySpanExporter, after: bool) -> list[ReadableSpan]:
    with tel.step(0, 2, "1f1b", BOUNDS) as span:
        t0 = time.perf_counter()  # as Pipeline._step takes it, just inside the step span
        if not after:
            tel.record_actions(span, ACTIONS, STARTS, ENDS, t0, optimizer=OPTIMIZER)
    if after:
        tel.record_actions(span, ACTIONS, STARTS, ENDS, t0, optimizer=OPTIMIZER)
    (step,) = _by_name(spans)["adaptive_pp.step"]
    kids = [s for s in spans.get_finished_spans() if s is not step]
    assert all(k.parent is not None and k.parent.span_id == step.context.span_id for k in kids)
    assert all(k.context.trace_id == step.context.trace_id for k in kids)
    assert step.start_time is not None
    # The first child (a wait) starts at t0, taken just after the step span started: the
    # perf_counter -> epoch conversion puts it there (within 0.1 ms before, 50 ms after).
    first = min(k.start_time or 0 for k in kids)
    assert -1e5 <= first - step.start_time < 5e7
    return sorted(kids, key=lambda k: (k.start_time or 0, k.name != "adaptive_pp.wait"))


@pytest.mark.parametrize("after", [False, True], ids=["inside", "after-the-step"])
def test_record_actions_makes_timed_children_of_the_step(after: bool) -> None:
    """forward/backward per action, a wait before each late one, the optimizer; exact times."""
    tel, spans, _ = _telemetry(detail=True)
    kids = _children(tel, spans, after)
    names = [(k.name, (k.attributes or {}).get(MICROBATCH)) for k in kids]
    assert [str(a) for a in ACTIONS] == ["1F0", "1B0", "1F1", "1B1"]
    assert names == [
        ("adaptive_pp.wait", 0),  # from t0 to the first forward: 10 ms
        ("adaptive_pp.forward", 0),
        ("adaptive_pp.backward", 0),  # 50 us after the forward: not a wait
        ("adaptive_pp.forward", 1),  # 0.5 us: not a wait either
        ("adaptive_pp.wait", 1),
        ("adaptive_pp.backward", 1),
        ("adaptive_pp.optimizer", None),
    ]
    assert all((k.attributes or {})[STAGE] == 1 for k in kids)
    waits = [k for k in kids if k.name == "adaptive_pp.wait"]
    assert [(w.attributes or {})["adaptive_pp.action"] for w in waits] == ["forward", "backward"]
    base = kids[0].start_time or 0  # t0, in epoch ns
    want = [(0.0, 0.010), *zip(STARTS[:3], ENDS[:3]), (0.035, 0.040), (STARTS[3], ENDS[3])]
    want.append(OPTIMIZER)
    got = [((k.start_time or 0) - base, (k.end_time or 0) - base) for k in kids]
    assert got == [pytest.approx((s * 1e9, e * 1e9), abs=2) for s, e in want]


def test_record_actions_takes_measured_waits() -> None:
    """waits given (blocked seconds per action): the wait span is [start - wait, start]."""
    tel, spans, _ = _telemetry(detail=True)
    t0 = time.perf_counter()
    with tel.step(0, 2, "1f1b", BOUNDS) as span:
        tel.record_actions(span, ACTIONS, STARTS, ENDS, t0, waits=[0.0, 0.0, 0.0, 0.002])
    by = _by_name(spans)
    (wait,) = by["adaptive_pp.wait"]
    (b1,) = [b for b in by["adaptive_pp.backward"] if (b.attributes or {})[MICROBATCH] == 1]
    assert wait.end_time == b1.start_time
    assert (wait.end_time or 0) - (wait.start_time or 0) == pytest.approx(2e6, abs=2)
    assert "adaptive_pp.optimizer" not in by


class _Untouchable(Sequence[Any]):
    """Fails the test if record_actions so much as looks at the actions."""

    def __getitem__(self, i: Any) -> Any:
        raise AssertionError("read the actions")

    def __len__(self) -> int:
        raise AssertionError("read the actions")

    def __iter__(self) -> Iterator[Any]:
        raise AssertionError("read the actions")


def test_record_actions_costs_nothing_without_detail() -> None:
    """detail off, telemetry off or an unrecorded span: returns before reading its arguments."""
    untouchable = _Untouchable()
    plain, spans, _ = _telemetry()
    assert not plain.detail
    with plain.step(0, 2, "1f1b", BOUNDS) as span:
        plain.record_actions(span, untouchable, untouchable, untouchable, 0.0)
    assert [s.name for s in spans.get_finished_spans()] == ["adaptive_pp.step"]
    off = Telemetry(0, enabled=False, detail=True)
    assert not off.detail
    off.record_actions(None, untouchable, untouchable, untouchable, 0.0)
    detailed, spans, _ = _telemetry(detail=True)
    detailed.record_actions(None, untouchable, untouchable, untouchable, 0.0)
    unrecorded = trace.NonRecordingSpan(trace.INVALID_SPAN_CONTEXT)
    detailed.record_actions(unrecorded, untouchable, untouchable, untouchable, 0.0)
    assert spans.get_finished_spans() == ()


# -- flushing ------------------------------------------------------------------------------------


class _Collect(MetricExporter):
    """Keeps the names of the metrics each export carried."""

    def __init__(self) -> None:
        super().__init__()
        self.names: list[str] = []

    def export(
        self, metrics_data: MetricsData, timeout_millis: float = 10_000, **kwargs: Any
    ) -> MetricExportResult:
        for rm in metrics_data.resource_metrics:
            for sm in rm.scope_metrics:
                self.names += [m.name for m in sm.metrics]
        return MetricExportResult.SUCCESS

    def force_flush(self, timeout_millis: float = 10_000) -> bool:
        return True

    def shutdown(self, timeout_millis: float = 30_000, **kwargs: Any) -> None:
        pass


def _batched() -> tuple[InMemorySpanExporter, TracerProvider, _Collect, MeterProvider]:
    """Providers that export only when flushed (or after an hour), like setup_otlp's."""
    spans, metric_names = InMemorySpanExporter(), _Collect()
    tp = TracerProvider(shutdown_on_exit=False)
    tp.add_span_processor(BatchSpanProcessor(spans, schedule_delay_millis=3_600_000))
    reader = PeriodicExportingMetricReader(metric_names, export_interval_millis=3_600_000)
    return spans, tp, metric_names, MeterProvider([reader], shutdown_on_exit=False)


def _record_a_failed_step(tp: TracerProvider, mp: MeterProvider) -> None:
    tel = Telemetry(0, enabled=True, tracer_provider=tp, meter_provider=mp)
    with pytest.raises(RuntimeError), tel.step(0, 2, "1f1b", BOUNDS):
        raise RuntimeError("the step failed")


def test_leaving_an_otlp_setup_by_an_error_exports_what_was_recorded(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """``with OtlpSetup`` flushes on the error path; a later shutdown() does nothing, quietly."""
    spans, tp, metric_names, mp = _batched()
    with pytest.raises(RuntimeError), otel.OtlpSetup("test", tp, mp):
        _record_a_failed_step(tp, mp)
        assert spans.get_finished_spans() == () and metric_names.names == []
        raise RuntimeError("the training failed")
    assert [s.name for s in spans.get_finished_spans()] == ["adaptive_pp.step"]
    assert metric_names.names == ["adaptive_pp.errors"]
    with caplog.at_level(logging.WARNING):
        otel.OtlpSetup("test", tp, mp).shutdown()
    assert caplog.records == []


class _Broken:
    def shutdown(self) -> None:
        raise ConnectionError("collector gone")


def test_a_failing_flush_does_not_hide_the_error_that_left_the_block() -> None:
    """The block's own error propagates; the meter provider is still shut down."""
    _, _, metric_names, mp = _batched()
    counter = mp.get_meter("t").create_counter("t.count")
    with pytest.raises(KeyError), otel.OtlpSetup("test", _Broken(), mp):
        counter.add(1)
        raise KeyError("the training failed")
    assert metric_names.names == ["t.count"]
    with pytest.raises(ConnectionError), otel.OtlpSetup("test", _Broken(), _Broken()):
        pass  # without an error in flight, the flush failure is the error


def test_flush_global_flushes_and_stops_the_global_sdk_providers(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """What a rank recorded reaches the exporters before os._exit; twice is harmless."""
    spans, tp, metric_names, mp = _batched()
    monkeypatch.setattr(trace, "get_tracer_provider", lambda: tp)
    monkeypatch.setattr(metrics, "get_meter_provider", lambda: mp)
    _record_a_failed_step(tp, mp)
    otel.flush_global(timeout_s=5.0)
    assert [s.name for s in spans.get_finished_spans()] == ["adaptive_pp.step"]
    assert metric_names.names == ["adaptive_pp.errors"]
    with caplog.at_level(logging.WARNING):
        otel.flush_global()
    assert caplog.records == []


def test_flush_global_leaves_the_api_default_providers_alone(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """No SDK provider installed (the API's proxy or no-op ones): nothing to do, no error."""
    monkeypatch.setattr(trace, "get_tracer_provider", trace.ProxyTracerProvider)
    monkeypatch.setattr(metrics, "get_meter_provider", metrics.NoOpMeterProvider)
    with structlog.testing.capture_logs() as logged:
        otel.flush_global(timeout_s=0.1)
    assert logged == []  # not even a failure it swallowed


def test_the_demo_flushes_when_training_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    """A rank whose training raised still exports (its process may leave by os._exit)."""
    spans, tp, metric_names, mp = _batched()

    def failing_train(*args: Any, **kwargs: Any) -> float:
        _record_a_failed_step(tp, mp)
        raise RuntimeError("stage 1 is gone")

    monkeypatch.setattr(demo, "setup_otlp", lambda *a, **k: otel.OtlpSetup("test", tp, mp))
    monkeypatch.setattr(demo, "_train", failing_train)
    monkeypatch.setattr(demo, "configure_logging", lambda *a: None)
    with pytest.raises(RuntimeError, match="gone"):
        demo.train_rank(1, 2, "1f1b", demo.Observe(otlp_endpoint="test"))
    assert [s.name for s in spans.get_finished_spans()] == ["adaptive_pp.step"]
    assert metric_names.names == ["adaptive_pp.errors"]
