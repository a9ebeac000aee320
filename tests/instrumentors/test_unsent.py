"""A connect failure proves a request never left the client only when nothing sent it before.

A connection that could not be made proves a request was never written, so the HTTP
instrumentors send even a POST again after one (``otel_recovery/instrumentors/_unsent.py``).
But the call we wrap may send more than one request, and the last one's connect failure
says nothing about the others:

- a client follows redirects (and runs response hooks and auth flows) inside the call: a
  POST answered ``303``/``307`` by one server, whose next request to another server is
  refused, or answered and followed by a call of the application's own;
- code between the client and its connection pool sends again: urllib3's ``Retry`` after a
  read error, an adapter, connection pool or transport of the application's that fails
  over to a backup, an aiohttp middleware (aiohttp's own digest auth's answer to a 401),
  aiohttp's resend on a fresh connection after a kept-alive one broke.

In each case the first server may have applied the POST, and resending the call would
apply it again. Every test here counts the POSTs the first server received: exactly one.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import socket
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import httpcore
import httpx
import pytest
import requests
import urllib3
import yarl
from requests.adapters import HTTPAdapter
from urllib3.util.retry import Retry

from otel_recovery._compiled import SPEEDUPS
from otel_recovery.instrumentors._unsent import original_code, sources
from otel_recovery.instrumentors.httpx import _unsent as httpx_unsent
from otel_recovery.testing import FakeClock

from . import http_faults as hf

server = pytest.fixture(scope="module")(hf.serve)
tel = pytest.fixture(hf.telemetry)
late = pytest.fixture(hf.late_port)

_PAIRS = hf.CLIENT_INSTRUMENTORS
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
        response.close()  # the connection goes back: the hook's error leaves requests' hands
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


class _AuditAuth(httpx.Auth):
    """An application's auth flow that, once the server answered, makes a call of its own
    (an audit, a token renewal) through another client."""

    def __init__(self, audit: str) -> None:
        self.audit = audit

    def sync_auth_flow(self, request: httpx.Request) -> Iterator[httpx.Request]:
        yield request
        with httpx.Client(timeout=2) as other:
            other.post(self.audit, content=b"audit")

    async def async_auth_flow(self, request: httpx.Request) -> AsyncIterator[httpx.Request]:
        yield request
        async with httpx.AsyncClient(timeout=2) as other:
            await other.post(self.audit, content=b"audit")


@pytest.mark.parametrize("client", ["httpx", "httpx_async"])
async def test_an_httpx_auth_flow_whose_own_call_is_refused_does_not_resend_the_post(
    server, tel, instrument, refused_url, client, tmp_path: Path, monkeypatch
):
    """httpx runs an auth flow between ``Client.send`` and its redirect loop, after the
    server answered: the refused call's redirect loop (its own, nothing answered yet) is
    the outermost in the traceback, and says nothing about the POST."""
    policy = tmp_path / "policy.toml"
    policy.write_text(f'[targets."{urlsplit(refused_url).netloc}"]\nmax_attempts = 1\n')
    monkeypatch.setenv("OTEL_RECOVERY_CONFIG", str(policy))  # the audit call: tried once
    clock = FakeClock(wall_start=time.time())
    instrument(client, clock=clock)
    url = server.script("/orders", hf.status(201))
    with pytest.raises(httpx.ConnectError) as failure:
        await post(client, url, auth=_AuditAuth(refused_url))
    assert server.count("/orders") == 1 and clock.sleeps == []
    assert not httpx_unsent(hf.as_the_layer_sees(failure.value))


class ReadThenGone:
    """A server that reads one request and drops the connection without answering (it may
    have applied it), then refuses connects (a pod going away) until ``clock``'s first
    sleep, when it comes back and answers 201: a wrongful resend would reach it.

    ``answers``: what it writes to each request it reads on its one connection, in order
    (``b""``: nothing, the connection is dropped); it stops listening before the last.
    ``listening=False``: it refuses until :meth:`listen` (a call made while it is down)."""

    def __init__(self, *answers: bytes, listening: bool = True) -> None:
        self._answers = answers or (b"",)
        self._listener = socket.socket()
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self.seen: list[bytes] = []
        self.clock = hf.SleepHook(self.come_back)
        self._back: hf.LatePort | None = None
        self._thread = threading.Thread(target=self._read_one, daemon=True)
        if listening:
            self.listen()

    def listen(self) -> None:
        self._listener.listen(8)
        self._thread.start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def _read_one(self) -> None:
        try:
            connection, _ = self._listener.accept()
        except OSError:  # closed before anyone came
            return
        with connection:
            for number, answer in enumerate(self._answers, 1):
                request = hf.read_request(connection)
                self.seen.append(request[0].encode() if request else b"")
                if number == len(self._answers):
                    self._listener.close()  # refused from now on: before the client knows
                connection.sendall(answer)

    def come_back(self) -> None:
        if self._back is None:
            self._thread.join(5)
            self._back = hf.LatePort(port=self.port)
            self._back.open()

    def requests_seen(self) -> list[bytes]:
        back = [method.encode() for method, _, _ in self._back.seen] if self._back else []
        return self.seen + back

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)  # wakes an accept() nobody answered
        self._listener.close()
        if self._thread.is_alive():
            self._thread.join(5)
        if self._back is not None:
            self._back.close()


_KEPT_ALIVE = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
_DIGEST_CHALLENGE = (
    b"HTTP/1.1 401 Unauthorized\r\n"
    b'WWW-Authenticate: Digest realm="orders", nonce="n1", qop="auth", algorithm=MD5\r\n'
    b"Content-Length: 0\r\nConnection: close\r\n\r\n"
)


@pytest.fixture
def gone(request: pytest.FixtureRequest) -> Iterator[ReadThenGone]:
    """A :class:`ReadThenGone`; its ``answers`` by indirect parametrization."""
    server = ReadThenGone(*getattr(request, "param", ()))
    yield server
    server.close()


def test_a_post_urllib3_resent_after_a_read_error_is_not_sent_again(tel, instrument, gone):
    """urllib3 resends a POST after the connection dropped under it when its ``Retry``
    allows any method (``allowed_methods=None``), with no connect retries: its reconnect is
    refused, and ``MaxRetryError`` keeps only that last reason. The first send was read."""
    instrument("requests", clock=gone.clock)
    with requests.Session() as session:
        session.mount(
            "http://",
            HTTPAdapter(max_retries=Retry(total=None, connect=0, read=1, allowed_methods=None)),
        )
        with pytest.raises(requests.exceptions.ConnectionError):
            session.post(gone.url("/pay"), data=b"order-1", timeout=2)
    assert gone.requests_seen() == [b"POST"] and gone.clock.sleeps == []
    recovery = tel.recovery()
    assert recovery.attributes["otel_recovery.retry.attempts"] == 1
    assert recovery.attributes["otel_recovery.retry.disallowed"] == "non_idempotent_method"


class _FailoverAdapter(HTTPAdapter):
    """An application's adapter that sends a failed request to a backup host."""

    def __init__(self, backup: str) -> None:
        super().__init__()
        self.backup = backup

    def send(self, request: requests.PreparedRequest, **options: Any) -> requests.Response:
        try:
            return super().send(request, **options)
        except requests.exceptions.ConnectionError:
            request.url = self.backup
            return super().send(request, **options)


class _FailoverPool(urllib3.HTTPConnectionPool):
    """An application's connection pool that sends a request to a backup host when the
    connection dropped under it."""

    def __init__(self, *args: Any, backup: str, **options: Any) -> None:
        super().__init__(*args, **options)
        where = urllib3.util.parse_url(backup)
        self.backup = urllib3.HTTPConnectionPool(where.host, where.port)

    def urlopen(self, method: str, url: str, *args: Any, **options: Any) -> Any:
        try:
            return super().urlopen(method, url, *args, **options)
        except urllib3.exceptions.ProtocolError:
            return self.backup.urlopen(method, url, *args, **options)

    def close(self) -> None:
        self.backup.close()
        super().close()


class _FailoverPoolAdapter(HTTPAdapter):
    """Installs :class:`_FailoverPool` through ``init_poolmanager``: no ``send`` of its own."""

    def __init__(self, backup: str) -> None:
        self.backup = backup
        super().__init__()

    def init_poolmanager(self, *args: Any, **options: Any) -> None:
        super().init_poolmanager(*args, **options)
        failover = functools.partial(_FailoverPool, backup=self.backup)
        # this manager's own table: the class's is shared by every PoolManager
        self.poolmanager.pool_classes_by_scheme = {
            **self.poolmanager.pool_classes_by_scheme,
            "http": failover,
        }


@pytest.mark.parametrize(
    "adapter", [_FailoverAdapter, _FailoverPoolAdapter], ids=["adapter", "connection_pool"]
)
def test_a_post_a_requests_adapter_or_pool_sent_on_after_a_failure_is_not_sent_again(
    tel, instrument, gone, refused_url, adapter
):
    """An adapter's ``send`` shows in requests' ``ConnectionError`` traceback. A pool's
    frames do not (that traceback ends in the adapter) but in that of urllib3's
    ``MaxRetryError``, whose history holds only the backup's refusal."""
    instrument("requests", clock=gone.clock)
    with requests.Session() as session:
        session.mount("http://", adapter(refused_url))
        with pytest.raises(requests.exceptions.ConnectionError):
            session.post(gone.url("/pay"), data=b"order-1", timeout=2)
    assert gone.requests_seen() == [b"POST"] and gone.clock.sleeps == []


class _FailoverTransport(httpx.BaseTransport):
    """An application's transport that sends a failed request to a backup host."""

    def __init__(self, backup: str) -> None:
        self.inner = httpx.HTTPTransport()
        self.backup = httpx.URL(backup)

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        try:
            return self.inner.handle_request(request)
        except httpx.TransportError:
            request.url = self.backup
            return self.inner.handle_request(request)

    def close(self) -> None:
        self.inner.close()


class _AsyncFailoverTransport(httpx.AsyncBaseTransport):
    def __init__(self, backup: str) -> None:
        self.inner = httpx.AsyncHTTPTransport()
        self.backup = httpx.URL(backup)

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        try:
            return await self.inner.handle_async_request(request)
        except httpx.TransportError:
            request.url = self.backup
            return await self.inner.handle_async_request(request)

    async def aclose(self) -> None:
        await self.inner.aclose()


@pytest.mark.parametrize("client", ["httpx", "httpx_async"])
async def test_a_post_an_httpx_transport_sent_on_after_a_failure_is_not_sent_again(
    tel, instrument, gone, refused_url, client
):
    instrument(client, clock=gone.clock)
    kind = _FailoverTransport if client == "httpx" else _AsyncFailoverTransport
    with pytest.raises(httpx.ConnectError):
        await post(client, gone.url("/pay"), transport=kind(refused_url))
    assert gone.requests_seen() == [b"POST"] and gone.clock.sleeps == []


class _FailoverHttpcorePool(httpcore.ConnectionPool):
    """An application's httpcore pool under httpx's own transport, that sends a request to
    a backup port when the connection dropped under it: its frames show only in the
    traceback of httpcore's error, which httpx's ``ConnectError`` is raised from."""

    def __init__(self, backup: str) -> None:
        super().__init__()
        self.backup = httpx.URL(backup)

    def handle_request(self, request: httpcore.Request) -> httpcore.Response:
        try:
            return super().handle_request(request)
        except (httpcore.RemoteProtocolError, httpcore.NetworkError):
            request.url = httpcore.URL(
                scheme=b"http", host=b"127.0.0.1", port=self.backup.port, target=b"/"
            )
            return super().handle_request(request)


async def test_a_post_an_httpcore_pool_under_httpx_sent_on_is_not_sent_again(
    tel, instrument, gone, refused_url
):
    instrument("httpx", clock=gone.clock)
    transport = httpx.HTTPTransport()
    transport._pool = _FailoverHttpcorePool(refused_url)
    with pytest.raises(httpx.ConnectError):
        await post("httpx", gone.url("/pay"), transport=transport)
    assert gone.requests_seen() == [b"POST"] and gone.clock.sleeps == []


@pytest.mark.skipif(
    "middlewares" not in inspect.signature(aiohttp.ClientSession.__init__).parameters,
    reason="client middlewares came with aiohttp 3.12",
)
@pytest.mark.parametrize("middleware", ["call_after_response", "fail_over"])
async def test_a_post_an_aiohttp_middleware_sent_on_is_not_sent_again(
    server, tel, instrument, gone, refused_url, middleware
):
    """A middleware runs inside aiohttp's request loop: after the POST was answered it may
    make a call of its own, or send the request again elsewhere after a failure."""
    instrument("aiohttp", **({"clock": gone.clock} if middleware == "fail_over" else {}))
    url = server.script("/orders", hf.ok("created"))
    async with aiohttp.ClientSession() as other:

        async def call_after_response(request: Any, handler: Any) -> Any:
            response = await handler(request)
            await other.post(refused_url, data=b"audit")
            return response

        async def fail_over(request: Any, handler: Any) -> Any:
            try:
                return await handler(request)
            except aiohttp.ClientError:
                request.url = yarl.URL(refused_url)
                return await handler(request)

        first = url if middleware == "call_after_response" else gone.url("/pay")
        chosen = call_after_response if middleware == "call_after_response" else fail_over
        with pytest.raises(aiohttp.ClientConnectorError):
            await post("aiohttp", first, middlewares=(chosen,))
    if middleware == "call_after_response":
        assert server.count("/orders") == 1
    else:
        assert gone.requests_seen() == [b"POST"] and gone.clock.sleeps == []


@pytest.mark.skipif(
    "retry_persistent_connection" not in inspect.getsource(aiohttp.client),
    reason="this aiohttp does not resend after a kept-alive connection broke",
)
@pytest.mark.parametrize("gone", [(_KEPT_ALIVE, b"")], ids=["kept_alive"], indirect=True)
async def test_a_put_aiohttp_resent_after_its_kept_alive_connection_broke_is_not_sent_again(
    tel, instrument, gone
):
    """aiohttp sends an idempotent method once more, on a fresh connection, when a
    kept-alive one broke under it (``retry_persistent_connection``): the fresh connect's
    refusal says nothing about the first send, which the server read. A PUT our settings
    may not repeat is sent once."""
    instrument("aiohttp", clock=gone.clock, http_retry_methods=["GET", "HEAD", "OPTIONS"])
    async with aiohttp.ClientSession() as session:
        # aiohttp resends by default (the switch came with 3.11; before it, always)
        assert getattr(session, "_retry_connection", True) is True
        async with session.get(gone.url("/warm")) as response:
            await response.read()
        with pytest.raises(aiohttp.ClientConnectorError):
            async with session.put(gone.url("/balance"), data=b"set=1") as response:
                await response.read()
    assert gone.requests_seen() == [b"GET", b"PUT"] and gone.clock.sleeps == []


@pytest.mark.skipif(
    not hasattr(aiohttp, "DigestAuthMiddleware"), reason="DigestAuthMiddleware came with 3.12"
)
@pytest.mark.parametrize("gone", [(_DIGEST_CHALLENGE,)], ids=["challenged"], indirect=True)
async def test_a_post_aiohttp_digest_auth_answered_with_credentials_is_not_sent_again(
    tel, instrument, gone
):
    """aiohttp's own digest middleware sends the POST again after the server's 401
    challenge (the server read the first): the second's refused connect says nothing about
    the first."""
    instrument("aiohttp", clock=gone.clock)
    digest = aiohttp.DigestAuthMiddleware("user", "secret")
    with pytest.raises(aiohttp.ClientConnectorError):
        await post("aiohttp", gone.url("/orders"), middlewares=(digest,))
    assert gone.requests_seen() == [b"POST"] and gone.clock.sleeps == []


@pytest.mark.skipif(
    not hasattr(aiohttp, "DigestAuthMiddleware"), reason="DigestAuthMiddleware came with 3.12"
)
async def test_a_post_behind_aiohttp_digest_auth_refused_at_its_first_connect_is_sent_again(
    tel, instrument, late
):
    """The control for the test above: the digest middleware's first round is the call's
    first request, so its refused connect still proves the POST never left."""
    instrument("aiohttp", clock=late.clock)
    digest = aiohttp.DigestAuthMiddleware("user", "secret")
    await post("aiohttp", late.url("/orders"), middlewares=(digest,))
    assert late.seen == [("POST", "/orders", b"order-1")] and len(late.clock.sleeps) == 1


class _RetryOnce:
    """An application's plain patch of ``Session.request``, installed before ours: it sends
    the request once more after a connection error."""

    def __init__(self) -> None:
        self.request = requests.Session.request

    def __call__(self, session: requests.Session, *args: Any, **kwargs: Any) -> Any:
        try:
            return self.request(session, *args, **kwargs)
        except requests.exceptions.ConnectionError:
            return self.request(session, *args, **kwargs)


@pytest.mark.skipif(not SPEEDUPS, reason="otel_recovery._speedups is not built")
def test_a_post_a_patch_under_the_compiled_layer_sent_again_is_not_resent(
    tel, monkeypatch, instrument
):
    """The compiled layer has no frame: the failure's traceback starts at the function it
    called, here the application's patch, which sent the POST (read, then dropped) before
    its own second connect was refused. That first frame is code we do not know.
    (``monkeypatch`` before ``instrument``: uninstrumenting goes first.)"""
    retry_once = _RetryOnce()
    monkeypatch.setattr(requests.Session, "request", lambda s, *a, **k: retry_once(s, *a, **k))
    gone = ReadThenGone(listening=False)
    try:
        instrument("requests", clock=gone.clock, http_retry_idempotency_key=False)
        url = gone.url("/orders")
        with pytest.raises(requests.exceptions.ConnectionError):
            requests.post(url, json={"id": 1}, timeout=2)  # down: its plan is remembered
        gone.listen()
        with pytest.raises(requests.exceptions.ConnectionError):
            requests.post(url, json={"id": 1}, timeout=2)  # the compiled first attempt
        assert gone.requests_seen() == [b"POST"] and gone.clock.sleeps == []
    finally:
        gone.close()


def test_a_patch_installed_before_us_is_not_taken_for_the_clients_entry_point():
    """The entry point is read when our module is imported: a plain patch of another's
    already there (it says nothing of what it wraps) must not pass for the library's own
    function, or its frame would be trusted as the client's."""
    libraries = sources(requests)

    class Patched:
        request = _RetryOnce()

    class PatchedFunction:
        def request(self) -> None: ...

    assert original_code(requests.Session, "request", libraries) == {
        requests.sessions.Session.request.__code__
    }
    assert original_code(Patched, "request", libraries) == frozenset()
    assert original_code(PatchedFunction, "request", libraries) == frozenset()
