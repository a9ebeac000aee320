"""Whether the current context asks instrumentation to stay quiet.

The SDK's exporters run under ``suppress_instrumentation()``, and so does user code that
wants a block untraced. A recovery of ours inside such a block (a span exporter whose send
is wrapped in ``@recover``) must record nothing: its span would be exported by the same
exporter, fail with it, and be recovered again, one span per failed export, for as long as
the collector is down. The recovery itself still runs; only its telemetry is left out.
"""

from __future__ import annotations

from opentelemetry import context as otel_context

__all__ = ["LEGACY_SUPPRESS_KEY", "SUPPRESS_KEY", "telemetry_suppressed"]

try:  # the key the SDK exporters and suppress_instrumentation() set
    from opentelemetry.context import _SUPPRESS_INSTRUMENTATION_KEY as SUPPRESS_KEY
except ImportError:  # pragma: no cover - an API without the private key
    SUPPRESS_KEY = "suppress_instrumentation"
LEGACY_SUPPRESS_KEY = "suppress_instrumentation"
"""What ``is_instrumentation_enabled()`` also honours, for older instrumentations."""


def telemetry_suppressed() -> bool:
    """True inside ``suppress_instrumentation()`` (or the exporters' own calls)."""
    return bool(otel_context.get_value(SUPPRESS_KEY) or otel_context.get_value(LEGACY_SUPPRESS_KEY))
