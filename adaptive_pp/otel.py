"""Opt-in OpenTelemetry SDK setup: tracer and meter providers exporting OTLP over gRPC.

The library itself uses opentelemetry-api only; call ``setup_otlp`` in each stage process (or
pass ``--otlp-endpoint`` to the CLI) to send its spans and metrics to a collector. Needs the
``otel`` extra (opentelemetry-sdk, opentelemetry-exporter-otlp-proto-grpc).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from opentelemetry import metrics, trace

ENV_ENDPOINT = "OTEL_EXPORTER_OTLP_ENDPOINT"


@dataclass
class OtlpSetup:
    """The providers ``setup_otlp`` made; ``shutdown()`` flushes and stops both."""

    endpoint: str
    tracer_provider: Any
    meter_provider: Any

    def shutdown(self) -> None:
        """Export what is pending, then stop the exporters."""
        self.tracer_provider.shutdown()
        self.meter_provider.shutdown()


def resolve_endpoint(endpoint: str | None) -> str | None:
    """The endpoint to use: the argument, else $OTEL_EXPORTER_OTLP_ENDPOINT, else None."""
    return endpoint or os.environ.get(ENV_ENDPOINT) or None


def setup_otlp(
    endpoint: str | None = None,
    *,
    service_name: str = "adaptive_pp",
    attributes: dict[str, Any] | None = None,
    export_interval_s: float = 10.0,
    set_global: bool = True,
) -> OtlpSetup | None:
    """Install SDK providers exporting to ``endpoint`` (gRPC); None if no endpoint is known.

    ``attributes`` go on the resource (e.g. ``{"adaptive_pp.rank": 2}``). With ``set_global``
    the providers become OpenTelemetry's global ones, which ``Pipeline`` uses when
    ``PipelineConfig(telemetry=True)``; otherwise pass them to ``Pipeline`` yourself.
    """
    url = resolve_endpoint(endpoint)
    if url is None:
        return None
    try:
        from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.metrics import MeterProvider
        from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
    except ImportError as exc:
        raise RuntimeError(
            "OTLP export needs the otel extra: pip install 'adaptive-pp[otel]' "
            f"(opentelemetry-sdk, opentelemetry-exporter-otlp-proto-grpc); {exc}"
        ) from exc
    if "://" not in url:
        url = f"http://{url}"
    insecure = url.startswith("http://")
    resource = Resource.create({"service.name": service_name, **(attributes or {})})
    tracer_provider = TracerProvider(resource=resource)
    tracer_provider.add_span_processor(
        BatchSpanProcessor(OTLPSpanExporter(endpoint=url, insecure=insecure))
    )
    reader = PeriodicExportingMetricReader(
        OTLPMetricExporter(endpoint=url, insecure=insecure),
        export_interval_millis=export_interval_s * 1e3,
    )
    meter_provider = MeterProvider(resource=resource, metric_readers=[reader])
    if set_global:
        trace.set_tracer_provider(tracer_provider)
        metrics.set_meter_provider(meter_provider)
    return OtlpSetup(url, tracer_provider, meter_provider)
