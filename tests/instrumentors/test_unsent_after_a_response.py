"""A POST is resent after a connect failure only when nothing answered it before.

A connection that could not be made proves a request never left the client, so the HTTP
instrumentors send even a POST again after one. But a client follows redirects (and runs
response hooks) inside the call we wrap: a POST answered ``303``/``307`` by one server,
whose next request to another server is refused, fails with the same connect error, while
the first server may have applied the POST. Resending the call would apply it again. Every
test here counts the POSTs the first server received: exactly one, for every client.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable, Iterator
from typing import Any

import aiohttp
import httpx
import pytest
import requests
from opentelemetry.instrumentation.aiohttp_client import AioHttpClientInstrumentor
from opentelemetry.instrumentation.httpx import HTTPXClientInstrumentor
from opentelemetry.instrumentation.requests import RequestsInstrumentor

from otel_recovery.instrumentors.aiohttp_client import AioHttpClientRecoveryInstrumentor
from otel_recovery.instrumentors.httpx import HTTPXRecoveryInstrumentor
from otel_recovery.instrumentors.requests import RequestsRecoveryInstrumentor
from otel_recovery.testing import FakeClock

from . import http_faults as hf

server = pytest.fixture(scope="module")(hf.serve)
tel = pytest.fixture(hf.telemetry)

_PAIRS = {
    "requests": (RequestsRecoveryInstrumentor, RequestsInstrumentor),
    "httpx": (HTTPXRecoveryInstrumentor, HTTPXClientInstrumentor),
    "httpx_async": (HTTPXRecoveryInstrumentor, HTTPXClientInstrumentor),
    "aiohttp": (AioHttpClientRecoveryInstrumentor, AioHttpClientInstrumentor),
}
CLIENTS = pytest.mark.parametrize("client", list(_PAIRS))


@pytest.fixture(autouse=True)
def _fresh(server):
    server.reset()


@pytest.fixture
def refused_url() -> Iterator[str]:
    """A URL whose connects are refused: a port bound but never listening."""
    with socket.socket() as bound:
        bound.bind(("127.0.0.1", 0))
        yield f"http://127.0.0.1:{bound.getsockname()[1]}/next"


@pytest.fixture
def instrument(tel) -> Iterator[Callable[..., Any]]:
    """``instrument(client, **settings)``: ours and contrib's for that client."""
    stack: list[Iterator[Callable[..., Any]]] = []

    def go(client: str, **settings: Any) -> Any:
        ours, contrib = _PAIRS[client]
        instrumenting = hf.instrumenting(tel, FakeClock(wall_start=time.time()), ours, contrib)
        stack.append(instrumenting)
        return next(instrumenting)(**settings)

    yield go
    for instrumenting in reversed(stack):
        next(instrumenting, None)  # uninstruments


async def post(client: str, url: str, **options: Any) -> None:
    """POST ``b"order-1"`` to ``url`` with ``client``, following redirects; returns only if
    the call succeeded."""
    if client == "requests":
        requests.post(url, data=b"order-1", timeout=2, **options)
    elif client == "httpx":
        with httpx.Client(follow_redirects=True, timeout=2, **options) as sync_client:
            sync_client.post(url, content=b"order-1")
    elif client == "httpx_async":
        async with httpx.AsyncClient(follow_redirects=True, timeout=2, **options) as async_client:
            await async_client.post(url, content=b"order-1")
    else:
        async with aiohttp.ClientSession(**options) as session:
            async with session.post(url, data=b"order-1") as response:
                await response.read()


_CONNECT_ERRORS = (
    requests.exceptions.ConnectionError,
    httpx.ConnectError,
    aiohttp.ClientConnectorError,
)


@CLIENTS
@pytest.mark.parametrize("status", [303, 307])
async def test_a_post_redirected_to_a_refusing_server_is_not_sent_again(
    server, tel, instrument, refused_url, client, status
):
    instrument(client)
    url = server.script("/orders", hf.status(status, {"Location": refused_url}))
    with pytest.raises(_CONNECT_ERRORS):
        await post(client, url)
    assert [(s.method, s.body) for s in server.seen("/orders")] == [("POST", b"order-1")]
    recovery = tel.recovery()
    assert recovery.attributes["otel_recovery.retry.attempts"] == 1
    assert recovery.attributes["otel_recovery.retry.disallowed"] == "non_idempotent_method"


@CLIENTS
async def test_the_same_post_refused_at_its_first_connect_is_sent_again(
    tel, instrument, refused_url, client
):
    """The control: what the tests above must not do is what the first hop does."""
    instrument(client, max_attempts=2)
    with pytest.raises(_CONNECT_ERRORS):
        await post(client, refused_url)
    recovery = tel.recovery()
    assert recovery.attributes["otel_recovery.retry.attempts"] == 2
    assert "otel_recovery.retry.disallowed" not in recovery.attributes


async def test_a_requests_response_hook_whose_request_is_refused_does_not_resend_the_post(
    server, tel, instrument, refused_url
):
    """A response hook runs after the server answered (digest auth's answer to a 401 is
    one): a connect error raised from it proves nothing about the POST."""
    instrument("requests", max_attempts=2)
    url = server.script("/orders", hf.ok("created"))

    def notify(response: requests.Response, *args: Any, **kwargs: Any) -> None:
        requests.post(refused_url, data=b"audit", timeout=2)

    with pytest.raises(requests.exceptions.ConnectionError):
        requests.post(url, data=b"order-1", timeout=2, hooks={"response": notify})
    assert server.count("/orders") == 1


@pytest.mark.parametrize("client", ["httpx", "httpx_async"])
async def test_an_httpx_response_hook_whose_request_is_refused_does_not_resend_the_post(
    server, tel, instrument, refused_url, client
):
    """httpx runs response hooks inside its redirect loop, before the answer joins the
    history: the failed request must be the loop's own to count as never sent."""
    instrument(client, max_attempts=2)
    url = server.script("/orders", hf.ok("created"))

    def notify(response: httpx.Response) -> None:
        with httpx.Client(timeout=2) as other:
            other.post(refused_url, content=b"audit")

    async def anotify(response: httpx.Response) -> None:
        async with httpx.AsyncClient(timeout=2) as other:
            await other.post(refused_url, content=b"audit")

    hook = notify if client == "httpx" else anotify
    with pytest.raises(httpx.ConnectError):
        await post(client, url, event_hooks={"response": [hook]})
    assert server.count("/orders") == 1
