"""HTTPXRecoveryInstrumentor, sync and async clients, against a real local server.

Each test runs once with ``httpx.Client`` and once with ``httpx.AsyncClient`` (``mode``);
the sync client blocks the test's event loop, which is fine: the server has its own thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import threading
import time

import httpcore
import httpx
import pytest
from cycles import collected, ours
from opentelemetry import trace
from opentelemetry.instrumentation.httpx import HTTPXClientInstrumentor
from opentelemetry.instrumentation.utils import suppress_instrumentation
from opentelemetry.trace import SpanKind, StatusCode
from ours import marked_by_us

from otel_recovery.instrumentors import _wrapping
from otel_recovery.instrumentors._settings import SettingsError
from otel_recovery.instrumentors.httpx import (
    HTTPXAttemptTimeoutError,
    HTTPXCircuitOpenError,
    HTTPXRecoveryInstrumentor,
)
from otel_recovery.recover import RecoveryPolicy
from otel_recovery.testing import FakeClock

from . import http_faults as hf

server = pytest.fixture(scope="module")(hf.serve)
tel = pytest.fixture(hf.telemetry)

ORIGINALS = {
    (httpx.Client, "send"): httpx.Client.__dict__["send"],
    (httpx.AsyncClient, "send"): httpx.AsyncClient.__dict__["send"],
    (httpx.HTTPTransport, "handle_request"): httpx.HTTPTransport.__dict__["handle_request"],
    (httpx.AsyncHTTPTransport, "handle_async_request"): httpx.AsyncHTTPTransport.__dict__[
        "handle_async_request"
    ],
}
MODES = pytest.mark.parametrize("mode", ["sync", "async"])
BOTH_ORDERS = pytest.mark.parametrize("order", ["ours_first", "contrib_first"])


def originals_restored() -> bool:
    return all(owner.__dict__[name] is fn for (owner, name), fn in ORIGINALS.items())


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
    yield from hf.instrumenting(tel, clock, HTTPXRecoveryInstrumentor, HTTPXClientInstrumentor)


async def send(mode, method, url, *, timeout=2.0, hooks=None, stream=False, **kwargs):
    """One request with a fresh client; ``stream=True`` returns the response unread."""
    hooks = hooks or []
    if mode == "sync":
        with httpx.Client(timeout=timeout, event_hooks={"response": hooks}) as client:
            request = client.build_request(method, url, **kwargs)
            response = client.send(request, stream=stream)
            if stream:
                assert not response.is_closed
                response.read()
            return response

    async def ahook(response):
        for hook in hooks:
            hook(response)

    async with httpx.AsyncClient(timeout=timeout, event_hooks={"response": [ahook]}) as client:
        request = client.build_request(method, url, **kwargs)
        response = await client.send(request, stream=stream)
        if stream:
            assert not response.is_closed
            await response.aread()
        return response


def status_of(span):
    return span.attributes.get("http.status_code", span.attributes.get("http.response.status_code"))


@MODES
@BOTH_ORDERS
async def test_503_then_429_then_200_recovers_with_one_client_span_per_attempt(
    server, tel, instrument, clock, mode, order
):
    instrument(order)
    url = server.script("/a", hf.status(503), hf.retry_after(429, 1), hf.ok("fresh"))
    with tel.tracer_provider.get_tracer("app").start_as_current_span("app"):
        response = await send(mode, "GET", url)
    assert (response.status_code, response.text) == (200, "fresh")
    assert server.count("/a") == 3
    assert clock.sleeps[1] >= 1.0
    clients = tel.clients()
    assert [status_of(s) for s in clients] == [503, 429, 200]
    assert [s.attributes.get("http.request.resend_count") for s in clients] == [None, 1, 2]
    recovery = tel.recovery()
    assert recovery.kind is SpanKind.INTERNAL
    assert recovery.name == f"recover httpx 127.0.0.1:{server.port}"
    assert recovery.status.status_code is StatusCode.UNSET
    assert recovery.attributes["otel_recovery.outcome"] == "success"
    failed = hf.events(recovery, "otel_recovery.attempt.failed")
    assert [e["error.type"] for e in failed] == ["503", "429"]
    assert [s.parent.span_id for s in clients[1:]] == [recovery.context.span_id] * 2


@MODES
async def test_exhausted_retries_return_the_final_response_unchanged(server, tel, instrument, mode):
    instrument()
    seen = []
    url = server.script("/down", *[hf.status(503, body="busy")] * 3)
    response = await send(mode, "GET", url, stream=True, hooks=[seen.append])
    assert response.status_code == 503 and response.text == "busy"
    assert server.count("/down") == 3
    assert seen[-1] is response and all(r.is_closed for r in seen[:2])
    recovery = tel.recovery()
    assert recovery.attributes["error.type"] == "503"
    assert recovery.status.status_code is StatusCode.ERROR


@MODES
async def test_reset_and_stall_are_retried(server, tel, instrument, mode):
    instrument()
    url = server.script("/flaky", hf.reset(), hf.stall(1.0), hf.ok())
    response = await send(mode, "GET", url, timeout=0.25)
    assert response.status_code == 200 and server.count("/flaky") == 3
    failed = hf.events(tel.recovery(), "otel_recovery.attempt.failed")
    assert [e["error.type"] for e in failed] == [
        "httpx.RemoteProtocolError",
        "httpx.ReadTimeout",
    ]


@MODES
async def test_post_is_sent_once_unless_it_carries_an_idempotency_key(server, instrument, mode):
    instrument()
    plain = server.script("/pay", hf.status(503), hf.ok())
    assert (await send(mode, "POST", plain, json={"amount": 5})).status_code == 503
    reset = server.script("/pay-reset", hf.reset(), hf.ok())
    with pytest.raises(httpx.RemoteProtocolError):
        await send(mode, "POST", reset, content=b"x")
    keyed = server.script("/orders", hf.status(503), hf.ok())
    headers = {"Idempotency-Key": "k-1"}
    assert (await send(mode, "POST", keyed, content=b"o-1", headers=headers)).status_code == 200
    assert (server.count("/pay"), server.count("/pay-reset"), server.count("/orders")) == (1, 1, 2)
    assert {s.body for s in server.seen("/orders")} == {b"o-1"}


@MODES
async def test_streaming_bodies_are_sent_once(server, instrument, mode):
    instrument()

    def chunks():
        yield b"a"
        yield b"b"

    async def achunks():
        yield b"a"
        yield b"b"

    streamed = server.script("/stream", hf.status(503), hf.ok())
    body = chunks() if mode == "sync" else achunks()
    assert (await send(mode, "PUT", streamed, content=body)).status_code == 503
    in_memory = server.script("/bytes", hf.status(503), hf.ok())
    assert (await send(mode, "PUT", in_memory, content=b"ab")).status_code == 200
    assert (server.count("/stream"), server.count("/bytes")) == (1, 2)


@MODES
async def test_a_remembered_plan_only_answers_for_requests_of_its_shape(server, instrument, mode):
    """Plans are remembered by method and URL; a body or a key still decides for itself."""
    instrument()

    def chunks():
        yield b"x"

    async def achunks():
        yield b"x"

    url = server.script(
        "/same", hf.ok(), hf.status(503), hf.status(503), hf.ok(), hf.status(503), hf.status(503)
    )
    statuses = [
        (await send(mode, "PUT", url)).status_code,  # planned, then remembered
        (
            await send(mode, "PUT", url, content=chunks() if mode == "sync" else achunks())
        ).status_code,
        (await send(mode, "PUT", url)).status_code,  # the remembered plan: retried
        (await send(mode, "POST", url)).status_code,  # POST: once
        (await send(mode, "POST", url, headers={"Idempotency-Key": "k"})).status_code,
    ]
    assert statuses == [200, 503, 200, 503, 200]
    assert server.count("/same") == 7


@MODES
async def test_an_open_circuit_rejects_as_an_httpx_transport_error(server, tel, instrument, mode):
    instrument(max_attempts=1, breaker_window=2, breaker_minimum_calls=2)
    url = server.script("/x", *[hf.status(503)] * 2)
    for _ in range(2):
        assert (await send(mode, "GET", url)).status_code == 503
    with pytest.raises(httpx.TransportError) as raised:
        await send(mode, "GET", url)
    assert isinstance(raised.value, HTTPXCircuitOpenError)
    assert raised.value.request.url == httpx.URL(url)
    assert server.count("/x") == 2
    assert tel.recoveries()[-1].attributes["otel_recovery.outcome"] == "rejected"


@MODES
async def test_a_fallback_value_answers_as_a_response(server, tel, instrument, mode):
    instrument(max_attempts=2, fallback_value=["cached"])
    url = server.script("/prices", hf.reset(), hf.status(503))
    response = await send(mode, "GET", url)
    assert response.status_code == 200 and response.json() == ["cached"]
    assert response.headers["X-OTel-Recovery-Fallback"] == "value"
    assert server.count("/prices") == 2
    assert tel.recovery().attributes["otel_recovery.outcome"] == "fallback"


@MODES
async def test_a_programming_error_is_not_masked_by_the_fallback(server, instrument, mode):
    instrument(fallback_value="cached")
    with pytest.raises(httpx.UnsupportedProtocol):
        await send(mode, "GET", "ftp://127.0.0.1:1/file")


@MODES
async def test_suppressed_instrumentation_passes_straight_through(server, tel, instrument, mode):
    instrument()
    url = server.script("/quiet", hf.status(503), hf.ok())
    with suppress_instrumentation():
        assert (await send(mode, "GET", url)).status_code == 503
    assert server.count("/quiet") == 1 and marked_by_us(tel.spans()) == []


async def test_cancellation_during_backoff_releases_the_held_response(server, tel):
    """Real time: the task must really be asleep in the Retry-After wait when cancelled."""
    ours = HTTPXRecoveryInstrumentor()
    ours.instrument(tracer_provider=tel.tracer_provider, retry_after_cap=10)
    seen = []
    try:
        url = server.script("/later", hf.retry_after(503, 5), hf.ok())
        task = asyncio.ensure_future(send("async", "GET", url, stream=True, hooks=[seen.append]))
        while not seen:
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.05)  # now inside the 5 s Retry-After sleep
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert seen[0].is_closed and server.count("/later") == 1
        (recovery,) = [s for s in tel.spans() if s.name.startswith("recover ")]
        assert recovery.attributes["otel_recovery.outcome"] == "cancelled"
        assert not trace.get_current_span().is_recording()
    finally:
        ours.uninstrument()


async def test_disabled_by_environment_and_bad_settings(server, instrument, monkeypatch):
    monkeypatch.setenv("OTEL_RECOVERY_ENABLED", "false")
    instrument(contrib=False)
    assert originals_restored()
    url = server.script("/off", hf.status(503), hf.ok())
    assert (await send("async", "GET", url)).status_code == 503 and server.count("/off") == 1
    monkeypatch.setenv("OTEL_RECOVERY_ENABLED", "true")
    monkeypatch.setenv("OTEL_RECOVERY_BACKOFF_MAX", "-1")
    ours = HTTPXRecoveryInstrumentor()
    ours.uninstrument()
    with pytest.raises(SettingsError, match="OTEL_RECOVERY_BACKOFF_MAX='-1'"):
        ours.instrument()
    assert not ours.is_instrumented_by_opentelemetry and originals_restored()


@pytest.mark.parametrize("first", ["ours", "contrib"])
@BOTH_ORDERS
def test_uninstrument_in_any_order_restores_the_originals(tel, order, first):
    ours, contrib = HTTPXRecoveryInstrumentor(), HTTPXClientInstrumentor()
    steps = [ours.instrument, lambda: contrib.instrument(tracer_provider=tel.tracer_provider)]
    for step in steps if order == "ours_first" else reversed(steps):
        step()
    assert not originals_restored()
    for instrumentor in (ours, contrib) if first == "ours" else (contrib, ours):
        instrumentor.uninstrument()
    assert originals_restored()


@MODES
async def test_a_bug_in_planning_falls_back_to_the_plain_call(
    server, instrument, monkeypatch, caplog, mode
):
    instrument()
    monkeypatch.setattr(_wrapping, "_reported", set())

    def broken(*args, **kwargs):
        raise RuntimeError("planning bug")

    monkeypatch.setattr("otel_recovery.instrumentors.httpx.plan_call", broken)
    url = server.script("/bug", hf.ok("still fine"))
    with caplog.at_level(logging.ERROR, logger="otel_recovery.instrumentors"):
        assert (await send(mode, "GET", url)).text == "still fine"
    assert server.count("/bug") == 1
    assert any("httpx: planning" in r.getMessage() for r in caplog.records)


@MODES
async def test_a_bug_in_the_engine_before_sending_sends_exactly_once(
    server, instrument, monkeypatch, mode
):
    instrument()
    monkeypatch.setattr(_wrapping, "_reported", set())

    def broken(fn, args, kwargs):
        raise RuntimeError("engine bug")

    async def abroken(fn, args, kwargs):
        raise RuntimeError("engine bug")

    monkeypatch.setattr(RecoveryPolicy, "runner", lambda self: broken)
    monkeypatch.setattr(RecoveryPolicy, "arunner", lambda self: abroken)
    url = server.script("/engine", hf.ok("sent once"))
    assert (await send(mode, "GET", url)).text == "sent once"
    assert server.count("/engine") == 1


# -- httpx's own connection retries (a transport's retries=N) -----------------------------


class _Hangup:
    """A TCP server that counts connections and closes each at once: a TLS client fails
    its handshake, which httpx reports as ``ConnectError``, and which httpcore's
    connection retries repeat."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.connections = 0
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                connection, _ = self.listener.accept()
            except OSError:  # closed
                return
            self.connections += 1
            connection.close()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.listener.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept()
        self.listener.close()
        self._thread.join(5)


@pytest.fixture
def hangup():
    server = _Hangup()
    yield server
    server.close()


async def _send_through(mode: str, url: str, retries: int) -> None:
    if mode == "sync":
        with httpx.Client(transport=httpx.HTTPTransport(retries=retries)) as client:
            client.get(url)
        return
    async with httpx.AsyncClient(transport=httpx.AsyncHTTPTransport(retries=retries)) as client:
        await client.get(url)


HTTPCORE = tuple(int(part) for part in httpcore.__version__.split(".")[:2])
TLS_REPEATED = HTTPCORE >= (0, 17)
"""httpcore 0.17 moved the TLS handshake into its connection retries; before, a failed
handshake was tried once whatever ``retries`` said."""


@MODES
async def test_handshakes_httpcore_already_retried_are_not_retried_again(
    hangup, tel, instrument, mode
):
    if mode == "async" and not TLS_REPEATED:
        pytest.skip(
            "httpcore < 0.17 under anyio 4 raises anyio.EndOfStream here, with or without us"
        )
    instrument()
    url = f"https://127.0.0.1:{hangup.port}/"
    with pytest.raises(httpx.ConnectError) as raised:
        await _send_through(mode, url, retries=1)  # httpcore waits 0 s before its retry
    assert type(raised.value) is httpx.ConnectError
    recovery = tel.recovery()
    if TLS_REPEATED:
        assert hangup.connections == 2  # httpcore's two, not six
        assert recovery.attributes["otel_recovery.retry.attempts"] == 1
        assert recovery.attributes["otel_recovery.retry.disallowed"] == "client_retried"
        assert recovery.attributes["otel_recovery.http.client_retries"] == 1
    else:  # httpcore tried the handshake once: ours is the only retry
        assert hangup.connections == 3
        assert "otel_recovery.retry.disallowed" not in recovery.attributes
    tel.exporter.clear()
    hangup.connections = 0
    with pytest.raises(httpx.ConnectError):
        await _send_through(mode, url, retries=0)  # httpx's default: we retry
    assert hangup.connections == 3
    assert "otel_recovery.retry.disallowed" not in tel.recovery().attributes


@MODES
async def test_refused_connections_httpcore_already_retried_are_not_retried_again(
    tel, instrument, mode
):
    """Every httpcore repeats a refused TCP connect ``retries`` times (with a backoff of
    0 s, then 0.5 s: one retry keeps the test fast)."""
    instrument()
    with socket.socket() as closed:  # a port that was free a moment ago: refused
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    url = f"http://127.0.0.1:{port}/"
    with pytest.raises(httpx.ConnectError):
        await _send_through(mode, url, retries=1)
    recovery = tel.recovery()
    assert recovery.attributes["otel_recovery.retry.attempts"] == 1
    assert recovery.attributes["otel_recovery.http.client_retries"] == 1
    tel.exporter.clear()
    with pytest.raises(httpx.ConnectError):
        await _send_through(mode, url, retries=0)
    assert tel.recovery().attributes["otel_recovery.retry.attempts"] == 3


# -- OTEL_RECOVERY_ATTEMPT_TIMEOUT (awaited requests) --------------------------------------


async def test_an_attempt_cut_by_attempt_timeout_is_retried(server, tel, instrument):
    instrument(attempt_timeout=0.5)  # the second attempt has that long, on a busy machine
    url = server.script("/slow", hf.stall(10.0), hf.ok("fine"))
    response = await send("async", "GET", url)
    assert (response.status_code, response.text) == (200, "fine")
    assert server.count("/slow") == 2
    failed = hf.events(tel.recovery(), "otel_recovery.attempt.failed")
    assert [e["error.type"] for e in failed] == [
        "otel_recovery.instrumentors.httpx.HTTPXAttemptTimeoutError"
    ]


async def test_attempts_all_cut_by_attempt_timeout_raise_httpxs_timeout_error(
    server, tel, instrument, caplog
):
    """Until now the app got a bare ``CancelledError`` here (the cancelled attempt's), and
    an internal error was logged: a cancellation the task never asked for."""
    instrument(attempt_timeout=0.3)
    url = server.script("/stuck", *[hf.stall(10.0)] * 3)
    with (
        caplog.at_level(logging.ERROR, logger="otel_recovery"),
        pytest.raises(httpx.TimeoutException) as raised,
    ):
        await send("async", "GET", url)
    assert isinstance(raised.value, HTTPXAttemptTimeoutError)
    assert isinstance(raised.value, TimeoutError)
    assert str(raised.value.request.url) == url  # what httpx's own errors carry
    assert server.count("/stuck") == 3
    assert "internal error" not in caplog.text
    assert tel.recovery().attributes["error.type"] == (
        "otel_recovery.instrumentors.httpx.HTTPXAttemptTimeoutError"
    )


# -- no reference cycles (see tests/test_reference_cycles.py) -----------------------------


@MODES
@pytest.mark.parametrize("ending", ["recovered", "gave_up"])
async def test_a_retried_request_leaves_no_reference_cycle_of_ours(
    server, tel, instrument, mode, ending
):
    """The signals our layer raised for failed responses, and our frames, are freed as soon
    as the request is over, without the garbage collector (httpx leaves each response in a
    cycle of its own, so this asks what the cycles hold rather than whether any exist)."""
    instrument()
    actions = [hf.status(503)] * 2 + ([hf.ok()] if ending == "recovered" else [hf.status(503)])
    url = server.script("/cyc", *actions)
    with collected() as garbage:
        final = await send(mode, "GET", url)
        assert final.status_code == (200 if ending == "recovered" else 503)
        del final
    assert server.count("/cyc") == 3
    assert ours(garbage) == []
