"""A redirect's target that fails is not the first server's failure (``_elsewhere``).

The HTTP instrumentors wrap the method that follows redirects, so one call may reach two
servers while its breaker and budget are the first URL's. Here ``127.0.0.1:<port>`` answers
``GET /dl`` with a 307 to another server (``localhost:<port>``, a name of its own: another
target, or a port that refuses connections), which fails. Without otel-recovery the
application gets that failure, and its next call to the first server goes through; with
it, the same, and the first server is asked once per call, not once per attempt.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import httpx
import pytest
import requests
from servers import free_port

from otel_recovery.testing import FakeClock

from . import http_faults as hf

server = pytest.fixture(scope="module")(hf.serve)
tel = pytest.fixture(hf.telemetry)

CLIENTS = pytest.mark.parametrize("client", list(hf.CLIENT_INSTRUMENTORS))
BREAKER = {"breaker_window": 4, "breaker_minimum_calls": 2}
"""A circuit that opens after two failed calls in four: the first server's would open here
if another server's failures counted on it."""

Outcome = tuple[str, Any]
"""``("status", 503)`` or ``("raised", the exception's type)``."""


@pytest.fixture(autouse=True)
def _fresh(server):
    server.reset()


@pytest.fixture
def clock():
    return FakeClock(wall_start=time.time())


@pytest.fixture
def instrument(tel, clock, request):
    client = request.getfixturevalue("client")
    ours, contrib = hf.CLIENT_INSTRUMENTORS[client]
    yield from hf.instrumenting(tel, clock, ours, contrib)


async def calls(client: str, steps: list[tuple[str, str]]) -> list[Outcome]:
    """Each ``(method, url)`` in turn through one client that follows redirects."""
    if client == "requests":
        with requests.Session() as session:
            return [_outcome(lambda m=m, u=u: session.request(m, u, timeout=2)) for m, u in steps]
    if client == "httpx":
        with httpx.Client(follow_redirects=True, timeout=2) as sync_client:
            return [_outcome(lambda m=m, u=u: sync_client.request(m, u)) for m, u in steps]
    if client == "httpx_async":
        async with httpx.AsyncClient(follow_redirects=True, timeout=2) as async_client:
            return [await _aoutcome(lambda m=m, u=u: async_client.request(m, u)) for m, u in steps]
    outcomes = []
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:
        for method, url in steps:

            async def one(method: str = method, url: str = url) -> int:
                async with session.request(method, url) as response:
                    await response.read()
                    return response.status

            outcomes.append(await _aoutcome(one, status=lambda status: status))
    return outcomes


def _outcome(call: Callable[[], Any]) -> Outcome:
    try:
        return ("status", call().status_code)
    except Exception as error:
        return ("raised", type(error))


async def _aoutcome(
    call: Callable[[], Awaitable[Any]], status: Callable[[Any], int] = lambda r: r.status_code
) -> Outcome:
    try:
        return ("status", status(await call()))
    except Exception as error:
        return ("raised", type(error))


def disallowed(tel: hf.Telemetry) -> list[Any]:
    return [s.attributes.get("otel_recovery.retry.disallowed") for s in tel.recoveries()]


@CLIENTS
async def test_a_redirect_targets_503s_neither_retry_nor_open_the_first_servers_circuit(
    server, tel, instrument, client
):
    instrument(contrib=False, **BREAKER)
    elsewhere = f"http://localhost:{server.port}/files"
    server.script("/dl", *[hf.status(307, {"Location": elsewhere})] * 4)
    server.script("/files", *[hf.status(503)] * 4)
    steps = [("GET", server.url("/dl"))] * 4 + [("POST", server.url("/orders"))]
    outcomes = await calls(client, steps)
    assert outcomes == [("status", 503)] * 4 + [("status", 200)]  # as without us
    assert server.count("/dl") == 4 and server.count("/files") == 4  # each asked once
    assert server.count("/orders") == 1
    assert disallowed(tel) == ["redirected"] * 4


@CLIENTS
async def test_a_redirect_target_that_refuses_is_not_the_first_servers_failure(
    server, tel, instrument, client
):
    instrument(contrib=False, **BREAKER)
    refusing = f"http://127.0.0.1:{free_port()}/files"
    server.script("/dl", *[hf.status(307, {"Location": refusing})] * 4)
    steps = [("GET", server.url("/dl"))] * 4 + [("POST", server.url("/orders"))]
    outcomes = await calls(client, steps)
    assert [kind for kind, _ in outcomes] == ["raised"] * 4 + ["status"]
    assert outcomes[-1] == ("status", 200)  # the first server's circuit stayed closed
    assert server.count("/dl") == 4 and server.count("/orders") == 1
    assert disallowed(tel) == ["redirected"] * 4


@CLIENTS
async def test_a_redirect_that_stays_on_the_server_is_retried_as_before(
    server, tel, instrument, client
):
    instrument(contrib=False)
    server.script(
        "/moved", hf.status(307, {"Location": "/here"}), hf.status(307, {"Location": "/here"})
    )
    server.script("/here", hf.status(503), hf.ok("fresh"))
    outcomes = await calls(client, [("GET", server.url("/moved"))])
    assert outcomes == [("status", 200)]
    assert server.count("/moved") == 2 and server.count("/here") == 2
    assert disallowed(tel) == [None]


@CLIENTS
async def test_a_redirect_target_that_drops_the_connection_is_not_the_first_servers_failure(
    server, tel, instrument, client
):
    """A dropped connection names no request in aiohttp (``ServerDisconnectedError``): it was
    taken as the first server's, retried there (asking it again for what it had answered)
    and counted on its breaker, which opened for the application's next POST."""
    instrument(contrib=False, **BREAKER)
    elsewhere = f"http://localhost:{server.port}/files"
    server.script("/dl", *[hf.status(307, {"Location": elsewhere})] * 4)
    server.script("/files", *[hf.reset()] * 12)
    steps = [("GET", server.url("/dl"))] * 4 + [("POST", server.url("/orders"))]
    outcomes = await calls(client, steps)
    assert [kind for kind, _ in outcomes] == ["raised"] * 4 + ["status"]
    assert outcomes[-1] == ("status", 200)  # the first server's circuit stayed closed
    assert server.count("/dl") == 4 and server.count("/orders") == 1  # each asked once
    assert disallowed(tel) == ["redirected"] * 4
