"""Regression tests from the review of the middlewares: every permit a breaker hands out
ends in exactly one outcome or release, retries see the request as it first came, and
what is not the route's fault never counts against it."""

from __future__ import annotations

import asyncio
import gc
import logging
from typing import Any

import pytest

from otel_recovery import CircuitBreaker, Retry
from otel_recovery._fake_clock import FakeClock
from otel_recovery.middleware import asgi, wsgi
from otel_recovery.middleware._route_breakers import default_breaker
from otel_recovery.policies.backoff import FixedBackoff


def _half_open(clock: FakeClock) -> CircuitBreaker:
    breaker = CircuitBreaker(1, timeout=10.0, name="r", clock=clock)
    breaker.record_failure()
    clock.advance(10.0)
    return breaker


def _scope(path: str = "/x", headers: list[Any] | None = None) -> dict[str, Any]:
    return {
        "type": "http",
        "method": "GET",
        "path": path,
        "root_path": "",
        "headers": headers or [],
    }


async def _empty() -> dict[str, Any]:
    return {"type": "http.request", "body": b"", "more_body": False}


def _collector(sent: list[dict[str, Any]]) -> Any:
    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    return send


async def _ok(scope: Any, receive: Any, send: Any) -> None:
    await receive()
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"ok"})


def _environ(path: str = "/x") -> dict[str, Any]:
    return {"REQUEST_METHOD": "GET", "PATH_INFO": path, "SCRIPT_NAME": "", "CONTENT_LENGTH": ""}


def _start_response(status: str, headers: Any, exc_info: Any = None) -> Any:
    return lambda data: None


async def test_asgi_cancelled_while_waiting_to_retry_gives_the_probe_permit_back():
    clock = _SlowClock()
    breaker = _half_open(clock)

    async def failing(scope: Any, receive: Any, send: Any) -> None:
        await receive()
        raise ConnectionError("db down")

    middleware = asgi.RecoveryMiddleware(
        failing, breaker=breaker, retry=Retry(3, backoff=FixedBackoff(1)), clock=clock
    )
    task = asyncio.ensure_future(middleware(_scope(), _empty, _collector([])))
    await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert breaker.state.value == "half_open" and breaker.can_execute()


class _SlowClock(FakeClock):
    async def asleep(self, seconds: float) -> None:
        await asyncio.sleep(3600)


def test_wsgi_interrupted_while_waiting_to_retry_gives_the_probe_permit_back():
    class Interrupting(FakeClock):
        def sleep(self, seconds: float) -> None:
            raise KeyboardInterrupt

    clock = Interrupting()
    breaker = _half_open(clock)

    def failing(environ: Any, start_response: Any) -> Any:
        raise ConnectionError("db down")

    middleware = wsgi.RecoveryMiddleware(
        failing, breaker=breaker, retry=Retry(3, backoff=FixedBackoff(1)), clock=clock
    )
    with pytest.raises(KeyboardInterrupt):
        middleware(_environ(), _start_response)
    assert breaker.can_execute()


async def test_asgi_str_headers_from_an_outer_middleware_do_not_break_the_request():
    clock = FakeClock()
    middleware = asgi.RecoveryMiddleware(_ok, breaker=_half_open(clock), retry=Retry(2))
    sent: list[dict[str, Any]] = []
    await middleware(
        _scope(headers=[(b"host", b"x"), ("x-forwarded-for", "1.2.3.4")]), _empty, _collector(sent)
    )
    assert sent[0]["status"] == 200


async def test_a_broken_is_failure_is_logged_once_and_counts_nothing(caplog):
    clock = FakeClock()
    breaker = _half_open(clock)

    def is_failure(status: int) -> bool:
        raise RuntimeError("predicate bug")

    middleware = asgi.RecoveryMiddleware(_ok, breaker=breaker, is_failure=is_failure)
    with caplog.at_level(logging.ERROR, logger="otel_recovery"):
        for _ in range(2):
            sent: list[dict[str, Any]] = []
            await middleware(_scope(), _empty, _collector(sent))
            assert sent[0]["status"] == 200
    assert breaker.can_execute()
    assert sum("middleware is_failure" in r.getMessage() for r in caplog.records) == 1


async def test_asgi_a_retry_sees_the_scope_as_it_first_came():
    """Starlette's Router updates the scope in place (Mount extends root_path)."""
    clock = FakeClock()
    seen: list[str] = []

    async def mounted(scope: Any, receive: Any, send: Any) -> None:
        seen.append(scope["root_path"])
        scope["root_path"] += "/api"
        await receive()
        if len(seen) == 1:
            raise ConnectionError("transient")
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    middleware = asgi.RecoveryMiddleware(
        mounted, retry=Retry(2, backoff=FixedBackoff(0.1)), clock=clock
    )
    sent: list[dict[str, Any]] = []
    await middleware(_scope("/api/items"), _empty, _collector(sent))
    assert seen == ["", ""] and sent[0]["status"] == 200


def test_wsgi_a_retry_sees_the_environ_as_it_first_came():
    """werkzeug's DispatcherMiddleware moves PATH_INFO into SCRIPT_NAME in place."""
    clock = FakeClock()
    seen: list[str] = []

    def dispatcher(environ: Any, start_response: Any) -> Any:
        seen.append(environ["PATH_INFO"])
        environ["SCRIPT_NAME"] += "/api"
        environ["PATH_INFO"] = environ["PATH_INFO"][4:]
        if len(seen) == 1:
            raise ConnectionError("transient")
        start_response("200 OK", [])
        return [b"api"]

    middleware = wsgi.RecoveryMiddleware(
        dispatcher, retry=Retry(2, backoff=FixedBackoff(0.1)), clock=clock
    )
    assert b"".join(middleware(_environ("/api/items"), _start_response)) == b"api"
    assert seen == ["/api/items", "/api/items"]


async def test_a_client_that_went_away_does_not_count_against_the_route():
    clock = FakeClock()
    breaker = CircuitBreaker(2, timeout=10.0, name="r", clock=clock)

    async def gone() -> dict[str, Any]:
        return {"type": "http.disconnect"}

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if (await receive())["type"] == "http.disconnect":
            return

    middleware = asgi.RecoveryMiddleware(app, breaker=breaker)
    for _ in range(3):
        await middleware(_scope(), gone, _collector([]))
    assert breaker.state.value == "closed"
    assert breaker.snapshot().failed_calls == 0


def test_wsgi_the_app_closes_once_when_the_server_stops_early():
    closes: list[int] = []

    class Body:
        def __init__(self) -> None:
            self.chunks = iter([b"a", b"b", b"c"])

        def __iter__(self) -> Any:
            return self

        def __next__(self) -> bytes:
            return next(self.chunks)

        def close(self) -> None:
            closes.append(1)

    def app(environ: Any, start_response: Any) -> Any:
        start_response("200 OK", [])
        return Body()

    result = wsgi.RecoveryMiddleware(app)(_environ(), _start_response)
    iterator = iter(result)
    next(iterator)
    result.close()  # type: ignore[attr-defined]
    del iterator
    gc.collect()
    assert closes == [1]


def test_wsgi_closed_unread_a_lazy_app_leaves_the_probe_uncounted():
    clock = FakeClock()
    breaker = _half_open(clock)

    def lazy(environ: Any, start_response: Any) -> Any:
        start_response("200 OK", [])
        yield b"ok"

    result = wsgi.RecoveryMiddleware(lazy, breaker=breaker)(_environ(), _start_response)
    result.close()  # type: ignore[attr-defined]
    assert breaker.state.value == "half_open" and breaker.can_execute()


def test_wsgi_a_list_body_goes_back_as_it_came_and_counts_at_once():
    clock = FakeClock()
    breaker = CircuitBreaker(2, timeout=10.0, name="r", clock=clock)

    def app(environ: Any, start_response: Any) -> Any:
        start_response("200 OK", [])
        return [b"ok"]

    result = wsgi.RecoveryMiddleware(app, breaker=breaker)(_environ(), _start_response)
    assert result == [b"ok"] and len(result) == 1  # type: ignore[arg-type]
    assert breaker.snapshot().successful_calls == 1


async def test_a_retry_never_waits_past_the_deadline():
    clock = FakeClock()
    calls: list[int] = []

    async def failing(scope: Any, receive: Any, send: Any) -> None:
        calls.append(1)
        await receive()
        raise ConnectionError("down")

    middleware = asgi.RecoveryMiddleware(
        failing,
        retry=Retry(5, deadline=1.0, backoff=FixedBackoff(0.6)),
        clock=clock,
        fallback=(503, [], b"later"),
    )
    sent: list[dict[str, Any]] = []
    await middleware(_scope(), _empty, _collector(sent))
    assert len(calls) == 2 and clock.sleeps == [0.6]
    assert sent[0]["status"] == 503


def test_retry_options_the_middleware_cannot_honour_are_refused():
    with pytest.raises(ValueError, match="cannot time out an app attempt"):
        asgi.RecoveryMiddleware(_ok, retry=Retry(3, attempt_timeout=1.0))


def test_a_fallback_header_with_a_line_break_is_refused_at_construction():
    with pytest.raises(TypeError, match="no line breaks"):
        wsgi.RecoveryMiddleware(_ok, fallback=(503, [("x-route", "a\r\nSet-Cookie: x")], b""))


def test_default_route_breakers_stay_in_the_process(monkeypatch):
    monkeypatch.setenv("OTEL_RECOVERY_STORE_URL", "redis://127.0.0.1:1/0")
    assert type(default_breaker("GET /health")) is CircuitBreaker
