"""OpenTelemetry spans and metrics of one stage, through opentelemetry-api only.

The library never sets up an SDK: without one (or with ``PipelineConfig.telemetry`` off and no
provider passed) every call below is a no-op. ``adaptive_pp.otel.setup_otlp`` is the opt-in
helper that installs the SDK and an OTLP exporter.

Names: spans ``adaptive_pp.step``, ``adaptive_pp.migration``, ``adaptive_pp.microbatches.change``
(and ``adaptive_pp.decision.refused`` as a span event); metrics listed in ``METRICS``. Every span
and data point carries ``adaptive_pp.stage``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from opentelemetry import metrics, trace
from opentelemetry.trace import Span

from . import __version__
from .report import StepReport

SCOPE = "adaptive_pp"
STAGE, STEP, MICROBATCHES = "adaptive_pp.stage", "adaptive_pp.step", "adaptive_pp.microbatches"
SECONDS = [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0]

METRICS = {
    "adaptive_pp.queue.depth": "messages arrived and not yet consumed (max over the step)",
    "adaptive_pp.stage.wait_time": "seconds a stage spent blocked on receives in a step",
    "adaptive_pp.stage.utilization": "compute / wall of a stage in the last step",
    "adaptive_pp.step.bubble_fraction": "idle fraction of a stage in the last step",
    "adaptive_pp.step.duration": "step wall time",
    "adaptive_pp.microbatches": "micro-batches per step (M)",
    "adaptive_pp.migrations": "layer migrations committed",
}


def _partition(bounds: tuple[int, ...]) -> str:
    return ",".join(map(str, bounds))


class Telemetry:
    """Spans and metrics for one stage; ``enabled=False`` makes every method a no-op."""

    def __init__(
        self,
        stage: int,
        *,
        enabled: bool,
        tracer_provider: trace.TracerProvider | None = None,
        meter_provider: metrics.MeterProvider | None = None,
    ) -> None:
        self.stage = stage
        self.enabled = enabled
        self._attrs = {STAGE: stage}
        if not enabled:
            return
        self.tracer = trace.get_tracer(SCOPE, __version__, tracer_provider=tracer_provider)
        meter = metrics.get_meter(SCOPE, __version__, meter_provider=meter_provider)
        d = METRICS
        self._depth = meter.create_gauge(
            "adaptive_pp.queue.depth", "{message}", d["adaptive_pp.queue.depth"]
        )
        self._wait = meter.create_histogram(
            "adaptive_pp.stage.wait_time",
            "s",
            d["adaptive_pp.stage.wait_time"],
            explicit_bucket_boundaries_advisory=SECONDS,
        )
        self._util = meter.create_gauge(
            "adaptive_pp.stage.utilization", "1", d["adaptive_pp.stage.utilization"]
        )
        self._bubble = meter.create_gauge(
            "adaptive_pp.step.bubble_fraction", "1", d["adaptive_pp.step.bubble_fraction"]
        )
        self._duration = meter.create_histogram(
            "adaptive_pp.step.duration",
            "s",
            d["adaptive_pp.step.duration"],
            explicit_bucket_boundaries_advisory=SECONDS,
        )
        self._m = meter.create_gauge("adaptive_pp.microbatches", "1", d["adaptive_pp.microbatches"])
        self._migrations = meter.create_counter(
            "adaptive_pp.migrations", "1", d["adaptive_pp.migrations"]
        )

    @contextlib.contextmanager
    def step(
        self, step: int, microbatches: int, schedule: str, bounds: tuple[int, ...]
    ) -> Iterator[Span | None]:
        """Span of one training step on this stage (None when off)."""
        if not self.enabled:
            yield None
            return
        attrs: dict[str, Any] = {
            **self._attrs,
            STEP: step,
            MICROBATCHES: microbatches,
            "adaptive_pp.schedule": schedule,
            "adaptive_pp.partition": _partition(bounds),
        }
        with self.tracer.start_as_current_span("adaptive_pp.step", attributes=attrs) as span:
            yield span

    def record(self, span: Span | None, report: StepReport) -> None:
        """Record this stage's metrics from the merged step report and annotate the span."""
        if not self.enabled:
            return
        me = report.stages[self.stage]
        attrs = self._attrs
        for q in report.queues:
            if q.dst == self.stage:
                self._depth.set(q.max_depth, {**attrs, "adaptive_pp.queue": q.kind})
        self._wait.record(me.wait, attrs)
        self._util.set(me.utilization, attrs)
        self._bubble.set(me.bubble, attrs)
        self._duration.record(report.step_time, attrs)
        self._m.set(report.microbatches, attrs)
        if span is not None:
            span.set_attributes(
                {
                    "adaptive_pp.step_time": report.step_time,
                    "adaptive_pp.bubble_fraction": me.bubble,
                    "adaptive_pp.utilization": me.utilization,
                    "adaptive_pp.wait_time": me.wait,
                    **({"adaptive_pp.loss": report.loss} if report.loss is not None else {}),
                }
            )
            for event in report.events:
                span.add_event("adaptive_pp.event", {"adaptive_pp.event": event})

    @contextlib.contextmanager
    def change(self, kind: str, step: int, attributes: dict[str, Any]) -> Iterator[Span | None]:
        """Span of a plan change (kind "migration" or "microbatches.change"); errors recorded."""
        if not self.enabled:
            yield None
            return
        attrs = {**self._attrs, STEP: step, **attributes}
        # An exception leaving the block is recorded on the span and sets status ERROR
        # (start_as_current_span's record_exception / set_status_on_exception).
        with self.tracer.start_as_current_span(f"adaptive_pp.{kind}", attributes=attrs) as span:
            yield span
        if kind == "migration":
            self._migrations.add(1, attrs)
