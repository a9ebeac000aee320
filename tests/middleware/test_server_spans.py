"""Inside OpenTelemetry's own ASGI and WSGI middlewares, the recovery middleware's decisions
land on the server span: what a user reads in Jaeger for a request an open route shed."""

from __future__ import annotations

from typing import Any

import httpx
from opentelemetry.instrumentation.asgi import OpenTelemetryMiddleware as OtelASGI
from opentelemetry.instrumentation.wsgi import OpenTelemetryMiddleware as OtelWSGI
from opentelemetry.trace import SpanKind, StatusCode

from otel_recovery import CircuitBreaker
from otel_recovery._fake_clock import FakeClock
from otel_recovery.middleware import ASGIRecoveryMiddleware, WSGIRecoveryMiddleware
from otel_recovery.telemetry import attributes


async def _down(scope: Any, receive: Any, send: Any) -> None:
    await receive()
    await send({"type": "http.response.start", "status": 500, "headers": []})
    await send({"type": "http.response.body", "body": b"down"})


def _down_wsgi(environ: Any, start_response: Any) -> Any:
    start_response("500 Internal Server Error", [("Content-Type", "text/plain")])
    return [b"down"]


def _breakers(clock: FakeClock) -> Any:
    return lambda route: CircuitBreaker(1, timeout=20.0, name=route, clock=clock)


def _shed_span(captured: Any) -> Any:
    servers = [s for s in captured.spans() if s.kind is SpanKind.SERVER]
    assert len(servers) == 2, [s.name for s in captured.spans()]
    return servers[1]


def _assert_shed(span: Any) -> None:
    assert span.attributes[attributes.BREAKER_STATE] == "open"
    status_code = span.attributes.get(
        "http.status_code", span.attributes.get("http.response.status_code")
    )
    assert status_code == 503
    assert span.status.status_code is StatusCode.ERROR
    event = next(e for e in span.events if e.name == attributes.EVENT_REJECTED)
    assert event.attributes[attributes.REJECTED_BY] == "circuit_breaker"
    assert event.attributes[attributes.BREAKER_RETRY_AFTER] == 20.0


async def test_an_asgi_request_shed_by_an_open_route_is_marked_on_the_server_span(
    recovery_telemetry,
):
    clock = FakeClock()
    guarded = ASGIRecoveryMiddleware(_down, breaker=_breakers(clock), clock=clock)
    app = OtelASGI(guarded, tracer_provider=recovery_telemetry.tracer_provider)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        assert (await client.get("/orders")).status_code == 500
        shed = await client.get("/orders")
    assert (shed.status_code, shed.headers["retry-after"]) == (503, "20")
    _assert_shed(_shed_span(recovery_telemetry))


def test_a_wsgi_request_shed_by_an_open_route_is_marked_on_the_server_span(recovery_telemetry):
    clock = FakeClock()
    guarded = WSGIRecoveryMiddleware(_down_wsgi, breaker=_breakers(clock), clock=clock)
    app = OtelWSGI(guarded, tracer_provider=recovery_telemetry.tracer_provider)
    with httpx.Client(transport=httpx.WSGITransport(app=app), base_url="http://test") as client:
        assert client.get("/orders").status_code == 500
        shed = client.get("/orders")
    assert (shed.status_code, shed.headers["retry-after"]) == (503, "20")
    _assert_shed(_shed_span(recovery_telemetry))
