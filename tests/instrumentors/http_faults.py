"""A real HTTP server with scripted faults, for the HTTP instrumentor tests.

An aiohttp server on 127.0.0.1:0 runs in a background thread with its own event loop, so the
same server serves the sync clients (requests, httpx.Client) and the async ones (whose event
loop is the test's). Each path answers a script of actions in order (then 200 "ok"):
``status(503)``, ``retry_after(429, seconds=1)``, ``retry_after_date(503, seconds=2)``,
``reset()`` (the connection is closed without a response), ``stall(seconds)`` (answers only
after the client's timeout), ``hold()`` (answers nothing until the client gave up) and
``ok(body)``. Every request is recorded, so tests assert the exact number of attempts the
server saw and what each carried.

Two more helpers fail a request before it is written, the failures after which even a POST
is sent again. :class:`LatePort` (each file's ``late = pytest.fixture(late_port)``) refuses
connections until the first backoff sleep of its fake ``clock``, then answers 201
``created:<body>`` and records each request: the refusal proves the first attempt never left
the client, and the resend meets a server. :func:`unaccepting_port` is a port whose connects
hang until their connect timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import os
import select
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from email.utils import formatdate
from typing import Any

import pytest
from aiohttp import web
from opentelemetry.instrumentation.aiohttp_client import AioHttpClientInstrumentor
from opentelemetry.instrumentation.httpx import HTTPXClientInstrumentor
from opentelemetry.instrumentation.requests import RequestsInstrumentor
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from otel_recovery.instrumentors.aiohttp_client import AioHttpClientRecoveryInstrumentor
from otel_recovery.instrumentors.httpx import HTTPXRecoveryInstrumentor
from otel_recovery.instrumentors.requests import RequestsRecoveryInstrumentor
from otel_recovery.testing import FakeClock

Action = Callable[[web.Request], Any]

CLIENT_INSTRUMENTORS = {
    "requests": (RequestsRecoveryInstrumentor, RequestsInstrumentor),
    "httpx": (HTTPXRecoveryInstrumentor, HTTPXClientInstrumentor),
    "httpx_async": (HTTPXRecoveryInstrumentor, HTTPXClientInstrumentor),
    "aiohttp": (AioHttpClientRecoveryInstrumentor, AioHttpClientInstrumentor),
}
"""Per client a test drives (``httpx_async``: an ``AsyncClient``), ours and contrib's
instrumentor, for tests that run one scenario through every HTTP client."""

# Stalled handlers are cancelled after 0.2 s at shutdown. aiohttp 3.9 moved that setting from
# the site to the runner; before, the runner handed it to each connection, which failed.
_QUICK_SHUTDOWN = {"shutdown_timeout": 0.2}
_ON_RUNNER = "shutdown_timeout" in inspect.signature(web.BaseRunner.__init__).parameters
_RUNNER_OPTIONS = _QUICK_SHUTDOWN if _ON_RUNNER else {}
_SITE_OPTIONS = {} if _ON_RUNNER else _QUICK_SHUTDOWN


@dataclass(frozen=True)
class Seen:
    """One request as the server received it."""

    method: str
    path: str
    headers: dict[str, str]
    body: bytes


def status(code: int, headers: dict[str, str] | None = None, body: str = "") -> Action:
    async def act(request: web.Request) -> web.Response:
        return web.Response(status=code, headers=headers or {}, text=body or f"status {code}")

    return act


def retry_after(code: int, seconds: float) -> Action:
    return status(code, {"Retry-After": f"{seconds:g}"})


def retry_after_date(code: int, seconds: float) -> Action:
    """Retry-After as an HTTP-date ``seconds`` from when the response is sent."""

    async def act(request: web.Request) -> web.Response:
        when = formatdate(time.time() + seconds, usegmt=True)
        return web.Response(status=code, headers={"Retry-After": when}, text="later")

    return act


def reset() -> Action:
    """Close the connection without answering: the client sees a dropped connection."""

    async def act(request: web.Request) -> web.Response:
        assert request.transport is not None
        request.transport.abort()
        raise asyncio.CancelledError  # nothing more to send on a dead connection

    return act


def stall(seconds: float, then: int = 200) -> Action:
    """Answer only after ``seconds``: beyond the client's timeout."""

    async def act(request: web.Request) -> web.Response:
        await asyncio.sleep(seconds)
        return web.Response(status=then, text="late")

    return act


HELD_TIMEOUT = 1.0
"""The client timeout of a request that meets ``hold()`` and is then answered: the held
attempt times out after it (the hold lasts until it has), the answered one must beat it: a
few ms on an idle machine, but a 0.25 s limit failed healthy answers on a loaded one."""


def hold(limit: float = 30.0) -> Action:
    """Answer nothing until the client gives up (closes the connection), however late its
    timeout fires on a loaded machine; a ``stall`` of fixed length answered a client whose
    timer fired late. After ``limit`` seconds (a client that never gives up) it answers 200
    "late"."""

    async def act(request: web.Request) -> web.Response:
        deadline = time.monotonic() + limit
        while time.monotonic() < deadline:
            transport = request.transport
            if transport is None or transport.is_closing():
                raise asyncio.CancelledError  # nobody left to answer
            await asyncio.sleep(0.01)
        return web.Response(status=200, text="late")

    return act


def ok(body: str = "ok") -> Action:
    return status(200, body=body)


@dataclass
class FaultServer:
    """The server; ``script(path, ...)`` then ``seen(path)`` / ``count(path)``."""

    host: str = "127.0.0.1"
    port: int = 0
    _scripts: dict[str, list[Action]] = field(default_factory=dict)
    _seen: list[Seen] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _loop: asyncio.AbstractEventLoop | None = None
    _runner: web.AppRunner | None = None
    _thread: threading.Thread | None = None

    def url(self, path: str = "/") -> str:
        return f"http://{self.host}:{self.port}{path}"

    def script(self, path: str, *actions: Action) -> str:
        """Answer ``path`` with ``actions`` in order, then 200 "ok"; returns the URL."""
        with self._lock:
            self._scripts[path] = list(actions)
        return self.url(path)

    def seen(self, path: str | None = None) -> list[Seen]:
        with self._lock:
            return [s for s in self._seen if path is None or s.path == path]

    def count(self, path: str | None = None) -> int:
        return len(self.seen(path))

    def reset(self) -> None:
        with self._lock:
            self._scripts.clear()
            self._seen.clear()

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        with self._lock:
            self._seen.append(Seen(request.method, request.path, dict(request.headers), body))
            actions = self._scripts.get(request.path)
            action = actions.pop(0) if actions else ok()
        response: web.StreamResponse = await action(request)
        return response

    def start(self) -> FaultServer:
        ready = threading.Event()
        failure: list[BaseException] = []

        def run() -> None:
            loop = asyncio.new_event_loop()
            asyncio.set_event_loop(loop)
            self._loop = loop
            try:
                app = web.Application()
                app.router.add_route("*", "/{tail:.*}", self._handle)
                runner = web.AppRunner(app, access_log=None, **_RUNNER_OPTIONS)
                loop.run_until_complete(runner.setup())
                site = web.TCPSite(runner, self.host, 0, **_SITE_OPTIONS)
                loop.run_until_complete(site.start())
                server = site._server
                assert server is not None
                self.port = server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
                self._runner = runner
            except BaseException as error:  # surface start-up failures in the test
                failure.append(error)
                ready.set()
                return
            ready.set()
            loop.run_forever()
            loop.close()

        self._thread = threading.Thread(target=run, name="fault-server", daemon=True)
        self._thread.start()
        ready.wait(10)
        if failure:
            raise failure[0]
        return self

    def stop(self) -> None:
        loop, runner = self._loop, self._runner
        if loop is None or runner is None:
            return

        async def shutdown() -> None:
            await runner.cleanup()
            others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in others:  # stalled handlers still sleeping
                task.cancel()
            await asyncio.gather(*others, return_exceptions=True)

        asyncio.run_coroutine_threadsafe(shutdown(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        if self._thread is not None:
            self._thread.join(10)


def serve() -> Iterator[FaultServer]:
    """Generator for a module-scoped fixture: ``server = pytest.fixture(scope="module")(serve)``."""
    server = FaultServer().start()
    try:
        yield server
    finally:
        server.stop()


class LatePort:
    """A port that refuses connections (bound, not listening) until :meth:`open`, which
    its ``clock``'s first backoff sleep calls; then it answers each request 201
    ``created:<body>`` and records it in ``seen`` as ``(method, path, body)``.

    The port is held from the start, so no other process can take it between the refusal
    and the resend, as a closed-then-reopened port could be. It is served by a thread of
    blocking sockets, so a sync client and the async clients (whose event loop is the
    test's) meet it alike, with ``Connection: close`` so each request is a connection of
    its own. With ``armed`` off, sleeps (and :meth:`open`) leave it refusing; with ``drop``
    on, it reads and records a request, then closes the connection without answering.
    """

    def __init__(self, port: int = 0) -> None:
        """``port``: a given one (a server that went away and comes back there)."""
        self._socket = socket.socket()
        self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._socket.bind(("127.0.0.1", port))
        self.port: int = self._socket.getsockname()[1]
        self.seen: list[tuple[str, str, bytes]] = []
        self.armed = True
        self.drop = False
        self.clock = SleepHook(self.open)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def open(self) -> None:
        """Listen and serve, once (again: nothing), unless ``armed`` is off."""
        if self.armed and self._thread is None:
            self._socket.listen(8)
            self._socket.settimeout(0.05)  # so the serving loop sees close() promptly
            self._thread = threading.Thread(target=self._serve, name="late-port", daemon=True)
            self._thread.start()

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        self._socket.close()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                connection, _ = self._socket.accept()
            except TimeoutError:
                continue
            except OSError:  # closed
                return
            with connection, contextlib.suppress(OSError):  # a client that went away
                connection.settimeout(2.0)
                self._answer(connection)

    def _answer(self, connection: socket.socket) -> None:
        request = read_request(connection)
        if request is None:
            return
        method, path, body = request
        self.seen.append((method, path, body))
        if self.drop:
            return
        reply = b"created:" + body
        connection.sendall(
            b"HTTP/1.1 201 Created\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s"
            % (len(reply), reply)
        )


def read_request(connection: socket.socket) -> tuple[str, str, bytes] | None:
    """One HTTP/1.1 request read off ``connection`` (its head, then a ``Content-Length``
    body) as ``(method, path, body)``; None when the client went away first."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = connection.recv(65536)
        if not chunk:
            return None
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    request_line, *lines = head.decode("latin-1").split("\r\n")
    method, path, _ = request_line.split(" ", 2)
    length = 0
    for line in lines:
        name, _, value = line.partition(":")
        if name.strip().lower() == "content-length":
            length = int(value)
    while len(body) < length:
        chunk = connection.recv(65536)
        if not chunk:
            break
        body += chunk
    return method, path, body


class SleepHook(FakeClock):
    """A fake clock whose sleeps (a backoff before a retry: the moment between a failed
    attempt and the resend) first run ``at_sleep``, to change what the resend will meet."""

    def __init__(self, at_sleep: Callable[[], None]) -> None:
        super().__init__(wall_start=time.time())
        self._at_sleep = at_sleep

    def sleep(self, seconds: float) -> None:
        self._at_sleep()
        super().sleep(seconds)

    async def asleep(self, seconds: float) -> None:
        self._at_sleep()  # FakeClock.asleep goes through sleep too: at_sleep runs twice
        await super().asleep(seconds)


def assert_resent_once(late: LatePort, tel: Telemetry, *, failed: list[str]) -> None:
    """What a POST refused at its first connect, then answered by ``late``, leaves: applied
    once, one backoff, two attempts on the recovery span and no ``disallowed``, contrib's
    resend counted on its second client span. ``failed``: the first attempt's error types."""
    assert late.seen == [("POST", "/orders", b"order-1")]  # sent once: the first never left
    assert len(late.clock.sleeps) == 1
    clients = tel.clients()
    assert [s.attributes.get("http.request.resend_count") for s in clients] == [None, 1]
    assert [s.status.status_code for s in clients] == [StatusCode.ERROR, StatusCode.UNSET]
    recovery = tel.recovery()
    assert recovery.attributes["otel_recovery.retry.attempts"] == 2
    assert recovery.attributes["otel_recovery.outcome"] == "success"
    assert "otel_recovery.retry.disallowed" not in recovery.attributes
    failures = events(recovery, "otel_recovery.attempt.failed")
    assert [e["error.type"] for e in failures] == failed


def late_port() -> Iterator[LatePort]:
    """Generator for a function-scoped fixture: ``late = pytest.fixture(late_port)``."""
    port = LatePort()
    try:
        yield port
    finally:
        port.close()


_TESTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "")


def as_the_layer_sees(error: BaseException) -> BaseException:
    """``error``, raised by an uninstrumented client in a test, with the test's own frames
    cut from the head of its traceback: as our compiled layer, which has no frame of its
    own, hands a failure of the function it called to the predicates that read it
    (``instrumentors/_unsent.py``). Those treat any frame they do not know as code that
    may have sent the request, the test's included."""
    traceback = error.__traceback__
    while traceback is not None and traceback.tb_frame.f_code.co_filename.startswith(_TESTS):
        traceback = traceback.tb_next
    return error.with_traceback(traceback)


@contextlib.contextmanager
def unaccepting_port() -> Iterator[int]:
    """A listening port whose accept queue is full (``listen(0)``, connections never
    accepted): the kernel drops further SYNs, so a connect hangs until its timeout. Skips
    the test where no connect hangs."""
    listener = socket.socket()
    held: list[socket.socket] = []
    try:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        address = listener.getsockname()
        for _ in range(8):
            filler = socket.socket()
            held.append(filler)
            filler.setblocking(False)
            filler.connect_ex(address)
            _, writable, _ = select.select([], [filler], [], 0.1)
            if not writable:  # this one hangs: the queue is full
                yield address[1]
                return
        pytest.skip("connects to a listen(0) socket never hang here: no connect timeout")
    finally:
        for held_socket in held:
            held_socket.close()
        listener.close()


@dataclass
class Telemetry:
    """An SDK tracer provider (and meter provider) writing to memory, passed as
    ``tracer_provider``/``meter_provider`` to both the contrib instrumentor and ours."""

    tracer_provider: TracerProvider
    exporter: InMemorySpanExporter
    meter_provider: MeterProvider
    reader: InMemoryMetricReader

    def spans(self) -> list[ReadableSpan]:
        return sorted(self.exporter.get_finished_spans(), key=lambda s: s.start_time or 0)

    def clients(self) -> list[ReadableSpan]:
        """Contrib's per-attempt HTTP CLIENT spans, in order."""
        return [s for s in self.spans() if s.kind is SpanKind.CLIENT]

    def recoveries(self) -> list[ReadableSpan]:
        return [s for s in self.spans() if s.name.startswith("recover ")]

    def recovery(self) -> ReadableSpan:
        found = self.recoveries()
        assert len(found) == 1, [s.name for s in self.spans()]
        return found[0]

    def metric(self, name: str) -> list[tuple[dict[str, Any], Any]]:
        data = self.reader.get_metrics_data()
        points: list[tuple[dict[str, Any], Any]] = []
        for resource in data.resource_metrics if data else ():
            for scope in resource.scope_metrics:
                for metric in scope.metrics:
                    if metric.name == name:
                        points += [
                            (dict(p.attributes or {}), getattr(p, "value", p))
                            for p in metric.data.data_points
                        ]
        return points


def telemetry() -> Iterator[Telemetry]:
    """Generator for a function-scoped fixture."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    reader = InMemoryMetricReader()
    meters = MeterProvider(metric_readers=[reader])
    try:
        yield Telemetry(provider, exporter, meters, reader)
    finally:
        meters.shutdown()
        provider.shutdown()


def events(span: ReadableSpan, name: str) -> list[dict[str, Any]]:
    """Attributes of the span's events called ``name``, in order."""
    return [dict(e.attributes or {}) for e in span.events if e.name == name]


def instrumenting(
    tel: Telemetry, clock: Any, ours_class: Any, contrib_class: Any
) -> Iterator[Callable[..., Any]]:
    """The body of each HTTP test file's ``instrument`` fixture.

    Yields ``go(order="ours_first", *, contrib=True, **settings)``, which instruments ours and
    (unless ``contrib=False``) contrib's in that order and returns ours; everything is
    uninstrumented afterwards, last first.
    """
    used: list[Any] = []

    def go(order: str = "ours_first", *, contrib: bool = True, **settings: Any) -> Any:
        ours = ours_class()
        options = {"backoff_initial": 0.01, "backoff_max": 0.05, "clock": clock, **settings}

        def mine() -> None:
            ours.instrument(
                tracer_provider=tel.tracer_provider, meter_provider=tel.meter_provider, **options
            )
            used.append(ours)

        def theirs() -> None:
            contrib_class().instrument(tracer_provider=tel.tracer_provider)
            used.append(contrib_class())

        for step in (mine, theirs) if order == "ours_first" else (theirs, mine):
            if step is mine or contrib:
                step()
        return ours

    yield go
    for instrumentor in reversed(used):
        instrumentor.uninstrument()


@contextlib.contextmanager
def unix_sockets() -> Iterator[tuple[str, str]]:
    """Two unix socket paths, short enough for ``AF_UNIX`` (108 bytes): an HTTP server on
    the first answers 200 ``ok`` to every GET (on its own thread), the second is dead (no
    file). Both are addressed as ``http://localhost/``, as clients of a unix socket do."""
    import http.server
    import shutil
    import socketserver
    import tempfile

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"ok")

        def log_message(self, *args: Any) -> None:
            pass

        def address_string(self) -> str:  # no client address on a unix socket
            return "uds"

    class Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
        daemon_threads = True

    folder = tempfile.mkdtemp(prefix="uds", dir="/tmp")
    live, dead = os.path.join(folder, "live.sock"), os.path.join(folder, "dead.sock")
    server = Server(live, Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield live, dead
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
        shutil.rmtree(folder, ignore_errors=True)
