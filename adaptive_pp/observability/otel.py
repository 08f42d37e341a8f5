"""Opt-in OpenTelemetry SDK setup: tracer and meter providers exporting OTLP over gRPC.

The library itself uses opentelemetry-api only; call ``setup_otlp`` in each stage process (or
pass ``--otlp-endpoint`` to the CLI) to send its spans and metrics to a collector. Needs the
``otel`` extra (opentelemetry-sdk, opentelemetry-exporter-otlp-proto-grpc).

Flushing: ``with setup_otlp(...) as otel:`` exports what is pending on the way out, error or not.
The SDK's providers also flush themselves at interpreter exit (atexit), which a process leaving
by ``os._exit`` skips: call ``flush_global()`` first.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import time
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import structlog
from opentelemetry import metrics, trace

ENV_ENDPOINT = "OTEL_EXPORTER_OTLP_ENDPOINT"
log = structlog.get_logger("adaptive_pp.otel")
_shut: weakref.WeakSet[Any] = weakref.WeakSet()  # providers shut down here (twice warns)


def _shutdown(provider: Any, *timeout_ms: int) -> None:
    if provider not in _shut:
        _shut.add(provider)
        provider.shutdown(*timeout_ms)


@dataclass
class OtlpSetup:
    """The providers ``setup_otlp`` made; ``shutdown()`` (or leaving a ``with``) flushes both."""

    endpoint: str
    tracer_provider: Any
    meter_provider: Any

    def shutdown(self) -> None:
        """Export what is pending, then stop the exporters (once; later calls do nothing)."""
        try:
            _shutdown(self.tracer_provider)
        finally:
            _shutdown(self.meter_provider)

    def __enter__(self) -> OtlpSetup:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc is None:
            self.shutdown()
            return
        try:  # an error is leaving the block: export what it left, and keep that error
            self.shutdown()
        except Exception as flush_error:
            log.warning("otel.shutdown_failed", error=repr(flush_error))


def flush_global(timeout_s: float = 5.0) -> None:
    """Flush, then shut down, OpenTelemetry's global providers if they are the SDK's.

    For a process about to leave by ``os._exit``, which skips the SDK's atexit shutdown. A
    no-op with the API's default providers, without the SDK, or for providers already shut
    down here (``OtlpSetup``). Best effort: failures are logged, not raised; ``timeout_s`` bounds
    the flushes (an exporter's own timeout bounds its shutdown).
    """
    try:
        from opentelemetry.sdk.metrics import MeterProvider
        from opentelemetry.sdk.trace import TracerProvider
    except ImportError:  # no SDK, so no SDK provider either
        return
    deadline = time.monotonic() + timeout_s

    def left_ms() -> int:
        return max(0, round((deadline - time.monotonic()) * 1e3))

    tracers, meters = trace.get_tracer_provider(), metrics.get_meter_provider()
    for provider, sdk in ((tracers, TracerProvider), (meters, MeterProvider)):
        if not isinstance(provider, sdk) or provider in _shut:
            continue
        try:  # MeterProvider.shutdown exports a last collection itself, within its timeout;
            # TracerProvider.shutdown has no timeout, so its spans are flushed with one first.
            if isinstance(provider, MeterProvider):
                _shutdown(provider, left_ms())
            else:
                provider.force_flush(left_ms())
                _shutdown(provider)
        except Exception as exc:
            log.warning("otel.flush_failed", provider=sdk.__name__, error=repr(exc))


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


def rotel_agent() -> Path:
    """Path of the rotel-agent collector binary shipped in the ``rotel`` wheel."""
    try:
        import rotel  # type: ignore[import-untyped]
    except ImportError as exc:
        raise RuntimeError("the local collector needs rotel: pip install rotel") from exc
    path = Path(rotel.__file__).parent / "rotel-agent"
    if not os.access(path, os.X_OK):
        raise RuntimeError(f"no executable rotel-agent at {path}")
    return path


@contextlib.contextmanager
def local_collector(log: Path, start_timeout_s: float = 20.0) -> Iterator[str]:
    """Run a rotel-agent OTLP collector on free loopback ports; yield its gRPC endpoint.

    It prints every span and metric it receives to ``log`` (debug exporter, detailed) and
    forwards nothing; it is stopped on exit. For tests, demos and benchmarks.
    """
    from ..runtime.launch import free_port

    grpc, http = free_port(), free_port()
    args = [
        str(rotel_agent()),
        "start",
        "--otlp-grpc-endpoint",
        f"127.0.0.1:{grpc}",
        "--otlp-http-endpoint",
        f"127.0.0.1:{http}",
        "--exporter",
        "blackhole",
        "--debug-log",
        "traces",
        "--debug-log",
        "metrics",
        "--debug-log-verbosity",
        "detailed",
    ]
    with log.open("w") as sink:
        proc = subprocess.Popen(args, stdout=sink, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + start_timeout_s
        while "Starting Rotel" not in log.read_text():
            if proc.poll() is not None:
                raise RuntimeError(f"rotel-agent exited with {proc.returncode}: {log.read_text()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"rotel-agent did not start within {start_timeout_s} s")
            time.sleep(0.1)
        yield f"http://127.0.0.1:{grpc}"
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
