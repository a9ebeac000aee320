"""The ASGI RecoveryMiddleware, driven through httpx's ASGITransport: breakers per route,
503 + Retry-After while open, fallbacks, retries only of what is safe to repeat."""

from __future__ import annotations

import asyncio
import functools
import logging
import sys
from typing import Any

import httpx
import pytest
from opentelemetry import trace

from otel_recovery import CircuitBreaker, CircuitOpenError, Fallback, Retry, recover
from otel_recovery._fake_clock import FakeClock
from otel_recovery.middleware import ASGIRecoveryMiddleware
from otel_recovery.middleware.asgi import RecoveryMiddleware
from otel_recovery.policies.backoff import FixedBackoff
from otel_recovery.telemetry import attributes


class App:
    """A tiny ASGI app: /ok answers 200, /boom raises, /down answers 500; counts calls."""

    def __init__(self, failures_before_ok: int = 0) -> None:
        self.calls: dict[str, int] = {}
        self.failures_before_ok = failures_before_ok
        self.bodies: list[bytes] = []

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        path = scope["path"]
        self.calls[path] = self.calls.get(path, 0) + 1
        message = await receive()
        self.bodies.append(message.get("body", b""))
        if path == "/flaky" and self.calls[path] <= self.failures_before_ok:
            raise ConnectionError("the database went away")
        if path == "/boom":
            raise ConnectionError("the database went away")
        if path == "/started-then-boom":
            await send({"type": "http.response.start", "status": 200, "headers": []})
            raise ConnectionError("mid-body")
        status = 500 if path == "/down" else 200
        await send({"type": "http.response.start", "status": status, "headers": []})
        await send({"type": "http.response.body", "body": b"done"})


def _breakers(clock: FakeClock) -> Any:
    return lambda route: CircuitBreaker(2, timeout=10.0, name=route, clock=clock)


def _client(app: Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app, raise_app_exceptions=True),
        base_url="http://test",
    )


async def test_a_failing_route_opens_sheds_with_retry_after_and_recovers_after_a_probe():
    clock = FakeClock()
    app = App()
    middleware = RecoveryMiddleware(app, breaker=_breakers(clock), clock=clock)
    async with _client(middleware) as client:
        for _ in range(2):
            assert (await client.get("/down")).status_code == 500
        shed = await client.get("/down")
        assert shed.status_code == 503
        assert shed.headers["retry-after"] == "10"
        assert app.calls["/down"] == 2  # the open route was not called
        assert (await client.get("/ok")).status_code == 200  # other routes are untouched
        clock.advance(10.0)
        app_down = app.calls["/down"]
        assert (await client.get("/down")).status_code == 500  # the probe reaches the app
        assert app.calls["/down"] == app_down + 1
        assert (await client.get("/down")).status_code == 503  # and re-opened it
    assert middleware.breakers["GET /down"].state.value == "open"
    assert middleware.breakers["GET /ok"].state.value == "closed"


async def test_an_app_error_counts_and_propagates_without_a_fallback():
    clock = FakeClock()
    app = App()
    middleware = RecoveryMiddleware(app, breaker=_breakers(clock), clock=clock)
    async with _client(middleware) as client:
        for _ in range(2):
            with pytest.raises(ConnectionError):
                await client.get("/boom")
        assert (await client.get("/boom")).status_code == 503
    assert app.calls["/boom"] == 2


async def test_a_fallback_answers_errors_and_open_routes():
    clock = FakeClock()
    app = App()
    seen: list[type[BaseException]] = []

    def fallback(route: str, error: BaseException) -> tuple[int, list[tuple[str, str]], bytes]:
        seen.append(type(error))
        return 200, [("content-type", "application/json")], b'{"items": []}'

    middleware = RecoveryMiddleware(app, breaker=_breakers(clock), fallback=fallback, clock=clock)
    async with _client(middleware) as client:
        answers = [await client.get("/boom") for _ in range(3)]
    assert [r.status_code for r in answers] == [200, 200, 200]
    assert answers[2].json() == {"items": []}
    assert seen == [ConnectionError, ConnectionError, CircuitOpenError]
    assert app.calls["/boom"] == 2


async def test_a_safe_request_is_retried_and_counts_once():
    clock = FakeClock()
    app = App(failures_before_ok=2)
    middleware = RecoveryMiddleware(
        app,
        breaker=_breakers(clock),
        retry=Retry(3, backoff=FixedBackoff(0.5)),
        clock=clock,
    )
    async with _client(middleware) as client:
        response = await client.get("/flaky")
    assert response.status_code == 200
    assert app.calls["/flaky"] == 3
    assert clock.sleeps == [0.5, 0.5]
    assert app.bodies == [b"", b"", b""]  # every attempt read the same (empty) request
    snapshot = middleware.breakers["GET /flaky"].snapshot()
    assert (snapshot.successful_calls, snapshot.failed_calls) == (1, 0)


async def test_each_attempt_gets_request_state_as_it_first_came():
    """uvicorn gives every request a ``state`` dict (``request.state``) from the lifespan's:
    what a failed attempt stored there must not be the next attempt's."""
    seen: list[dict[str, Any]] = []

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        seen.append(dict(scope["state"]))
        scope["state"]["user"] = f"from attempt {len(seen)}"
        if len(seen) == 1:
            raise ConnectionError("the database went away")
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"done"})

    clock = FakeClock()
    middleware = RecoveryMiddleware(app, retry=Retry(2, backoff=FixedBackoff(0)), clock=clock)
    messages = iter([{"type": "http.request", "body": b"", "more_body": False}])
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return next(messages, {"type": "http.disconnect"})

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {"type": "http", "method": "GET", "path": "/me", "headers": [], "state": {"db": 1}}
    await middleware(scope, receive, send)
    assert sent[0]["status"] == 200
    assert seen == [{"db": 1}, {"db": 1}]


class CallingApp:
    """An ASGI app whose handler calls a dependency under a policy of ours (``@recover``):
    the dependency fails its first ``failures`` calls; ``/after`` then raises an error of
    the app's own once the dependency answered."""

    def __init__(self, clock: FakeClock, failures: int, retry: Retry | None = None) -> None:
        self.dependency_calls = 0
        self.handler_runs = 0
        self.failures = failures

        @recover(retry=retry or Retry(3, backoff=FixedBackoff(0.1)), clock=clock)
        async def dependency() -> str:
            self.dependency_calls += 1
            if self.dependency_calls <= self.failures:
                raise ConnectionError("the dependency went away")
            return "answer"

        self.dependency = dependency

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        self.handler_runs += 1
        await receive()
        path = scope["path"]
        if path == "/handled":  # the app catches the dependency's failure and goes on
            try:
                await self.dependency()
            except ConnectionError:
                pass
        elif path == "/wrapped":  # the app raises its own error from the dependency's
            try:
                await self.dependency()
            except ConnectionError as error:
                raise ConnectionError("the quote service is unavailable") from error
        else:
            await self.dependency()
        if path in ("/after", "/handled") and self.handler_runs == 1:
            raise ConnectionError("the app's own failure, after the dependency answered")
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"done"})


async def test_a_request_whose_inner_call_gave_up_is_not_retried_on_top(recovery_telemetry):
    """Retries must not multiply across layers: the dependency's policy retried 3 times and
    gave up, so the middleware's Retry(3) does not run the handler again (it would make
    that 9 calls, outside the dependency's budget); the server span says why."""
    clock = FakeClock()
    app = CallingApp(clock, failures=100)
    middleware = RecoveryMiddleware(
        app, breaker=_breakers(clock), retry=Retry(3, backoff=FixedBackoff(0.5)), clock=clock
    )
    tracer = recovery_telemetry.tracer_provider.get_tracer("test")
    with tracer.start_as_current_span("GET /dep", kind=trace.SpanKind.SERVER):
        async with _client(middleware) as client:
            with pytest.raises(ConnectionError):
                await client.get("/dep")
    assert (app.handler_runs, app.dependency_calls) == (1, 3)
    assert clock.sleeps == [0.1, 0.1]  # the dependency's backoff only
    span = recovery_telemetry.span("GET /dep")
    assert span.attributes[attributes.RETRY_DISALLOWED] == "inner_recovery"


async def test_an_inner_call_that_may_not_be_repeated_stops_the_retry_a_recovered_one_not():
    """An inner call its policy may not repeat (``Retry(1)``, as our instrumentors run a
    POST or a SQL statement) failed: decided, so the handler is not run again either (it
    would repeat that call). An inner call that recovered was not decided on, so the app's
    own later failure is the middleware's to retry."""
    clock = FakeClock()
    once = CallingApp(clock, failures=100, retry=Retry(1))
    retry = Retry(3, backoff=FixedBackoff(0.5))
    middleware = RecoveryMiddleware(once, breaker=_breakers(clock), retry=retry, clock=clock)
    async with _client(middleware) as client:
        with pytest.raises(ConnectionError):
            await client.get("/dep")
    assert (once.handler_runs, once.dependency_calls) == (1, 1)
    recovered = CallingApp(clock, failures=1)
    middleware = RecoveryMiddleware(recovered, breaker=_breakers(clock), retry=retry, clock=clock)
    async with _client(middleware) as client:
        assert (await client.get("/after")).status_code == 200
    assert (recovered.handler_runs, recovered.dependency_calls) == (2, 3)


async def test_what_the_app_handled_or_wrapped_is_judged_by_the_error_that_escapes():
    """Only the failure a policy gave up on stops the middleware's retry: an error the app
    raised *from* it is that failure (no retry), while a later, unrelated error after the
    app handled it is not (retried). A fallback's answer is a success, not a give-up."""
    clock = FakeClock()
    retry = Retry(3, backoff=FixedBackoff(0.5))
    wrapped = CallingApp(clock, failures=100)
    middleware = RecoveryMiddleware(wrapped, breaker=_breakers(clock), retry=retry, clock=clock)
    async with _client(middleware) as client:
        with pytest.raises(ConnectionError, match="quote service"):
            await client.get("/wrapped")
    assert (wrapped.handler_runs, wrapped.dependency_calls) == (1, 3)
    handled = CallingApp(clock, failures=100, retry=Retry(1))
    middleware = RecoveryMiddleware(handled, breaker=_breakers(clock), retry=retry, clock=clock)
    async with _client(middleware) as client:
        assert (await client.get("/handled")).status_code == 200
    assert (handled.handler_runs, handled.dependency_calls) == (2, 2)

    fallback_runs = []

    @recover(retry=Retry(2, backoff=FixedBackoff(0.1)), fallback=Fallback("cached"), clock=clock)
    async def quote() -> str:
        raise ConnectionError("the dependency went away")

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        fallback_runs.append(await quote())
        if len(fallback_runs) == 1:
            raise ConnectionError("the app's own failure, after the fallback answered")
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"done"})

    middleware = RecoveryMiddleware(app, breaker=_breakers(clock), retry=retry, clock=clock)
    async with _client(middleware) as client:
        assert (await client.get("/fallback")).status_code == 200
    assert fallback_runs == ["cached", "cached"]


@pytest.mark.skipif(sys.version_info < (3, 11), reason="asyncio.TaskGroup is 3.11+")
async def test_a_task_groups_give_up_is_not_retried_on_top():
    """A handler that runs its dependency in a ``TaskGroup`` gets an ``ExceptionGroup``:
    every member given up on, so not retried (found by review: 3 x 3 = 9 calls)."""
    clock = FakeClock()
    dependency = CallingApp(clock, failures=100).dependency
    runs: list[str] = []

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        runs.append("handler")
        async with asyncio.TaskGroup() as group:  # type: ignore[attr-defined]
            group.create_task(dependency())

    retry = Retry(3, backoff=FixedBackoff(0.5))
    middleware = RecoveryMiddleware(app, breaker=_breakers(clock), retry=retry, clock=clock)
    async with _client(middleware) as client:
        with pytest.raises(BaseException) as caught:
            await client.get("/group")
    assert type(caught.value).__name__ == "ExceptionGroup"
    assert runs == ["handler"] and clock.sleeps == [0.1, 0.1]


async def test_a_post_and_a_consumed_body_are_never_retried():
    clock = FakeClock()
    app = App(failures_before_ok=5)
    retry = Retry(3, backoff=FixedBackoff(0.5))
    middleware = RecoveryMiddleware(app, breaker=_breakers(clock), retry=retry, clock=clock)
    async with _client(middleware) as client:
        with pytest.raises(ConnectionError):
            await client.post("/flaky", content=b"order")
        assert app.calls["/flaky"] == 1
        with pytest.raises(ConnectionError):  # an Idempotency-Key, but the body was read
            await client.post("/flaky", content=b"order", headers={"Idempotency-Key": "k1"})
        assert app.calls["/flaky"] == 2
    assert clock.sleeps == []


async def test_an_idempotency_key_allows_a_bodiless_retry():
    clock = FakeClock()
    app = App(failures_before_ok=1)
    middleware = RecoveryMiddleware(
        app, breaker=_breakers(clock), retry=Retry(2, backoff=FixedBackoff(0.1)), clock=clock
    )
    async with _client(middleware) as client:
        response = await client.delete("/flaky", headers={"Idempotency-Key": "k2"})
    assert response.status_code == 200
    assert app.calls["/flaky"] == 2


async def test_an_error_after_the_response_started_is_not_retried_nor_replaced():
    clock = FakeClock()
    app = App()
    middleware = RecoveryMiddleware(
        app,
        breaker=_breakers(clock),
        retry=Retry(3),
        fallback=(200, [], b"fallback"),
        clock=clock,
    )
    async with _client(middleware) as client:
        with pytest.raises(ConnectionError):
            await client.get("/started-then-boom")
    assert app.calls["/started-then-boom"] == 1
    assert middleware.breakers["GET /started-then-boom"].snapshot().failed_calls == 1


async def test_the_shed_request_is_marked_on_the_current_span(recovery_telemetry):
    clock = FakeClock()
    app = App()
    middleware = RecoveryMiddleware(app, breaker=_breakers(clock), clock=clock)
    tracer = recovery_telemetry.tracer_provider.get_tracer("test")
    async with _client(middleware) as client:
        for _ in range(2):
            await client.get("/down")
        with tracer.start_as_current_span("GET /down", kind=trace.SpanKind.SERVER):
            assert (await client.get("/down")).status_code == 503
    span = recovery_telemetry.span("GET /down")
    assert span.attributes[attributes.BREAKER_STATE] == "open"
    event = next(e for e in span.events if e.name == attributes.EVENT_REJECTED)
    assert event.attributes[attributes.REJECTED_BY] == "circuit_breaker"
    assert event.attributes[attributes.BREAKER_NAME] == "GET /down"
    assert event.attributes[attributes.BREAKER_RETRY_AFTER] == 10.0


async def test_a_fallback_is_marked_with_the_error_it_answered(recovery_telemetry):
    app = App()
    middleware = RecoveryMiddleware(app, fallback=(200, [], b"cached"))
    tracer = recovery_telemetry.tracer_provider.get_tracer("test")
    async with _client(middleware) as client:
        with tracer.start_as_current_span("GET /boom", kind=trace.SpanKind.SERVER):
            assert (await client.get("/boom")).text == "cached"
    event = next(
        e
        for e in recovery_telemetry.span("GET /boom").events
        if e.name == attributes.EVENT_FALLBACK
    )
    assert event.attributes[attributes.ERROR_TYPE] == "ConnectionError"


async def test_non_http_scopes_and_a_broken_route_function_pass_through(caplog):
    app = App()
    lifespan: list[str] = []

    async def lifespan_app(scope: Any, receive: Any, send: Any) -> None:
        lifespan.append(scope["type"])

    middleware = RecoveryMiddleware(lifespan_app)
    await middleware({"type": "lifespan"}, None, None)  # type: ignore[arg-type]
    assert lifespan == ["lifespan"]

    def broken_route(scope: Any) -> str:
        raise KeyError("no route")

    middleware = RecoveryMiddleware(app, route=broken_route)
    with caplog.at_level(logging.ERROR, logger="otel_recovery"):
        async with _client(middleware) as client:
            assert (await client.get("/ok")).status_code == 200
            assert (await client.get("/ok")).status_code == 200
    assert app.calls["/ok"] == 2
    assert sum("ASGI RecoveryMiddleware" in r.getMessage() for r in caplog.records) == 1


async def test_past_max_routes_new_routes_pass_through_with_one_warning(caplog):
    app = App()
    middleware = RecoveryMiddleware(app, max_routes=1)
    with caplog.at_level(logging.WARNING, logger="otel_recovery.middleware"):
        async with _client(middleware) as client:
            for path in ("/ok", "/a", "/b"):
                await client.get(path)
    assert sum("Pass route=" in r.getMessage() for r in caplog.records) == 1
    with pytest.raises(KeyError):
        middleware.breakers["GET /a"]


def test_bad_options_fail_at_construction_naming_the_fix():
    app = App()
    with pytest.raises(TypeError, match="breaker must be a CircuitBreaker"):
        RecoveryMiddleware(app, breaker="yes")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="max_routes must be an int >= 1"):
        RecoveryMiddleware(app, max_routes=0)
    with pytest.raises(TypeError, match=r"fallback must be \(status"):
        RecoveryMiddleware(app, fallback=(200, "nope"))  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="retry must be a Retry"):
        RecoveryMiddleware(app, retry=3)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="route must be a function"):
        RecoveryMiddleware(app, route="/orders")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="app must be an ASGI application"):
        RecoveryMiddleware(None)


def test_the_package_re_exports_the_asgi_middleware():
    assert ASGIRecoveryMiddleware is RecoveryMiddleware


class _LookupFailed(Exception):
    """An application's own exception class: its error.type is module-qualified."""


async def test_a_fallbacks_error_type_is_qualified_as_the_librarys_are(recovery_telemetry):
    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        raise _LookupFailed("no such user")

    middleware = RecoveryMiddleware(app, fallback=(200, [], b"cached"))
    tracer = recovery_telemetry.tracer_provider.get_tracer("test")
    async with _client(middleware) as client:
        with tracer.start_as_current_span("GET /me", kind=trace.SpanKind.SERVER):
            assert (await client.get("/me")).text == "cached"
    event = next(
        e for e in recovery_telemetry.span("GET /me").events if e.name == attributes.EVENT_FALLBACK
    )
    assert event.attributes[attributes.ERROR_TYPE] == f"{__name__}._LookupFailed"


async def _get(middleware: Any, scope: dict[str, Any]) -> list[dict[str, Any]]:
    """One request straight through ``middleware`` (no client in between): the messages
    the server was sent."""
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await middleware(scope, receive, send)
    return sent


def _http(path: str, **extra: Any) -> dict[str, Any]:
    return {"type": "http", "method": "GET", "path": path, "headers": [], **extra}


@pytest.mark.parametrize(
    ("status", "more_body", "counted"),
    [
        (200, False, (1, 0)),  # the client has its whole 200: a success
        (500, False, (0, 1)),  # a whole 500 is a failure, by its status
        (200, True, (0, 1)),  # the body was cut short: the request failed
    ],
)
async def test_an_error_after_the_whole_response_counts_by_its_status(status, more_body, counted):
    """A Starlette ``BackgroundTask`` that fails after a complete response counted as a
    failure: the route opened, and later clients got 503 where the app answers 200 (found
    by review). The error still reaches the server, the same object."""
    clock = FakeClock()
    raised: list[BaseException] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await receive()
        await send({"type": "http.response.start", "status": status, "headers": []})
        await send({"type": "http.response.body", "body": b"done", "more_body": more_body})
        raised.append(RuntimeError("the analytics call after the response failed"))
        raise raised[-1]

    middleware = RecoveryMiddleware(app, breaker=_breakers(clock), clock=clock)
    with pytest.raises(RuntimeError) as caught:
        await _get(middleware, _http("/report"))
    assert caught.value is raised[0]
    snapshot = middleware.breakers["GET /report"].snapshot()
    assert (snapshot.successful_calls, snapshot.failed_calls) == counted


async def test_a_failing_starlette_background_task_never_opens_the_route():
    pytest.importorskip("starlette")
    from starlette.applications import Starlette
    from starlette.background import BackgroundTask
    from starlette.responses import PlainTextResponse
    from starlette.routing import Route

    clock = FakeClock()
    ran: list[int] = []

    def send_analytics() -> None:
        raise RuntimeError("analytics endpoint unreachable")

    async def report(request: Any) -> PlainTextResponse:
        ran.append(1)
        return PlainTextResponse("report ready", background=BackgroundTask(send_analytics))

    app = Starlette(routes=[Route("/report", report)])
    app.add_middleware(RecoveryMiddleware, breaker=_breakers(clock), clock=clock)
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        answers = [await client.get("/report") for _ in range(4)]
    assert [(r.status_code, r.text) for r in answers] == [(200, "report ready")] * 4
    assert len(ran) == 4


async def test_after_a_retry_the_layers_outside_read_what_the_answering_attempt_left():
    """The scope and its ``state`` are put back in place, not replaced: an outer access log
    or metrics middleware read the failed attempt's ``request.state`` while the response
    came from the retry (found by review)."""
    clock = FakeClock()
    attempts: list[int] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        attempts.append(len(attempts) + 1)
        scope["state"]["attempt"] = attempts[-1]
        scope["endpoint"] = f"attempt {attempts[-1]}"
        await receive()
        if len(attempts) == 1:
            scope["failed"] = True
            raise ConnectionError("the database went away")
        scope["state"]["order_id"] = 7
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"order 7"})

    middleware = RecoveryMiddleware(app, retry=Retry(2, backoff=FixedBackoff(0.1)), clock=clock)
    state = {"db": "from lifespan"}
    scope = _http("/orders/7", state=state)
    sent = await _get(middleware, scope)
    assert sent[0]["status"] == 200 and attempts == [1, 2]
    assert scope["state"] is state
    assert state == {"db": "from lifespan", "attempt": 2, "order_id": 7}
    assert scope["endpoint"] == "attempt 2" and "failed" not in scope


async def test_a_retry_sees_the_headers_as_they_came_though_a_layer_appended_in_place():
    """``dict(scope)`` shared the headers list: an inner middleware's
    ``scope["headers"].append(...)`` reached the retry twice (found by review)."""
    clock = FakeClock()
    seen: list[list[tuple[bytes, bytes]]] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        scope["headers"].append((b"x-request-id", b"abc"))
        seen.append(list(scope["headers"]))
        await receive()
        if len(seen) == 1:
            raise ConnectionError("the database went away")
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    middleware = RecoveryMiddleware(app, retry=Retry(2, backoff=FixedBackoff(0.1)), clock=clock)
    headers = [(b"host", b"test")]
    scope = _http("/x")
    scope["headers"] = headers
    await _get(middleware, scope)
    once = [(b"host", b"test"), (b"x-request-id", b"abc")]
    assert seen == [once, once]
    assert scope["headers"] is headers and headers == once  # as the bare app leaves it


class _ASGI2App:
    """A double-callable app: ``app(scope)`` makes the instance that takes the channels."""

    def __init__(self, scope: Any) -> None:
        self.scope = scope

    async def __call__(self, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"asgi2"})


def test_an_asgi2_app_is_refused_at_construction_naming_the_fix():
    """Accepted, it failed every request with a 500 (found by review)."""
    with pytest.raises(TypeError, match=r"ASGI2 \(double-callable\).*guarantee_single_callable"):
        RecoveryMiddleware(_ASGI2App)


class _AwaitableApp:
    """An ASGI3 app written as a class: uvicorn's test accepts it (it has ``__await__``)."""

    def __init__(self, scope: Any, receive: Any, send: Any) -> None:
        self.send = send

    def __await__(self) -> Any:
        return _ok(None, None, self.send).__await__()


async def _ok(scope: Any, receive: Any, send: Any, body: bytes = b"ok") -> None:
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": body})


class _Instance:
    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        await _ok(scope, receive, send)


def _starlette_app() -> Any:
    pytest.importorskip("starlette")
    from starlette.applications import Starlette
    from starlette.responses import PlainTextResponse
    from starlette.routing import Route

    async def ok(request: Any) -> PlainTextResponse:
        return PlainTextResponse("ok")

    return Starlette(routes=[Route("/", ok)])


@pytest.mark.parametrize(
    "make",
    [
        lambda: _ok,
        lambda: _Instance(),
        lambda: functools.partial(_ok, body=b"ok"),
        lambda: _AwaitableApp,
        _starlette_app,
    ],
    ids=["function", "instance", "partial", "awaitable-class", "starlette"],
)
async def test_asgi3_apps_of_every_shape_are_accepted_and_served(make):
    async with _client(RecoveryMiddleware(make())) as client:
        response = await client.get("/")
    assert (response.status_code, response.text) == (200, "ok")
