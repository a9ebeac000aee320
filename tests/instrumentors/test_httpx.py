"""HTTPXRecoveryInstrumentor, sync and async clients, against a real local server.

Each test runs once with ``httpx.Client`` and once with ``httpx.AsyncClient`` (``mode``);
the sync client blocks the test's event loop, which is fine: the server has its own thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
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

import otel_recovery.instrumentors.httpx
from otel_recovery._first_times import FirstTimes
from otel_recovery.instrumentors import _wrapping, suppress_recovery
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
late = pytest.fixture(hf.late_port)

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
    url = server.script("/flaky", hf.reset(), hf.hold(), hf.ok())
    response = await send(mode, "GET", url, timeout=hf.HELD_TIMEOUT)
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
@pytest.mark.parametrize("on", ["request", "client"])
async def test_a_post_with_an_idempotency_key_spelt_in_bytes_is_retried_once(
    server, instrument, mode, on
):
    """httpx takes header names and values as bytes and puts the client's headers on each
    request: a key spelt so, on either, is a key (as ``requests`` needs its own reading)."""
    instrument()
    url = server.script("/orders", hf.status(503), hf.ok())
    key = {b"IDEMPOTENCY-KEY": b"k-1"}
    client_headers, headers = (key, None) if on == "client" else (None, key)
    if mode == "sync":
        with httpx.Client(headers=client_headers) as client:
            response = client.post(url, content=b"o-1", headers=headers)
    else:
        async with httpx.AsyncClient(headers=client_headers) as client:
            response = await client.post(url, content=b"o-1", headers=headers)
    assert response.status_code == 200
    seen = server.seen("/orders")
    keys = [v for s in seen for k, v in s.headers.items() if k.lower() == "idempotency-key"]
    assert keys == ["k-1", "k-1"]  # two requests, each with its key


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
    assert response.elapsed.total_seconds() == 0  # readable, as on a real response
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


@MODES
async def test_suppress_recovery_steps_aside_while_contrib_still_traces(
    server, tel, instrument, mode
):
    """Inside ``suppress_recovery()`` a request goes out once, as the application sent it;
    an open circuit does not refuse it and it counts on no breaker; contrib's span stays."""
    ours = instrument()
    url = server.script("/probe", hf.ok(), hf.status(503), hf.ok())
    assert (await send(mode, "GET", url)).status_code == 200  # remembered: compiled
    tel.exporter.clear()
    with suppress_recovery():
        assert (await send(mode, "GET", url)).status_code == 503
    assert server.count("/probe") == 2
    spans = tel.spans()
    assert len(spans) == 1 and spans[0].kind is SpanKind.CLIENT and marked_by_us(spans) == []
    (breaker,) = ours.targets.breakers()
    breaker.force_open()
    before = breaker.snapshot()
    with suppress_recovery():
        assert (await send(mode, "GET", url)).status_code == 200  # not refused
    assert server.count("/probe") == 3 and breaker.snapshot() == before
    with pytest.raises(HTTPXCircuitOpenError):
        await send(mode, "GET", url)


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


async def test_disabled_by_environment_and_bad_settings(server, instrument, monkeypatch, caplog):
    monkeypatch.setattr("otel_recovery.instrumentors._setting_values._warned", FirstTimes())
    monkeypatch.setenv("OTEL_RECOVERY_ENABLED", "false")
    instrument(contrib=False)
    assert originals_restored()
    url = server.script("/off", hf.status(503), hf.ok())
    assert (await send("async", "GET", url)).status_code == 503 and server.count("/off") == 1
    monkeypatch.setenv("OTEL_RECOVERY_ENABLED", "true")
    monkeypatch.setenv("OTEL_RECOVERY_BACKOFF_MAX", "-1")
    ours = HTTPXRecoveryInstrumentor()
    assert not ours.is_instrumented_by_opentelemetry  # switched off, it patched nothing
    with caplog.at_level(logging.ERROR, logger="otel_recovery.instrumentors"):
        ours.instrument()  # the deployment's bad value: logged, never raised
    assert "OTEL_RECOVERY_BACKOFF_MAX='-1' is not valid" in caplog.text
    assert not ours.is_instrumented_by_opentelemetry and originals_restored()
    with pytest.raises(SettingsError, match=r"max_attempts \(from instrument"):
        ours.instrument(max_attempts=0)  # the program's own bad argument still raises


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
    # The first attempt is cut at the limit; the second, answered at once (a few ms on an
    # idle machine), must beat it, on a loaded machine too (0.5 s left it little margin).
    instrument(attempt_timeout=2.0)
    url = server.script("/slow", hf.hold(), hf.ok("fine"))
    response = await send("async", "GET", url, timeout=10.0)  # httpx's own: far beyond ours
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
    # Each attempt's request must reach the server within the limit to be counted (a few
    # ms on an idle machine; 0.3 s was tight on a loaded one); the hold outlasts the limit.
    instrument(attempt_timeout=1.0)
    url = server.script("/stuck", *[hf.hold()] * 3)
    with (
        caplog.at_level(logging.ERROR, logger="otel_recovery"),
        pytest.raises(httpx.TimeoutException) as raised,
    ):
        await send("async", "GET", url, timeout=10.0)  # httpx's own: far beyond ours
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


# -- requests that never left the client --------------------------------------------------
# httpcore raises ConnectError / ConnectTimeout only while it makes a connection, before it
# writes the request: even a POST is sent again after one (as urllib3's ``connect`` retries
# and Envoy's ``reset-before-request`` do); a failure after the request was written never.


@MODES
async def test_a_retried_response_is_released_before_the_backoff(server, instrument, mode):
    """A streamed 503's connection goes back to the pool before the wait, not after it: a
    ``Retry-After`` must not keep it from every other request of a small pool."""
    seen: list[httpx.Response] = []
    at_sleep: list[list[bool]] = []
    instrument(clock=hf.SleepHook(lambda: at_sleep.append([r.is_closed for r in seen])))
    url = server.script("/x", hf.retry_after(503, 1), hf.ok())
    response = await send(mode, "GET", url, stream=True, hooks=[seen.append])
    assert response.status_code == 200 and len(seen) == 2
    assert at_sleep and all(closed == [True] for closed in at_sleep)


def _chain(error: BaseException | None) -> list[type[BaseException]]:
    types = []
    while error is not None and len(types) < 12:
        types.append(type(error))
        error = error.__cause__ or error.__context__
    return types


@MODES
async def test_the_final_error_keeps_its_own_chain(server, instrument, mode):
    """After a 503 and a reset the app gets httpx's exception as httpx raised it, its
    ``__context__`` its own, not the failure before it nor our signal for the 503."""
    bare = server.script("/bare", hf.reset())
    with pytest.raises(httpx.TransportError) as raised:
        await send(mode, "GET", bare)
    expected = _chain(raised.value)
    instrument(max_attempts=2)
    url = server.script("/r", hf.status(503), hf.reset())
    with pytest.raises(httpx.TransportError) as raised:
        await send(mode, "GET", url)
    assert _chain(raised.value) == expected and server.count("/r") == 2


def _refused(error: BaseException) -> bool:
    """Whether a refused connect (``ConnectionRefusedError``) is behind ``error``."""
    link: BaseException | None = error
    for _ in range(8):
        if link is None or isinstance(link, ConnectionRefusedError):
            break
        link = link.__cause__ or link.__context__
    return isinstance(link, ConnectionRefusedError)


def _chunks(mode):
    """A streaming body (not replayable) of the kind ``mode``'s client takes."""

    def chunks():
        yield b"order-"
        yield b"1"

    async def achunks():
        yield b"order-"
        yield b"1"

    return chunks() if mode == "sync" else achunks()


def _not_resent(recovery, why):
    assert recovery.attributes["otel_recovery.retry.attempts"] == 1
    assert recovery.attributes["otel_recovery.retry.disallowed"] == why
    assert recovery.attributes["otel_recovery.retry.stop_reason"] == "not_retryable"
    assert recovery.attributes["otel_recovery.outcome"] == "failure"


@MODES
@BOTH_ORDERS
async def test_a_post_whose_connect_was_refused_is_sent_again_and_applied_once(
    late, tel, instrument, mode, order
):
    instrument(order, clock=late.clock)
    response = await send(mode, "POST", late.url("/orders"), content=b"order-1")
    assert (response.status_code, response.text) == (201, "created:order-1")
    hf.assert_resent_once(late, tel, failed=["httpx.ConnectError"])


@MODES
async def test_a_json_post_to_a_remembered_shape_is_sent_again_after_a_refused_connect(
    late, tel, instrument, monkeypatch, mode
):
    """httpx remembers a plan by method and URL: a second POST to the URL, refused again,
    is resent by the remembered plan (Idempotency-Keys ignored, so the plan is kept)."""
    planner = otel_recovery.instrumentors.httpx._Planner
    planned = []
    plan_afresh = planner._plan
    monkeypatch.setattr(
        planner, "_plan", lambda self, *args: planned.append(args) or plan_afresh(self, *args)
    )
    instrument(clock=late.clock, http_retry_idempotency_key=False)
    url = late.url("/orders")
    late.armed = False  # planned and remembered by a POST refused throughout
    with pytest.raises(httpx.ConnectError):
        await send(mode, "POST", url, json={"id": 1})
    assert tel.recovery().attributes["otel_recovery.retry.attempts"] == 3  # resent, refused
    late.armed = True
    tel.exporter.clear()
    response = await send(mode, "POST", url, json={"id": 1})
    assert len(planned) == 1  # the second POST was not planned again: remembered
    assert response.status_code == 201 and response.text.startswith("created:")
    assert [(m, p, json.loads(b)) for m, p, b in late.seen] == [("POST", "/orders", {"id": 1})]
    recovery = tel.recovery()
    assert recovery.attributes["otel_recovery.retry.attempts"] == 2
    assert "otel_recovery.retry.disallowed" not in recovery.attributes


@MODES
async def test_a_post_reset_after_it_was_sent_is_not_sent_again(
    server, tel, instrument, clock, mode
):
    """A dropped connection after the request was written may have been applied: the
    library's error goes to the app as it was raised."""
    instrument()
    url = server.script("/pay", hf.reset(), hf.ok())
    with pytest.raises(httpx.RemoteProtocolError) as raised:
        await send(mode, "POST", url, content=b"order-1")
    assert type(raised.value) is httpx.RemoteProtocolError
    assert [s.body for s in server.seen("/pay")] == [b"order-1"]
    assert clock.sleeps == [] and len(tel.clients()) == 1
    _not_resent(tel.recovery(), "non_idempotent_method")


@MODES
@pytest.mark.parametrize("how", ["argument", "environment"])
async def test_resending_requests_that_never_left_can_be_switched_off(
    late, tel, instrument, monkeypatch, mode, how
):
    """Off, a POST keeps to the method rules: refused, it is tried once (a GET is still
    retried, which opens the port: the POST would have met it had it been resent)."""
    if how == "environment":
        monkeypatch.setenv("OTEL_RECOVERY_HTTP_RETRY_UNSENT", "false")
        instrument(clock=late.clock)
    else:
        instrument(clock=late.clock, http_retry_unsent=False)
    with pytest.raises(httpx.ConnectError) as raised:
        await send(mode, "POST", late.url("/orders"), content=b"order-1")
    assert type(raised.value) is httpx.ConnectError and _refused(raised.value)
    assert late.clock.sleeps == [] and late.seen == []
    _not_resent(tel.recovery(), "non_idempotent_method")
    assert (await send(mode, "GET", late.url("/after"))).status_code == 201
    assert late.seen == [("GET", "/after", b"")]


@MODES
async def test_a_streaming_body_is_not_resent_after_a_refused_connect(late, tel, instrument, mode):
    """Only a body held in memory can be sent again; a POST of bytes to the same port is
    (and meets the port it opened)."""
    instrument(clock=late.clock)
    with pytest.raises(httpx.ConnectError) as raised:
        await send(mode, "POST", late.url("/upload"), content=_chunks(mode))
    assert type(raised.value) is httpx.ConnectError and _refused(raised.value)
    assert late.clock.sleeps == [] and late.seen == [] and len(tel.clients()) == 1
    _not_resent(tel.recovery(), "non_replayable_body")
    response = await send(mode, "POST", late.url("/bytes"), content=b"order-2")
    assert response.status_code == 201
    assert late.seen == [("POST", "/bytes", b"order-2")]


@MODES
async def test_a_refused_post_httpcore_already_reconnected_is_not_sent_again(
    late, tel, instrument, monkeypatch, mode
):
    """httpcore repeats a refused connect for any method (``retries=2``; its backoff,
    0 s then 0.5 s, set to 0 s here): ours on top would multiply the connects; a resend
    would have slept, opening the port."""
    for connection in (httpcore._sync.connection, httpcore._async.connection):
        monkeypatch.setattr(connection, "RETRIES_BACKOFF_FACTOR", 0, raising=False)
    instrument(clock=late.clock)
    url = late.url("/orders")
    with pytest.raises(httpx.ConnectError) as raised:
        if mode == "sync":
            with httpx.Client(transport=httpx.HTTPTransport(retries=2)) as client:
                client.post(url, content=b"order-1")
        else:
            transport = httpx.AsyncHTTPTransport(retries=2)
            async with httpx.AsyncClient(transport=transport) as client:
                await client.post(url, content=b"order-1")
    assert type(raised.value) is httpx.ConnectError and _refused(raised.value)
    assert late.clock.sleeps == [] and late.seen == []
    recovery = tel.recovery()
    assert recovery.attributes["otel_recovery.retry.attempts"] == 1
    assert recovery.attributes["otel_recovery.retry.disallowed"] == "client_retried"
    assert recovery.attributes["otel_recovery.http.client_retries"] == 2
    assert recovery.attributes["otel_recovery.outcome"] == "failure"


@MODES
async def test_an_open_circuit_refuses_a_post_once_and_sends_nothing(late, tel, instrument, mode):
    """Refused POSTs (each resent, each failing) open the target's circuit; the next POST
    is refused with our error, a ConnectError that never counts as a connect that failed:
    not resent (a resend would sleep, which would open the port to it)."""
    ours = instrument(
        clock=late.clock, breaker_window=2, breaker_minimum_calls=2, breaker_failure_rate=0.5
    )
    url = late.url("/orders")
    late.armed = False
    for _ in range(2):
        with pytest.raises(httpx.ConnectError) as raised:
            await send(mode, "POST", url, content=b"order-1")
        assert _refused(raised.value)
    assert [r.attributes["otel_recovery.retry.attempts"] for r in tel.recoveries()] == [3, 3]
    (breaker,) = ours.targets.breakers()
    assert breaker.snapshot().state == "open"
    late.armed, slept = True, len(late.clock.sleeps)
    tel.exporter.clear()
    with pytest.raises(HTTPXCircuitOpenError) as raised:
        await send(mode, "POST", url, content=b"order-1")
    assert isinstance(raised.value, httpx.ConnectError)
    assert not otel_recovery.instrumentors.httpx._unsent(raised.value)
    assert len(late.clock.sleeps) == slept and late.seen == [] and tel.clients() == []
    recovery = tel.recovery()
    assert recovery.attributes["otel_recovery.outcome"] == "rejected"
    assert "otel_recovery.retry.disallowed" not in recovery.attributes


async def _raised_by_httpx(server, mode, fault):
    """The error uninstrumented httpx raises for a POST that meets ``fault``."""
    with contextlib.ExitStack() as stack:
        timeout = httpx.Timeout(2.0)
        if fault == "refused":
            closed = stack.enter_context(socket.socket())
            closed.bind(("127.0.0.1", 0))  # bound, not listening: refused
            url = f"http://127.0.0.1:{closed.getsockname()[1]}/orders"
        elif fault == "connect_timeout":
            url = f"http://127.0.0.1:{stack.enter_context(hf.unaccepting_port())}/"
            timeout = httpx.Timeout(2.0, connect=0.1)
        elif fault == "reset":
            url = server.script("/fault", hf.reset())
        else:  # held until the 0.2 s read timeout fired; the connect has 2 s
            url, timeout = server.script("/fault", hf.hold()), httpx.Timeout(2.0, read=0.2)
        with pytest.raises(httpx.TransportError) as raised:
            await send(mode, "POST", url, timeout=timeout, content=b"order-1")
    return raised.value


@MODES
@pytest.mark.parametrize(
    ("fault", "error", "unsent"),
    [
        ("refused", httpx.ConnectError, True),
        ("connect_timeout", httpx.ConnectTimeout, True),
        ("reset", httpx.RemoteProtocolError, False),
        ("read_timeout", httpx.ReadTimeout, False),
    ],
)
async def test_unsent_tells_a_connection_never_made_from_a_request_that_may_have_been_sent(
    server, mode, fault, error, unsent
):
    raised = await _raised_by_httpx(server, mode, fault)
    assert type(raised) is error
    assert otel_recovery.instrumentors.httpx._unsent(hf.as_the_layer_sees(raised)) is unsent
    if fault in ("reset", "read_timeout"):
        assert server.count("/fault") == 1  # the request did reach the server


def test_unsent_never_counts_our_open_circuit_as_a_failed_connect():
    rejection = HTTPXCircuitOpenError("httpx 127.0.0.1:1", 5.0)
    assert isinstance(rejection, httpx.ConnectError)  # what a failed connect raises too
    assert not otel_recovery.instrumentors.httpx._unsent(rejection)


# -- unix sockets: each socket is its own target -------------------------------------------


async def send_over(mode, uds, url, **transport):
    """One GET with a fresh client whose transport talks over the unix socket ``uds``."""
    if mode == "sync":
        with httpx.Client(transport=httpx.HTTPTransport(uds=uds, **transport)) as client:
            return client.get(url)
    async with httpx.AsyncClient(transport=httpx.AsyncHTTPTransport(uds=uds)) as client:
        return await client.get(url)


@MODES
async def test_each_unix_socket_has_its_own_breaker_named_by_its_path(tel, instrument, mode):
    """Every client of a unix socket addresses it as ``http://localhost/``: the socket's path
    names the target, so a dead socket's failures open its own circuit, never a live
    socket's (nor a real ``localhost:80``'s), and a plan remembered for one socket's request
    is not used for another's of the same method and URL."""
    ours = instrument(max_attempts=1, breaker_window=2, breaker_minimum_calls=2)
    with hf.unix_sockets() as (live, dead):
        outcomes = []
        for uds in (live, dead, dead, dead, live):
            try:
                outcomes.append((await send_over(mode, uds, "http://localhost/v1")).status_code)
            except httpx.TransportError as error:
                outcomes.append(type(error).__name__)
    assert outcomes == [200, "ConnectError", "ConnectError", "HTTPXCircuitOpenError", 200]
    states = {b.name: b.state.value for b in ours.targets.breakers()}
    assert states == {f"httpx {live}": "closed", f"httpx {dead}": "open"}
    assert {s.name for s in tel.recoveries()} == {f"recover httpx {dead}"}  # the failures


def test_a_transport_of_the_applications_is_named_by_the_url(instrument):
    """A transport that is not httpx's own (no connection pool to read a socket from) is
    named by the URL, as before, and its plan is remembered; reading a client's socket never
    raises, whatever its transport holds."""
    ours = instrument(contrib=False)

    def handler(request):
        return httpx.Response(200)

    with httpx.Client(transport=httpx.MockTransport(handler)) as client:
        for _ in range(2):
            assert client.get("http://Api.Example.invalid/x").status_code == 200
    assert [b.name for b in ours.targets.breakers()] == ["httpx api.example.invalid:80"]
    odd = httpx.HTTPTransport()
    odd._pool = None  # another httpcore, say
    for client in (object(), httpx.Client(transport=odd), None):
        assert otel_recovery.instrumentors.httpx._socket_of(client) is None


class _TokenFromBody(httpx.Auth):
    """Answers a 401 by sending the request again with the token the 401's body names."""

    requires_response_body = True

    def auth_flow(self, request):
        response = yield request
        if response.status_code == 401:
            request.headers["Authorization"] = f"Token {response.text}"
            yield request


@MODES
async def test_a_resend_goes_out_as_the_application_gave_it_not_as_the_auth_flow_left_it(
    server, tel, instrument, mode
):
    """The auth flow writes to the request; the resend is the same request object, which
    must start its flow afresh (bare httpx never sends the first round with a token)."""
    instrument(contrib=False)
    url = server.script(
        "/a",
        hf.status(401, body="tok1"),
        hf.status(503),
        hf.status(401, body="tok2"),
        hf.ok("fresh"),
    )
    if mode == "sync":
        with httpx.Client(auth=_TokenFromBody()) as client:
            response = client.get(url)
    else:
        async with httpx.AsyncClient(auth=_TokenFromBody()) as client:
            response = await client.get(url)
    assert (response.status_code, response.text) == (200, "fresh")
    sent = [seen.headers.get("Authorization") for seen in server.seen("/a")]
    assert sent == [None, "Token tok1", None, "Token tok2"]


@MODES
async def test_a_resend_goes_out_without_what_a_request_hook_added(server, tel, instrument, mode):
    instrument(contrib=False)
    url = server.script("/a", hf.status(503), hf.ok("fresh"))

    def stamp(request):  # appends, as a hook that counts hops might
        request.headers["X-Hops"] = ",".join(filter(None, [request.headers.get("X-Hops"), "1"]))

    async def astamp(request):
        stamp(request)

    if mode == "sync":
        with httpx.Client(event_hooks={"request": [stamp]}) as client:
            response = client.get(url)
    else:
        async with httpx.AsyncClient(event_hooks={"request": [astamp]}) as client:
            response = await client.get(url)
    assert response.status_code == 200
    assert [seen.headers.get("X-Hops") for seen in server.seen("/a")] == ["1", "1"]
