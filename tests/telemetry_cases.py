"""Stage-process jobs of the telemetry tests (importable by spawned ranks)."""

from __future__ import annotations

import os
from typing import Any

import runtime_cases as rc
import structlog
import torch
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader, NumberDataPoint
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from torch import nn

from adaptive_pp import Pipeline, PipelineConfig
from adaptive_pp.core.decisions import Decision, MoveLayers, SetMicrobatches
from adaptive_pp.observability.otel import setup_otlp


def in_memory() -> tuple[InMemorySpanExporter, TracerProvider, InMemoryMetricReader, MeterProvider]:
    """SDK providers that keep every finished span and metric in memory."""
    spans = InMemorySpanExporter()
    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(SimpleSpanProcessor(spans))
    reader = InMemoryMetricReader()
    return spans, tracer_provider, reader, MeterProvider(metric_readers=[reader])


def metric_points(reader: InMemoryMetricReader) -> dict[str, list[tuple[dict[str, Any], Any]]]:
    """Metric name -> (attributes, value) of each data point (a histogram's value: its count)."""
    out: dict[str, list[tuple[dict[str, Any], Any]]] = {}
    data = reader.get_metrics_data()
    for rm in data.resource_metrics if data is not None else ():
        for sm in rm.scope_metrics:
            for m in sm.metrics:
                for p in m.data.data_points:
                    value = p.value if isinstance(p, NumberDataPoint) else p.count  # histogram
                    out.setdefault(m.name, []).append((dict(p.attributes or {}), value))
    return out


CASE = rc.Case(
    seed=5,
    widths=(4, 6, 5, 7, 3, 4),
    bounds=(0, 2, 5),
    microbatches=2,
    schedule="1f1b",
    optimizer="adam",
    steps=4,
)
SCRIPT: dict[int, Decision] = {0: MoveLayers(src=1, dst=0, count=1), 1: SetMicrobatches(4)}


def _train(pipe: Any) -> list[float]:
    return [pipe.step(x, y).loss for x, y in rc.batches(CASE)]


def _failing_step(pipe: Any) -> str:
    """A step every rank fails alike, before any message (3 samples do not split into M=4);
    the class name of its error (a ValueError)."""
    x, y = rc.batches(CASE)[0]
    try:
        pipe.step(x[:3], y[:3])
    except ValueError as exc:
        return type(exc).__name__
    raise AssertionError("a batch of 3 split into 4 micro-batches")


def job_in_memory() -> dict[str, Any]:
    """Train CASE with a scripted migration and M change, then fail a step; spans, metrics, logs."""
    torch.set_num_threads(1)
    spans, tracer_provider, reader, meter_provider = in_memory()
    with structlog.testing.capture_logs(
        processors=[structlog.contextvars.merge_contextvars]
    ) as logs:
        pipe = rc.case_pipeline(
            CASE,
            controller=rc.Scripted(dict(SCRIPT)),
            tracer_provider=tracer_provider,
            meter_provider=meter_provider,
        )
        losses = _train(pipe)
        error_type = _failing_step(pipe)
        pipe.close()
    return {
        "losses": losses,
        "error_type": error_type,
        "spans": [
            {
                "name": s.name,
                "attributes": dict(s.attributes or {}),
                "parent": s.parent.span_id if s.parent is not None else None,
                "id": s.context.span_id,
                "status": s.status.status_code.name,
            }
            for s in spans.get_finished_spans()
        ],
        "metrics": metric_points(reader),
        "logs": [
            {k: v for k, v in e.items() if k in ("event", "rank", "stage", "step", "log_level")}
            for e in logs
        ],
    }


def job_plain() -> list[float]:
    """The same training with telemetry off: the losses to compare."""
    torch.set_num_threads(1)
    pipe = rc.case_pipeline(CASE, controller=rc.Scripted(dict(SCRIPT)))
    losses = _train(pipe)
    pipe.close()
    return losses


def job_otlp(endpoint: str) -> list[float]:
    """Train CASE exporting over OTLP to ``endpoint``, fail a step; flush on the way out."""
    torch.set_num_threads(1)
    otel = setup_otlp(endpoint, attributes={"adaptive_pp.rank": int(os.environ["RANK"])})
    assert otel is not None
    with otel:
        cfg = PipelineConfig(microbatches=CASE.microbatches, telemetry=True, init_timeout=60)
        pipe = Pipeline(
            rc.build_model(CASE),
            nn.functional.mse_loss,
            lambda p: rc.make_optimizer(CASE, p),
            cfg,
            controller=rc.Scripted(dict(SCRIPT)),
        )
        losses = _train(pipe)
        _failing_step(pipe)
        pipe.close()
    return losses


def job_one_trace() -> list[dict[str, Any]]:
    """Two steps of CASE with child spans of every action: the finished spans of this rank."""
    torch.set_num_threads(1)
    spans, tracer_provider, _, _ = in_memory()
    cfg = PipelineConfig(
        microbatches=CASE.microbatches, partition=CASE.bounds, telemetry=True, trace_actions=True
    )
    pipe = Pipeline(
        rc.build_model(CASE),
        nn.functional.mse_loss,
        lambda p: rc.make_optimizer(CASE, p),
        cfg,
        tracer_provider=tracer_provider,
    )
    for x, y in rc.batches(CASE)[:2]:
        pipe.step(x, y)
    pipe.close()
    return [
        {
            "name": s.name,
            "step": (s.attributes or {}).get("adaptive_pp.step"),
            "trace": s.context.trace_id,
            "id": s.context.span_id,
            "parent": s.parent.span_id if s.parent is not None else None,
        }
        for s in spans.get_finished_spans()
    ]
