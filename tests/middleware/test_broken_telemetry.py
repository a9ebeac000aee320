"""A span that raises (a vendor bridge's bug, a broken tracer) must not change what the
middlewares answer: the 503 of an open route, the fallback and the retry go on as if the span
had been marked, and the failure is logged once (found by review: the telemetry's error
reached the server in place of the response)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from opentelemetry import trace
from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags

from otel_recovery import CircuitBreaker, Retry, recover
from otel_recovery._fake_clock import FakeClock
from otel_recovery.instrumentors import _wrapping
from otel_recovery.middleware import asgi, wsgi
from otel_recovery.policies.backoff import FixedBackoff


class BrokenSpan(NonRecordingSpan):
    """A recording span whose every write raises."""

    def __init__(self) -> None:
        super().__init__(SpanContext(1, 1, False, TraceFlags(1)))

    def is_recording(self) -> bool:
        return True

    def add_event(self, *args: Any, **kwargs: Any) -> None:
        raise RuntimeError("telemetry backend bug in add_event")

    def set_attribute(self, *args: Any, **kwargs: Any) -> None:
        raise RuntimeError("telemetry backend bug in set_attribute")


@pytest.fixture
def reported(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> Iterator[Any]:
    """Internal errors are logged once per process: start from none reported."""
    monkeypatch.setattr(_wrapping, "_reported", set())
    with caplog.at_level(logging.ERROR, logger="otel_recovery"):
        yield lambda: sum("middleware span" in r.getMessage() for r in caplog.records)


def _open_breaker() -> CircuitBreaker:
    breaker = CircuitBreaker(1, timeout=60.0, name="r", clock=FakeClock())
    breaker.record_failure()
    return breaker


def _options(case: str) -> dict[str, Any]:
    if case == "shed":
        return {"breaker": _open_breaker()}
    if case == "fallback":
        return {"fallback": (503, [("x-fallback", "1")], b"later")}
    return {"retry": Retry(2, backoff=FixedBackoff(0.5)), "clock": FakeClock()}


EXPECTED = {"shed": (503, 0), "fallback": (503, 1), "retry": (200, 2)}
"""Per case, (the status answered, the app's calls): what a healthy span gives."""


async def _asgi(middleware: Any, path: str) -> int:
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {"type": "http", "method": "GET", "path": path, "headers": []}
    with trace.use_span(BrokenSpan(), end_on_exit=False):
        await middleware(scope, receive, send)
    return int(sent[0]["status"])


def _wsgi(middleware: Any, path: str) -> int:
    statuses: list[str] = []

    def start_response(status: str, headers: Any, exc_info: Any = None) -> Any:
        statuses.append(status)
        return lambda data: None

    environ = {"REQUEST_METHOD": "GET", "PATH_INFO": path, "CONTENT_LENGTH": ""}
    with trace.use_span(BrokenSpan(), end_on_exit=False):
        body = middleware(environ, start_response)
        b"".join(body)
        getattr(body, "close", lambda: None)()
    return int(statuses[-1].split()[0])


def _failing_first(calls: list[int]) -> Callable[[str], None]:
    """Raises on the app's first call, and on every call to /down."""

    def step(path: str) -> None:
        calls.append(1)
        if path == "/down" or len(calls) == 1:
            raise ConnectionError("the database went away")

    return step


@pytest.mark.parametrize("case", ["shed", "fallback", "retry"])
async def test_asgi_a_span_that_raises_changes_no_answer(case, reported):
    calls: list[int] = []
    step = _failing_first(calls)

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await receive()
        step(scope["path"])
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    path = "/flaky" if case == "retry" else "/down"
    for _ in range(2):
        calls.clear()
        status = await _asgi(asgi.RecoveryMiddleware(app, **_options(case)), path)
        assert (status, len(calls)) == EXPECTED[case]
    assert reported() == 1


@pytest.mark.parametrize("case", ["shed", "fallback", "retry"])
def test_wsgi_a_span_that_raises_changes_no_answer(case, reported):
    calls: list[int] = []
    step = _failing_first(calls)

    def app(environ: Any, start_response: Any) -> Any:
        step(environ["PATH_INFO"])
        start_response("200 OK", [])
        return [b"ok"]

    path = "/flaky" if case == "retry" else "/down"
    for _ in range(2):
        calls.clear()
        status = _wsgi(wsgi.RecoveryMiddleware(app, **_options(case)), path)
        assert (status, len(calls)) == EXPECTED[case]
    assert reported() == 1


async def test_a_span_that_raises_leaves_the_apps_own_error_when_an_inner_call_gave_up(
    reported,
):
    """The "not retried: inner recovery" attribute is the other write: the app's error must
    reach the server, not the telemetry's."""
    clock = FakeClock()

    @recover(retry=Retry(2, backoff=FixedBackoff(0.1)), clock=clock)
    async def dependency() -> None:
        raise ConnectionError("the dependency went away")

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await dependency()

    middleware = asgi.RecoveryMiddleware(
        app, retry=Retry(3, backoff=FixedBackoff(0.5)), clock=clock
    )
    with pytest.raises(ConnectionError, match="dependency"):
        await _asgi(middleware, "/dep")
    assert clock.sleeps == [0.1]  # the dependency's own retry; the request was not retried
    assert reported() == 1
