"""The spans of the seed API and the orchestrator, and the text they and the results show.

``ErrorRecoveryInteraction`` and ``RecoveryOrchestrator`` make their spans here so that
both honour the ``telemetry=`` switch the same way (off: no span, and the caller's span
stays current), time them with the recovery's clock as the engine does, and speak the
library's outcome words. Any text taken from a value or an error on its way into a span or a
result dict goes through :func:`bounded`: redacted and at most ``MAX_VALUE`` characters.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import Any

from opentelemetry import trace
from opentelemetry.trace import Span, SpanKind, Tracer

from otel_recovery._clock import Clock
from otel_recovery._redact import redact_bounded
from otel_recovery.telemetry import Telemetry, get_telemetry

__all__ = [
    "MAX_VALUE",
    "activated",
    "bounded",
    "describe",
    "span_outcome",
    "start_span",
    "tracer_of",
    "type_name",
]


MAX_VALUE = 256


def tracer_of(telemetry: Telemetry | bool) -> Tracer | None:
    """The tracer to use, or None when telemetry is off (or cannot be set up)."""
    if telemetry is False:
        return None
    try:
        return (telemetry if isinstance(telemetry, Telemetry) else get_telemetry()).tracer
    except Exception:  # telemetry must never break recovery
        return None


def start_span(
    tracer: Tracer | None, name: str, attributes: Mapping[str, Any], clock: Clock
) -> Span:
    """An INTERNAL span timed by ``clock`` (like the engine's), or a no-op span."""
    if tracer is None:
        return trace.INVALID_SPAN
    return tracer.start_span(
        name,
        kind=SpanKind.INTERNAL,
        attributes=dict(attributes),
        start_time=int(clock.wall() * 1e9),
    )


@contextlib.contextmanager
def activated(span: Span, tracer: Tracer | None) -> Iterator[None]:
    """Make ``span`` current; with telemetry off, leave the caller's span current instead."""
    if tracer is None:
        yield
        return
    with trace.use_span(
        span, end_on_exit=False, record_exception=False, set_status_on_exception=False
    ):
        yield


def bounded(value: object) -> str:
    try:
        text = value if isinstance(value, str) else str(value)
    except Exception:
        text = f"<unprintable {type(value).__name__}>"
    return redact_bounded(text, MAX_VALUE)


_SPAN_OUTCOMES = {"failed": "failure", "circuit_open": "rejected"}
"""The seed API's ``recovery_status`` values that the recovery spans name otherwise."""


def span_outcome(status: str) -> str:
    """A result's status in the words every recovery span uses (``failure``, not the seed
    API's ``failed``), so one search for ``otel_recovery.outcome=failure`` finds them all."""
    return _SPAN_OUTCOMES.get(status, status)


def type_name(error: BaseException) -> str:
    kind = type(error)
    if kind.__module__ == "builtins":
        return kind.__qualname__
    return f"{kind.__module__}.{kind.__qualname__}"


def describe(error: BaseException) -> str:
    """``"Type: message"``, redacted and bounded, for results and span statuses."""
    text = bounded(error)
    return f"{type(error).__name__}: {text}" if text else type(error).__name__
