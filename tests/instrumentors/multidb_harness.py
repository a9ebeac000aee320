"""The harness the MultiDB tests share (``test_redis_multidb``, ``test_redis_multidb_routing``):
two private redis-servers, attempts counted beneath every layer by (command, port), and a
MultiDB client over them, sync or asyncio.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest
import redis
import redis.asyncio
import wrapt
from opentelemetry.instrumentation.redis import RedisInstrumentor
from opentelemetry.instrumentation.utils import suppress_instrumentation
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from redis.backoff import NoBackoff
from servers import PrivateRedis

from otel_recovery.instrumentors.redis import RedisRecoveryInstrumentor
from otel_recovery.testing import FakeClock

try:
    import redis.asyncio.multidb.client
    import redis.asyncio.multidb.config
    import redis.multidb.circuit
    import redis.multidb.client
    import redis.multidb.config
    import redis.multidb.exception  # noqa: F401 - imported only to know it is there
except ImportError as missing:  # redis-py before 7: no MultiDB; or no pybreaker, which it needs
    HAS_MULTIDB, WHY_NOT = False, f"no MultiDB client to test ({missing})"
else:
    HAS_MULTIDB, WHY_NOT = True, ""

needs_multidb = pytest.mark.skipif(not HAS_MULTIDB, reason=WHY_NOT)

TIMEOUT = 0.25
"""The database clients' socket timeout (the health-check clients copy it): what a PING or
a GET sent to a stopped server costs."""
CHECK_TIMEOUT = 3.0
"""MultiDB's budget for one health check: room for all our attempts, so that a check we
retried would show them."""
COUNTED = [(redis.client.Redis, "execute_command"), (redis.asyncio.client.Redis, "execute_command")]
"""The health checks PING through a ``redis.asyncio.Redis`` of their own (the sync client's
too); the application's commands go through a ``Redis`` per database, sync or asyncio."""
KINDS = ["sync", "async"]


class MultiHarness:
    """Counts attempts beneath our layer by (command, port); instruments ours (and contrib)."""

    def __init__(self, a: PrivateRedis, b: PrivateRedis) -> None:
        self.a, self.b = a, b
        self.exporter = InMemorySpanExporter()
        self.provider = TracerProvider()
        self.provider.add_span_processor(SimpleSpanProcessor(self.exporter))
        self.attempts: Counter[tuple[str, int]] = Counter()
        self.before_attempt: Callable[[str, int, int], None] | None = None
        """Called with the command, the port and its count as a counted attempt starts."""
        self.ours = RedisRecoveryInstrumentor()
        self._originals = [
            (owner, attribute, vars(owner)[attribute]) for owner, attribute in COUNTED
        ]
        for owner, attribute, original in self._originals:  # first: beneath every layer
            setattr(owner, attribute, wrapt.FunctionWrapper(original, self._count))

    def _count(self, wrapped: Any, instance: Any, args: Any, kwargs: Any) -> Any:
        pool = getattr(instance, "connection_pool", None)
        port = getattr(pool, "connection_kwargs", {}).get("port")
        if args and port in (self.a.port, self.b.port):
            name = str(args[0]).upper()
            self.attempts[name, port] += 1
            if self.before_attempt is not None:
                self.before_attempt(name, port, self.attempts[name, port])
        return wrapped(*args, **kwargs)

    def instrument(self, *, contrib: bool = False, **settings: Any) -> RedisRecoveryInstrumentor:
        if contrib:
            RedisInstrumentor().instrument(tracer_provider=self.provider)
        self.ours.instrument(tracer_provider=self.provider, clock=FakeClock(), **settings)
        return self.ours

    def pings(self, server: PrivateRedis) -> int:
        return self.attempts["PING", server.port]

    def close(self) -> None:
        with contextlib.ExitStack() as steps:
            steps.callback(self.provider.shutdown)
            for owner, attribute, original in self._originals:
                steps.callback(setattr, owner, attribute, original)
            steps.callback(self._contrib_off)
            steps.callback(self.ours.uninstrument)

    @staticmethod
    def _contrib_off() -> None:
        if RedisInstrumentor().is_instrumented_by_opentelemetry:
            RedisInstrumentor().uninstrument()


@pytest.fixture
def h() -> Iterator[MultiHarness]:
    a = PrivateRedis()
    try:
        b = PrivateRedis()
        try:
            harness = MultiHarness(a, b)
            try:
                yield harness
            finally:
                harness.close()
        finally:
            b.close()
    finally:
        a.close()


def multidb_client(kind: str, h: MultiHarness, interval: float = 60.0, **options: Any) -> Any:
    """A MultiDB client over ``h.a`` (weight 1: the active database) and ``h.b``, checking
    each database with one PING every ``interval`` seconds; by default MultiDB itself
    resends nothing (``command_retry``), so every resend seen is ours."""
    config = redis.multidb.config if kind == "sync" else redis.asyncio.multidb.config
    retry = redis.retry.Retry if kind == "sync" else redis.asyncio.retry.Retry
    databases = [
        config.DatabaseConfig(
            weight=weight,
            client_kwargs={"host": "127.0.0.1", "port": server.port, "socket_timeout": TIMEOUT},
        )
        for server, weight in ((h.a, 1.0), (h.b, 0.5))
    ]
    options.setdefault("command_retry", retry(NoBackoff(), 0))
    client_class = (
        redis.multidb.client.MultiDBClient
        if kind == "sync"
        else redis.asyncio.multidb.client.MultiDBClient
    )
    return client_class(
        config.MultiDbConfig(
            databases_config=databases,
            health_check_interval=interval,
            health_check_probes=1,
            health_check_delay=0.01,
            health_check_timeout=CHECK_TIMEOUT,
            **options,
        )
    )


@contextlib.asynccontextmanager
async def initialized(client: Any) -> AsyncIterator[Any]:
    """``client`` initialized (its first health checks run), and closed after the block."""
    try:
        await maybe_await(client.initialize())
        yield client
    finally:
        await maybe_await(client.aclose() if hasattr(client, "aclose") else client.close())


def database(client: Any, server: PrivateRedis) -> Any:
    """``client``'s database on ``server``."""
    for db, _weight in client.get_databases():
        if db.client.get_connection_kwargs()["port"] == server.port:
            return db
    raise AssertionError(f"no database on port {server.port}")


async def maybe_await(value: Any) -> Any:
    return await value if inspect.isawaitable(value) else value


async def eventually(condition: Callable[[], bool], within: float = 5.0) -> bool:
    """Whether ``condition()`` holds within ``within`` seconds of real time (MultiDB's)."""
    deadline = time.monotonic() + within
    while not condition():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.02)
    return True


def peek(server: PrivateRedis, *command: Any) -> Any:
    """A command to ``server`` past every instrumentation (our layer's circuit included)."""
    admin = server.admin()
    try:
        with suppress_instrumentation():
            return admin.execute_command(*command)
    finally:
        admin.close()
