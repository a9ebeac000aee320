"""Calls the client library refuses on its own say nothing of the server.

An application mistake that the library reports (a request whose streamed body was already
sent, a URL aiohttp cannot speak to) is the application's: without otel-recovery each such
call gets the library's own error, every time. Counted as the server's failures, 20 of them
opened its circuit, and the calls then got our open-circuit error instead, as did every
healthy call to that server.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import aiohttp
import httpx
import pytest

from otel_recovery.instrumentors.aiohttp_client import AioHttpClientRecoveryInstrumentor
from otel_recovery.instrumentors.httpx import HTTPXRecoveryInstrumentor
from otel_recovery.testing import FakeClock

from . import http_faults as hf

server = pytest.fixture(scope="module")(hf.serve)
tel = pytest.fixture(hf.telemetry)

REFUSED = 25
"""More than the breaker's minimum of 20 calls."""


@pytest.fixture(autouse=True)
def _fresh(server):
    server.reset()


def instrument(tel: hf.Telemetry, instrumentor: type) -> object:
    ours = instrumentor()
    ours.instrument(
        tracer_provider=tel.tracer_provider,
        meter_provider=tel.meter_provider,
        clock=FakeClock(wall_start=time.time()),
    )
    return ours


def body() -> Iterator[bytes]:
    yield b"once"


def test_httpx_a_request_whose_stream_was_consumed_is_not_the_servers_failure(server, tel):
    ours = instrument(tel, HTTPXRecoveryInstrumentor)
    url = server.script("/a")
    raised: list[str] = []
    try:
        with httpx.Client() as client:
            request = client.build_request("PUT", url, content=body())
            assert client.send(request).status_code == 200
            for _ in range(REFUSED):  # sending it again: httpx refuses the spent body
                with pytest.raises(httpx.StreamError) as caught:
                    client.send(request)
                raised.append(type(caught.value).__name__)
            status = client.get(url).status_code
    finally:
        ours.uninstrument()
    assert raised == ["StreamConsumed"] * REFUSED  # never our open circuit's error
    assert status == 200


async def test_aiohttp_a_url_of_another_scheme_is_not_the_servers_failure(server, tel):
    ours = instrument(tel, AioHttpClientRecoveryInstrumentor)
    raised: list[str] = []
    try:
        async with aiohttp.ClientSession() as session:
            for _ in range(REFUSED):
                with pytest.raises(aiohttp.ClientError) as caught:
                    await session.get("ftp://127.0.0.1/file")
                raised.append(type(caught.value).__name__)
    finally:
        ours.uninstrument()
    expected = type(caught.value).__name__  # NonHttpUrlClientError from 3.10, InvalidURL before
    assert expected != "AioHttpCircuitOpenError"
    assert raised == [expected] * REFUSED
