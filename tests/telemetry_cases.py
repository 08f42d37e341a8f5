"""Stage-process jobs of the telemetry tests (importable by spawned ranks)."""

from __future__ import annotations

import os
from typing import Any

import runtime_cases as rc
import structlog
import torch
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from torch import nn

from adaptive_pp import Pipeline, PipelineConfig
from adaptive_pp.decisions import MoveLayers, SetMicrobatches
from adaptive_pp.otel import setup_otlp

CASE = rc.Case(
    seed=5,
    widths=(4, 6, 5, 7, 3, 4),
    bounds=(0, 2, 5),
    microbatches=2,
    schedule="1f1b",
    optimizer="adam",
    steps=4,
)
SCRIPT = {0: MoveLayers(src=1, dst=0, count=1), 1: SetMicrobatches(4)}


def _train(pipe: Any) -> list[float]:
    return [pipe.step(x, y).loss for x, y in rc.batches(CASE)]


def job_in_memory() -> dict[str, Any]:
    """Train CASE with a scripted migration and M change; return spans, metrics and logs."""
    torch.set_num_threads(1)
    spans = InMemorySpanExporter()
    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(SimpleSpanProcessor(spans))
    reader = InMemoryMetricReader()
    meter_provider = MeterProvider(metric_readers=[reader])
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
        pipe.close()
    data = reader.get_metrics_data()
    points: dict[str, list[dict[str, Any]]] = {}
    for rm in data.resource_metrics if data is not None else ():
        for sm in rm.scope_metrics:
            for metric in sm.metrics:
                for p in metric.data.data_points:
                    points.setdefault(metric.name, []).append(dict(p.attributes or {}))
    return {
        "losses": losses,
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
        "metrics": points,
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
    """Train CASE exporting spans and metrics over OTLP to ``endpoint``; flush on the way out."""
    torch.set_num_threads(1)
    otel = setup_otlp(endpoint, attributes={"adaptive_pp.rank": int(os.environ["RANK"])})
    assert otel is not None
    cfg = PipelineConfig(microbatches=CASE.microbatches, telemetry=True, init_timeout=60)
    pipe = Pipeline(
        rc.build_model(CASE),
        nn.functional.mse_loss,
        lambda p: rc.make_optimizer(CASE, p),
        cfg,
        controller=rc.Scripted(dict(SCRIPT)),
    )
    losses = _train(pipe)
    pipe.close()
    otel.shutdown()
    return losses
