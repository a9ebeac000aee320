"""AioHttpClientRecoveryInstrumentor against a real local server with real faults."""

from __future__ import annotations

import asyncio
import io
import logging
import sys
import time

import aiohttp
import pytest
from opentelemetry.instrumentation.aiohttp_client import AioHttpClientInstrumentor
from opentelemetry.instrumentation.utils import suppress_instrumentation
from opentelemetry.trace import SpanKind, StatusCode
from ours import marked_by_us

from otel_recovery._clock import SYSTEM_CLOCK, MonotonicClock
from otel_recovery.instrumentors import _wrapping, suppress_recovery
from otel_recovery.instrumentors._settings import SettingsError
from otel_recovery.instrumentors.aiohttp_client import (
    AioHttpAttemptTimeoutError,
    AioHttpCircuitOpenError,
    AioHttpClientRecoveryInstrumentor,
    AioHttpTotalTimeoutError,
    _unsent,
)
from otel_recovery.recover import RecoveryPolicy
from otel_recovery.testing import FakeClock

from . import http_faults as hf

RESENDS = tuple(int(part) for part in aiohttp.__version__.split(".")[:2]) >= (3, 10)
"""aiohttp 3.10 and later resend an idempotent request once, by themselves, when the server
drops a kept-alive connection; earlier releases raise at the first reset."""
DROPS = [hf.reset()] * (2 if RESENDS else 1)
"""The resets that make one failed attempt of ours."""

server = pytest.fixture(scope="module")(hf.serve)
tel = pytest.fixture(hf.telemetry)
late = pytest.fixture(hf.late_port)

ORIGINAL_REQUEST = aiohttp.ClientSession.__dict__["_request"]
ORIGINAL_INIT = aiohttp.ClientSession.__dict__["__init__"]
BOTH_ORDERS = pytest.mark.parametrize("order", ["ours_first", "contrib_first"])


def originals_restored() -> bool:
    return (
        aiohttp.ClientSession.__dict__["_request"] is ORIGINAL_REQUEST
        and aiohttp.ClientSession.__dict__["__init__"] is ORIGINAL_INIT
    )


@pytest.fixture(autouse=True)
def _fresh(server):
    server.reset()
    yield
    assert originals_restored()


@pytest.fixture
def clock():
    return FakeClock(wall_start=time.time())


@pytest.fixture
def instrument(tel, clock):
    """``instrument(order, contrib=True, **settings)``; uninstruments everything afterwards."""
    yield from hf.instrumenting(
        tel, clock, AioHttpClientRecoveryInstrumentor, AioHttpClientInstrumentor
    )


async def fetch(method, url, *, timeout=2.0, seen=None, session_options=None, **kwargs):
    """One request with a fresh session (contrib hooks session creation); returns the
    response and its body, read inside the ``async with`` as applications do. ``seen``
    collects every attempt's response."""
    trace = aiohttp.TraceConfig()

    async def on_end(session, context, params):
        if seen is not None:
            seen.append(params.response)

    trace.on_request_end.append(on_end)
    async with aiohttp.ClientSession(
        timeout=timeout
        if isinstance(timeout, aiohttp.ClientTimeout)
        else aiohttp.ClientTimeout(total=timeout),
        trace_configs=[trace],
        **(session_options or {}),
    ) as session:
        async with session.request(method, url, **kwargs) as response:
            return response, await response.text()


@BOTH_ORDERS
async def test_503_then_429_then_200_recovers_with_one_client_span_per_attempt(
    server, tel, instrument, clock, order
):
    instrument(order)
    url = server.script("/a", hf.status(503), hf.retry_after(429, 1), hf.ok("fresh"))
    with tel.tracer_provider.get_tracer("app").start_as_current_span("app"):
        # a total above the waits: Retry-After 1 plus up to 1 s of jitter, after the 503's
        # backoff, came within 2 s about one run in a hundred, and the 429 was the answer
        response, body = await fetch("GET", url, timeout=5.0)
    assert (response.status, body) == (200, "fresh")
    assert server.count("/a") == 3
    assert clock.sleeps[1] >= 1.0
    clients = tel.clients()
    assert [s.attributes.get("http.status_code") for s in clients] == [503, 429, 200]
    assert [s.attributes.get("http.request.resend_count") for s in clients] == [None, 1, 2]
    recovery = tel.recovery()
    assert recovery.kind is SpanKind.INTERNAL
    assert recovery.name == f"recover aiohttp 127.0.0.1:{server.port}"
    assert recovery.status.status_code is StatusCode.UNSET
    failed = hf.events(recovery, "otel_recovery.attempt.failed")
    assert [e["error.type"] for e in failed] == ["503", "429"]
    assert [s.parent.span_id for s in clients[1:]] == [recovery.context.span_id] * 2


async def test_an_option_given_as_an_iterator_is_sent_once(server, tel, instrument):
    """``headers=`` as an iterator of pairs is consumed by the first attempt: a resend went
    without the ``Authorization`` header. The request is sent once, as one with a streamed
    body is."""
    instrument()
    url = server.script("/me", hf.status(503), hf.ok("me"))
    for _ in range(2):  # the second time, a plain GET of the URL has its plan remembered
        response, _ = await fetch("GET", url, headers=iter([("Authorization", "Bearer t")]))
        assert response.status == 503
        server.script("/me", hf.status(503), hf.ok("me"))
        response, _ = await fetch("GET", url)
        assert response.status == 200
        server.script("/me", hf.status(503), hf.ok("me"))
    assert [s.headers.get("Authorization") for s in server.seen("/me")] == [
        "Bearer t",
        None,
        None,
        "Bearer t",
        None,
        None,
    ]


async def test_exhausted_retries_return_the_final_response_unchanged(server, tel, instrument):
    instrument()
    seen = []
    big = "x" * 4_000_000  # too big to arrive whole: only a release closes the response
    url = server.script("/down", *[hf.status(503, body=big)] * 2, hf.status(503, body="busy"))
    response, body = await fetch("GET", url, seen=seen)
    assert (response.status, body) == (503, "busy")
    assert server.count("/down") == 3
    assert seen[-1] is response and all(r.closed for r in seen[:2])  # retried ones released
    recovery = tel.recovery()
    assert recovery.attributes["error.type"] == "503"
    assert recovery.status.status_code is StatusCode.ERROR


async def test_reset_and_stall_are_retried(server, tel, instrument):
    """aiohttp 3.10+ itself resends an idempotent request once when the server drops the
    connection, so there it takes two resets to make one failed attempt of ours. The stall
    meets a read timeout (``sock_read``): a ``total`` would bound the whole call, retries
    included."""
    instrument()
    url = server.script("/flaky", *DROPS, hf.hold(), hf.ok())
    response, _ = await fetch("GET", url, timeout=aiohttp.ClientTimeout(sock_read=hf.HELD_TIMEOUT))
    assert response.status == 200 and server.count("/flaky") == len(DROPS) + 2
    failed = hf.events(tel.recovery(), "otel_recovery.attempt.failed")
    assert [e["otel_recovery.error.kind"] for e in failed] == ["connection", "timeout"]


async def test_post_is_sent_once_unless_it_carries_an_idempotency_key(server, instrument):
    instrument()
    plain = server.script("/pay", hf.status(503), hf.ok())
    assert (await fetch("POST", plain, json={"amount": 5}))[0].status == 503
    reset = server.script("/pay-reset", hf.reset(), hf.ok())
    with pytest.raises(aiohttp.ServerDisconnectedError):
        await fetch("POST", reset, data=b"x")
    keyed = server.script("/orders", hf.status(503), hf.ok())
    key = {"Idempotency-Key": "k-1"}
    assert (await fetch("POST", keyed, data=b"o-1", headers=key))[0].status == 200
    assert (server.count("/pay"), server.count("/pay-reset"), server.count("/orders")) == (1, 1, 2)
    assert {s.body for s in server.seen("/orders")} == {b"o-1"}


async def test_streamed_and_form_bodies_are_sent_once(server, instrument):
    instrument()

    async def chunks():
        yield b"a"
        yield b"b"

    streamed = server.script("/stream", hf.status(503), hf.ok())
    assert (await fetch("PUT", streamed, data=chunks()))[0].status == 503
    form = aiohttp.FormData({"a": "1"})
    formed = server.script("/form", hf.status(503), hf.ok())
    assert (await fetch("PUT", formed, data=form))[0].status == 503
    in_memory = server.script("/bytes", hf.status(503), hf.ok())
    assert (await fetch("PUT", in_memory, data=b"ab"))[0].status == 200
    assert (server.count("/stream"), server.count("/form"), server.count("/bytes")) == (1, 1, 2)


@pytest.mark.parametrize(
    "form",
    [{"file": "bytes"}, [("note", "a"), ("file", "bytes")]],
    ids=["mapping", "pairs"],
)
async def test_a_form_that_holds_a_file_is_sent_once(server, instrument, form):
    """aiohttp uploads a form with a file in it as multipart and reads the file: a second
    attempt would send it empty, and the server would take the empty upload."""
    instrument()
    upload = io.BytesIO(b"report")
    data = (
        {k: upload if v == "bytes" else v for k, v in form.items()}
        if isinstance(form, dict)
        else [(k, upload if v == "bytes" else v) for k, v in form]
    )
    url = server.script("/upload", hf.status(503), hf.ok())
    assert (await fetch("PUT", url, data=data))[0].status == 503
    assert server.count("/upload") == 1
    plain = server.script("/plain", hf.status(503), hf.ok())
    assert (await fetch("PUT", plain, data={"a": "1", "n": 2, "tags": ["x", "y"]}))[0].status == 200
    assert server.count("/plain") == 2


async def test_a_retried_response_is_released_before_the_backoff(server, instrument):
    """aiohttp streams every response: the 503's connection goes back to the connector
    before the wait, not after it, so a ``Retry-After`` does not keep it from others."""
    seen: list[aiohttp.ClientResponse] = []
    at_sleep: list[list[bool]] = []
    instrument(clock=hf.SleepHook(lambda: at_sleep.append([r.closed for r in seen])))
    big = "x" * 500_000  # more than aiohttp reads ahead: the connection stays taken
    url = server.script("/x", hf.status(503, {"Retry-After": "1"}, big), hf.ok())
    assert (await fetch("GET", url, seen=seen, timeout=5.0))[0].status == 200 and len(seen) == 2
    assert at_sleep and all(closed == [True] for closed in at_sleep)


# aiohttp's ClientTimeout(total=...) bounds the whole request, and each of our attempts would
# start it afresh. These tests time a real server against the real clock (the policy's clock
# and the event loop's must agree, as in production), so their margins are generous.


async def test_a_stalled_request_ends_at_its_own_total_timeout_and_is_not_repeated(
    server, tel, instrument
):
    instrument(clock=SYSTEM_CLOCK)
    url = server.script("/slow", *[hf.stall(10.0)] * 3)
    started = time.monotonic()
    with pytest.raises(asyncio.TimeoutError) as raised:
        # the session's ClientTimeout(total=1): the request must reach the server within it
        # to be counted, a few ms on an idle machine (0.5 s was tight on a loaded one)
        await fetch("GET", url, timeout=1.0)
    assert not isinstance(raised.value, aiohttp.ClientError)  # aiohttp's own, as raised
    took = time.monotonic() - started
    # cut at 1 s, not after the 10 s stall (half of it: a wide margin for a loaded machine)
    assert took < 5.0 and server.count("/slow") == 1, took
    recovery = tel.recovery().attributes
    assert recovery["otel_recovery.retry.stop_reason"] == "deadline"


async def test_retries_stop_at_the_requests_own_total_timeout(server, tel, instrument):
    """Slow 503s: without the limit, ten attempts of 0.4 s each would take 4 s; within
    ``timeout=ClientTimeout(total=1)`` the attempt in flight at 1 s is cut, and the caller
    gets aiohttp's timeout error, as aiohttp alone raises when its total passes."""
    instrument(clock=SYSTEM_CLOCK, max_attempts=10)
    url = server.script("/busy", *[hf.stall(0.4, then=503)] * 10)
    started = time.monotonic()
    async with aiohttp.ClientSession() as session:
        with pytest.raises(asyncio.TimeoutError) as raised:
            await session.get(url, timeout=aiohttp.ClientTimeout(total=1.0))
    took = time.monotonic() - started
    # Not before the limit, and far from the 4 s the attempts would take without it (half
    # of that: a wide margin for a loaded machine); fewer attempts than allowed were sent.
    assert 0.9 < took < 2.0 and server.count("/busy") < 10, took
    # aiohttp's type for its own total: a TimeoutError, not a ClientError (which an
    # `except aiohttp.ClientError` ahead of `except asyncio.TimeoutError` would take)
    assert isinstance(raised.value, AioHttpTotalTimeoutError)
    assert not isinstance(raised.value, aiohttp.ClientError)
    assert "own 1s time limit" in str(raised.value)
    # The span tells what the caller got, as when the limit is seen to pass before a retry:
    # not a cancellation (no one cancelled the call), but a failure at the deadline.
    recovery = tel.recovery()
    assert recovery.attributes["otel_recovery.outcome"] == "failure"
    assert recovery.attributes["otel_recovery.retry.stop_reason"] == "deadline"
    assert recovery.attributes["error.type"] == (
        "otel_recovery.instrumentors.aiohttp_client.AioHttpTotalTimeoutError"
    )
    assert recovery.status.status_code is StatusCode.ERROR


async def test_calls_cut_at_their_own_total_timeout_count_on_the_breaker(server, tel, instrument):
    """A server that keeps every call busy past the caller's ``total`` (503s, slowly) opens
    its circuit: a cut call is a failure at its deadline, not a cancellation, which the
    breaker would leave uncounted for ever."""
    instrument(
        clock=SYSTEM_CLOCK, max_attempts=5, breaker_window=2, breaker_minimum_calls=2,
        backoff_initial=0.01, backoff_max=0.01,
    )  # fmt: skip
    url = server.script("/busy", *[hf.stall(0.3, then=503)] * 8)
    async with aiohttp.ClientSession() as session:
        for _ in range(2):
            with pytest.raises(asyncio.TimeoutError):
                await session.get(url, timeout=aiohttp.ClientTimeout(total=0.5))
        sent = server.count("/busy")
        with pytest.raises(AioHttpCircuitOpenError):
            await session.get(url, timeout=aiohttp.ClientTimeout(total=0.5))
    assert server.count("/busy") == sent
    outcomes = [r.attributes["otel_recovery.outcome"] for r in tel.recoveries()]
    assert outcomes == ["failure", "failure", "rejected"]


async def test_a_call_cut_at_its_own_total_timeout_gets_the_fallback(server, tel, instrument):
    """As when the limit is found to have passed before a retry: the call gave up at its
    deadline, and a GET's configured fallback answers it."""
    instrument(clock=SYSTEM_CLOCK, max_attempts=5, fallback_value={"prices": []})
    url = server.script("/busy", *[hf.stall(0.4, then=503)] * 5)
    async with aiohttp.ClientSession() as session:
        async with session.get(url, timeout=aiohttp.ClientTimeout(total=1.0)) as response:
            assert response.status == 200 and await response.json() == {"prices": []}
            assert response.headers["X-OTel-Recovery-Fallback"] == "value"
    assert server.count("/busy") < 5
    recovery = tel.recovery().attributes
    assert recovery["otel_recovery.outcome"] == "fallback"
    assert recovery["otel_recovery.retry.stop_reason"] == "deadline"


class _OversleepingClock(MonotonicClock):
    """The real clock, whose backoffs last 5 s whatever was asked: a loop too busy to wake
    the retry in time, so the call's own limit passes in the middle of one."""

    async def asleep(self, seconds: float) -> None:
        await asyncio.sleep(5.0)


async def test_a_total_timeout_passing_during_a_backoff_raises_aiohttps_timeout_error(
    server, tel, instrument, caplog
):
    """No attempt is in flight then; the response of the last one was released before the
    wait. The caller gets aiohttp's timeout error, as aiohttp alone raises when ``total``
    passes, and nothing is logged as our internal error."""
    instrument(clock=_OversleepingClock(), backoff_initial=0.08, backoff_max=0.08)
    url = server.script("/busy", *[hf.status(503)] * 3)
    started = time.monotonic()
    with caplog.at_level(logging.ERROR, logger="otel_recovery"):
        async with aiohttp.ClientSession() as session:
            with pytest.raises(asyncio.TimeoutError) as raised:
                await session.get(url, timeout=aiohttp.ClientTimeout(total=0.5))
    took = time.monotonic() - started
    # cut at 0.5 s, in the backoff, not after it (5 s; half of it: a margin for load)
    assert took < 2.5 and server.count("/busy") == 1, took
    assert isinstance(raised.value, AioHttpTotalTimeoutError)
    assert not isinstance(raised.value, aiohttp.ClientError)
    assert "internal error" not in caplog.text


async def test_raise_for_status_sessions_are_retried_and_get_their_error(server, instrument):
    instrument()
    options = {"raise_for_status": True}
    url = server.script("/rfs", hf.status(503), hf.ok())
    assert (await fetch("GET", url, session_options=options))[0].status == 200
    down = server.script("/rfs-down", *[hf.status(503)] * 3)
    with pytest.raises(aiohttp.ClientResponseError) as raised:
        await fetch("GET", down, session_options=options)
    assert raised.value.status == 503
    assert (server.count("/rfs"), server.count("/rfs-down")) == (2, 3)


async def test_an_open_circuit_rejects_as_an_aiohttp_connection_error(server, tel, instrument):
    instrument(max_attempts=1, breaker_window=2, breaker_minimum_calls=2)
    url = server.script("/x", *[hf.status(503)] * 2)
    for _ in range(2):
        assert (await fetch("GET", url))[0].status == 503
    with pytest.raises(aiohttp.ClientConnectionError) as raised:
        await fetch("GET", url)
    assert isinstance(raised.value, AioHttpCircuitOpenError)
    assert server.count("/x") == 2
    assert tel.recoveries()[-1].attributes["otel_recovery.outcome"] == "rejected"


async def test_a_fallback_value_answers_as_a_response(server, tel, instrument):
    instrument(max_attempts=2, fallback_value={"prices": []})
    url = server.script("/prices", *DROPS, hf.status(503))  # see DROPS
    async with aiohttp.ClientSession() as session:
        async with session.get(url) as response:
            chunks = [chunk async for chunk in response.content.iter_chunked(4)]
            assert b"".join(chunks) == b'{"prices": []}'  # read as a real response is
            assert response.status == 200 and await response.json() == {"prices": []}
            assert response.headers["X-OTel-Recovery-Fallback"] == "value"
            response.raise_for_status()
    assert server.count("/prices") == len(DROPS) + 1
    assert tel.recovery().attributes["otel_recovery.outcome"] == "fallback"


async def test_suppressed_instrumentation_passes_straight_through(server, tel, instrument):
    instrument()
    url = server.script("/quiet", hf.status(503), hf.ok())
    with suppress_instrumentation():
        assert (await fetch("GET", url))[0].status == 503
    assert server.count("/quiet") == 1 and tel.spans() == []


async def test_suppress_recovery_steps_aside_while_contrib_still_traces(server, tel, instrument):
    """Inside ``suppress_recovery()`` a request goes out once, as the application sent it;
    an open circuit does not refuse it and it counts on no breaker; contrib's span stays."""
    ours = instrument()
    url = server.script("/probe", hf.ok(), hf.status(503), hf.ok())
    assert (await fetch("GET", url))[0].status == 200  # remembered: compiled
    tel.exporter.clear()
    with suppress_recovery():
        assert (await fetch("GET", url))[0].status == 503
    assert server.count("/probe") == 2
    spans = tel.spans()
    assert len(spans) == 1 and spans[0].kind is SpanKind.CLIENT and marked_by_us(spans) == []
    (breaker,) = ours.targets.breakers()
    breaker.force_open()
    before = breaker.snapshot()
    with suppress_recovery():
        assert (await fetch("GET", url))[0].status == 200  # not refused
    assert server.count("/probe") == 3 and breaker.snapshot() == before
    with pytest.raises(AioHttpCircuitOpenError):
        await fetch("GET", url)


async def test_disabled_by_environment_and_bad_settings(server, instrument, monkeypatch):
    monkeypatch.setenv("OTEL_RECOVERY_ENABLED", "false")
    instrument(contrib=False)
    assert originals_restored()
    url = server.script("/off", hf.status(503), hf.ok())
    assert (await fetch("GET", url))[0].status == 503 and server.count("/off") == 1
    ours = AioHttpClientRecoveryInstrumentor()
    ours.uninstrument()
    monkeypatch.setenv("OTEL_RECOVERY_ENABLED", "true")
    with pytest.raises(SettingsError, match=r"http_retry_methods|max_attempts \(from instrument"):
        ours.instrument(max_attempts=0)
    assert not ours.is_instrumented_by_opentelemetry and originals_restored()


@pytest.mark.parametrize("first", ["ours", "contrib"])
@BOTH_ORDERS
def test_uninstrument_in_any_order_restores_the_originals(tel, order, first):
    ours, contrib = AioHttpClientRecoveryInstrumentor(), AioHttpClientInstrumentor()
    steps = [ours.instrument, lambda: contrib.instrument(tracer_provider=tel.tracer_provider)]
    for step in steps if order == "ours_first" else reversed(steps):
        step()
    assert not originals_restored()
    for instrumentor in (ours, contrib) if first == "ours" else (contrib, ours):
        instrumentor.uninstrument()
    assert originals_restored()


async def test_a_bug_in_planning_falls_back_to_the_plain_call(
    server, instrument, monkeypatch, caplog
):
    instrument()
    monkeypatch.setattr(_wrapping, "_reported", set())

    def broken(*args, **kwargs):
        raise RuntimeError("planning bug")

    monkeypatch.setattr("otel_recovery.instrumentors.aiohttp_client.plan_call", broken)
    url = server.script("/bug", hf.ok("still fine"))
    with caplog.at_level(logging.ERROR, logger="otel_recovery.instrumentors"):
        assert (await fetch("GET", url))[1] == "still fine"
    assert server.count("/bug") == 1
    assert any("aiohttp: planning" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("url", ["http://[::1/x", "http://127.0.0.1:99999/x"])
async def test_a_malformed_url_is_the_applications_error_not_ours(
    instrument, monkeypatch, caplog, url
):
    """aiohttp reports it in its own words; nothing is logged as our internal error."""
    instrument()
    monkeypatch.setattr(_wrapping, "_reported", set())
    with caplog.at_level(logging.ERROR, logger="otel_recovery"):
        with pytest.raises(aiohttp.InvalidURL):
            await fetch("GET", url)
    assert not caplog.records


async def test_a_bug_in_the_engine_before_sending_sends_exactly_once(
    server, instrument, monkeypatch
):
    instrument()
    monkeypatch.setattr(_wrapping, "_reported", set())

    async def broken(fn, args, kwargs):
        raise RuntimeError("engine bug")

    monkeypatch.setattr(RecoveryPolicy, "arunner", lambda self: broken)
    url = server.script("/engine", hf.ok("sent once"))
    assert (await fetch("GET", url))[1] == "sent once"
    assert server.count("/engine") == 1


# -- OTEL_RECOVERY_ATTEMPT_TIMEOUT ---------------------------------------------------------


async def test_an_attempt_cut_by_attempt_timeout_is_retried(server, tel, instrument):
    # The first attempt is cut at the limit; the second, answered at once (a few ms on an
    # idle machine), must beat it, on a loaded machine too (0.5 s left it little margin).
    instrument(attempt_timeout=2.0)
    url = server.script("/slow", hf.hold(), hf.ok("fine"))
    response, body = await fetch("GET", url, timeout=10.0)  # aiohttp's total: the whole call
    assert (response.status, body) == (200, "fine")
    assert server.count("/slow") == 2
    failed = hf.events(tel.recovery(), "otel_recovery.attempt.failed")
    assert [e["error.type"] for e in failed] == [
        "otel_recovery.instrumentors.aiohttp_client.AioHttpAttemptTimeoutError"
    ]


async def test_attempts_all_cut_by_attempt_timeout_raise_aiohttps_timeout_error(
    server, tel, instrument, caplog
):
    """Until now the app got a bare ``CancelledError`` here (the cancelled attempt's), and
    an internal error was logged: a cancellation the task never asked for."""
    # Each attempt's request must reach the server within the limit to be counted (a few
    # ms on an idle machine; 0.3 s was tight on a loaded one); the hold outlasts the limit.
    instrument(attempt_timeout=1.0)
    url = server.script("/stuck", *[hf.hold()] * 3)
    with (
        caplog.at_level(logging.ERROR, logger="otel_recovery"),
        pytest.raises(aiohttp.ClientError) as raised,
    ):
        await fetch("GET", url, timeout=10.0)  # aiohttp's total: the whole call, 3 attempts
    assert isinstance(raised.value, AioHttpAttemptTimeoutError)
    assert isinstance(raised.value, asyncio.TimeoutError)  # aiohttp's documented idiom
    assert server.count("/stuck") == 3
    assert "internal error" not in caplog.text
    recovery = tel.recovery()
    assert recovery.attributes["otel_recovery.retry.stop_reason"] == "attempts_exhausted"
    assert recovery.attributes["error.type"] == (
        "otel_recovery.instrumentors.aiohttp_client.AioHttpAttemptTimeoutError"
    )


@pytest.mark.skipif(sys.version_info < (3, 11), reason="before 3.11 wait_for cannot tell")
async def test_aiohttps_own_timeout_is_not_taken_for_our_attempt_limit(
    server, tel, instrument, caplog
):
    """aiohttp's ``ClientTimeout`` raises a bare ``asyncio.TimeoutError`` too; with our
    (longer) limit set, it was reported as our limit and as an internal error of ours. Its
    ``total`` is the whole call's: spent by the first attempt, nothing is repeated (the
    real clock, as the policy's and the event loop's must agree)."""
    instrument(attempt_timeout=5.0, clock=SYSTEM_CLOCK)
    url = server.script("/own", *[hf.hold()] * 3)
    with (
        caplog.at_level(logging.ERROR, logger="otel_recovery"),
        pytest.raises(asyncio.TimeoutError) as raised,
    ):
        # aiohttp's total, well inside our 5 s: long enough for the request to reach the
        # server on a loaded machine (0.2 s was tight), or it would not be counted
        await fetch("GET", url, timeout=1.0)
    assert not isinstance(raised.value, AioHttpAttemptTimeoutError)
    assert server.count("/own") == 1
    assert "internal error" not in caplog.text
    recovery = tel.recovery().attributes
    assert "AioHttpAttemptTimeoutError" not in recovery["error.type"]
    assert recovery["otel_recovery.retry.stop_reason"] == "deadline"


# -- requests that never left the client (http_retry_unsent) -------------------------------


async def attempted(method, url, **kwargs):
    """Send one request that is expected to fail; returns the error the app got, and what
    aiohttp itself raised at each attempt (our wrapper retries ``_request``, inside which
    aiohttp's trace signals fire once per attempt)."""
    raised: list[BaseException] = []
    trace = aiohttp.TraceConfig()

    async def on_exception(session, context, params):
        raised.append(params.exception)

    trace.on_request_exception.append(on_exception)
    timeout = aiohttp.ClientTimeout(total=2.0)
    with pytest.raises(aiohttp.ClientError) as got:
        async with aiohttp.ClientSession(timeout=timeout, trace_configs=[trace]) as session:
            async with session.request(method, url, **kwargs):
                pass
    return got.value, raised


@BOTH_ORDERS
async def test_a_post_whose_connect_was_refused_is_sent_again_and_applied_once(
    tel, instrument, late, order
):
    instrument(order, clock=late.clock)
    response, body = await fetch("POST", late.url("/orders"), data=b"order-1")
    assert (response.status, body) == (201, "created:order-1")
    hf.assert_resent_once(late, tel, failed=["aiohttp.client_exceptions.ClientConnectorError"])
    failed = hf.events(tel.recovery(), "otel_recovery.attempt.failed")
    assert [e["otel_recovery.error.kind"] for e in failed] == ["connection"]


async def test_a_json_post_whose_connect_was_refused_is_sent_again(tel, instrument, late):
    instrument(clock=late.clock)
    response, _ = await fetch("POST", late.url("/orders"), json={"order": 2})
    assert response.status == 201
    assert late.seen == [("POST", "/orders", b'{"order": 2}')]
    assert tel.recovery().attributes["otel_recovery.retry.attempts"] == 2


async def test_a_post_reset_after_it_was_sent_is_not_sent_again(server, tel, instrument, clock):
    instrument()
    url = server.script("/pay", hf.reset(), hf.ok())
    got, raised = await attempted("POST", url, data=b"pay-1")
    assert len(raised) == 1 and got is raised[0]  # aiohttp's own error, unchanged
    assert type(got) is aiohttp.ServerDisconnectedError
    assert [s.body for s in server.seen("/pay")] == [b"pay-1"]
    assert clock.sleeps == []
    recovery = tel.recovery()
    assert recovery.attributes["otel_recovery.retry.attempts"] == 1
    assert recovery.attributes["otel_recovery.retry.disallowed"] == "non_idempotent_method"
    assert recovery.attributes["otel_recovery.retry.stop_reason"] == "not_retryable"


async def test_retry_unsent_off_sends_a_refused_post_once(tel, instrument, clock, late):
    instrument(http_retry_unsent=False)
    got, raised = await attempted("POST", late.url("/orders"), data=b"order-1")
    assert len(raised) == 1 and got is raised[0]
    assert type(got) is aiohttp.ClientConnectorError
    assert clock.sleeps == []
    recovery = tel.recovery()
    assert recovery.attributes["otel_recovery.retry.attempts"] == 1
    assert recovery.attributes["otel_recovery.retry.disallowed"] == "non_idempotent_method"
    assert recovery.attributes["otel_recovery.retry.stop_reason"] == "not_retryable"


async def test_retry_unsent_off_from_the_environment(tel, instrument, late, monkeypatch):
    monkeypatch.setenv("OTEL_RECOVERY_HTTP_RETRY_UNSENT", "false")
    instrument()
    got, raised = await attempted("POST", late.url("/orders"), data=b"order-1")
    assert len(raised) == 1 and isinstance(got, aiohttp.ClientConnectorError)
    assert tel.recovery().attributes["otel_recovery.retry.attempts"] == 1


async def test_a_body_that_cannot_be_replayed_is_not_sent_again_after_a_refusal(
    tel, instrument, clock, late
):
    instrument()

    async def chunks():
        yield b"order-"
        yield b"1"

    got, raised = await attempted("POST", late.url("/orders"), data=chunks())
    assert len(raised) == 1 and got is raised[0]
    assert isinstance(got, aiohttp.ClientConnectorError)
    assert clock.sleeps == []
    recovery = tel.recovery()
    assert recovery.attributes["otel_recovery.retry.attempts"] == 1
    assert recovery.attributes["otel_recovery.retry.disallowed"] == "non_replayable_body"
    assert recovery.attributes["otel_recovery.retry.stop_reason"] == "not_retryable"


async def test_an_open_circuit_refuses_a_post_once_and_sends_nothing(tel, instrument, clock, late):
    """Refused POSTs open the target's circuit: each is resent once and counts as one
    failed call. Once the port listens, the next POST gets our circuit-open error, also
    an ``aiohttp.ClientConnectionError`` but no proof of a connect that failed: nothing
    is sent, now or after a backoff."""
    ours = instrument(max_attempts=2, breaker_window=2, breaker_minimum_calls=2)
    for _ in range(2):
        got, raised = await attempted("POST", late.url("/orders"), data=b"order-1")
        assert isinstance(got, aiohttp.ClientConnectorError) and len(raised) == 2
    (breaker,) = ours.targets.breakers()
    assert breaker.snapshot().failed_calls == 2
    late.open()
    sleeps = len(clock.sleeps)
    got, raised = await attempted("POST", late.url("/orders"), data=b"order-1")
    assert isinstance(got, AioHttpCircuitOpenError) and raised == []
    assert not _unsent(got)
    assert late.seen == [] and len(clock.sleeps) == sleeps
    recovery = tel.recoveries()[-1]
    assert recovery.attributes["otel_recovery.outcome"] == "rejected"


async def test_a_post_refused_at_every_attempt_blames_no_method(tel, instrument, clock, late):
    """Every failure proved the request never left the client: it was retried like a GET,
    and its trace must not say its method forbade that."""
    instrument(max_attempts=3)
    got, raised = await attempted("POST", late.url("/orders"), data=b"order-1")
    assert len(raised) == 3 and got is raised[-1]
    assert len(clock.sleeps) == 2
    recovery = tel.recovery()
    assert recovery.attributes["otel_recovery.retry.attempts"] == 3
    assert recovery.attributes["otel_recovery.retry.stop_reason"] == "attempts_exhausted"
    assert "otel_recovery.retry.disallowed" not in recovery.attributes


async def test_a_post_refused_then_dropped_after_it_was_sent_stops_there(tel, instrument, late):
    """The resend after the refusal reached the server, which dropped the connection
    without answering: that POST may have been applied, so it is not sent a third time,
    and the trace says why."""
    late.drop = True
    instrument(max_attempts=3, clock=late.clock)
    got, raised = await attempted("POST", late.url("/orders"), data=b"order-1")
    assert [type(e) for e in raised] == [
        aiohttp.ClientConnectorError,
        aiohttp.ServerDisconnectedError,
    ]
    assert got is raised[-1]
    assert late.seen == [("POST", "/orders", b"order-1")] and len(late.clock.sleeps) == 1
    recovery = tel.recovery()
    assert recovery.attributes["otel_recovery.retry.attempts"] == 2
    assert recovery.attributes["otel_recovery.retry.disallowed"] == "non_idempotent_method"
    assert recovery.attributes["otel_recovery.retry.stop_reason"] == "not_retryable"


async def test_a_refused_post_is_resent_only_within_the_retry_budget(tel, instrument, late):
    """The resend of a request that never left the client is a retry like any: with the
    target's budget spent (here: none at all) the refused POST is tried once, and the
    trace says why it stopped, not that the method forbade it."""
    instrument(budget_ratio=0.0, budget_min_per_second=0.0)
    got, raised = await attempted("POST", late.url("/orders"), data=b"order-1")
    assert len(raised) == 1 and got is raised[0]
    recovery = tel.recovery()
    assert recovery.attributes["otel_recovery.retry.attempts"] == 1
    assert recovery.attributes["otel_recovery.retry.stop_reason"] == "budget_exhausted"
    assert "otel_recovery.retry.disallowed" not in recovery.attributes


# The predicate, on errors aiohttp itself raises (nothing instrumented).

TELLS_CONNECT_TIMEOUTS = hasattr(aiohttp, "ConnectionTimeoutError")
"""aiohttp 3.10 and later raise a connect timeout as a ``ConnectionTimeoutError``."""


async def aiohttp_error(url, **timeouts):
    """What plain aiohttp raises for a POST to ``url`` (a POST: aiohttp resends nothing)."""
    timeout = aiohttp.ClientTimeout(total=2.0, **timeouts)
    with pytest.raises(aiohttp.ClientError) as raised:
        async with aiohttp.ClientSession(timeout=timeout) as session:
            async with session.post(url, data=b"x"):
                pass
    return raised.value


async def test_unsent_is_true_for_a_refused_connect(late):
    assert originals_restored()
    error = await aiohttp_error(late.url("/"))
    assert isinstance(error, aiohttp.ClientConnectorError)
    assert _unsent(hf.as_the_layer_sees(error))


async def test_unsent_is_true_for_a_connect_timeout_from_aiohttp_3_10():
    """Before 3.10 a connect timeout is the ``ServerTimeoutError`` a read timeout also
    raises: nothing tells it was never sent, so it is not resent."""
    assert originals_restored()
    with hf.unaccepting_port() as port:
        error = await aiohttp_error(f"http://127.0.0.1:{port}/", connect=0.2)
    assert isinstance(error, aiohttp.ServerTimeoutError)
    assert _unsent(hf.as_the_layer_sees(error)) is TELLS_CONNECT_TIMEOUTS


async def test_unsent_is_false_once_the_request_was_sent(server):
    assert originals_restored()
    reset = await aiohttp_error(server.script("/reset", hf.reset()))
    assert isinstance(reset, aiohttp.ServerDisconnectedError)
    slow = await aiohttp_error(server.script("/slow", hf.hold()), sock_read=0.2)
    assert isinstance(slow, aiohttp.ServerTimeoutError)  # as a connect timeout before 3.10
    assert (server.count("/reset"), server.count("/slow")) == (1, 1)
    assert not _unsent(hf.as_the_layer_sees(reset))
    assert not _unsent(hf.as_the_layer_sees(slow))
    assert not _unsent(AioHttpCircuitOpenError("127.0.0.1:80", 1.0))


# -- unix sockets: each socket is its own target -------------------------------------------


async def test_each_unix_socket_has_its_own_breaker_named_by_its_path(tel, instrument):
    """Every session over a unix socket addresses it as ``http://localhost/``: the socket's
    path names the target, so a dead socket's failures open its own circuit, never a live
    socket's (nor a real ``localhost:80``'s), and a plan remembered for one socket's request
    is not used for another's of the same method and URL."""
    ours = instrument(max_attempts=1, breaker_window=2, breaker_minimum_calls=2)
    with hf.unix_sockets() as (live, dead):
        outcomes = []
        for path in (live, dead, dead, dead, live):
            connector = aiohttp.UnixConnector(path=path)
            async with aiohttp.ClientSession(connector=connector) as session:
                try:
                    async with session.get("http://localhost/v1") as response:
                        outcomes.append(response.status)
                except aiohttp.ClientConnectionError as error:
                    outcomes.append(type(error).__name__)
    assert outcomes == [
        200,
        "UnixClientConnectorError",
        "UnixClientConnectorError",
        "AioHttpCircuitOpenError",
        200,
    ]
    states = {b.name: b.state.value for b in ours.targets.breakers()}
    assert states == {f"aiohttp {live}": "closed", f"aiohttp {dead}": "open"}
    assert {s.name for s in tel.recoveries()} == {f"recover aiohttp {dead}"}  # the failures
