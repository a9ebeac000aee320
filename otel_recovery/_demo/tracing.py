"""OpenTelemetry set-up for the demo: SDK if installed, OTLP if asked for, memory otherwise.

Everything SDK-related is imported inside :func:`set_up`, so ``import otel_recovery`` (and the
demo itself, when the SDK is missing) never needs ``opentelemetry-sdk``. The standard
``OTEL_EXPORTER_OTLP_*`` variables configure the exporters, as in any OpenTelemetry program:
``OTEL_EXPORTER_OTLP_ENDPOINT=http://localhost:4318 OTEL_EXPORTER_OTLP_PROTOCOL=http/protobuf``
sends the spans to a local Jaeger.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from opentelemetry import trace

from otel_recovery.telemetry import Telemetry, attributes, set_telemetry

__all__ = ["DemoTracing", "set_up"]

SERVICE_NAME = "otel-recovery-demo"
INSTALL_HINT = "pip install 'otel-recovery[sdk]'"


@dataclass
class DemoTracing:
    """What was set up; ``memory`` holds the in-memory exporter when spans stay local."""

    tracer: trace.Tracer
    description: str
    provider: Any = None
    memory: Any = None
    notes: list[str] = field(default_factory=list)

    def shutdown(self) -> None:
        """Flush (OTLP export happens in the background) and release the exporters."""
        if self.provider is not None:
            self.provider.force_flush()
            self.provider.shutdown()
        set_telemetry(None)

    def summary(self) -> list[str]:
        """How many recovery spans were produced, with one example's events (memory only)."""
        if self.memory is None:
            return []
        spans: Sequence[Any] = self.memory.get_finished_spans()
        prefix = attributes.RECOVERY_SPAN_PREFIX + " "
        recovery = [span for span in spans if span.name.startswith(prefix)]
        lines = [
            f"Spans kept in memory: {len(spans)}, of which {len(recovery)} recovery spans "
            f"(set OTEL_EXPORTER_OTLP_ENDPOINT to send them to Jaeger)."
        ]
        example = _pick_example(recovery)
        if example is None:
            return lines
        attrs = example.attributes or {}
        parent = next(
            (s for s in spans if example.parent and s.context.span_id == example.parent.span_id),
            None,
        )
        lines.append(
            f"Example: span {example.name!r} under {parent.name if parent else 'no parent'!r}, "
            f"outcome={attrs.get(attributes.OUTCOME)}, attempts={attrs.get(attributes.ATTEMPTS)}"
        )
        start = example.start_time or 0
        for event in example.events:
            shown = ", ".join(
                f"{key.removeprefix('otel_recovery.')}={_short(value)}"
                for key, value in (event.attributes or {}).items()
                if key != attributes.ERROR_FINGERPRINT
            )
            offset_ms = (event.timestamp - start) / 1e6
            lines.append(f"  +{offset_ms:7.1f} ms  {event.name}  {shown}")
        return lines


def _pick_example(spans: Sequence[Any]) -> Any:
    """Prefer a call recovered by a retry: it shows failure, backoff and success in one span."""
    for outcome in ("success", "fallback", "failure", "rejected"):
        for span in spans:
            if (span.attributes or {}).get(attributes.OUTCOME) == outcome and len(span.events) > 1:
                return span
    return spans[0] if spans else None


def _short(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.3f}"
    text = str(value)
    return text if len(text) <= 60 else text[:57] + "..."


def set_up() -> DemoTracing:
    """Install an SDK tracer provider as the global one, or explain how to get one."""
    try:
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor
        from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
    except ImportError:
        return DemoTracing(
            tracer=trace.get_tracer("otel_recovery.demo"),
            description="off (opentelemetry-sdk is not installed)",
            notes=[f"Tracing is off: opentelemetry-sdk is not installed. {INSTALL_HINT}"],
        )
    provider = TracerProvider(resource=Resource.create({"service.name": SERVICE_NAME}))
    endpoint = os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or os.environ.get(
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"
    )
    memory = None
    if endpoint:
        protocol = os.environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or os.environ.get(
            "OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"
        )
        try:
            exporter = _otlp_exporter(protocol)
        except ImportError as missing:
            return DemoTracing(
                tracer=trace.get_tracer("otel_recovery.demo"),
                description=f"off (OTLP exporter for {protocol} missing)",
                notes=[f"Tracing is off: {missing}. {INSTALL_HINT}"],
            )
        provider.add_span_processor(BatchSpanProcessor(exporter))
        description = f"OTLP {protocol} to {endpoint} (service.name={SERVICE_NAME})"
    else:
        memory = InMemorySpanExporter()
        provider.add_span_processor(SimpleSpanProcessor(memory))
        description = f"in memory (service.name={SERVICE_NAME})"
    trace.set_tracer_provider(provider)
    # Pin our telemetry to this provider: the global can only be set once per process, and a
    # pinned provider keeps the demo honest even if something set one earlier.
    set_telemetry(Telemetry(tracer_provider=provider))
    return DemoTracing(
        tracer=provider.get_tracer("otel_recovery.demo"),
        description=description,
        provider=provider,
        memory=memory,
    )


def _otlp_exporter(protocol: str) -> Any:
    if protocol.startswith("http"):
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    else:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (  # type: ignore[assignment]
            OTLPSpanExporter,
        )
    return OTLPSpanExporter()
