"""A client the application closes while a call of it waits to be repeated.

At shutdown an application closes its shared client while some calls are still in flight.
Without otel-recovery a call that had failed already has its answer (a 503); with it, that
call may be waiting to be repeated, and the repeat would only meet the client's own
"closed" error (httpx's and aiohttp's ``RuntimeError``), which no server caused and which
``except httpx.HTTPError`` does not catch. The call gives up on the failure it has instead
(``stop_reason=client_closed``), which still counts on the server's breaker.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable

import aiohttp
import httpx
import pytest

from otel_recovery.instrumentors.aiohttp_client import AioHttpClientRecoveryInstrumentor
from otel_recovery.instrumentors.httpx import HTTPXRecoveryInstrumentor
from otel_recovery.testing import FakeClock

from . import http_faults as hf

server = pytest.fixture(scope="module")(hf.serve)
tel = pytest.fixture(hf.telemetry)


class ClosingClock(FakeClock):
    """A fake clock whose first backoff wait runs ``during_wait`` (closes the client)."""

    def __init__(self) -> None:
        super().__init__(wall_start=time.time())
        self.during_wait: Callable[[], Awaitable[None] | None] = lambda: None

    def sleep(self, seconds: float) -> None:
        closing = self.during_wait()
        assert closing is None, "a sync client closes without awaiting"
        super().sleep(seconds)

    async def asleep(self, seconds: float) -> None:
        closing = self.during_wait()
        if closing is not None:
            await closing
        self.sleeps.append(seconds)


@pytest.fixture(autouse=True)
def _fresh(server):
    server.reset()


def instrument(tel: hf.Telemetry, instrumentor: type, clock: FakeClock) -> object:
    ours = instrumentor()
    ours.instrument(
        tracer_provider=tel.tracer_provider,
        meter_provider=tel.meter_provider,
        clock=clock,
        backoff_initial=0.01,
        backoff_max=0.05,
    )
    return ours


def assert_gave_up_on_the_503(server: hf.FaultServer, tel: hf.Telemetry, clock: FakeClock) -> None:
    assert server.count("/a") == 1 and len(clock.sleeps) == 1 and clock.sleeps[0] >= 1.0
    recovery = tel.recovery()
    assert recovery.attributes["otel_recovery.retry.stop_reason"] == "client_closed"
    assert recovery.attributes["otel_recovery.retry.attempts"] == 1


@pytest.mark.parametrize("mode", ["sync", "async"])
async def test_httpx_a_client_closed_during_the_wait_gives_the_call_its_503(server, tel, mode):
    clock = ClosingClock()
    ours = instrument(tel, HTTPXRecoveryInstrumentor, clock)
    url = server.script("/a", hf.status(503, {"Retry-After": "1"}, body="busy"), hf.ok())
    try:
        if mode == "sync":
            client = httpx.Client()
            clock.during_wait = client.close
            response = client.get(url)
        else:
            async_client = httpx.AsyncClient()
            clock.during_wait = async_client.aclose
            response = await async_client.get(url)
    finally:
        ours.uninstrument()
    assert (response.status_code, response.text) == (503, "busy")  # as without us
    assert_gave_up_on_the_503(server, tel, clock)


async def test_aiohttp_a_session_closed_during_the_wait_gives_the_call_its_503(server, tel):
    clock = ClosingClock()
    ours = instrument(tel, AioHttpClientRecoveryInstrumentor, clock)
    url = server.script("/a", hf.status(503, {"Retry-After": "1"}, body="busy"), hf.ok())
    session = aiohttp.ClientSession()
    clock.during_wait = session.close
    try:
        response = await session.get(url)
    finally:
        ours.uninstrument()
        await session.close()
    assert response.status == 503  # its body was let go before the wait
    assert_gave_up_on_the_503(server, tel, clock)


async def test_a_client_still_open_after_the_wait_is_resent_to(server, tel):
    clock = ClosingClock()
    ours = instrument(tel, HTTPXRecoveryInstrumentor, clock)
    url = server.script("/a", hf.status(503, {"Retry-After": "1"}), hf.ok("fresh"))
    try:
        with httpx.Client() as client:
            response = client.get(url)
    finally:
        ours.uninstrument()
    assert (response.status_code, response.text) == (200, "fresh")
    assert server.count("/a") == 2


# A client used after it was closed: the library refuses each call before anything is sent.
# Without otel-recovery every call gets the library's "closed" RuntimeError, and the other,
# open clients of the same server are unaffected; with it, those calls counted as the
# server's failures and after 20 the circuit opened for every client of that server.

REFUSED = 25
"""Calls of the closed client: more than the breaker's minimum of 20."""


@pytest.mark.parametrize("mode", ["sync", "async"])
async def test_httpx_a_closed_clients_calls_are_not_the_servers_failures(server, tel, mode):
    clock = FakeClock(wall_start=time.time())
    ours = instrument(tel, HTTPXRecoveryInstrumentor, clock)
    url = server.script("/a")
    refused: list[str] = []
    try:
        if mode == "sync":
            closed = httpx.Client()
            closed.close()
            for _ in range(REFUSED):
                with pytest.raises(RuntimeError) as caught:
                    closed.get(url)
                refused.append(type(caught.value).__name__)
            with httpx.Client() as client:
                status = client.get(url).status_code
        else:
            aclosed = httpx.AsyncClient()
            await aclosed.aclose()
            for _ in range(REFUSED):
                with pytest.raises(RuntimeError) as caught:
                    await aclosed.get(url)
                refused.append(type(caught.value).__name__)
            async with httpx.AsyncClient() as aclient:
                status = (await aclient.get(url)).status_code
    finally:
        ours.uninstrument()
    assert refused == ["RuntimeError"] * REFUSED  # httpx's own, never our open circuit's
    assert status == 200
    assert server.count("/a") == 1
    assert tel.recoveries() == []


async def test_aiohttp_a_closed_sessions_calls_are_not_the_servers_failures(server, tel):
    clock = FakeClock(wall_start=time.time())
    ours = instrument(tel, AioHttpClientRecoveryInstrumentor, clock)
    url = server.script("/a")
    refused: list[str] = []
    try:
        closed = aiohttp.ClientSession()
        await closed.close()
        for _ in range(REFUSED):
            with pytest.raises(RuntimeError) as caught:
                await closed.get(url)
            refused.append(type(caught.value).__name__)
        async with aiohttp.ClientSession() as session, session.get(url) as response:
            status = response.status
    finally:
        ours.uninstrument()
    assert refused == ["RuntimeError"] * REFUSED  # aiohttp's own, never our open circuit's
    assert status == 200
    assert server.count("/a") == 1
    assert tel.recoveries() == []
