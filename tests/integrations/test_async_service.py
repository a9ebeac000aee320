"""An async service under uvicorn with all three kinds of client, with real faults.

Why: the instrumentor and middleware tests drive each piece on its own, in the test's event
loop. A production async service is all of them at once: uvicorn's server loop, contrib's
``OpenTelemetryMiddleware`` making the server span, our ``RecoveryMiddleware`` inside
Starlette, and handlers whose httpx, asyncpg and redis.asyncio calls go through our layers
(retry inline, per-server breakers, budgets). What the service depends on is what these
tests check over real HTTP (a bare-socket client, so nothing instruments the test's side):

- a recovered upstream call is invisible to the caller but visible in the trace (exact
  attempts, one server span, resends marked ``http.request.resend_count``);
- cancellation (client gone, ``asyncio.timeout``, ``wait_for``, uvicorn's shutdown) while
  our layer sleeps between attempts or waits on a stalled upstream stops the retry for good,
  gives back the breaker's half-open permit and the pooled connection, and logs nothing;
- a database that goes down under 50 concurrent requests opens the breaker after a bounded
  number of connects, later requests fail fast with an error the app maps to 503, and the
  service recovers through half-open probes once the server is back;
- the middleware's promises (retry before the response started, fallback, breaker shed,
  streaming untouched, a started response never replaced, a cancelled probe's permit given
  back) hold on a real server, and its retries do not stack on our client layer's.

Faults are real: the upstream is ``tests/instrumentors/http_faults.py`` (503, 429 with
``Retry-After``, stalls), PostgreSQL refusals come from ``servers.PgFront`` (``FATAL 57P03``
for as long as a test wants, counting TCP connections), Redis is a private server. ``"none"``
runs the same stack without otel-recovery (contrib only), the baseline a difference is
judged against.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from instrumentors import http_faults as hf
from opentelemetry.trace import StatusCode
from servers import PgFront, PrivateRedis, eventually, private_redis  # noqa: F401

from integrations.asgi_service import (
    Deps,
    RawRequest,
    Served,
    Stack,
    StopAtFirst,
    build_app,
    fetch,
    parse,
    status_of,
)
from otel_recovery import Retry
from otel_recovery.policies.backoff import FixedBackoff
from otel_recovery.policies.circuit_breaker import CircuitState

pytestmark = pytest.mark.server

upstream = pytest.fixture(scope="module")(hf.serve)

Start = Callable[..., tuple[Served, Deps]]


@pytest.fixture
def stack() -> Iterator[Stack]:
    made = Stack()
    try:
        yield made
    finally:
        made.close()


@pytest.fixture
def fronts() -> Iterator[list[PgFront]]:
    made: list[PgFront] = []
    yield made
    for front in made:
        front.close()


@pytest.fixture
def start(
    stack: Stack,
    upstream: hf.FaultServer,
    private_redis: PrivateRedis,  # noqa: F811
) -> Iterator[Start]:
    """``start(pg_port=..., recovery=..., cancel_on_disconnect=..., graceful=...)``: the
    service on a real uvicorn; stopped (if the test did not) afterwards."""
    upstream.reset()
    served: list[Served] = []

    def go(
        *,
        pg_port: int = 5432,
        pool_size: int = 2,
        recovery: dict[str, Any] | None = None,
        cancel_on_disconnect: bool = False,
        graceful: float | None = None,
        redis_trap: StopAtFirst | None = None,
    ) -> tuple[Served, Deps]:
        deps = Deps(upstream.url("").rstrip("/"), pg_port, private_redis.port, pool_size)
        if redis_trap is not None:
            deps.redis_connection_class = redis_trap.connection_class()
        app = build_app(
            deps, stack.provider, recovery=recovery, cancel_on_disconnect=cancel_on_disconnect
        )
        server = Served(app, graceful=graceful).start()
        served.append(server)
        return server, deps

    try:
        yield go
    finally:
        private_redis.resume()  # a test that froze it and failed before it woke up
        for server in served:
            assert server.stop(), "uvicorn did not stop"
        private_redis.heal()


SERVICE_LOGGERS = ("uvicorn", "asyncio", "otel_recovery")


def service_errors(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    """Records at ERROR or above from the service: uvicorn's ("Exception in ASGI
    application"), asyncio's, ours, or anything logged on the server's thread; not what a
    test's own plumbing (or another library in this process) happens to log."""
    return [
        r
        for r in caplog.records
        if r.levelno >= logging.ERROR
        and (r.name.split(".")[0] in SERVICE_LOGGERS or r.threadName == "uvicorn")
    ]


@pytest.fixture
def errors(caplog: pytest.LogCaptureFixture) -> Callable[[], list[str]]:
    """The service's errors (:func:`service_errors`), as messages."""
    caplog.set_level(logging.WARNING)

    def logged() -> list[str]:
        return [r.getMessage() for r in service_errors(caplog)]

    return logged


def recovery_attributes(span: Any) -> tuple[Any, Any]:
    attributes = dict(span.attributes or {})
    return attributes.get("otel_recovery.outcome"), attributes.get("otel_recovery.retry.attempts")


# -- 1. inline recovery inside a request ------------------------------------------------------


@pytest.mark.parametrize("order", ["none", "ours_first", "contrib_first"])
async def test_redis_upstream_and_database_faults_are_recovered_inside_one_request(
    stack: Stack,
    start: Start,
    upstream: hf.FaultServer,
    fronts: list[PgFront],
    private_redis: PrivateRedis,  # noqa: F811
    order: str,
) -> None:
    """``/work`` reads Redis (frozen from the moment its first GET is sent until the client
    gives up at its 1 s timeout: ``StopAtFirst``), GETs the upstream (503, then 200), takes
    a pooled connection from a server answering ``57P03`` once, SELECTs and writes Redis. With otel-recovery the caller gets 200 with no
    sign of any failure: two Redis GETs under contrib's one ``GET`` span, exactly two
    upstream requests and two TCP connects, one server span, the upstream's two CLIENT
    spans (the resend marked ``http.request.resend_count=1``) under a ``recover httpx``
    span, the connect's recovery on ``recover asyncpg``, all in the server span's trace.
    Without it the caller gets the Redis timeout as a 503 and nothing else is attempted."""
    stack.instrument(order)
    front = PgFront(starting_up=1)
    fronts.append(front)
    frozen = StopAtFirst(private_redis, "GET")
    server, _ = start(pg_port=front.port, redis_trap=frozen)
    upstream.script("/q1", hf.status(503), hf.ok("fresh"))
    reply = await fetch(server.port, "/work/q1")
    assert frozen.fired == 1 and frozen.resumed.is_set()  # by the timed-out connection's close
    stack.wait_servers(1)
    (served,) = stack.servers()
    trace_id = served.context.trace_id
    clients = stack.clients_to(upstream.port)
    (redis_get,) = [
        s for s in stack.named("GET") if (s.attributes or {}).get("db.system") == "redis"
    ]
    if order == "none":
        assert (reply.status, reply.headers["x-error"]) == (503, "TimeoutError"), reply.raw
        assert upstream.count("/q1") == 0 and front.accepted == 0 and clients == []
        assert redis_get.status.status_code is StatusCode.ERROR
        return
    assert recovery_attributes(redis_get) == ("success", 2)
    assert (reply.status, reply.body) == (200, b"fresh 42"), reply.raw
    assert upstream.count("/q1") == 2 and front.accepted == 2
    assert status_of(served) == 200 and served.status.status_code is not StatusCode.ERROR
    assert [status_of(s) for s in clients] == [503, 200]
    assert [(s.attributes or {}).get("http.request.resend_count") for s in clients] == [None, 1]
    (http_recovery,) = stack.named(f"recover httpx 127.0.0.1:{upstream.port}")
    assert recovery_attributes(http_recovery) == ("success", 2)
    assert clients[1].parent is not None
    assert clients[1].parent.span_id == http_recovery.context.span_id
    (pg_recovery,) = stack.named(f"recover asyncpg 127.0.0.1:{front.port}")
    assert recovery_attributes(pg_recovery) == ("success", 2)
    everything = stack.spans()
    assert {s.context.trace_id for s in everything} == {trace_id}, [s.name for s in everything]


# -- 2./3. cancellation while our layer sleeps between attempts or waits on a stall -----------

HALF_OPEN = {"breaker_window": 1, "breaker_minimum_calls": 1, "breaker_open_seconds": 0.2}
"""One failed call opens the upstream's breaker for 0.2 s; then one probe permit."""


async def half_open_upstream(stack: Stack, server: Served, upstream: hf.FaultServer) -> None:
    """Open the upstream's breaker with a real failed call (three 503s), wait until it lets
    one probe through, and forget the sleeps that took."""
    upstream.script("/opener", *[hf.status(503)] * 3)
    assert (await fetch(server.port, "/quote/opener")).status == 502
    breaker = stack.breaker("httpx", upstream.port)
    assert breaker.snapshot().state is CircuitState.OPEN
    await asyncio.sleep(0.25)  # the breaker's own open time
    stack.clock.forget()


async def in_our_backoff_sleep(stack: Stack) -> float:
    """Wait until our layer has started sleeping before a retry; when it did."""
    assert await asyncio.to_thread(stack.clock.sleeping.wait, 5), "never slept"
    return time.monotonic()


async def until_handler_ended(deps: Deps, name: str) -> str:
    assert await asyncio.to_thread(eventually, lambda: any(n == name for n, _ in deps.ended))
    return next(how for n, how in deps.ended if n == name)


def assert_quiet(server: Served, errors: Callable[[], list[str]]) -> None:
    """uvicorn stopped, with no task left, nothing reported to its loop's exception handler
    (never-retrieved exceptions included) and nothing logged as an error."""
    assert server.stop(), "uvicorn did not stop"
    gc.collect()
    assert server.leftover == []
    assert server.loop_errors == []
    assert errors() == []


@pytest.mark.parametrize(
    ("fault", "order"),
    [
        ("backoff", "ours_first"),
        ("backoff", "contrib_first"),
        ("stall", "ours_first"),
        ("stall", "none"),
    ],
)
async def test_a_client_that_hangs_up_cancels_the_retry_and_gives_everything_back(
    stack: Stack,
    start: Start,
    upstream: hf.FaultServer,
    errors: Callable[[], list[str]],
    fault: str,
    order: str,
) -> None:
    """The handler holds the pool's only connection and calls the upstream as the breaker's
    half-open probe; the upstream answers 429 ``Retry-After: 1`` (our layer sleeps 1 s) or
    stalls. The client hangs up there and ``CancelOnDisconnect`` cancels the handler. Then:
    the handler ended cancelled; no upstream attempt follows (counted past the moment the
    retry was due); the probe permit is back (the next call is admitted and closes the
    breaker instead of being refused); the pooled connection is back (idle, and the next
    request gets it at once); the route's breaker counted the request neither way; nothing
    logged, no task left. The baseline (``none``) behaves the same where it applies."""
    stack.instrument(order, **HALF_OPEN)
    server, deps = start(cancel_on_disconnect=True, pool_size=1)
    if order != "none":
        await half_open_upstream(stack, server, upstream)
    if fault == "backoff":
        upstream.script("/slow", hf.retry_after(429, 1), hf.ok())
    else:
        upstream.script("/slow", hf.stall(3), hf.ok())
    request = await RawRequest.send(server.port, "/db-then-quote/slow")
    if fault == "backoff":
        began = await in_our_backoff_sleep(stack)
    else:
        assert await asyncio.to_thread(eventually, lambda: upstream.count("/slow") == 1)
        began = time.monotonic()
    await request.hang_up()
    assert await until_handler_ended(deps, "db_then_quote") == "cancelled"
    # our backoff sleep ended by cancellation, not by its time (the stall: no sleep at all)
    assert stack.clock.cancelled == (1 if fault == "backoff" else 0), stack.clock.sleeps
    # past the moment the retry was due (a stalled attempt has none: a moment suffices)
    await asyncio.sleep(max(0.0, began + (1.1 if fault == "backoff" else 0.2) - time.monotonic()))
    assert upstream.count("/slow") == 1
    assert deps.pool_idle() == (1, 1)
    reply = await fetch(server.port, "/db", timeout=2)
    assert (reply.status, reply.body) == (200, b"42")
    if order != "none":
        reply = await fetch(server.port, "/quote/ok")
        assert (reply.status, reply.body) == (200, b"ok"), reply.raw
        assert upstream.count("/ok") == 1
        assert stack.breaker("httpx", upstream.port).snapshot().state is CircuitState.CLOSED
    route = deps.route_breakers["GET /db-then-quote/slow"].snapshot()
    assert (route.failed_calls, route.successful_calls) == (0, 0)
    assert_quiet(server, errors)


@pytest.mark.parametrize("how", ["timeout", "wait_for", "anyio"])
async def test_a_time_limit_around_a_retried_call_cancels_it_cleanly(
    stack: Stack,
    start: Start,
    upstream: hf.FaultServer,
    errors: Callable[[], list[str]],
    how: str,
) -> None:
    """``asyncio.timeout(0.3)`` / ``asyncio.wait_for(..., 0.3)`` / ``anyio.fail_after(0.3)``
    (a cancel scope: cancellation repeats at every await until it is left) around an
    upstream GET that our layer is retrying (429 ``Retry-After: 1``: it sleeps 1 s): the handler gets the
    builtin ``TimeoutError`` at 0.3 s (answered 504), as it would without us; no retry
    follows; the half-open probe permit is back, and so is the 429's connection (the
    client has one: the next call would wait for it); nothing logged, no task left."""
    stack.instrument("ours_first", **HALF_OPEN)
    server, deps = start()
    await half_open_upstream(stack, server, upstream)
    upstream.script("/slow", hf.retry_after(429, 1), hf.ok())
    pending = asyncio.ensure_future(fetch(server.port, f"/quote/slow?limit=0.3&how={how}"))
    began = await in_our_backoff_sleep(stack)
    reply = await pending
    assert (reply.status, reply.headers.get("x-error")) == (504, "TimeoutError"), reply.raw
    assert reply.seconds >= 0.3  # the limit, not the 1 s sleep, ended it (no retry below)
    assert stack.clock.sleeps == [1.0] and stack.clock.cancelled == 1  # cut, not slept out
    await asyncio.sleep(max(0.0, began + 1.1 - time.monotonic()))  # past the retry's time
    assert upstream.count("/slow") == 1
    reply = await fetch(server.port, "/quote/ok")
    assert (reply.status, reply.body) == (200, b"ok"), reply.raw
    assert stack.breaker("httpx", upstream.port).snapshot().state is CircuitState.CLOSED
    stack.wait_servers(3)
    (recovery,) = [
        s
        for s in stack.named(f"recover httpx 127.0.0.1:{upstream.port}")
        if (s.attributes or {}).get("otel_recovery.outcome") not in ("failure",)
    ]
    assert recovery_attributes(recovery)[0] == "cancelled"
    assert_quiet(server, errors)


# -- 4. a database that goes down under concurrency ------------------------------------------

CONCURRENT = 50
MINIMUM_CALLS = 20
"""``OTEL_RECOVERY_BREAKER_MINIMUM_CALLS``'s default: failed calls before the breaker judges."""


@pytest.mark.parametrize("order", ["none", "ours_first"])
async def test_a_refused_database_under_50_concurrent_requests_opens_and_recovers(
    stack: Stack, start: Start, fronts: list[PgFront], order: str
) -> None:
    """PostgreSQL answers every connection ``FATAL 57P03`` (PgFront). 50 concurrent ``/db``
    requests all get 503 (no 500, no hang) and cost a bounded number of TCP connects: one
    per acquire plus what the retry budget allows (10 % of calls + 1/s over 10 s), at most
    65, and the asyncpg breaker opens. The next 20 requests fail fast with
    ``AsyncPGCircuitOpenError`` (an ``asyncpg.InterfaceError``, mapped to 503) and no
    connect at all. Once the server is back and the open time is over (30 s, passed by
    moving our clock on: ``SleepWatch.advance``), one probe is let through, the breaker
    closes and 20 concurrent requests succeed. Without otel-recovery every request costs
    exactly one connect, and none fails fast. The breaker judges after ``MINIMUM_CALLS``
    failed calls, each at least one connect: the first wave costs at least that many.

    The route breakers of our middleware get a high threshold here, so that every request
    reaches the handler and the client-side breaker is what is observed."""
    stack.instrument(order, breaker_open_seconds=30)
    front = PgFront(starting_up=10**9)
    fronts.append(front)
    server, _ = start(
        pg_port=front.port,
        pool_size=10,
        recovery={"breaker": {"failure_threshold": 10_000, "timeout": 1.0}},
    )
    replies = await asyncio.gather(*[fetch(server.port, "/db") for _ in range(CONCURRENT)])
    assert [r.status for r in replies] == [503] * CONCURRENT, {r.status for r in replies}
    first_wave = front.accepted
    kinds = {r.headers["x-error"] for r in replies}
    if order == "none":
        assert first_wave == CONCURRENT and kinds == {"CannotConnectNowError"}
    else:
        assert MINIMUM_CALLS <= first_wave <= CONCURRENT + CONCURRENT // 10 + 10, first_wave
        breaker = stack.breaker("asyncpg", front.port)
        assert breaker.snapshot().state is CircuitState.OPEN
        assert kinds <= {"CannotConnectNowError", "AsyncPGCircuitOpenError"}
    later = [await fetch(server.port, "/db") for _ in range(20)]
    assert [r.status for r in later] == [503] * 20
    if order == "none":
        assert front.accepted == first_wave + 20
    else:
        assert {r.headers["x-error"] for r in later} == {"AsyncPGCircuitOpenError"}
        assert front.accepted == first_wave  # refused by the circuit: not one connect
        open_until = breaker.snapshot().open_until
        assert open_until is not None
        stack.clock.advance(max(0.0, open_until - stack.clock.now()) + 0.01)
    front.starting_up = front.accepted  # the server is back: forward from now on
    probe = await fetch(server.port, "/db")
    assert (probe.status, probe.body) == (200, b"42"), probe.raw
    if order != "none":
        assert breaker.snapshot().state is CircuitState.CLOSED
    healed = await asyncio.gather(*[fetch(server.port, "/db") for _ in range(20)])
    assert [r.status for r in healed] == [200] * 20


# -- 5. graceful shutdown with retried calls in flight ----------------------------------------


async def test_shutdown_waits_for_an_in_flight_retry_and_then_stops_cleanly(
    stack: Stack, start: Start, upstream: hf.FaultServer, errors: Callable[[], list[str]]
) -> None:
    """uvicorn's default graceful shutdown (no timeout) during our 1 s backoff: the request
    is finished by the retry (200, two upstream requests), then uvicorn stops, the lifespan
    closes the clients, no task is left and nothing is logged."""
    stack.instrument("ours_first")
    server, deps = start()
    upstream.script("/slow", hf.retry_after(429, 1), hf.ok("late"))
    pending = asyncio.ensure_future(fetch(server.port, "/quote/slow"))
    await in_our_backoff_sleep(stack)
    stopped = server.begin_stop()
    reply = await pending
    assert (reply.status, reply.body) == (200, b"late")
    assert await asyncio.to_thread(stopped, 5)
    assert upstream.count("/slow") == 2 and deps.closed
    assert_quiet(server, errors)


@pytest.mark.parametrize(
    ("fault", "order"), [("stall", "none"), ("stall", "ours_first"), ("backoff", "ours_first")]
)
async def test_shutdown_past_its_grace_cancels_the_retry_like_any_other_await(
    stack: Stack,
    start: Start,
    upstream: hf.FaultServer,
    caplog: pytest.LogCaptureFixture,
    fault: str,
    order: str,
) -> None:
    """With ``timeout_graceful_shutdown=0.2`` uvicorn cancels the request's task while our
    layer sleeps before a retry, or waits on a stalled upstream. No further upstream
    request, uvicorn stops promptly, no task left, nothing reported to the loop, and what
    uvicorn logs and the client gets are what the baseline gets for a stalled call."""
    caplog.set_level(logging.WARNING)
    stack.instrument(order)
    server, deps = start(graceful=0.2)
    action = hf.retry_after(429, 1) if fault == "backoff" else hf.stall(3)
    upstream.script("/slow", action, hf.ok())
    request = await RawRequest.send(server.port, "/quote/slow")
    if fault == "backoff":
        await in_our_backoff_sleep(stack)
    else:
        assert await asyncio.to_thread(eventually, lambda: upstream.count("/slow") == 1)
    assert stack.clock.cancelled == 0
    stopped = server.begin_stop()
    raw = await request.rest()
    assert await asyncio.to_thread(stopped, 5)
    # uvicorn's shutdown itself (the grace, then cancellation), not the thread's clean-up
    assert server.served_in is not None and server.served_in < 1.5, server.served_in
    gc.collect()
    assert server.leftover == [] and server.loop_errors == []
    assert upstream.count("/slow") == 1 and deps.closed
    assert stack.clock.cancelled == (1 if fault == "backoff" else 0)
    assert deps.ended == [("quote", "cancelled")]
    reply = parse(raw) if raw else None
    assert reply is None or (reply.status == 500 and reply.responses == 1), raw
    logged = sorted(r.getMessage().split("\n")[0] for r in service_errors(caplog))
    assert logged == sorted(EXPECTED_SHUTDOWN_ERRORS), logged


EXPECTED_SHUTDOWN_ERRORS = [
    "Cancel 1 running task(s), timeout graceful shutdown exceeded",
    "Exception in ASGI application",
]
"""What uvicorn itself logs when it cancels a request past the grace period (baseline)."""


# -- 6. the middleware's promises on a real server --------------------------------------------


async def test_the_middleware_retries_a_safe_request_before_its_response_started(
    stack: Stack, start: Start, errors: Callable[[], list[str]]
) -> None:
    """``Retry(2)``: a GET whose handler raised ``ConnectionError`` before answering is run
    again and answered once (200, two handler runs, one status line, one server span with
    the retry event); a POST with an ``Idempotency-Key`` too; a POST without one is not
    repeated and reaches Starlette's ``ServerErrorMiddleware`` (500, one run), which re-raises
    to uvicorn as it does without our middleware."""
    stack.instrument("ours_first")
    server, deps = start(recovery={"retry": Retry(2, backoff=FixedBackoff(0.01))})
    reply = await fetch(server.port, "/flaky/get")
    assert (reply.status, reply.body, reply.responses) == (200, b"fine", 1), reply.raw
    assert deps.flaky["/flaky/get"] == 2
    stack.wait_servers(1, "/flaky/get")
    (span,) = stack.servers("/flaky/get")
    assert status_of(span) == 200
    assert [e.name for e in span.events].count("otel_recovery.retry") == 1
    keyed = await fetch(
        server.port, "/flaky/keyed", method="POST", headers={"Idempotency-Key": "k1"}
    )
    assert (keyed.status, keyed.responses, deps.flaky["/flaky/keyed"]) == (200, 1, 2)
    assert errors() == []
    plain = await fetch(server.port, "/flaky/post", method="POST")
    assert (plain.status, plain.responses, deps.flaky["/flaky/post"]) == (500, 1, 1)
    assert errors() == ["Exception in ASGI application\n"]
    breaker = deps.route_breakers["POST /flaky/post"].snapshot()
    assert (
        breaker.failed_calls,
        deps.route_breakers["GET /flaky/get"].snapshot().failed_calls,
    ) == (1, 0)


async def test_fallback_answers_errors_before_the_start_and_leaves_streams_alone(
    stack: Stack, start: Start, errors: Callable[[], list[str]]
) -> None:
    """With a fallback: a handler error before its response started is answered by the
    fallback (once, nothing logged); a streaming response reaches the client chunk by chunk
    (the first chunk arrives while the handler still waits for the test to read it); a
    stream that fails after starting is not replaced (one status line, the chunked body cut
    off) and counts as a failure of its route."""
    stack.instrument("ours_first")
    fallback = (503, [("content-type", "text/plain")], b"try later\n")
    server, deps = start(recovery={"fallback": fallback})
    reply = await fetch(server.port, "/flaky/fb")
    assert (reply.status, reply.body, reply.responses) == (503, b"try later\n", 1), reply.raw
    assert errors() == []
    streaming = await RawRequest.send(server.port, "/stream")
    await streaming.read_until(b"first")
    deps.gate.set()
    streamed = parse(await streaming.rest())
    assert (streamed.status, streamed.body, streamed.responses) == (
        200,
        b"first\nsecond\nthird\n",
        1,
    )
    assert "x-test-truncated" not in streamed.headers
    broken = await fetch(server.port, "/stream?broken=1")
    assert (broken.status, broken.body, broken.responses) == (200, b"first\n", 1), broken.raw
    assert broken.headers.get("x-test-truncated") == "1"
    assert deps.route_breakers["GET /stream"].snapshot().failed_calls == 1
    assert errors() == ["Exception in ASGI application\n"]


async def test_an_open_route_is_shed_with_503_and_retry_after_on_the_server_span(
    stack: Stack, start: Start
) -> None:
    """A route whose handler failed once (threshold 1) is open: the next request is not
    run, and gets 503 with ``Retry-After``; its server span carries the rejection."""
    stack.instrument("ours_first")
    server, deps = start(recovery={"breaker": {"failure_threshold": 1, "timeout": 20.0}})
    assert (await fetch(server.port, "/flaky/shed?fail=5")).status == 500
    shed = await fetch(server.port, "/flaky/shed?fail=5")
    assert (shed.status, shed.headers.get("retry-after"), shed.responses) == (503, "20", 1)
    assert deps.started["flaky"] == 1
    stack.wait_servers(2)
    span = stack.servers()[1]
    assert status_of(span) == 503 and span.status.status_code is StatusCode.ERROR
    assert "otel_recovery.rejected" in [e.name for e in span.events]


async def test_a_cancelled_probe_gives_the_routes_permit_back(
    stack: Stack, start: Start, upstream: hf.FaultServer, errors: Callable[[], list[str]]
) -> None:
    """The route ``/quote`` (``route=`` groups the names) fails once and opens for 0.2 s;
    the half-open probe waits on a stalled upstream and its client hangs up, so the handler
    is cancelled. The middleware gives the probe permit back: the next request is run (200)
    and closes the route instead of being shed with 503 while nothing is in flight."""
    stack.instrument("ours_first")
    server, deps = start(
        cancel_on_disconnect=True,
        recovery={
            "breaker": {"failure_threshold": 1, "timeout": 0.2},
            "route": lambda scope: scope["path"].rsplit("/", 1)[0],
        },
    )
    upstream.script("/bad", *[hf.status(503)] * 3)
    assert (await fetch(server.port, "/quote/bad")).status == 502
    route = deps.route_breakers["/quote"]
    assert route.snapshot().state is CircuitState.OPEN
    await asyncio.sleep(0.25)  # the route's open time
    upstream.script("/slow", hf.stall(3))
    probe = await RawRequest.send(server.port, "/quote/slow")
    assert await asyncio.to_thread(eventually, lambda: upstream.count("/slow") == 1)
    await probe.hang_up()
    assert await until_handler_ended(deps, "quote") == "done"  # the opener's
    assert await asyncio.to_thread(eventually, lambda: ("quote", "cancelled") in deps.ended)
    reply = await fetch(server.port, "/quote/ok")
    assert (reply.status, reply.body) == (200, b"ok"), reply.raw
    assert route.snapshot().state is CircuitState.CLOSED
    assert_quiet(server, errors)


@pytest.mark.parametrize("order", ["none", "ours_first"])
async def test_middleware_and_client_retries_do_not_multiply(
    stack: Stack, start: Start, upstream: hf.FaultServer, order: str
) -> None:
    """The handler GETs an upstream that answers 503 every time and lets the failure escape
    (``raise_for_status()``). Either of our layers alone repeats the upstream request
    ``max_attempts`` (3) times: the middleware's ``Retry(3)`` by running the handler three
    times (``none``: no instrumentor), the httpx layer by resending within one run. Both
    on must not make that 3 x 3: one incoming request may cost at most 3 upstream requests,
    as the package keeps retry loops from stacking elsewhere (a pool's connect inside a
    retried acquire, redis-py's own Retry)."""
    stack.instrument(order)
    server, deps = start(recovery={"retry": Retry(3, backoff=FixedBackoff(0.001))})
    upstream.script("/down", *[hf.status(503)] * 20)
    reply = await fetch(server.port, "/strict-quote/down")
    assert (reply.status, reply.responses) == (500, 1)
    assert upstream.count("/down") == 3, (upstream.count("/down"), deps.started)
    assert deps.started["strict_quote"] == (3 if order == "none" else 1)  # handler runs
    stack.wait_servers(1)
    (span,) = stack.servers()
    disallowed = dict(span.attributes or {}).get("otel_recovery.retry.disallowed")
    assert disallowed == (None if order == "none" else "inner_recovery")
