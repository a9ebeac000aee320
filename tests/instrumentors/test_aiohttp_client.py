"""AioHttpClientRecoveryInstrumentor against a real local server with real faults."""

from __future__ import annotations

import asyncio
import logging
import sys
import time

import aiohttp
import pytest
from opentelemetry.instrumentation.aiohttp_client import AioHttpClientInstrumentor
from opentelemetry.instrumentation.utils import suppress_instrumentation
from opentelemetry.trace import SpanKind, StatusCode

from otel_recovery.instrumentors import _wrapping
from otel_recovery.instrumentors._settings import SettingsError
from otel_recovery.instrumentors.aiohttp_client import (
    AioHttpAttemptTimeoutError,
    AioHttpCircuitOpenError,
    AioHttpClientRecoveryInstrumentor,
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
        timeout=aiohttp.ClientTimeout(total=timeout),
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
        response, body = await fetch("GET", url)
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
    connection, so there it takes two resets to make one failed attempt of ours."""
    instrument()
    url = server.script("/flaky", *DROPS, hf.stall(1.0), hf.ok())
    response, _ = await fetch("GET", url, timeout=0.25)
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
    instrument(attempt_timeout=0.5)  # the second attempt has that long, on a busy machine
    url = server.script("/slow", hf.stall(10.0), hf.ok("fine"))
    response, body = await fetch("GET", url)
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
    instrument(attempt_timeout=0.3)
    url = server.script("/stuck", *[hf.stall(10.0)] * 3)
    with (
        caplog.at_level(logging.ERROR, logger="otel_recovery"),
        pytest.raises(aiohttp.ClientError) as raised,
    ):
        await fetch("GET", url)
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
    (longer) limit set, it was reported as our limit and as an internal error of ours."""
    instrument(attempt_timeout=5.0)
    url = server.script("/own", *[hf.stall(10.0)] * 3)
    with (
        caplog.at_level(logging.ERROR, logger="otel_recovery"),
        pytest.raises(asyncio.TimeoutError) as raised,
    ):
        await fetch("GET", url, timeout=0.2)
    assert not isinstance(raised.value, AioHttpAttemptTimeoutError)
    assert server.count("/own") == 3  # a timeout is retried like any
    assert "internal error" not in caplog.text
    assert "AioHttpAttemptTimeoutError" not in tel.recovery().attributes["error.type"]
