"""Observability: OpenTelemetry spans and metrics, logs, Chrome traces, plots, progress and
text rendering of step reports."""
