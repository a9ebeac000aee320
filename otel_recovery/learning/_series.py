"""What a span series is: which finished spans count, and how they are grouped.

A series is ``SeriesKey(service, server address, operation group)``:

- service: the processor's ``service`` argument, else the span resource's ``service.name``;
- server address: ``server.address``, else ``net.peer.name``, else ``""``;
- operation group: ``"<db system> <operation>"`` for database spans, ``"HTTP <method>"`` for
  HTTP clients, ``"<rpc.service>/<rpc.method>"`` for RPC, else the span name.

Old and new semantic-convention names are both read (``db.system`` / ``db.system.name``,
``http.method`` / ``http.request.method``), since contrib emits the old ones by default. The
groups are deliberately coarse (no URL path, no SQL text): series must stay few and stable.
Only CLIENT and PRODUCER spans (calls to dependencies) and otel_recovery's own ``recover ...``
spans count by default.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.trace import SpanKind

from otel_recovery.learning._detector import StreamingDetector
from otel_recovery.learning._error_rate import ErrorRateDetector
from otel_recovery.learning._events import SeriesKey
from otel_recovery.telemetry import attributes as names

__all__ = ["OVERFLOW", "Series", "Signal", "default_include", "key_fields", "series_key"]

_COUNTED_KINDS = frozenset({SpanKind.CLIENT, SpanKind.PRODUCER})
_OWN_PREFIX = names.RECOVERY_SPAN_PREFIX + " "
_MAX_NAME = 100
OVERFLOW = "_overflow"
"""Server address and operation of the series that collects spans beyond ``max_series``."""


def _text(value: object) -> str:
    return str(value)[:_MAX_NAME] if value is not None else ""


def series_key(name: str, attrs: Mapping[str, Any], service: str) -> SeriesKey:
    """The series a span belongs to (see the module docstring for the rules)."""
    return SeriesKey(*key_fields(name, attrs, service))


def key_fields(name: str, attrs: Mapping[str, Any], service: str) -> tuple[str, str, str]:
    """``series_key`` as a plain tuple: hashing a tuple is C code, a dataclass's is not."""
    address = attrs.get("server.address") or attrs.get("net.peer.name") or ""
    system = attrs.get("db.system.name") or attrs.get("db.system")
    if system:
        operation = attrs.get("db.operation.name") or attrs.get("db.operation")
        if not operation:
            operation = name.split(" ", 1)[0] if name else "query"
        group = f"{_text(system)} {_text(operation)}"
    elif attrs.get("http.request.method") or attrs.get("http.method"):
        group = f"HTTP {_text(attrs.get('http.request.method') or attrs.get('http.method'))}"
    elif attrs.get("rpc.method"):
        group = f"{_text(attrs.get('rpc.service'))}/{_text(attrs.get('rpc.method'))}"
    else:
        group = _text(name)
    return (service, _text(address), group)


def default_include(span: ReadableSpan) -> bool:
    return span.kind in _COUNTED_KINDS or span.name.startswith(_OWN_PREFIX)


class Signal:
    """One monitored signal of a series, with its on/off hysteresis."""

    __slots__ = ("active", "calm", "name", "published", "streak")

    def __init__(self, name: str) -> None:
        self.name = name
        self.active = False
        self.streak = 0
        self.calm = 0
        self.published = 0.0


class Series:
    """One dependency series: the open bucket, running totals, detectors and signals."""

    __slots__ = (
        "bucket",
        "calls",
        "calls_detector",
        "error_detector",
        "errors",
        "key",
        "last_bucket",
        "latency",
        "latency_detector",
        "signals",
        "total_calls",
        "total_errors",
    )

    def __init__(
        self,
        key: SeriesKey,
        detector_factory: Callable[[], StreamingDetector] | None,
        error_factory: Callable[[], ErrorRateDetector] | None,
        calls_factory: Callable[[], StreamingDetector] | None = None,
    ) -> None:
        """No factories: an overflow series, counted but never scored. ``detector_factory``
        makes the latency detector, and the calls one unless ``calls_factory`` is given."""
        self.key = key
        self.bucket = -1
        self.last_bucket = -1
        self.calls = 0
        self.errors = 0
        self.latency = 0.0
        self.total_calls = 0
        self.total_errors = 0
        self.error_detector = error_factory() if error_factory else None
        self.latency_detector = detector_factory() if detector_factory else None
        calls = calls_factory or detector_factory
        self.calls_detector = calls() if calls else None
        self.signals = (Signal("error_rate"), Signal("latency"), Signal("calls"))
