"""The measuring side of ``instrumentors.py``: the worker processes that make the calls,
the HTTP server process they call, and how the parent starts both.

``instrumentors.py`` (the parent) sends a worker requests as JSON lines and reads results
back; ``_instrumentor_counts.py`` runs the same worker under callgrind. See
``instrumentors.py``'s docstring for the method.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import importlib
import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import IO, Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # also when loaded by file path
from _paired_calls import PAIRED_MODES, PerCallSwitch, run_blocks, uses_python_of_ours

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = Path(__file__).with_name("instrumentors.py")
"""What the parent runs again as a worker, a callgrind child or the HTTP server."""
TARGETS = ("redis", "postgres", "http")
ASYNC_TARGETS = ("redis_async", "postgres_async", "asyncpg")
"""Asked for by name (``--targets``): the same calls awaited, one event loop per client."""
TARGET_LABELS = {
    "redis": "Redis GET",
    "postgres": "PostgreSQL SELECT 1",
    "http": "HTTP GET",
    "redis_async": "redis.asyncio GET",
    "postgres_async": "psycopg async SELECT 1",
    "asyncpg": "asyncpg SELECT 1",
}
REDIS = ("127.0.0.1", 6379)
PG_DSN = "postgresql://postgres@127.0.0.1:5432/test"
OURS = {
    "redis": ("otel_recovery.instrumentors.redis", "RedisRecoveryInstrumentor"),
    "postgres": ("otel_recovery.instrumentors.psycopg", "PsycopgRecoveryInstrumentor"),
    "http": ("otel_recovery.instrumentors.requests", "RequestsRecoveryInstrumentor"),
    "redis_async": ("otel_recovery.instrumentors.redis", "RedisRecoveryInstrumentor"),
    "postgres_async": ("otel_recovery.instrumentors.psycopg", "PsycopgRecoveryInstrumentor"),
    "asyncpg": ("otel_recovery.instrumentors.asyncpg", "AsyncPGRecoveryInstrumentor"),
}
BATCH_WARMUP = 20
"""Untimed calls before each batch: the new client's connection, and the mode's code paths."""
HTTP_RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 2\r\n\r\nok"
WRAPT_SITES = {
    "redis": ("redis.client", "Redis", "execute_command"),
    "postgres": ("psycopg", "Cursor", "execute"),
    "http": ("requests.sessions", "Session", "request"),
}
"""Where otel-recovery's per-call layer sits, for the ``wrapt`` mode's do-nothing wrapper."""
CONTRIB_PREFIX = "opentelemetry.instrumentation."


# -- the local HTTP server (its own process) -------------------------------------------------


class _HttpResponder(asyncio.Protocol):
    """Answers every request on a keep-alive connection with a fixed 200 (GETs have no body)."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.buffer = b""

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while b"\r\n\r\n" in self.buffer:
            _, self.buffer = self.buffer.split(b"\r\n\r\n", 1)
            self.transport.write(HTTP_RESPONSE)


async def _serve_http() -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(_HttpResponder, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    print(port, flush=True)
    await loop.run_in_executor(None, sys.stdin.read)  # until the parent closes our stdin
    server.close()


# -- the workers ----------------------------------------------------------------------------


class _CountingExporter:
    """A span exporter that only counts: the export path runs, nothing leaves the process."""

    def __init__(self) -> None:
        self.count = 0

    def export(self, spans: Sequence[Any]) -> Any:
        from opentelemetry.sdk.trace.export import SpanExportResult

        self.count += len(spans)
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        return None

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return True


def _our_layers(value: object) -> int:
    """How many otel_recovery wrappers sit in the wrapt chain of a patched attribute."""
    from otel_recovery.instrumentors._wrapping import _wrapper_module

    count, node, seen = 0, value, 0
    while node is not None and seen < 20:
        if _wrapper_module(node).startswith("otel_recovery"):  # a wrapt proxy or a layer
            count += 1
        node, seen = getattr(node, "__wrapped__", None), seen + 1
    return count


class Worker:
    """Runs batches on request (JSON lines on stdin/stdout).

    ``bare`` has no OpenTelemetry at all. ``instrumented`` has the SDK and the contrib
    instrumentations for good, and instruments otel-recovery for ``recovery`` batches only,
    uninstrumenting it for ``contrib`` and ``control`` batches (see the module docstring).
    ``deterministic`` is for ``--instructions``, which needs a process whose instruction
    count does not depend on when another thread runs: spans are exported in the calling
    thread (a ``SimpleSpanProcessor``, not the batch processor's background thread), and the
    providers get a fixed resource, because ``Resource.create`` runs its detectors on a
    thread pool that starts one or two threads depending on timing (that alone moved the
    count of the same 300 warm-up calls by some 400,000 instructions).
    """

    def __init__(
        self, kind: str, targets: Sequence[str], http_port: int, *, deterministic: bool = False
    ) -> None:
        self.kind = kind
        self.deterministic = deterministic
        self.http_port = http_port
        self.notes: list[str] = []
        self.missing: list[str] = []
        self.exporter: _CountingExporter | None = None
        self.provider: Any = None
        self.ours: dict[str, Any] = {}
        self.ours_on = False
        self.patched: list[tuple[Any, str]] = []
        if kind == "instrumented":
            self._set_up_sdk()
            self._instrument_contrib(targets)
            self._load_ours(targets)

    def _set_up_sdk(self) -> None:
        from opentelemetry import metrics, trace
        from opentelemetry.sdk.metrics import MeterProvider
        from opentelemetry.sdk.metrics.export import InMemoryMetricReader
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor

        self.exporter = _CountingExporter()
        reader = InMemoryMetricReader()
        if self.deterministic:
            resource = Resource({"service.name": "otel-recovery-benchmark"})  # no detectors
            self.provider = TracerProvider(resource=resource)
            self.provider.add_span_processor(SimpleSpanProcessor(self.exporter))  # type: ignore[arg-type]
            meter_provider = MeterProvider(metric_readers=[reader], resource=resource)
        else:
            self.provider = TracerProvider()
            self.provider.add_span_processor(BatchSpanProcessor(self.exporter))  # type: ignore[arg-type]
            meter_provider = MeterProvider(metric_readers=[reader])
        trace.set_tracer_provider(self.provider)
        metrics.set_meter_provider(meter_provider)

    def _instrument_contrib(self, targets: Sequence[str]) -> None:
        from opentelemetry.instrumentation.asyncpg import AsyncPGInstrumentor
        from opentelemetry.instrumentation.psycopg import PsycopgInstrumentor
        from opentelemetry.instrumentation.redis import RedisInstrumentor
        from opentelemetry.instrumentation.requests import RequestsInstrumentor

        contrib: dict[str, Any] = {
            "redis": RedisInstrumentor,
            "postgres": PsycopgInstrumentor,
            "http": RequestsInstrumentor,
            "redis_async": RedisInstrumentor,
            "postgres_async": PsycopgInstrumentor,
            "asyncpg": AsyncPGInstrumentor,
        }
        for kind in dict.fromkeys(contrib[target] for target in targets):  # each once
            kind().instrument()

    def _load_ours(self, targets: Sequence[str]) -> None:
        for target in targets:  # an instrumentor is a singleton: redis and redis_async share
            module_name, class_name = OURS[target]
            try:
                module = importlib.import_module(module_name)
            except ImportError as error:
                self.notes.append(f"{module_name} not importable ({error})")
                self.missing.append(target)
                continue
            self.ours[target] = getattr(module, class_name)()

    def set_recovery(self, on: bool) -> None:
        """Instrument or uninstrument otel-recovery; prove that uninstrument removed it."""
        if on == self.ours_on:
            return
        for instrumentor in dict.fromkeys(self.ours.values()):
            if on:
                instrumentor.instrument()
                patches = getattr(instrumentor, "_patches", None)
                for item in getattr(patches, "_installed", ()):
                    if (item.owner, item.attribute) not in self.patched:
                        self.patched.append((item.owner, item.attribute))
            else:
                instrumentor.uninstrument()
        self.ours_on = on
        if not on:
            left = [
                f"{getattr(owner, '__name__', owner)}.{attribute}"
                for owner, attribute in self.patched
                if _our_layers(getattr(owner, attribute, None))
            ]
            if left:
                raise RuntimeError(f"uninstrument left otel_recovery wrappers on {left}")

    def idle_recovery(self) -> None:
        """Leave otel-recovery's layers in the call path but switch each of them off.

        Every layer tests its ``PatchSet``'s ``enabled`` flag first and, when it is off,
        calls straight through: what remains is the cost of being a layer at all.
        """
        if not self.ours_on:
            raise RuntimeError("idle_recovery needs otel-recovery instrumented first")
        for instrumentor in self.ours.values():
            patches = getattr(instrumentor, "_patches", None)
            if patches is not None:  # None: it did not instrument; the caller notes that
                patches.enabled = False

    def client(self, target: str) -> tuple[Callable[[], object], Callable[[], object]]:
        """A fresh client (made after the mode switch, as instrumentation may bind at
        connect time): the call to time, and how to close the client."""
        if target == "redis":
            import redis

            client = redis.Redis(*REDIS, socket_timeout=5)
            key = f"otel-recovery-bench:{uuid.uuid4().hex}"
            client.set(key, "x" * 64, ex=600)

            def close_redis() -> None:
                client.delete(key)
                client.close()

            return (lambda: client.get(key)), close_redis
        if target == "postgres":
            import psycopg

            connection = psycopg.connect(PG_DSN, autocommit=True)
            return (lambda: connection.execute("SELECT 1").fetchone()), connection.close
        if target in ASYNC_TARGETS:
            return self._async_client(target)
        import requests

        session = requests.Session()
        session.trust_env = False  # no proxy lookups from the environment on every call
        url = f"http://127.0.0.1:{self.http_port}/"
        return (lambda: session.get(url).content), session.close

    def _async_client(self, target: str) -> tuple[Callable[[], object], Callable[[], object]]:
        """An asyncio client and its own event loop; a call runs one awaited call to the end
        (the loop's share of each call is the same in every mode)."""
        loop = asyncio.new_event_loop()
        run = loop.run_until_complete
        if target == "redis_async":
            import redis.asyncio

            client = redis.asyncio.Redis(host=REDIS[0], port=REDIS[1], socket_timeout=5)
            key = f"otel-recovery-bench:{uuid.uuid4().hex}"
            run(client.set(key, "x" * 64, ex=600))

            def close_redis() -> None:
                run(client.delete(key))
                run(client.aclose())
                loop.close()

            return (lambda: run(client.get(key))), close_redis
        if target == "asyncpg":
            import asyncpg

            pg = run(asyncpg.connect(PG_DSN))

            def close_asyncpg() -> None:
                run(pg.close())
                loop.close()

            return (lambda: run(pg.fetchval("SELECT 1"))), close_asyncpg
        import psycopg

        connection = run(psycopg.AsyncConnection.connect(PG_DSN, autocommit=True))

        async def select_one() -> object:
            cursor = await connection.execute("SELECT 1")
            return await cursor.fetchone()

        def close_postgres() -> None:
            run(connection.close())
            loop.close()

        return (lambda: run(select_one())), close_postgres

    def batch(self, target: str, mode: str, calls: int, warmup: int) -> dict[str, Any]:
        self.set_recovery(mode == "recovery" and self.kind == "instrumented")
        call, close = self.client(target)
        try:
            for _ in range(warmup):  # connections, caches and code paths of this mode
                call()
            if self.provider is not None:
                self.provider.force_flush()
            latencies = [0] * calls
            clock = time.perf_counter_ns
            spans_before = self.exporter.count if self.exporter else 0
            gc.collect()  # garbage of the previous batch is not this batch's cost
            cpu_start = time.process_time_ns()
            for index in range(calls):
                started = clock()
                call()
                latencies[index] = clock() - started
            if self.provider is not None:
                self.provider.force_flush()  # exporting this batch's spans is part of its cost
            cpu = time.process_time_ns() - cpu_start
            spans = (self.exporter.count if self.exporter else 0) - spans_before
        finally:
            close()
        return {"latencies": latencies, "cpu_ns": cpu, "spans": spans}

    def paired(self, target: str, blocks: int) -> dict[str, Any]:
        """CPU time of every call of ``blocks`` blocks, the modes switched call by call
        (``_paired_calls.py``); and which Python of ours a recovery call ran."""
        from otel_recovery.instrumentors._wrapping import _wrapper_module

        self.set_recovery(True)
        patch_sets = [getattr(i, "_patches", None) for i in self.ours.values()]
        switch = PerCallSwitch(
            [p for p in patch_sets if p is not None],
            lambda node: _wrapper_module(node).startswith("otel_recovery"),
        )
        call, close = self.client(target)
        try:
            for mode in PAIRED_MODES:
                switch.select(mode)
                for _ in range(BATCH_WARMUP):
                    call()
            switch.select("recovery")
            # what every one of three calls ran: once a second the retry budget's bucket
            # ends and that call deposits in Python (record_call), as the compiled path does
            python = set.intersection(*(uses_python_of_ours(call) for _ in range(3)))
            gc.collect()
            cpu = run_blocks(call, switch, blocks)
        finally:
            switch.restore()
            close()
        return {"cpu": cpu, "python": sorted(python)}


def install_wrapt_idle_layer(target: str) -> None:
    """Put a do-nothing ``wrapt.FunctionWrapper`` where otel-recovery's layer for ``target``
    would sit (beneath contrib's wrapt proxies on the attribute, if any).

    Only the ``wrapt`` mode of ``--instructions`` uses it, to show what a wrapt proxy costs
    per call compared with the plain-function layers otel-recovery installs.
    """
    import wrapt

    from otel_recovery.instrumentors._wrapping import _wrapper_module

    def call_through(
        wrapped: Callable[..., Any], instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        return wrapped(*args, **kwargs)

    module_name, class_name, attribute = WRAPT_SITES[target]
    owner = getattr(importlib.import_module(module_name), class_name)
    current = vars(owner).get(attribute)
    if current is None:
        current = getattr(owner, attribute)
    lowest, node = None, current
    while hasattr(node, "_self_wrapper") and _wrapper_module(node).startswith(CONTRIB_PREFIX):
        lowest, node = node, node.__wrapped__
    if lowest is None:
        setattr(owner, attribute, wrapt.FunctionWrapper(current, call_through))
    else:
        lowest.__wrapped__ = wrapt.FunctionWrapper(lowest.__wrapped__, call_through)


def run_counted(target: str, mode: str, http_port: int, calls: int, warmup: int) -> None:
    """One child of ``--instructions`` (callgrind runs it): set up ``mode``, warm up, make
    ``calls`` calls with the garbage collector off, and report the spans they made (and any
    instrumentor that could not be measured) as a JSON line on stdout."""
    gc.disable()  # no automatic collection anywhere: the two runs differ only by the calls
    worker = Worker("instrumented", [target], http_port, deterministic=True)
    if mode in ("recovery", "idle"):
        worker.set_recovery(True)
        for name, instrumentor in worker.ours.items():
            if getattr(instrumentor, "_patches", None) is None:
                worker.notes.append(f"otel-recovery did not instrument {name}")
                worker.missing.append(name)
        if mode == "idle":
            worker.idle_recovery()
    elif mode == "wrapt":
        install_wrapt_idle_layer(target)
    exporter, provider = worker.exporter, worker.provider
    assert exporter is not None
    call, close = worker.client(target)
    try:
        call()  # the first call makes the target's retry budget
        pin_budget_buckets()
        for _ in range(warmup - 1):
            call()
        provider.force_flush()
        spans_before = exporter.count
        gc.collect()  # the same heap in both runs: start-up and warm-up garbage goes now
        for _ in range(calls):
            call()
        provider.force_flush()
        spans = exporter.count - spans_before
    finally:
        gc.enable()
        close()
    _send(sys.stdout, {"spans": spans, "notes": worker.notes, "missing": worker.missing})


def pin_budget_buckets() -> None:
    """Keep every retry budget in its current time bucket while callgrind counts.

    Why: under callgrind a call runs about 50 times slower, so the budget's one-second
    buckets would end every few dozen calls, and how many end among the counted calls
    depends on how fast the machine runs that day (two runs of one build differed by ~15
    instructions per call). A real client ends a bucket once a second among thousands of
    calls; with the end moved out of reach (after the first call, which makes the budget,
    and before the warm-up, which both runs of a figure make and whose length differs), every
    later call takes the path nearly all real calls take, and the count repeats. Only the
    counting children do this.
    """
    from otel_recovery.policies.budget import RetryBudget

    for budget in (o for o in gc.get_objects() if isinstance(o, RetryBudget)):
        budget._bucket_end = float("inf")


def run_worker(kind: str, targets: Sequence[str], http_port: int, warmup: int) -> None:
    worker = Worker(kind, targets, http_port)
    modes = ("bare",) if kind == "bare" else ("contrib", "recovery")
    for mode in modes:  # a first pass through every code path, results discarded
        for target in targets:
            worker.batch(target, mode, warmup, 0)
    _send(sys.stdout, {"ready": True, "notes": worker.notes, "missing": worker.missing})
    for line in sys.stdin:
        request = json.loads(line)
        if request.get("stop"):
            break
        if "paired" in request:
            _send(sys.stdout, worker.paired(request["paired"], request["blocks"]))
            continue
        result = worker.batch(request["target"], request["mode"], request["calls"], BATCH_WARMUP)
        _send(sys.stdout, result)


def _send(stream: IO[str], message: dict[str, Any]) -> None:
    stream.write(json.dumps(message) + "\n")
    stream.flush()


# -- starting the processes ----------------------------------------------------------------


def child_environment() -> dict[str, str]:
    """The parent's environment without OTEL_* settings that would reconfigure the SDK."""
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith("OTEL_") or key.startswith("OTEL_RECOVERY_")
    }
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


@contextlib.contextmanager
def http_server() -> Iterator[int]:
    process = subprocess.Popen(
        [sys.executable, str(SCRIPT), "--serve-http"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=child_environment(),
    )
    try:
        assert process.stdout is not None
        yield int(process.stdout.readline())
    finally:
        assert process.stdin is not None
        process.stdin.close()
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
