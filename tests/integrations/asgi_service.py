"""An async service as production runs one, for ``test_async_service.py``: Starlette under a
real uvicorn server (its own thread and event loop), wrapped by contrib's
``OpenTelemetryMiddleware`` and our ``RecoveryMiddleware``, calling an upstream HTTP server
(httpx.AsyncClient), PostgreSQL (an asyncpg pool) and Redis (redis.asyncio).

What lives here:

- :class:`Stack`: our three instrumentors (httpx, asyncpg, redis) and contrib's, in a chosen
  load order (``"none"``: contrib only, the same stack without otel-recovery), one tracer
  provider writing to memory for them and for the server span.
- :func:`build_app`: the service. Its handlers map dependency errors to statuses the way a
  service does (a refused database to 503, an upstream failure to 502, a time limit to 504)
  and note which handlers started and how they ended (:class:`Deps`).
- :class:`CancelOnDisconnect`: neither uvicorn nor Starlette cancels a handler whose client
  went away; services that want that add a middleware like this one.
- :class:`Served`: uvicorn in a thread, recording what its event loop reports
  (``Task exception was never retrieved`` and friends) and the tasks left when it stopped.
- :func:`fetch` / :class:`RawRequest`: an HTTP/1.1 client on bare asyncio streams, so no
  instrumentation of ours or contrib's touches the test's own requests, and a second
  response on the wire (or a truncated chunked body) would be seen as it is.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import re
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import anyio
import asyncpg
import httpx
import redis.asyncio
import uvicorn
from opentelemetry.instrumentation.asgi import OpenTelemetryMiddleware
from opentelemetry.instrumentation.asyncpg import AsyncPGInstrumentor
from opentelemetry.instrumentation.httpx import HTTPXClientInstrumentor
from opentelemetry.instrumentation.redis import RedisInstrumentor
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind
from redis.asyncio.retry import Retry as RedisRetry
from redis.backoff import NoBackoff
from servers import PrivateRedis
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from otel_recovery._clock import MonotonicClock
from otel_recovery.instrumentors.asyncpg import AsyncPGRecoveryInstrumentor
from otel_recovery.instrumentors.httpx import HTTPXRecoveryInstrumentor
from otel_recovery.instrumentors.redis import RedisRecoveryInstrumentor
from otel_recovery.middleware.asgi import RecoveryMiddleware
from otel_recovery.policies.circuit_breaker import CircuitBreaker

Scope = dict[str, Any]
Message = dict[str, Any]

# -- instrumentation ------------------------------------------------------------------------

PAIRS = {
    "httpx": (HTTPXRecoveryInstrumentor, HTTPXClientInstrumentor),
    "asyncpg": (AsyncPGRecoveryInstrumentor, AsyncPGInstrumentor),
    "redis": (RedisRecoveryInstrumentor, RedisInstrumentor),
}


class SleepWatch(MonotonicClock):
    """The production clock (monotonic time, real ``asyncio.sleep``) that also says when our
    layer starts a backoff sleep, so a test can cancel a request exactly there, and counts the
    sleeps that were cancelled. ``advance()`` moves its ``now()`` forward (a breaker's long
    open time passes at once), while sleeps stay real."""

    def __init__(self) -> None:
        self.sleeping = threading.Event()
        self.sleeps: list[float] = []
        self.cancelled = 0
        self.offset = 0.0

    def now(self) -> float:  # type: ignore[override]
        return time.monotonic() + self.offset

    def advance(self, seconds: float) -> None:
        self.offset += seconds

    def forget(self) -> None:
        """Start counting afresh (after a test's setup slept its own sleeps)."""
        self.sleeping.clear()
        self.sleeps.clear()
        self.cancelled = 0

    async def asleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.sleeping.set()
        try:
            await asyncio.sleep(seconds)
        except asyncio.CancelledError:
            self.cancelled += 1
            raise


FAST = {"backoff_initial": 0.001, "backoff_max": 0.005, "retry_after_cap": 1.0}
"""Tiny backoffs; ``Retry-After: 1`` is then waited exactly 1 s (no jitter room under the
cap), a deterministic window to cancel in."""


class Stack:
    """Ours and contrib's instrumentors in one load order, one in-memory tracer provider."""

    def __init__(self) -> None:
        self.exporter = InMemorySpanExporter()
        self.provider = TracerProvider()
        self.provider.add_span_processor(SimpleSpanProcessor(self.exporter))
        self.clock = SleepWatch()
        self.ours: dict[str, Any] = {}
        self._used: list[Any] = []
        self.order = "none"

    def instrument(self, order: str = "ours_first", **settings: Any) -> Stack:
        """``ours_first`` / ``contrib_first`` / ``ours_only``; ``none`` is contrib alone."""
        self.order = order
        options = {**FAST, "clock": self.clock, **settings}
        for library, (ours_class, contrib_class) in PAIRS.items():
            ours = ours_class()

            def mine(ours: Any = ours, library: str = library) -> None:
                ours.instrument(tracer_provider=self.provider, **options)
                self.ours[library] = ours
                self._used.append(ours)

            def theirs(contrib_class: Any = contrib_class) -> None:
                contrib_class().instrument(tracer_provider=self.provider)
                self._used.append(contrib_class())

            steps = {
                "ours_first": (mine, theirs),
                "contrib_first": (theirs, mine),
                "ours_only": (mine,),
                "none": (theirs,),
            }[order]
            for step in steps:
                step()
        return self

    def close(self) -> None:
        for instrumentor in reversed(self._used):
            if instrumentor.is_instrumented_by_opentelemetry:
                instrumentor.uninstrument()
        self.provider.shutdown()

    def breaker(self, library: str, port: int) -> CircuitBreaker:
        targets = self.ours[library].targets
        (found,) = [b for b in targets.breakers() if b.name.endswith(f":{port}")]
        return found

    def spans(self) -> list[ReadableSpan]:
        return sorted(self.exporter.get_finished_spans(), key=lambda s: s.start_time or 0)

    def servers(self, path: str | None = None) -> list[ReadableSpan]:
        """Contrib's SERVER spans (of requests to ``path``)."""
        return [
            s
            for s in self.spans()
            if s.kind is SpanKind.SERVER
            and (path is None or _attr(s, "http.target", "url.path", default="") == path)
        ]

    def wait_servers(self, count: int, path: str | None = None, timeout: float = 5.0) -> None:
        """The server span ends after the response went out: wait for ``count`` of them."""
        deadline = time.monotonic() + timeout
        while len(self.servers(path)) < count and time.monotonic() < deadline:
            time.sleep(0.005)
        ended = [s.name for s in self.servers(path)]
        assert len(ended) >= count, f"{count} server spans expected in {timeout} s: {ended}"

    def clients_to(self, port: int) -> list[ReadableSpan]:
        """Contrib's HTTP CLIENT spans of requests to 127.0.0.1:``port``."""
        return [
            s
            for s in self.spans()
            if s.kind is SpanKind.CLIENT
            and f"127.0.0.1:{port}/" in str(_attr(s, "http.url", "url.full", default=""))
        ]

    def named(self, name: str) -> list[ReadableSpan]:
        return [s for s in self.spans() if s.name == name]


def _attr(span: ReadableSpan, *names: str, default: Any = None) -> Any:
    attributes = span.attributes or {}
    for name in names:
        if name in attributes:
            return attributes[name]
    return default


def status_of(span: ReadableSpan) -> Any:
    return _attr(span, "http.status_code", "http.response.status_code")


# -- the service ----------------------------------------------------------------------------


@dataclass
class Deps:
    """The service's settings and clients (made by the lifespan, on the server's loop), and
    what its handlers did: how many started (``started``), how each ended (``ended``:
    ``"done"``, ``"cancelled"``, or an exception's type name)."""

    upstream: str
    pg_port: int = 5432
    redis_port: int | None = None
    pool_size: int = 2
    redis_connection_class: type | None = None
    http: httpx.AsyncClient | None = None
    pool: Any = None
    redis: Any = None
    closed: bool = False
    started: Counter[str] = field(default_factory=Counter)
    ended: list[tuple[str, str]] = field(default_factory=list)
    gate: threading.Event = field(default_factory=threading.Event)
    flaky: Counter[str] = field(default_factory=Counter)
    route_breakers: dict[str, CircuitBreaker] = field(default_factory=dict)

    def pool_idle(self) -> tuple[int, int]:
        """(connections open, connections idle) in the pool: read on the server's loop
        thread, but these are plain attribute reads."""
        return self.pool.get_size(), self.pool.get_idle_size()


@contextlib.contextmanager
def _tracked(deps: Deps, name: str) -> Iterator[None]:
    deps.started[name] += 1
    try:
        yield
    except asyncio.CancelledError:
        deps.ended.append((name, "cancelled"))
        raise
    except BaseException as error:
        deps.ended.append((name, type(error).__name__))
        raise
    deps.ended.append((name, "done"))


DEPENDENCY_DOWN = (OSError, asyncpg.PostgresError, asyncpg.InterfaceError)
"""What the service answers 503 for: the database refused, unreachable, or shed by a breaker
(``AsyncPGCircuitOpenError`` is an ``asyncpg.InterfaceError``)."""


def _failed(status: int, error: BaseException) -> Response:
    return PlainTextResponse(
        f"{type(error).__name__}: {error}"[:200], status, headers={"x-error": type(error).__name__}
    )


async def _quote(deps: Deps, request: Request) -> Response:
    """GET upstream ``/{name}``; ``?limit=<s>&how=timeout|wait_for|anyio`` bounds the call."""
    assert deps.http is not None
    url = f"{deps.upstream}/{request.path_params['name']}"
    limit = request.query_params.get("limit")
    try:
        if limit is None:
            answer = await deps.http.get(url)
        elif request.query_params.get("how") == "wait_for":
            answer = await asyncio.wait_for(deps.http.get(url), float(limit))
        elif request.query_params.get("how") == "anyio":  # level-triggered cancellation
            with anyio.fail_after(float(limit)):
                answer = await deps.http.get(url)
        else:
            async with asyncio.timeout(float(limit)):
                answer = await deps.http.get(url)
    except TimeoutError as error:
        return _failed(504, error)
    except httpx.HTTPError as error:
        return _failed(502, error)
    if answer.status_code != 200:
        return PlainTextResponse(f"upstream {answer.status_code}", 502)
    return PlainTextResponse(answer.text)


async def quote(request: Request) -> Response:
    deps: Deps = request.app.state.deps
    with _tracked(deps, "quote"):
        return await _quote(deps, request)


async def strict_quote(request: Request) -> Response:
    """GET upstream ``/{name}`` and let its failure escape, as ``raise_for_status()`` code
    does: what reaches our middleware is what our client layer gave up on."""
    deps: Deps = request.app.state.deps
    assert deps.http is not None
    with _tracked(deps, "strict_quote"):
        answer = await deps.http.get(f"{deps.upstream}/{request.path_params['name']}")
        answer.raise_for_status()
        return PlainTextResponse(answer.text)


async def db(request: Request) -> Response:
    deps: Deps = request.app.state.deps
    with _tracked(deps, "db"):
        try:
            async with deps.pool.acquire() as conn:
                value = await conn.fetchval("SELECT 41 + 1")
        except DEPENDENCY_DOWN as error:
            return _failed(503, error)
        return PlainTextResponse(str(value))


async def db_then_quote(request: Request) -> Response:
    """Holds a pooled connection while it calls upstream (a transaction around a call)."""
    deps: Deps = request.app.state.deps
    with _tracked(deps, "db_then_quote"):
        async with deps.pool.acquire() as conn:
            await conn.fetchval("SELECT 1")
            return await _quote(deps, request)


async def work(request: Request) -> Response:
    """All three clients in one request: Redis GET, upstream GET, a SELECT, Redis SET."""
    deps: Deps = request.app.state.deps
    with _tracked(deps, "work"):
        name = request.path_params["name"]
        key = f"otelrec-asgi:{name}"
        try:
            await deps.redis.get(key)
        except redis.exceptions.RedisError as error:
            return _failed(503, error)
        answer = await _quote(deps, request)
        if answer.status_code != 200:
            return answer
        try:
            async with deps.pool.acquire() as conn:
                value = await conn.fetchval("SELECT 41 + 1")
        except DEPENDENCY_DOWN as error:
            return _failed(503, error)
        await deps.redis.set(key, bytes(answer.body))
        return PlainTextResponse(f"{bytes(answer.body).decode()} {value}")


async def flaky(request: Request) -> Response:
    """Raises ``ConnectionError`` on its first ``?fail=N`` calls (per path), then answers."""
    deps: Deps = request.app.state.deps
    with _tracked(deps, "flaky"):
        await request.body()
        deps.flaky[request.url.path] += 1
        if deps.flaky[request.url.path] <= int(request.query_params.get("fail", "1")):
            raise ConnectionError("the handler's dependency reset the connection")
        return PlainTextResponse("fine")


async def stream(request: Request) -> Response:
    """Streams ``first``, then waits for the test to set ``deps.gate`` (it does once it has
    read ``first``: a buffered response would never let it), then ``second``, ``third``;
    with ``?broken=1`` raises after ``first`` instead."""
    deps: Deps = request.app.state.deps
    deps.started["stream"] += 1
    broken = request.query_params.get("broken") == "1"

    async def body() -> AsyncIterator[bytes]:
        yield b"first\n"
        if broken:
            raise ConnectionError("the stream's source went away")
        if not await asyncio.to_thread(deps.gate.wait, 5):
            raise TimeoutError("the test never read the first chunk")
        yield b"second\n"
        yield b"third\n"

    return StreamingResponse(body(), media_type="text/plain")


class CancelOnDisconnect:
    """Cancels the handler when its client disconnects (uvicorn only reports it through
    ``receive()``), and ends the request quietly: there is no one left to answer."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        inbox: asyncio.Queue[Message] = asyncio.Queue()
        state = {"complete": False, "gone": False}

        async def sending(message: Message) -> None:
            if message["type"] == "http.response.body" and not message.get("more_body"):
                state["complete"] = True
            await send(message)

        handler = asyncio.ensure_future(self.app(scope, inbox.get, sending))

        async def watch() -> None:
            while True:
                message = await receive()
                await inbox.put(message)
                if message["type"] == "http.disconnect":
                    if not state["complete"]:
                        state["gone"] = True
                        handler.cancel()
                    return

        watcher = asyncio.ensure_future(watch())
        try:
            await handler
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if not state["gone"] or (current is not None and current.cancelling()):
                raise
        finally:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher


def build_app(
    deps: Deps,
    provider: TracerProvider,
    *,
    recovery: dict[str, Any] | None = None,
    cancel_on_disconnect: bool = False,
) -> Any:
    """The service: contrib's ``OpenTelemetryMiddleware`` around Starlette, whose stack is
    ServerErrorMiddleware, [CancelOnDisconnect], our RecoveryMiddleware (added as its docs
    say, with ``add_middleware``-style ``Middleware``), ExceptionMiddleware, the router.
    ``recovery`` are RecoveryMiddleware's options; ``breaker`` may be a factory's keyword
    arguments (``{"failure_threshold": 5, "timeout": 0.3}``): the breakers it makes are kept
    in ``deps.route_breakers``."""
    options = dict(recovery or {})
    shape = options.pop("breaker", {"failure_threshold": 5, "timeout": 30.0})

    def breaker(route: str) -> CircuitBreaker:
        made = CircuitBreaker(name=f"http.server {route}", store="memory://", **shape)
        deps.route_breakers[route] = made
        return made

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        # one connection: a response our layer failed to release would block the next call
        deps.http = httpx.AsyncClient(
            timeout=httpx.Timeout(10, pool=2), limits=httpx.Limits(max_connections=1)
        )
        deps.pool = await asyncpg.create_pool(
            f"postgresql://postgres@127.0.0.1:{deps.pg_port}/test?sslmode=disable",
            min_size=0,
            max_size=deps.pool_size,
        )
        if deps.redis_port is not None:
            pool = redis.asyncio.ConnectionPool(
                port=deps.redis_port,
                # the healthy commands must beat it on a loaded machine too (0.5 s left
                # them little margin); a StopAtFirst freeze lasts until it fired
                socket_timeout=1.0,
                retry=RedisRetry(NoBackoff(), 0),
                connection_class=deps.redis_connection_class or redis.asyncio.Connection,
            )
            deps.redis = redis.asyncio.Redis.from_pool(pool)  # closing the client closes it
        app.state.deps = deps
        try:
            yield
        finally:
            await deps.http.aclose()
            await deps.pool.close()
            if deps.redis is not None:
                await deps.redis.aclose()
            deps.closed = True

    middleware = [Middleware(CancelOnDisconnect)] if cancel_on_disconnect else []
    middleware.append(Middleware(RecoveryMiddleware, breaker=breaker, **options))
    app = Starlette(
        routes=[
            Route("/quote/{name}", quote),
            Route("/strict-quote/{name}", strict_quote),
            Route("/db", db),
            Route("/db-then-quote/{name}", db_then_quote),
            Route("/work/{name}", work),
            Route("/flaky/{name}", flaky, methods=["GET", "POST"]),
            Route("/stream", stream),
        ],
        middleware=middleware,
        lifespan=lifespan,
    )
    return OpenTelemetryMiddleware(app, tracer_provider=provider)


# -- a Redis fault at the exact moment --------------------------------------------------------

_FIRST_COMMAND = re.compile(rb"\*\d+\r\n\$\d+\r\n([A-Za-z]+)\r\n")


class StopAtFirst:
    """Freezes ``server`` (SIGSTOP) the moment the service's Redis client is about to send its
    first ``command``, on a connection already set up, and resumes it (SIGCONT) when that
    connection is closed: redis-py closes it right after its socket timeout, so that attempt
    times out however slow the machine is, and the next attempt finds the server running.
    (``CLIENT PAUSE ALL`` cannot be ended early: this Redis holds ``CLIENT UNPAUSE`` too.)
    A timer resumes the server after ``fallback`` seconds whatever happens."""

    def __init__(self, server: PrivateRedis, command: str = "GET", fallback: float = 5.0) -> None:
        self.server, self.command, self.fallback = server, command.upper(), fallback
        self.fired = 0
        self.resumed = threading.Event()
        self._victim: Any = None

    def connection_class(self) -> type:
        trap = self

        class Stopping(redis.asyncio.Connection):
            async def send_packed_command(self, command: Any, check_health: bool = True) -> None:
                if not self.is_connected:
                    await self.connect()
                trap._sending(self, command)
                await super().send_packed_command(command, check_health)

            async def disconnect(self, *args: Any, **kwargs: Any) -> None:
                try:
                    await super().disconnect(*args, **kwargs)
                finally:
                    trap.resume(self)

        return Stopping

    def _sending(self, connection: Any, command: Any) -> None:
        if self.fired:
            return
        data = command if isinstance(command, bytes) else b"".join(bytes(c) for c in command)
        found = _FIRST_COMMAND.match(data)
        if found is None or found.group(1).decode().upper() != self.command:
            return
        self.fired += 1
        self._victim = connection
        self.server.stop_answering()
        deadline = time.monotonic() + 5
        while _process_state(self.server.pid) not in ("T", "t"):  # SIGSTOP is asynchronous
            assert time.monotonic() < deadline, "redis-server did not stop"
            time.sleep(0.001)
        self.server.after(self.fallback, self.resume)

    def resume(self, connection: Any = None) -> None:
        """Resume the server (``connection``: only if it is the one that met the fault)."""
        if not self.fired or self.resumed.is_set():
            return
        if connection is not None and connection is not self._victim:
            return
        self.server.resume()
        self.resumed.set()


def _process_state(pid: int) -> str:
    with open(f"/proc/{pid}/stat") as stat:
        return stat.read().rsplit(")", 1)[1].split()[0]


# -- the server -----------------------------------------------------------------------------


class Served:
    """uvicorn serving ``app`` on a free port, in a thread with its own event loop.

    ``loop_errors`` collects what the loop's exception handler got (never-retrieved task
    and future exceptions included, after a final ``gc.collect()``); ``leftover`` names
    the tasks still pending once ``serve()`` returned; ``served_in`` is how long ``serve()``
    took to return once asked to stop (uvicorn's own shutdown), ``stopped_in`` how long
    the thread took to end (the clean-up after it included)."""

    def __init__(self, app: Any, *, graceful: float | None = None) -> None:
        config = uvicorn.Config(
            app,
            host="127.0.0.1",
            port=0,
            loop="asyncio",
            lifespan="on",
            log_config=None,
            access_log=False,
            timeout_graceful_shutdown=graceful,
        )
        self.server = uvicorn.Server(config)
        self.loop_errors: list[dict[str, Any]] = []
        self.leftover: list[str] = []
        self.port = 0
        self.stopped_in: float | None = None
        self.served_in: float | None = None
        self._stop_asked: float | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> Served:
        def run() -> None:
            loop = asyncio.new_event_loop()
            asyncio.set_event_loop(loop)
            loop.set_exception_handler(lambda _, context: self.loop_errors.append(context))
            try:
                loop.run_until_complete(self.server.serve())
            finally:
                if self._stop_asked is not None:
                    self.served_in = time.monotonic() - self._stop_asked
                pending = [t for t in asyncio.all_tasks(loop) if not t.done()]
                self.leftover = [repr(t.get_coro()) for t in pending]
                for task in pending:
                    task.cancel()
                if pending:
                    loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
                loop.run_until_complete(loop.shutdown_asyncgens())
                gc.collect()
                loop.close()

        self._thread = threading.Thread(target=run, name="uvicorn", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            assert self._thread.is_alive(), "uvicorn did not start"
            assert time.monotonic() < deadline, "uvicorn did not start in 10 s"
            time.sleep(0.005)
        self.port = self.server.servers[0].sockets[0].getsockname()[1]
        return self

    def stop(self, timeout: float = 10.0) -> bool:
        """Ask uvicorn to shut down (as SIGTERM does); True if its thread ended in time."""
        if self._thread is None or not self._thread.is_alive():
            return True
        began = self._stop_asked = time.monotonic()
        self.server.should_exit = True
        self._thread.join(timeout)
        self.stopped_in = time.monotonic() - began
        return not self._thread.is_alive()

    def begin_stop(self) -> Callable[[float], bool]:
        """Start shutting down now; returns ``wait(timeout)`` for the thread's end."""
        began = self._stop_asked = time.monotonic()
        self.server.should_exit = True

        def wait(timeout: float) -> bool:
            assert self._thread is not None
            self._thread.join(timeout)
            self.stopped_in = time.monotonic() - began
            return not self._thread.is_alive()

        return wait


# -- the test's own HTTP client ---------------------------------------------------------------


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes
    raw: bytes
    seconds: float

    @property
    def responses(self) -> int:
        """Status lines on the wire: 1 unless someone answered twice."""
        return self.raw.count(b"HTTP/1.1 ")


def _request_bytes(method: str, path: str, headers: dict[str, str] | None) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1", "Connection: close"]
    lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
    if method not in ("GET", "HEAD"):
        lines.append("Content-Length: 0")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def parse(raw: bytes, seconds: float = 0.0) -> Reply:
    head, _, rest = raw.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in header_lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    body = rest
    if headers.get("transfer-encoding") == "chunked":
        body, complete = _dechunk(rest)
        if not complete:
            headers["x-test-truncated"] = "1"
    return Reply(int(status_line.split()[1]), headers, body, raw, seconds)


def _dechunk(data: bytes) -> tuple[bytes, bool]:
    """The chunked body, and whether its terminating zero-length chunk arrived."""
    out = b""
    while True:
        size_line, sep, data = data.partition(b"\r\n")
        if not sep:
            return out, False
        size = int(size_line.split(b";")[0] or b"0", 16)
        if size == 0:
            return out, True
        out, data = out + data[:size], data[size + 2 :]


async def fetch(
    port: int,
    path: str,
    *,
    method: str = "GET",
    headers: dict[str, str] | None = None,
    timeout: float = 10.0,
) -> Reply:
    """One request on a fresh connection; the reply as it came off the wire."""
    began = time.monotonic()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(_request_bytes(method, path, headers))
        raw = await asyncio.wait_for(reader.read(), timeout)
    finally:
        writer.close()
    return parse(raw, time.monotonic() - began)


class RawRequest:
    """A request left open: read part of the answer, or hang up before it comes."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.received = b""

    @classmethod
    async def send(cls, port: int, path: str) -> RawRequest:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(_request_bytes("GET", path, None))
        await writer.drain()
        return cls(reader, writer)

    async def read_until(self, marker: bytes, timeout: float = 5.0) -> bytes:
        async def more() -> None:
            while marker not in self.received:
                chunk = await self.reader.read(4096)
                if not chunk:
                    raise ConnectionError(f"closed before {marker!r}: {self.received!r}")
                self.received += chunk

        await asyncio.wait_for(more(), timeout)
        return self.received

    async def rest(self, timeout: float = 5.0) -> bytes:
        self.received += await asyncio.wait_for(self.reader.read(), timeout)
        return self.received

    async def hang_up(self) -> None:
        self.writer.close()
        with contextlib.suppress(OSError):
            await self.writer.wait_closed()
