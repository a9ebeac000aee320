"""An in-process OTLP/HTTP trace receiver, fed by the real exporter of a process under test.

Why not an in-memory exporter: the end-to-end tests must prove that what a user sees in Jaeger
(or any OTLP backend) arrives, which means spans that went through ``opentelemetry-instrument``,
the SDK's batch processor, the OTLP protobuf encoding and HTTP. This receiver is the other end
of that wire: an ``http.server`` that decodes ``ExportTraceServiceRequest`` (identity, gzip or
deflate bodies) into plain :class:`ReceivedSpan` records that tests can query. Metrics and logs
requests are accepted and ignored, so a process exporting them does not fail.
"""

from __future__ import annotations

import gzip
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue

__all__ = ["OtlpReceiver", "ReceivedEvent", "ReceivedSpan"]

KIND_NAMES = {
    0: "UNSPECIFIED",
    1: "INTERNAL",
    2: "SERVER",
    3: "CLIENT",
    4: "PRODUCER",
    5: "CONSUMER",
}
STATUS_NAMES = {0: "UNSET", 1: "OK", 2: "ERROR"}


def decode_value(value: AnyValue) -> Any:
    """An OTLP ``AnyValue`` as the Python value it was recorded from."""
    which = value.WhichOneof("value")
    if which is None:
        return None
    if which == "array_value":
        return tuple(decode_value(item) for item in value.array_value.values)
    if which == "kvlist_value":
        return {kv.key: decode_value(kv.value) for kv in value.kvlist_value.values}
    return getattr(value, which)


@dataclass(frozen=True)
class ReceivedEvent:
    name: str
    attributes: dict[str, Any]


@dataclass(frozen=True)
class ReceivedSpan:
    """One span as it arrived: ids in hex, kind and status by name, attributes decoded."""

    name: str
    trace_id: str
    span_id: str
    parent_span_id: str
    kind: str
    status: str
    status_message: str
    attributes: dict[str, Any]
    events: tuple[ReceivedEvent, ...]
    service_name: str
    scope: str
    start_ns: int
    end_ns: int
    resource: dict[str, Any] = field(default_factory=dict)

    def event_names(self) -> list[str]:
        return [event.name for event in self.events]

    def events_named(self, name: str) -> list[ReceivedEvent]:
        return [event for event in self.events if event.name == name]


def decode_request(body: bytes) -> list[ReceivedSpan]:
    """Every span of one ``ExportTraceServiceRequest``."""
    request = ExportTraceServiceRequest()
    request.ParseFromString(body)
    spans = []
    for resource_spans in request.resource_spans:
        resource = {kv.key: decode_value(kv.value) for kv in resource_spans.resource.attributes}
        service = str(resource.get("service.name", ""))
        for scope_spans in resource_spans.scope_spans:
            for span in scope_spans.spans:
                spans.append(
                    ReceivedSpan(
                        name=span.name,
                        trace_id=span.trace_id.hex(),
                        span_id=span.span_id.hex(),
                        parent_span_id=span.parent_span_id.hex(),
                        kind=KIND_NAMES.get(span.kind, str(span.kind)),
                        status=STATUS_NAMES.get(span.status.code, str(span.status.code)),
                        status_message=span.status.message,
                        attributes={kv.key: decode_value(kv.value) for kv in span.attributes},
                        events=tuple(
                            ReceivedEvent(
                                event.name,
                                {kv.key: decode_value(kv.value) for kv in event.attributes},
                            )
                            for event in span.events
                        ),
                        service_name=service,
                        scope=scope_spans.scope.name,
                        start_ns=span.start_time_unix_nano,
                        end_ns=span.end_time_unix_nano,
                        resource=resource,
                    )
                )
    return spans


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    receiver: OtlpReceiver


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        return None

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length)
        encoding = (self.headers.get("Content-Encoding") or "").lower()
        if encoding == "gzip":
            body = gzip.decompress(body)
        elif encoding == "deflate":
            body = zlib.decompress(body)
        if self.path.rstrip("/").endswith("/v1/traces"):
            try:
                self.server.receiver.add(decode_request(body))
            except Exception as error:  # a malformed export is a test failure, not a hang
                self.server.receiver.errors.append(repr(error))
                self.send_response(400)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            payload = ExportTraceServiceResponse().SerializeToString()
        else:
            payload = b""
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)


class OtlpReceiver:
    """``with OtlpReceiver() as receiver:`` point ``OTEL_EXPORTER_OTLP_ENDPOINT`` at
    ``receiver.endpoint`` (http/protobuf), then query ``receiver.spans()`` / ``wait_for``."""

    def __init__(self, host: str = "127.0.0.1") -> None:
        self._server = _Server((host, 0), _Handler)
        self._server.receiver = self
        self._lock = threading.Condition()
        self._spans: list[ReceivedSpan] = []
        self.errors: list[str] = []
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="otlp-receiver", daemon=True
        )

    @property
    def endpoint(self) -> str:
        """The base URL for ``OTEL_EXPORTER_OTLP_ENDPOINT`` (the exporter adds /v1/traces)."""
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    def add(self, spans: list[ReceivedSpan]) -> None:
        with self._lock:
            self._spans.extend(spans)
            self._lock.notify_all()

    def spans(self) -> list[ReceivedSpan]:
        with self._lock:
            return list(self._spans)

    def clear(self) -> None:
        with self._lock:
            self._spans.clear()

    def wait_for(
        self, predicate: Callable[[list[ReceivedSpan]], bool], timeout: float = 10.0
    ) -> list[ReceivedSpan]:
        """Block until ``predicate(all spans so far)`` holds; return the spans either way."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while not predicate(list(self._spans)):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._lock.wait(min(remaining, 0.2))
            return list(self._spans)

    def __enter__(self) -> OtlpReceiver:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()

    def __iter__(self) -> Iterator[ReceivedSpan]:
        return iter(self.spans())
