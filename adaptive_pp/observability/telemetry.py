"""OpenTelemetry spans and metrics of one stage, through opentelemetry-api only.

The library never sets up an SDK: without one (or with ``PipelineConfig.telemetry`` off and no
provider passed) every call below is a no-op. ``adaptive_pp.otel.setup_otlp`` is the opt-in
helper that installs the SDK and an OTLP exporter.

Names: spans ``adaptive_pp.step``, ``adaptive_pp.migration``, ``adaptive_pp.microbatches.change``
and, with ``detail``, the step's children ``adaptive_pp.forward`` / ``backward`` / ``wait`` /
``optimizer``; metrics listed in ``METRICS`` (a healthy run) and ``ERROR_METRICS`` (only once
something failed). Every span and data point carries ``adaptive_pp.stage``.

One trace per step across ranks: stage 0 sends ``carrier()`` (W3C trace context of its step span)
to the other ranks, which open their step span with ``step(..., parent=carrier)``.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from opentelemetry import context, metrics, trace
from opentelemetry.trace import NonRecordingSpan, Span
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from .. import __version__
from ..core.report import StepReport

if TYPE_CHECKING:
    from ..core.schedules import Action

SCOPE = "adaptive_pp"
STAGE, STEP, MICROBATCHES = "adaptive_pp.stage", "adaptive_pp.step", "adaptive_pp.microbatches"
MICROBATCH, ERROR_TYPE = "adaptive_pp.microbatch", "error.type"
MIN_WAIT_S = 1e-4  # shorter gaps before an action get no wait span (loop bookkeeping, not waiting)
_PROPAGATOR = TraceContextTextMapPropagator()
_ACTION = {"F": "forward", "B": "backward", "I": "backward.input", "W": "backward.weight"}
SECONDS = [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0]

METRICS = {
    "adaptive_pp.queue.depth": "messages arrived and not yet consumed (max over the step)",
    "adaptive_pp.stage.wait_time": "seconds a stage spent blocked on receives in a step",
    "adaptive_pp.stage.utilization": "compute / wall of a stage in the last step",
    "adaptive_pp.step.bubble_fraction": "idle fraction of a stage in the last step",
    "adaptive_pp.step.duration": "step wall time",
    "adaptive_pp.microbatches": "micro-batches per step (M)",
    "adaptive_pp.migrations": "layer migrations committed",
    "adaptive_pp.loss": "mini-batch loss of the last step",
    "adaptive_pp.step.last_completed": "unix time (s) at which the last step completed",
}
ERROR_METRICS = {"adaptive_pp.errors": "errors (failed steps) by error.type, the exception class"}


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
        detail: bool = False,
    ) -> None:
        self.stage = stage
        self.enabled = enabled
        self.detail = enabled and detail  # record_actions makes child spans
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
        self._loss = meter.create_gauge("adaptive_pp.loss", "1", d["adaptive_pp.loss"])
        self._completed = meter.create_gauge(
            "adaptive_pp.step.last_completed", "s", d["adaptive_pp.step.last_completed"]
        )
        self._errors = meter.create_counter(
            "adaptive_pp.errors", "{error}", ERROR_METRICS["adaptive_pp.errors"]
        )

    @contextlib.contextmanager
    def step(
        self,
        step: int,
        microbatches: int,
        schedule: str,
        bounds: tuple[int, ...],
        *,
        parent: Mapping[str, str] | None = None,
    ) -> Iterator[Span | None]:
        """Span of one training step on this stage (None when off).

        ``parent``: stage 0's ``carrier()``; the span becomes a child of stage 0's step span
        (one trace per step). None or empty: a child of the current context, as usual.
        An exception leaving the block ends the span with status ERROR, the exception recorded
        and ``error.type`` set, and adds one to ``adaptive_pp.errors`` (no ``error()`` call).
        """
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
        ctx = _PROPAGATOR.extract(parent, context.get_current()) if parent else None
        with self.tracer.start_as_current_span("adaptive_pp.step", ctx, attributes=attrs) as span:
            try:
                yield span
            except Exception as exc:
                # start_as_current_span then records it and sets status ERROR.
                span.set_attribute(ERROR_TYPE, type(exc).__name__)
                self.error(type(exc).__name__)
                raise

    def carrier(self) -> dict[str, str]:
        """W3C trace context (``traceparent``) of the current span: call inside ``step``.

        Empty when off, outside any span or without an SDK; ``step(parent={})`` is fine.
        """
        out: dict[str, str] = {}
        if self.enabled:
            _PROPAGATOR.inject(out)
        return out

    def error(self, error_type: str) -> None:
        """Count one error outside a step span (``error_type``: the exception's class name)."""
        if self.enabled:
            self._errors.add(1, {**self._attrs, ERROR_TYPE: error_type})

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
        self._completed.set(time.time(), attrs)
        if report.loss is not None:
            self._loss.set(report.loss, attrs)
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

    def record_actions(
        self,
        span: Span | None,
        actions: Sequence[Action],
        starts: Sequence[float],
        ends: Sequence[float],
        t0: float,
        *,
        waits: Sequence[float] | None = None,
        optimizer: tuple[float, float] | None = None,
        min_wait_s: float = MIN_WAIT_S,
    ) -> None:
        """With ``detail``: child spans of the step ``span`` for what the stage did, after the fact.

        ``actions``, ``starts``, ``ends`` as in ``StageLog`` (seconds since ``t0``, the step's
        ``time.perf_counter()`` start). Each action gets ``adaptive_pp.forward`` or ``backward``
        and, if it waited longer than ``min_wait_s``, an ``adaptive_pp.wait`` just before it;
        ``waits`` (seconds blocked before each action) defaults to the gap since the previous
        action ended (or since ``t0``). ``optimizer``: its (start, end) since ``t0``. A no-op
        without ``detail``, without a span, or if the span is not recorded.
        """
        if not self.detail or span is None or isinstance(span, NonRecordingSpan):
            return
        parent = trace.set_span_in_context(span)
        epoch_ns = time.time_ns() - time.perf_counter_ns()  # + perf_counter ns = unix ns

        def child(name: str, start: float, end: float, attrs: dict[str, Any]) -> None:
            at, t = {**self._attrs, **attrs}, epoch_ns + round((t0 + start) * 1e9)
            self.tracer.start_span(name, parent, attributes=at, start_time=t).end(
                epoch_ns + round((t0 + end) * 1e9)
            )

        prev = 0.0
        for i, (action, start, end) in enumerate(zip(actions, starts, ends, strict=True)):
            kind, m = _ACTION[action.kind], {MICROBATCH: action.microbatch}
            wait = start - prev if waits is None else waits[i]
            if wait > min_wait_s:  # blocked until the action's input arrived
                child("adaptive_pp.wait", start - wait, start, {**m, "adaptive_pp.action": kind})
            child(f"adaptive_pp.{kind}", start, end, m)
            prev = end
        if optimizer is not None:
            child("adaptive_pp.optimizer", optimizer[0], optimizer[1], {})

    @contextlib.contextmanager
    def change(self, kind: str, step: int, attributes: dict[str, Any]) -> Iterator[Span | None]:
        """Span of a plan change (kind "migration", "microbatches.change" or "schedule.change");
        errors recorded."""
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
