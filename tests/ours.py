"""Which exported spans otel-recovery made or marked.

Suppressed calls must leave no trace of ours. Older releases of contrib's instrumentations
(0.45b0, the oldest the project supports) ignore suppression and still make their client
spans, so a test of suppression asks that no span be ours rather than that there be none.
"""

from __future__ import annotations

from collections.abc import Sequence

from opentelemetry.sdk.trace import ReadableSpan


def marked_by_us(spans: Sequence[ReadableSpan]) -> list[ReadableSpan]:
    """Spans from our tracer, or carrying an attribute or an event of ours."""
    return [span for span in spans if _ours(span)]


def _ours(span: ReadableSpan) -> bool:
    scope = span.instrumentation_scope
    return (
        (scope is not None and scope.name.startswith("otel_recovery"))
        or any(key.startswith("otel_recovery.") for key in span.attributes or {})
        or any(event.name.startswith("otel_recovery.") for event in span.events)
    )
