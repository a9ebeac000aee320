"""``http.request.resend_count`` on the client span of every HTTP resend.

The HTTP conventions want one CLIENT span per attempt (contrib's) and, on resends, the stable
attribute ``http.request.resend_count``. Contrib creates those spans inside our retry loop,
out of our reach, so a span processor stamps them at start from the claim an HTTP
instrumentor's policy publishes for each resend (:class:`otel_recovery._attempt.ResendClaim`):
the first HTTP client span of that attempt takes it. A request made in a retry of anything
else (a recovered function, a Redis command), or inside the resent one, is a first send.
"""

from __future__ import annotations

import weakref
from typing import Any

from opentelemetry.context import Context
from opentelemetry.sdk.trace import ReadableSpan, Span, SpanProcessor
from opentelemetry.trace import SpanKind

from otel_recovery._attempt import RESEND
from otel_recovery._forksafe import new_lock
from otel_recovery.telemetry.attributes import HTTP_REQUEST_RESEND_COUNT

__all__ = ["ResendCountSpanProcessor", "install_resend_processor"]

_HTTP_METHOD_KEYS = ("http.request.method", "http.method")
_current_claim = RESEND.get  # one Python call less per span
_installed: weakref.WeakSet[Any] = weakref.WeakSet()
_lock = new_lock()


class ResendCountSpanProcessor(SpanProcessor):
    """Sets ``http.request.resend_count = attempt - 1`` on HTTP CLIENT spans of resends."""

    def on_start(self, span: Span, parent_context: Context | None = None) -> None:
        claim = _current_claim()
        if claim is None or not claim.count or span.kind is not SpanKind.CLIENT:
            return
        attributes = span.attributes or {}
        if any(key in attributes for key in _HTTP_METHOD_KEYS):
            span.set_attribute(HTTP_REQUEST_RESEND_COUNT, claim.take())

    def on_end(self, span: ReadableSpan) -> None:
        return None


def install_resend_processor(tracer_provider: Any) -> bool:
    """Add the processor to an SDK tracer provider once; False if it cannot take processors."""
    add = getattr(tracer_provider, "add_span_processor", None)
    if add is None:
        return False
    with _lock:
        if tracer_provider in _installed:
            return True
        _installed.add(tracer_provider)
    add(ResendCountSpanProcessor())
    return True
