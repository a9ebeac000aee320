"""RedisRecoveryInstrumentor against a private redis-server with real faults.

Faults: CLIENT KILL of our own connection while its command is in flight (held there by
CLIENT PAUSE WRITE), CLIENT PAUSE ALL, and a server that stops answering (SIGSTOP). Two
independent counts keep the tests honest: ``attempts`` counts calls into redis-py beneath our
wrapper (a counting wrapper installed first, so it sits under every layer), ``sent`` counts
commands written to the socket by the client's connection class.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import socket
import threading
import time
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis
import redis.asyncio
import wrapt
from opentelemetry.instrumentation.redis import RedisInstrumentor
from opentelemetry.instrumentation.utils import suppress_instrumentation
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode
from ours import marked_by_us
from redis.backoff import NoBackoff
from redis.retry import Retry
from servers import (  # noqa: F401
    MovingRedis,
    PrivateRedis,
    aclose,
    free_port,
    moving_redis,
    private_redis,
    private_redis_cluster,
)

from otel_recovery._policy_core import PolicyCore
from otel_recovery.instrumentors import (
    _redis_errors,
    _redis_plans,
    _redis_targets,
    _wrapping,
    suppress_recovery,
)
from otel_recovery.instrumentors import redis as ours_module
from otel_recovery.instrumentors._redis_commands import READS, CommandRules, command_name, runs_code
from otel_recovery.instrumentors._settings import load_settings
from otel_recovery.instrumentors.redis import RedisCircuitOpenError, RedisRecoveryInstrumentor
from otel_recovery.policies.circuit_breaker import CircuitBreaker, CircuitOpenError, CircuitState
from otel_recovery.testing import FakeClock

REDIS_PY = tuple(int(part) for part in redis.__version__.split(".")[:3])
"""The installed redis-py, where its own retries differ by release."""
TIMEOUT = 1.0
"""The clients' socket timeout. A fault lasts until attempt 1 failed (and no longer), so it
costs time only; every healthy command, a retry's included, must beat it: well under 1 ms on
an idle machine, but 0.4 s left a loaded one (parallel workers, child runs) little margin."""
COUNTED = [
    (redis.client.Redis, "execute_command"),
    (redis.client.Pipeline, "execute"),
    (redis.asyncio.client.Redis, "execute_command"),
    (redis.asyncio.client.Pipeline, "execute"),
    (redis.cluster.RedisCluster, "execute_command"),
    (redis.cluster.ClusterPipeline, "execute"),
    (redis.asyncio.cluster.RedisCluster, "execute_command"),
]
ORIGINALS = {(o, a): o.__dict__[a] for o, a in COUNTED}


def _owner(instance: Any) -> Any:
    """What identifies the client a call belongs to (its pool, or its cluster's nodes)."""
    for candidate in (instance, getattr(instance, "cluster_client", None)):
        for attribute in ("connection_pool", "nodes_manager"):
            found = getattr(candidate, attribute, None)
            if found is not None:
                return found
    return None


def owning(client: Any) -> Any:
    """``client``, made to disconnect its pool when it is closed: a client given a pool
    leaves it connected, and its sockets would reach the garbage collector open."""
    client.auto_close_connection_pool = True
    return client


class Harness:
    """Instruments in a chosen order with contrib; counts attempts and sends."""

    def __init__(self, server: PrivateRedis) -> None:
        self.server = server
        self.exporter = InMemorySpanExporter()
        self.provider = TracerProvider()
        self.provider.add_span_processor(SimpleSpanProcessor(self.exporter))
        self.attempts: Counter[str] = Counter()
        self.sent: Counter[str] = Counter()
        self.contrib = False
        self.ours = RedisRecoveryInstrumentor()
        self._owners: set[int] = set()  # only our clients' calls are counted, not admin's
        self._proxies: list[tuple[Any, str, Any]] = []
        self.before_attempt: Callable[[str, int], None] | None = None
        """Called with the method's name and its count as each counted attempt starts, before
        redis-py sends anything: a fault can begin with the call, however late it starts."""
        for owner, attribute in COUNTED:  # first, so every other layer lands above it
            proxy = wrapt.FunctionWrapper(owner.__dict__[attribute], self._count(attribute))
            setattr(owner, attribute, proxy)
            self._proxies.append((owner, attribute, proxy))

    def _count(self, name: str) -> Any:
        def count(wrapped: Any, instance: Any, args: Any, kwargs: Any) -> Any:
            if id(_owner(instance)) in self._owners:
                self.attempts[name] += 1
                if self.before_attempt is not None:
                    self.before_attempt(name, self.attempts[name])
            return wrapped(*args, **kwargs)

        return count

    def instrument(self, order: str = "contrib_first", **settings: Any) -> Harness:
        settings.setdefault("clock", FakeClock())
        if order == "contrib_first":
            RedisInstrumentor().instrument(tracer_provider=self.provider)
        self.ours.instrument(tracer_provider=self.provider, **settings)
        if order == "ours_first":
            RedisInstrumentor().instrument(tracer_provider=self.provider)
        self.contrib = order != "ours_only"
        return self

    def close(self) -> None:
        """Every step runs even if one fails (a half-done teardown would leave patched
        methods behind for every later test); the first failure is raised at the end."""
        with contextlib.ExitStack() as steps:
            steps.callback(self.provider.shutdown)
            for owner, attribute, proxy in reversed(self._proxies):
                steps.callback(self._restore, owner, attribute, proxy)
            steps.callback(self._contrib_off)
            steps.callback(self.ours.uninstrument)

    @staticmethod
    def _contrib_off() -> None:
        if RedisInstrumentor().is_instrumented_by_opentelemetry:
            RedisInstrumentor().uninstrument()

    @staticmethod
    def _restore(owner: Any, attribute: str, proxy: Any) -> None:
        top = owner.__dict__[attribute]
        setattr(owner, attribute, ORIGINALS[owner, attribute])  # whatever happens below
        # contrib's unwrap leaves a bound copy of whatever wrapt layer is below it
        assert proxy in (top, getattr(top, "_self_parent", None)), f"left on {attribute}"
        assert proxy.__wrapped__ is ORIGINALS[owner, attribute], f"{attribute} was re-wrapped"

    def reset_counts(self) -> None:
        self.attempts.clear()
        self.sent.clear()
        self.exporter.clear()

    def _connection_class(self, base: type) -> type:
        sent = self.sent

        class Counting(base):  # type: ignore[misc, valid-type]
            def send_command(self, *args: Any, **kwargs: Any) -> Any:
                sent[str(args[0]).upper()] += 1
                return super().send_command(*args, **kwargs)

        return Counting

    def client(
        self,
        redis_py_retry: Retry | None = None,
        retry_on_error: list[Any] | None = None,
        pool_class: type[redis.ConnectionPool] = redis.ConnectionPool,
        timeout: float = TIMEOUT,
    ) -> redis.Redis:
        pool = pool_class(
            host="127.0.0.1",
            port=self.server.port,
            socket_timeout=timeout,
            retry=redis_py_retry or Retry(NoBackoff(), 0),
            connection_class=self._connection_class(redis.Connection),
            **({} if retry_on_error is None else {"retry_on_error": retry_on_error}),
        )
        self._owners.add(id(pool))
        return redis.Redis(connection_pool=pool)

    def aclient(self) -> redis.asyncio.Redis:
        pool = redis.asyncio.ConnectionPool(
            host="127.0.0.1",
            port=self.server.port,
            socket_timeout=TIMEOUT,
            retry=redis.asyncio.retry.Retry(NoBackoff(), 0),
            connection_class=self._connection_class(redis.asyncio.Connection),
        )
        self._owners.add(id(pool))
        return owning(redis.asyncio.Redis(connection_pool=pool))

    def cluster_client(self, retries: int = 0, **options: Any) -> redis.cluster.RedisCluster:
        client = redis.cluster.RedisCluster(
            host="127.0.0.1",
            port=self.server.port,
            socket_timeout=TIMEOUT,
            retry=Retry(NoBackoff(), retries),
            **options,
        )
        self._owners.add(id(client.nodes_manager))
        return client

    def acluster_client(self) -> redis.asyncio.cluster.RedisCluster:
        client = redis.asyncio.cluster.RedisCluster(
            host="127.0.0.1",
            port=self.server.port,
            socket_timeout=TIMEOUT,
            retry=redis.asyncio.retry.Retry(NoBackoff(), 0),
        )
        self._owners.add(id(client.nodes_manager))
        return client

    def peek(self, method: str, *args: Any) -> Any:
        """Read the server's data without instrumentation (no spans, no counts)."""
        admin = self.server.admin()
        try:
            with suppress_instrumentation():
                return getattr(admin, method)(*args)
        finally:
            admin.close()

    def spans_named(self, name: str) -> list[ReadableSpan]:
        return [s for s in self.exporter.get_finished_spans() if s.name == name]

    def logical_span(self, name: str) -> ReadableSpan:
        """The one span of the call: contrib's, or ours without contrib."""
        if not self.contrib:
            name = f"recover redis 127.0.0.1:{self.server.port}"
        found = [s for s in self.exporter.get_finished_spans() if s.name == name]
        assert len(found) == 1, [s.name for s in self.exporter.get_finished_spans()]
        assert found[0].kind is (SpanKind.CLIENT if self.contrib else SpanKind.INTERNAL)
        return found[0]


@pytest.fixture
def server(private_redis: PrivateRedis) -> Iterator[PrivateRedis]:  # noqa: F811
    yield private_redis
    private_redis.heal()


@pytest.fixture
def h(server: PrivateRedis) -> Iterator[Harness]:
    harness = Harness(server)
    try:
        yield harness
    finally:
        harness.close()


def events(span: ReadableSpan, name: str) -> list[dict[str, Any]]:
    return [dict(e.attributes or {}) for e in span.events if e.name == name]


def kill_mid_write(server: PrivateRedis, client_id: int) -> threading.Thread:
    """Hold writes with CLIENT PAUSE WRITE, kill our connection once its command waits."""
    admin = server.admin()
    with suppress_instrumentation():
        admin.execute_command("CLIENT", "PAUSE", "5000", "WRITE")

    def run() -> None:
        with suppress_instrumentation():
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline:
                info = admin.execute_command("CLIENT", "LIST", "ID", client_id).decode()
                flags = next((f[6:] for f in info.split() if f.startswith("flags=")), "")
                if "b" in flags:  # blocked: its command is held by the pause
                    break
                time.sleep(0.005)
            admin.execute_command("CLIENT", "KILL", "ID", client_id)
            admin.execute_command("CLIENT", "UNPAUSE")

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


PAUSE_MS = int((TIMEOUT + 1.1) * 1000)
"""How long ``paused_from_the_next_attempt`` pauses: its attempt times out if it reaches the
server within 1.1 s of the pause, which it does unless its thread stalls that long."""


@contextlib.contextmanager
def paused_from_the_next_attempt(h: Harness, name: str = "execute_command") -> Iterator[None]:
    """``CLIENT PAUSE ALL`` issued as the next attempt of ``name`` starts (from inside it), so
    the attempt times out however late the call began: a 0.6 s pause issued before the call
    was over before a call that started 0.2 s late reached the server. A second attempt waits
    for the pause to end (blocking, an asyncio test's loop too), and is answered; leaving the
    block waits for it too. Redis 7.0 answers no command during a pause ALL, ``CLIENT
    UNPAUSE`` included, so unlike a stop it cannot be ended once the retry has started: it
    runs its ``PAUSE_MS``."""
    admin = h.server.admin()
    first = h.attempts[name] + 1

    def pause_or_wait(attempt_name: str, attempt: int) -> None:
        with suppress_instrumentation():
            if (attempt_name, attempt) == (name, first):
                admin.execute_command("CLIENT", "PAUSE", str(PAUSE_MS), "ALL")
            elif (attempt_name, attempt) == (name, first + 1):
                admin.ping()  # answered once the pause is over

    h.before_attempt = pause_or_wait
    try:
        yield
    finally:
        h.before_attempt = None
        with suppress_instrumentation():
            admin.ping()
        admin.close()


@contextlib.contextmanager
def stopped(server: PrivateRedis, safety: float = 10.0) -> Iterator[None]:
    """The server stopped (SIGSTOP) for the block, resumed as it ends: a call meant to fail
    meets the stop however late it starts (a 0.6 s timer let an INCR that started 0.2 s late
    be answered). A timer resumes it after ``safety`` seconds should the block hang."""
    server.stop_answering()
    timer = threading.Timer(safety, server.resume)
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()
        server.resume()


def stop_for(server: PrivateRedis, seconds: float = 30.0) -> None:
    """Stop the server now and resume it after ``seconds`` (``heal()`` resumes it after the
    test anyway): for calls meant to fail on every attempt, well inside ``seconds``, which
    costs nothing (a test that ends sooner resumes it as it ends)."""
    server.stop_answering()
    server.after(seconds, server.resume)


def stop_until_the_retry(h: Harness, name: str = "execute_command") -> None:
    """Stop the server now and resume it once the second attempt of ``name`` has started:
    the first one times out whatever the machine's load (a timer of 0.6 s let a GET that
    started 0.2 s late succeed at once, seen once under parallel workers)."""
    h.server.stop_answering()
    started = h.attempts[name]

    def resume() -> None:
        deadline = time.monotonic() + 10
        while h.attempts[name] < started + 2 and time.monotonic() < deadline:
            time.sleep(0.005)
        h.server.resume()

    threading.Thread(target=resume, daemon=True).start()


def assert_recovered(h: Harness, name: str, attempts: int) -> ReadableSpan:
    span = h.logical_span(name)
    attrs = dict(span.attributes or {})
    assert attrs["otel_recovery.outcome"] == "success"
    assert attrs["otel_recovery.retry.attempts"] == attempts
    assert len(events(span, "otel_recovery.attempt.failed")) == attempts - 1
    assert [e["otel_recovery.retry.attempt"] for e in events(span, "otel_recovery.retry")] == list(
        range(2, attempts + 1)
    )
    assert span.status.status_code is StatusCode.UNSET
    return span


# -- sync: recovery under real faults, in every load order --------------------------------


@pytest.mark.parametrize("order", ["contrib_first", "ours_first", "ours_only"])
def test_client_kill_mid_set_is_retried_once_under_one_span(h: Harness, order: str) -> None:
    h.instrument(order)
    c = h.client()
    client_id = c.client_id()
    h.reset_counts()
    killer = kill_mid_write(h.server, client_id)
    assert c.set("k", "v") is True
    killer.join()
    assert h.attempts["execute_command"] == 2 and h.sent["SET"] == 2
    assert h.peek("get", "k") == b"v"
    span = assert_recovered(h, "SET", attempts=2)
    failed = events(span, "otel_recovery.attempt.failed")[0]
    assert failed["error.type"] == "redis.exceptions.ConnectionError"
    assert failed["otel_recovery.error.retryable"] is True


@pytest.mark.parametrize("order", ["contrib_first", "ours_only"])
def test_client_pause_get_recovers_on_the_second_attempt(h: Harness, order: str) -> None:
    h.instrument(order)
    c = h.client()
    c.set("k", "v")
    h.reset_counts()
    with paused_from_the_next_attempt(h):
        assert c.get("k") == b"v"
    assert h.attempts["execute_command"] == 2 and h.sent["GET"] == 2
    assert_recovered(h, "GET", attempts=2)


def test_a_server_that_stops_answering_is_retried_until_it_answers(h: Harness) -> None:
    h.instrument()
    c = h.client()
    c.set("k", "v")
    h.reset_counts()
    stop_until_the_retry(h)
    assert c.get("k") == b"v"
    assert h.attempts["execute_command"] == 2
    failed = events(assert_recovered(h, "GET", 2), "otel_recovery.attempt.failed")[0]
    assert failed["error.type"] == "redis.exceptions.TimeoutError"


def test_a_server_that_never_answers_fails_after_exactly_max_attempts(h: Harness) -> None:
    h.instrument(max_attempts=3)
    c = h.client()
    c.set("k", "v")
    h.reset_counts()
    stop_for(h.server)  # heal() resumes it after the test
    with pytest.raises(redis.exceptions.TimeoutError):
        c.get("k")
    assert h.attempts["execute_command"] == 3
    span = h.logical_span("GET")
    attrs = dict(span.attributes or {})
    assert attrs["otel_recovery.outcome"] == "failure"
    assert attrs["otel_recovery.retry.attempts"] == 3
    assert attrs["otel_recovery.retry.stop_reason"] == "attempts_exhausted"
    assert len(events(span, "otel_recovery.attempt.failed")) == 3
    assert span.status.status_code is StatusCode.ERROR  # contrib's, for the final failure


# -- sync: what is never retried ----------------------------------------------------------


@pytest.mark.parametrize("order", ["contrib_first", "ours_only"])
@pytest.mark.parametrize("fault", ["kill", "pause", "stop"])
def test_incr_is_never_sent_twice(h: Harness, fault: str, order: str) -> None:
    """The span that says so is contrib's, or without contrib our own ``recover`` span."""
    ours = h.instrument(order).ours
    c = h.client()
    client_id = c.client_id()
    h.reset_counts()
    expected: type[Exception] = redis.exceptions.TimeoutError
    fault_on: contextlib.AbstractContextManager[None] = contextlib.nullcontext()
    if fault == "kill":
        killer = kill_mid_write(h.server, client_id)
        expected = redis.exceptions.ConnectionError
    elif fault == "pause":
        fault_on = paused_from_the_next_attempt(h)
    else:
        fault_on = stopped(h.server)
    with fault_on, pytest.raises(expected):
        c.incr("counter")
    if fault == "kill":
        killer.join()
    assert h.attempts["execute_command"] == 1 and h.sent["INCRBY"] + h.sent["INCR"] == 1
    # the fault is over: whatever the server did with it is visible now
    assert int(h.peek("get", "counter") or 0) <= 1
    span = h.logical_span("INCRBY" if h.sent["INCRBY"] else "INCR")
    attrs = dict(span.attributes or {})
    assert attrs["otel_recovery.retry.disallowed"] == "non_idempotent_command"
    assert attrs["otel_recovery.outcome"] == "failure"
    assert ours.targets is not None
    (breaker,) = ours.targets.breakers()
    assert breaker.snapshot().failed_calls == 1  # recorded against 127.0.0.1:<port>


async def maybe_await(value: Any) -> Any:
    return await value if inspect.isawaitable(value) else value


@pytest.mark.parametrize("kind", ["sync", "async"])
async def test_an_open_breakers_rejection_is_a_redis_connection_error(
    h: Harness, kind: str
) -> None:
    """As the SQL drivers' are: ``except redis.RedisError`` catches it, and frameworks that
    reconnect after a lost connection (kombu and Celery's worker, RQ's worker) do so, where a
    plain ``CircuitOpenError`` stopped them for good (tests/integrations/test_celery.py)."""
    ours = h.instrument().ours
    c = h.client() if kind == "sync" else h.aclient()
    try:
        await maybe_await(c.ping())
        assert ours.targets is not None
        (breaker,) = ours.targets.breakers()
        breaker.force_open()
        h.reset_counts()
        with pytest.raises(redis.exceptions.ConnectionError) as rejected:
            await maybe_await(c.get("k"))
        assert isinstance(rejected.value, RedisCircuitOpenError)
        assert rejected.value.name == breaker.name and h.sent["GET"] == 0
    finally:
        await (aclose(c) if kind == "async" else maybe_await(c.close()))


@pytest.mark.skipif(REDIS_PY < (7, 2), reason="redis-py < 7.2 forgets a one-node cluster")
def test_an_open_breakers_rejection_on_a_cluster_client_is_not_a_connection_error(
    hc: Harness,
) -> None:
    """redis-py's cluster pipeline resends its whole stack (INCRs included) on any
    ``ConnectionError`` raised inside it, and its resend of a MOVED command goes through our
    cluster command layer (see ``RedisCircuitOpenError``): there the rejection stays plain."""
    ours = hc.instrument().ours
    c = hc.cluster_client()
    try:
        c.ping()
        c.get("k")
        assert ours.targets is not None
        for breaker in ours.targets.breakers():  # the shard's, and the cluster-wide one
            breaker.force_open()
        hc.reset_counts()
        with pytest.raises(CircuitOpenError) as rejected:
            c.get("k")
        assert not isinstance(rejected.value, redis.exceptions.ConnectionError)
        with pytest.raises(CircuitOpenError) as rejected:
            c.pipeline().incr("n").execute()
        assert not isinstance(rejected.value, redis.exceptions.ConnectionError)
        assert hc.sent["GET"] == hc.sent["INCR"] == 0
    finally:
        c.close()


def test_watch_conflicts_are_answers_and_do_not_open_the_breaker(h: Harness) -> None:
    """Optimistic locking that loses a race (``WatchError``) met a healthy server: a hot key
    must not open the circuit for every other command."""
    ours = h.instrument(breaker_window=4, breaker_minimum_calls=4).ours
    c, rival = h.client(), h.client()
    for n in range(4):
        with c.pipeline() as pipe:
            pipe.watch("hot")
            rival.set("hot", n)  # changed under the watch: EXEC is refused
            pipe.multi()
            pipe.set("hot", "mine")
            with pytest.raises(redis.exceptions.WatchError):
                pipe.execute()
    assert ours.targets is not None
    (breaker,) = ours.targets.breakers()
    snapshot = breaker.snapshot()
    assert (snapshot.state, snapshot.failed_calls) == ("closed", 0)
    assert c.get("hot") == b"3"


def test_a_write_refused_for_its_own_reason_says_nothing_of_retries(h: Harness) -> None:
    """``retry.disallowed`` says why a call that a retry could have mended was not retried.
    ``INCR`` of a list fails the same way however often it is sent: the span said
    ``non_idempotent_command`` as if that were why it was not retried."""
    h.instrument()
    c = h.client()
    c.delete("a-list")
    c.rpush("a-list", "x")
    h.reset_counts()
    with pytest.raises(redis.exceptions.ResponseError, match="WRONGTYPE"):
        c.incr("a-list")
    assert h.attempts["execute_command"] == 1
    attrs = dict(h.logical_span("INCRBY" if h.sent["INCRBY"] else "INCR").attributes or {})
    assert attrs["otel_recovery.retry.stop_reason"] == "not_retryable"
    assert attrs["otel_recovery.error.category"] == "invalid_request"
    assert "otel_recovery.retry.disallowed" not in attrs


@pytest.mark.parametrize(
    ("command", "args"),
    [
        ("SADD", ("seen", "msg-42")),
        ("DEL", ("claim",)),
        ("HSET", ("h", "f", "v")),
        ("EXPIRE", ("claim", "0")),  # deletes the key: a resend answers 0
        ("PEXPIRE", ("claim", "20")),  # the key is gone before a resend arrives
        ("PEXPIREAT", ("claim", "1000")),  # a time long past: deletes it too
    ],
)
def test_a_write_whose_reply_counts_is_not_sent_twice(
    h: Harness, command: str, args: tuple[str, ...]
) -> None:
    """Repeated after its reply was lost, ``SADD`` answers 0 where the first application
    counted 1, and ``if r.sadd("seen", id): handle(id)`` would drop the message: the caller
    gets the error, as without us, unless it names the command as safe to repeat."""
    h.instrument()
    c = h.client()
    c.set("claim", "worker-1")  # and connected: the fault meets the command itself
    h.reset_counts()
    with stopped(h.server), pytest.raises(redis.exceptions.TimeoutError):
        c.execute_command(command, *args)
    assert h.attempts["execute_command"] == 1 and h.sent[command] == 1
    attrs = dict(h.logical_span(command).attributes or {})
    assert attrs["otel_recovery.retry.disallowed"] == "non_idempotent_command"
    h.ours.uninstrument()
    h.instrument(redis_retry_commands=command)
    c = h.client()
    c.set("claim", "worker-1")  # and connected: the fault meets the command itself
    h.reset_counts()
    if command in ("EXPIRE", "PEXPIRE"):
        # built in, with a floor: listed again, it keeps the floor (it widens nothing)
        with stopped(h.server), pytest.raises(redis.exceptions.TimeoutError):
            c.execute_command(command, *args)
        assert h.attempts["execute_command"] == 1
        return
    stop_until_the_retry(h)
    c.execute_command(command, *args)  # the user's word: repeated, its reply not read
    assert h.attempts["execute_command"] == 2


def test_transactional_pipeline_is_not_retried_and_not_applied_twice(h: Harness) -> None:
    h.instrument()
    c = h.client()
    client_id = c.client_id()
    h.reset_counts()
    killer = kill_mid_write(h.server, client_id)
    pipe = c.pipeline()  # transaction=True, redis-py's default: MULTI/EXEC
    pipe.incr("counter").set("k", "v")
    with pytest.raises(redis.exceptions.ConnectionError):
        pipe.execute()
    killer.join()
    assert h.attempts["execute"] == 1
    assert h.peek("get", "counter") is None
    attrs = dict(h.logical_span("INCRBY SET").attributes or {})
    assert attrs["otel_recovery.retry.disallowed"] == "transaction"


def test_idempotent_pipeline_is_refilled_and_retried(h: Harness) -> None:
    h.instrument()
    c = h.client()
    client_id = c.client_id()
    h.reset_counts()
    killer = kill_mid_write(h.server, client_id)
    pipe = c.pipeline(transaction=False)
    pipe.set("a", "1").set("b", "2").get("a")
    assert pipe.execute() == [True, True, b"1"]
    killer.join()
    assert h.attempts["execute"] == 2
    assert_recovered(h, "SET SET GET", attempts=2)


def test_a_pipeline_kill_is_retried_once_whoever_retries_by_redis_py_version(h: Harness) -> None:
    """``retry_on_error=[ConnectionError]``, as redis-py advises: from 5.0.2 a pipeline's
    ``execute()`` repeats it itself; before, it repeats only timeouts, so we must."""
    h.instrument()
    c = h.client(
        redis_py_retry=Retry(NoBackoff(), 3), retry_on_error=[redis.exceptions.ConnectionError]
    )
    client_id = c.client_id()
    h.reset_counts()
    killer = kill_mid_write(h.server, client_id)
    pipe = c.pipeline(transaction=False)
    pipe.set("a", "1").get("a")
    assert pipe.execute() == [True, b"1"]
    killer.join()
    assert h.attempts["execute"] == (1 if REDIS_PY >= (5, 0, 2) else 2)


def test_pipeline_with_a_non_idempotent_command_is_not_retried(h: Harness) -> None:
    h.instrument()
    c = h.client()
    client_id = c.client_id()
    h.reset_counts()
    killer = kill_mid_write(h.server, client_id)
    pipe = c.pipeline(transaction=False)
    pipe.set("a", "1").lpush("list", "x")
    with pytest.raises(redis.exceptions.ConnectionError):
        pipe.execute()
    killer.join()
    assert h.attempts["execute"] == 1
    assert h.peek("llen", "list") == 0
    attrs = dict(h.logical_span("SET LPUSH").attributes or {})
    assert attrs["otel_recovery.retry.disallowed"] == "non_idempotent_command"


# -- redis-py's own retry ----------------------------------------------------------------


def test_redis_py_retry_absorbs_a_kill_inside_our_single_attempt(h: Harness) -> None:
    h.instrument()
    c = h.client(
        redis_py_retry=Retry(NoBackoff(), 3), retry_on_error=[redis.exceptions.ConnectionError]
    )
    client_id = c.client_id()
    h.reset_counts()
    killer = kill_mid_write(h.server, client_id)
    assert c.set("k", "v") is True
    killer.join()
    assert h.attempts["execute_command"] == 1  # our attempts: one logical command
    assert h.sent["SET"] == 2  # redis-py resent it on a new connection
    assert not h.logical_span("SET").events


def test_a_kill_is_retried_once_whoever_retries_by_redis_py_version(h: Harness) -> None:
    """A ``Retry`` without ``retry_on_error``: redis-py 6 repeats a dropped connection
    itself; before 6.0 it repeats only the errors listed in ``retry_on_error`` (none here), so
    we must, or the kill reaches the application."""
    h.instrument()
    c = h.client(redis_py_retry=Retry(NoBackoff(), 3))
    client_id = c.client_id()
    h.reset_counts()
    killer = kill_mid_write(h.server, client_id)
    assert c.set("k", "v") is True
    killer.join()
    assert h.sent["SET"] == 2
    redis_py_repeats = not hasattr(redis.Redis, "_disconnect_raise")  # redis-py >= 6
    assert h.attempts["execute_command"] == (1 if redis_py_repeats else 2)


@pytest.mark.parametrize("order", ["contrib_first", "ours_only"])
def test_a_failure_redis_py_already_retried_is_not_retried_again(h: Harness, order: str) -> None:
    """Said on contrib's span, or on our own without contrib (where it was missing)."""
    h.instrument(order, max_attempts=3)
    c = h.client(
        redis_py_retry=Retry(NoBackoff(), 1), retry_on_error=[redis.exceptions.TimeoutError]
    )
    c.set("k", "v")
    h.reset_counts()
    stop_for(h.server)
    with pytest.raises(redis.exceptions.TimeoutError):
        c.get("k")
    assert h.attempts["execute_command"] == 1  # not 3 x 2
    attrs = dict(h.logical_span("GET").attributes or {})
    assert attrs["otel_recovery.retry.disallowed"] == "client_retried"
    assert attrs["otel_recovery.redis.client_retries"] == 1


# -- lifecycle, suppression, never breaking the app -----------------------------------------


ALL_SITES = [(owner, attribute) for owner, attribute, *_ in ours_module._SITES]


@pytest.mark.parametrize("ours_first", [True, False])
@pytest.mark.parametrize("ours_leave_first", [True, False])
def test_uninstrument_restores_the_original_methods(ours_first: bool, ours_leave_first: bool):
    originals = {site: site[0].__dict__[site[1]] for site in ALL_SITES}
    provider = TracerProvider()
    first, second = RedisRecoveryInstrumentor(), RedisInstrumentor()
    if not ours_first:
        first, second = second, first
    first.instrument(tracer_provider=provider)
    second.instrument(tracer_provider=provider)
    for owner, attribute in ALL_SITES:  # contrib's wrapper is on top, ours beneath it
        top = owner.__dict__[attribute]
        assert top.__module__ != "otel_recovery.instrumentors._wrapping"
        assert _wrapping._wrapper_module(top).startswith("opentelemetry.instrumentation.")
        assert _wrapping._wrapper_module(top.__wrapped__).startswith("otel_recovery.instrumentors.")
    leaving = [RedisRecoveryInstrumentor(), RedisInstrumentor()]
    if not ours_leave_first:
        leaving.reverse()
    for instrumentor in leaving:
        instrumentor.uninstrument()
    for site, original in originals.items():
        assert site[0].__dict__[site[1]] is original, site


def test_suppressed_instrumentation_is_not_retried(h: Harness) -> None:
    h.instrument()
    c = h.client()
    client_id = c.client_id()
    h.reset_counts()
    killer = kill_mid_write(h.server, client_id)
    with suppress_instrumentation(), pytest.raises(redis.exceptions.ConnectionError):
        c.set("k", "v")
    killer.join()
    assert h.attempts["execute_command"] == 1 and not marked_by_us(h.exporter.get_finished_spans())


@pytest.mark.parametrize("order", ["contrib_first", "ours_first"])
def test_suppress_recovery_steps_aside_while_contrib_still_traces(h: Harness, order: str) -> None:
    """Inside ``suppress_recovery()`` a command goes to redis-py once, as sent, on the
    remembered (compiled) path too; an open circuit does not refuse it and it counts on no
    breaker; contrib's span stays."""
    h.instrument(order)
    c = h.client()
    assert c.get("k") is None  # the command's plan is remembered: the check comes first
    h.reset_counts()
    h.exporter.clear()
    with suppress_recovery(), stopped(h.server), pytest.raises(redis.exceptions.TimeoutError):
        c.get("k")
    assert h.attempts["execute_command"] == 1
    spans = h.exporter.get_finished_spans()
    assert [s.name for s in spans] == ["GET"] and marked_by_us(spans) == []
    breaker = h.ours.targets.known_breaker("127.0.0.1", h.server.port)
    assert breaker is not None
    breaker.force_open()
    before = breaker.snapshot()
    h.reset_counts()
    with suppress_recovery():
        assert c.set("k", "v") is True and c.get("k") == b"v"  # not refused
    assert h.attempts["execute_command"] == 2 and breaker.snapshot() == before
    with pytest.raises(RedisCircuitOpenError):
        c.get("k")


def test_a_wrapper_bug_does_not_break_the_call(
    h: Harness, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    h.instrument()
    c = h.client()
    _break_the_planner(monkeypatch)
    with caplog.at_level(logging.ERROR, logger="otel_recovery.instrumentors"):
        assert c.set("k", "v") is True and c.get("k") == b"v"
        with pytest.raises(redis.exceptions.ResponseError) as refused:
            c.execute_command("NOSUCHCOMMAND")
    assert _reports(caplog, "redis Redis.execute_command") == 1
    # made outside our handler: redis-py's error does not carry our bug as its context
    assert refused.value.__context__ is None


def _break_the_planner(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every command's planning raises: a wrapper bug, which must not break the call."""

    def broken(*args: Any) -> Any:
        raise RuntimeError("planner bug")

    monkeypatch.setattr(_redis_plans.Planner, "command", broken)
    monkeypatch.setattr(_wrapping, "_reported", set())


def _reports(caplog: pytest.LogCaptureFixture, where: str) -> int:
    """How often the internal error at ``where`` was logged."""
    return [r.message for r in caplog.records].count(
        f"otel_recovery internal error in {where}; the call proceeds uninstrumented "
        "(reported once per site)"
    )


@pytest.mark.parametrize("kind", ["sync", "async"])
async def test_a_malformed_command_is_redis_pys_to_refuse_not_an_error_of_ours(
    h: Harness, kind: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """No command, or a name that is a list: redis-py refuses it in its own words; our
    planning fails on it too, but that is not reported as our internal error."""
    h.instrument()
    monkeypatch.setattr(_wrapping, "_reported", set())
    c = h.client() if kind == "sync" else h.aclient()
    try:
        with caplog.at_level(logging.ERROR, logger="otel_recovery"):
            for call in (lambda: c.execute_command(), lambda: c.execute_command(["GET"], "k")):
                with pytest.raises(Exception) as raised:
                    await maybe_await(call())
                assert type(raised.value).__module__.startswith(("redis", "builtins"))
        assert not caplog.records
    finally:
        await close_client(c)


# -- the command rules -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "allowed"),
    [
        (("GET", "k"), True),
        (("SET", "k", "v"), True),
        (("SET", "k", "v", "EX", 10), True),
        (("SET", "k", "v", "NX"), False),
        ((b"set", b"k", b"v", b"get"), False),
        (("ZADD", "z", 1, "m"), False),  # its reply counts what it added
        (("SADD", "s", "m"), False),
        (("DEL", "k"), False),
        (("SETBIT", "b", 7, 1), False),  # its reply is the bit before
        (("EXPIRE", "k", 3600), True),
        ((b"expire", b"k", b"60"), True),
        (("PEXPIRE", "k", 60_000), True),
        (("EXPIRE", "k", 3600, "NX"), False),
        # the key may be gone when the resend arrives, and the resend answer 0 where the
        # first send answered 1: at once (zero or less), or soon
        (("EXPIRE", "k", 0), False),
        (("EXPIRE", "k", -1), False),
        (("EXPIRE", "k", 10), False),
        (("PEXPIRE", "k", 500), False),
        (("EXPIRE", "k", "soon"), False),
        (("EXPIRE", "k"), False),
        (("EXPIREAT", "k", 4_102_444_800), False),  # the server's clock says when
        (("PEXPIREAT", "k", 1000), False),
        (("INCR", "k"), False),
        (("EVAL", "return 1", 0), False),
        (("CONFIG GET", "maxmemory"), True),
        (("CONFIG", "SET", "maxmemory", "1"), False),
    ],
)
def test_command_rules(args: tuple[Any, ...], allowed: bool) -> None:
    rules = CommandRules(load_settings(environ={}))
    assert rules.allows(rules.name(args), args) is allowed


def test_command_rules_follow_the_settings() -> None:
    s = load_settings(
        {"redis_retry_commands": "incr, set, expire", "redis_no_retry_commands": "GET"}
    )
    rules = CommandRules(s)
    assert rules.allows("INCR", ("INCR", "k"))  # not built in: the user's word
    assert not rules.allows("GET", ("GET", "k"))
    # built in already: listing them again widens nothing and loosens nothing (a SET NX
    # resent after its reply was lost answers None to the caller that took the lock)
    assert rules.allows("SET", ("SET", "k", "v"))
    assert not rules.allows("SET", ("SET", "k", "v", "NX"))
    assert not rules.allows("SET", ("SET", "k", "v", "GET"))
    assert not rules.allows("EXPIRE", ("EXPIRE", "k", "0"))
    assert rules.allows("EXPIRE", ("EXPIRE", "k", "300"))
    assert command_name(("config", "get", "x")) == "CONFIG GET"


# -- a failover behind one address (a managed service's DNS name) --------------------------


def sent_incr(h: Harness) -> int:
    """INCRs written to the socket (recent redis-py sends ``INCRBY key 1``)."""
    return h.sent["INCRBY"] + h.sent["INCR"]


def incr_name(h: Harness) -> str:
    """The name contrib gives an INCR's span: the command redis-py sent."""
    return "INCRBY" if h.sent["INCRBY"] else "INCR"


@pytest.fixture
def hm(moving_redis: MovingRedis) -> Iterator[Harness]:  # noqa: F811
    """A harness whose clients talk to :class:`MovingRedis`'s one address."""
    harness = Harness(moving_redis)  # type: ignore[arg-type]
    try:
        yield harness
    finally:
        harness.close()


def test_redis_py_alone_keeps_its_connections_on_the_demoted_primary(
    hm: Harness,
    moving_redis: MovingRedis,  # noqa: F811
) -> None:
    """What the instrumentor repairs: without it, pooled connections stay with the old
    primary after the address moved, and every write is refused there."""
    c = hm.client()
    assert c.incr("n") == 1
    moving_redis.fail_over()
    for _ in range(3):
        with pytest.raises(redis.exceptions.ReadOnlyError):
            c.incr("n")
    assert moving_redis.peek("get", "n") == b"1"


@pytest.mark.parametrize("order", ["contrib_first", "ours_first", "ours_only"])
def test_a_write_refused_by_the_demoted_primary_reconnects_and_is_applied_once(
    hm: Harness,
    moving_redis: MovingRedis,  # noqa: F811
    order: str,
) -> None:
    """``READONLY`` proves the command did not run (the client's own ``Retry`` resends
    nothing here), so even ``INCR`` is sent again, on a new connection: it resolves the
    address anew and reaches the new primary."""
    hm.instrument(order)
    c = hm.client()
    assert c.incr("n") == 1 and c.set("k", "v") is True
    assert moving_redis.front is not None
    opened = moving_redis.front.accepted
    moving_redis.fail_over()
    hm.reset_counts()
    assert c.incr("n") == 2
    assert hm.attempts["execute_command"] == 2 and sent_incr(hm) == 2
    span = assert_recovered(hm, incr_name(hm), attempts=2)
    failed = events(span, "otel_recovery.attempt.failed")[0]
    assert failed["error.type"] == "redis.exceptions.ReadOnlyError"
    assert "otel_recovery.retry.disallowed" not in (span.attributes or {})  # it was retried
    assert moving_redis.front.accepted == opened + 1
    hm.reset_counts()
    assert c.set("k", "w") is True and c.get("k") == b"w"  # the new connection stays
    assert hm.attempts["execute_command"] == 2 and hm.sent["SET"] == 1
    assert moving_redis.peek("get", "n") == b"2"  # applied once, on the new primary


def test_a_single_connection_clients_session_is_never_left_for_a_resend(h: Harness) -> None:
    """A client with a connection of its own (``Redis.client()``,
    ``single_connection_client=True``) carries session state set by hand: here a
    ``MULTI``. A ``SET`` queued in it, its reply lost, was resent on a new connection, where
    it ran at once, outside the transaction: the key was written though ``EXEC`` failed."""
    h.instrument()
    session = h.client().client()  # single_connection_client=True, on the same pool
    session.delete("queued-1", "queued-2")
    session.execute_command("MULTI")
    session.set("queued-1", "a")  # queued (redis-py reads its QUEUED as False)
    with stopped(h.server), pytest.raises(redis.exceptions.TimeoutError):
        session.set("queued-2", "b")
    with pytest.raises(redis.exceptions.ResponseError, match="EXEC without MULTI"):
        session.execute_command("EXEC")
    assert h.peek("get", "queued-1") is None and h.peek("get", "queued-2") is None
    said = [
        dict(span.attributes or {}).get("otel_recovery.retry.disallowed")
        for span in h.exporter.get_finished_spans()
    ]
    assert [why for why in said if why is not None] == ["session"]
    session.close()


@pytest.mark.parametrize("code", ["READONLY", "LOADING", "MASTERDOWN"])
def test_a_script_whose_own_error_looks_like_a_refusal_is_sent_once(h: Harness, code: str) -> None:
    """A script (or function, or module command) runs the application's code, which may
    write and then answer with any error, a ``READONLY ...`` included: that proves nothing
    about whether it ran. Taken as the server's refusal, the script ran three times."""
    h.instrument()
    c = h.client()  # redis-py's own Retry resends nothing: refusals would count as proof
    c.delete("script-count")
    h.reset_counts()
    script = "redis.call('INCR', KEYS[1]); return redis.error_reply(ARGV[1] .. ' app says no')"
    with pytest.raises(redis.exceptions.RedisError, match="app says no"):
        c.eval(script, 1, "script-count", code)
    assert h.attempts["execute_command"] == 1
    assert c.get("script-count") == b"1"


@pytest.fixture(scope="module")
def gears_server() -> Iterator[PrivateRedis]:
    """A server where ``TFCALL`` and ``TFCALLASYNC`` run the application's code, as they do
    under RedisGears 2 (which no server here has): ``EVAL`` and ``EVALSHA`` renamed."""
    server = PrivateRedis(
        options=["--rename-command", "EVAL", "TFCALL", "--rename-command", "EVALSHA", "TFCALLASYNC"]
    )
    try:
        yield server
    finally:
        server.close()


@pytest.mark.parametrize("command", ["TFCALL", "TFCALLASYNC"])
@pytest.mark.parametrize("code", ["READONLY", "LOADING"])
def test_a_gears_function_whose_own_error_looks_like_a_refusal_is_sent_once(
    gears_server: PrivateRedis, command: str, code: str
) -> None:
    """A RedisGears 2 function (``r.tfcall("lib", "fn", keys)`` in redis-py 5) runs the
    application's code as a script does: it may write, then answer ``READONLY ...``.
    Taken as the server's refusal, the function ran three times."""
    script = "redis.call('INCR', KEYS[1]); return redis.error_reply(ARGV[1] .. ' app says no')"
    admin = gears_server.admin()
    function = script if command == "TFCALL" else admin.script_load(script)  # by its SHA
    admin.close()
    h = Harness(gears_server)
    try:
        h.instrument()
        c = h.client()  # redis-py's own Retry resends nothing: refusals would count as proof
        with pytest.raises(redis.exceptions.RedisError, match="app says no"):
            c.execute_command(command, function, 1, "gears-count", code)
        assert h.attempts["execute_command"] == 1 and h.sent[command] == 1
        assert c.get("gears-count") == b"1"
    finally:
        h.close()
        gears_server.heal()


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        *[(name, True) for name in ("EVAL", "EVALSHA_RO", "FCALL", "TFCALL", "TFCALLASYNC")],
        ("JSON.SET", True),  # a module's own code answers it
        # loading and deleting the code are an administrator's writes: refused before they
        # run, like any write
        *[(name, False) for name in ("FUNCTION LOAD", "TFUNCTION LOAD", "TFUNCTION DELETE")],
        ("SET", False),
    ],
)
def test_commands_that_run_the_applications_code(name: str, expected: bool) -> None:
    assert runs_code(name) is expected


@pytest.mark.parametrize(
    "args",
    [
        ("TFCALL", "lib.fn", 1, "k"),
        (b"tfcallasync", b"lib.fn", 0),
        ("TFUNCTION LOAD", "#!js api_version=1.0 name=lib"),  # as redis-py 5 sends it
        ("TFUNCTION", "LOAD", "REPLACE", "#!js api_version=1.0 name=lib"),
        ("TFUNCTION DELETE", "lib"),
        ("TFUNCTION", "DELETE", "lib"),
    ],
    ids=["call", "call_async", "load", "load_split", "delete", "delete_split"],
)
def test_gears_commands_are_never_taken_for_reads(args: tuple[Any, ...]) -> None:
    rules = CommandRules(load_settings(environ={}))
    name = rules.name(args)
    assert name in {"TFCALL", "TFCALLASYNC", "TFUNCTION LOAD", "TFUNCTION DELETE"}
    assert not rules.allows(name, args) and name not in READS


@pytest.mark.parametrize(
    "why", ["redis_py_may_have_resent_it", "named_never_to_repeat", "switched_off"]
)
def test_a_refused_incr_is_not_sent_again_where_the_refusal_proves_nothing_or_is_excluded(
    hm: Harness,
    moving_redis: MovingRedis,  # noqa: F811
    why: str,
) -> None:
    """redis-py's own ``Retry`` resends any command on a new connection after a dropped
    one: a ``READONLY`` may answer that resend after the first send ran, so it proves
    nothing there. A command the settings name never to repeat is not repeated either, nor
    any command with ``redis_retry_refused`` off.
    Either way the refused call fails as without us, but its pool is closed, and the next
    call reaches the new primary."""
    if why == "named_never_to_repeat":
        hm.instrument("ours_only", redis_no_retry_commands="INCRBY, INCR")
        c = hm.client()
    elif why == "switched_off":
        hm.instrument("ours_only", redis_retry_refused=False)
        c = hm.client()
    else:
        hm.instrument("ours_only")
        # before redis-py 6 a Retry repeats only what retry_on_error lists
        retry_on_error = [redis.exceptions.ConnectionError]
        c = hm.client(redis_py_retry=Retry(NoBackoff(), 3), retry_on_error=retry_on_error)
    assert c.incr("n") == 1
    moving_redis.fail_over()
    hm.reset_counts()
    with pytest.raises(redis.exceptions.ReadOnlyError):
        c.incr("n")
    assert hm.attempts["execute_command"] == 1 and sent_incr(hm) == 1
    assert c.incr("n") == 2
    assert moving_redis.peek("get", "n") == b"2"


def test_a_single_connection_client_keeps_its_connection(
    hm: Harness,
    moving_redis: MovingRedis,  # noqa: F811
) -> None:
    """Its one connection may carry session state the application set (a ``MULTI`` sent by
    hand, ``CLIENT TRACKING``): it is not closed behind the application's back."""
    hm.instrument("ours_only")
    c = redis.Redis(connection_pool=hm.client().connection_pool, single_connection_client=True)
    assert c.incr("n") == 1
    assert moving_redis.front is not None
    opened = moving_redis.front.accepted
    moving_redis.fail_over()
    with pytest.raises(redis.exceptions.ReadOnlyError):
        c.incr("n")
    assert moving_redis.front.accepted == opened
    c.close()


def test_a_retry_changed_in_place_to_resend_stops_our_resends_of_refused_incrs(
    hm: Harness,
    moving_redis: MovingRedis,  # noqa: F811
) -> None:
    """The target's facts are kept while its ``Retry`` is the same object; one changed in
    place (``update_retries``) may now resend a dropped INCR, so a refusal proves nothing
    any more: checked again on every failure."""
    hm.instrument("ours_only")
    retry = Retry(NoBackoff(), 0)
    c = hm.client(redis_py_retry=retry, retry_on_error=[redis.exceptions.ConnectionError])
    assert c.incr("n") == 1  # the target is made: redis-py resends nothing
    if hasattr(retry, "update_retries"):
        retry.update_retries(3)
    else:  # redis-py before 6
        retry._retries = 3
    moving_redis.fail_over()
    hm.reset_counts()
    with pytest.raises(redis.exceptions.ReadOnlyError):
        c.incr("n")
    assert hm.attempts["execute_command"] == 1 and sent_incr(hm) == 1


def test_a_blocking_pool_keeps_its_connections_and_a_refused_incr_is_not_resent(
    hm: Harness,
    moving_redis: MovingRedis,  # noqa: F811
) -> None:
    """A ``BlockingConnectionPool`` hands connections out under another lock than the one
    it closes idle ones under: nothing of it is closed, and a resend would meet the same
    replica on the same connection."""
    hm.instrument("ours_only")
    c = hm.client(pool_class=redis.BlockingConnectionPool)
    assert c.incr("n") == 1
    assert moving_redis.front is not None
    opened = moving_redis.front.accepted
    moving_redis.fail_over()
    hm.reset_counts()
    with pytest.raises(redis.exceptions.ReadOnlyError):
        c.incr("n")
    assert hm.attempts["execute_command"] == 1 and moving_redis.front.accepted == opened


def test_while_the_address_lags_reads_go_on_and_refused_writes_never_open_the_circuit(
    hm: Harness,
    moving_redis: MovingRedis,  # noqa: F811
) -> None:
    """Until the name moves, every connection reaches the old primary: writes are refused
    there (each after its attempts), reads are answered. A refusal is an answer from a
    healthy server: counting it would open the circuit and refuse the reads too. The pool
    is closed at most once a second of the (fake) clock, not once per refused write."""
    clock = FakeClock()
    ours = hm.instrument("ours_only", clock=clock, breaker_window=4, breaker_minimum_calls=4).ours
    c = hm.client()
    c.set("k", "v")
    moving_redis.fail_over(move_address=False)
    assert moving_redis.front is not None
    opened, started = moving_redis.front.accepted, clock.now()
    hm.reset_counts()
    for _ in range(12):
        with pytest.raises(redis.exceptions.ReadOnlyError):
            c.incr("n")
        assert c.get("k") == b"v"
    # each write sent up to three times (fewer once the retry budget is spent), never once
    # only: the refusal proved it had not run
    assert 12 < sent_incr(hm) <= 12 * 3 and hm.sent["GET"] == 12
    assert ours.targets is not None
    (breaker,) = ours.targets.breakers()
    assert breaker.snapshot().state == "closed"
    seconds = clock.now() - started
    assert 1 <= moving_redis.front.accepted - opened <= int(seconds) + 1
    moving_redis.move_address()
    clock.advance(10.0)  # the retry budget the refused writes spent comes back too
    assert c.incr("n") == 1  # the next refusal closes the pool again, and the name has moved
    assert breaker.snapshot().state == "closed"


# -- asyncio ------------------------------------------------------------------------------


@pytest.mark.parametrize("order", ["contrib_first", "ours_first", "ours_only"])
async def test_async_client_kill_mid_set_is_retried(h: Harness, order: str) -> None:
    h.instrument(order)
    c = h.aclient()
    client_id = await c.client_id()
    h.reset_counts()
    killer = kill_mid_write(h.server, client_id)
    assert await c.set("k", "v") is True
    await asyncio.to_thread(killer.join)
    assert h.attempts["execute_command"] == 2 and h.sent["SET"] == 2
    assert_recovered(h, "SET", attempts=2)
    await aclose(c)


@pytest.mark.parametrize("order", ["contrib_first", "ours_only"])
async def test_async_a_write_refused_by_the_demoted_primary_reconnects_and_is_applied_once(
    hm: Harness,
    moving_redis: MovingRedis,  # noqa: F811
    order: str,
) -> None:
    hm.instrument(order)
    c = hm.aclient()
    assert await c.incr("n") == 1
    moving_redis.fail_over()
    hm.reset_counts()
    assert await c.incr("n") == 2
    assert hm.attempts["execute_command"] == 2 and sent_incr(hm) == 2
    assert_recovered(hm, incr_name(hm), attempts=2)
    assert moving_redis.peek("get", "n") == b"2"
    await aclose(c)


async def test_async_a_retry_set_on_the_pool_stops_our_resends_of_refused_incrs(
    hm: Harness,
    moving_redis: MovingRedis,  # noqa: F811
) -> None:
    """redis.asyncio's ``set_retry`` hands the pool's connections a new ``Retry`` but not the
    ``connection_kwargs``: the connections themselves are asked whether they resend."""
    hm.instrument("ours_only")
    c = hm.aclient()
    assert await c.incr("n") == 1
    for connection in c.connection_pool._available_connections:
        # before redis-py 6 a Retry repeats only what retry_on_error lists
        connection.retry_on_error = [redis.exceptions.ConnectionError]
    c.connection_pool.set_retry(redis.asyncio.retry.Retry(NoBackoff(), 3))
    moving_redis.fail_over()
    hm.reset_counts()
    with pytest.raises(redis.exceptions.ReadOnlyError):
        await c.incr("n")
    assert hm.attempts["execute_command"] == 1 and sent_incr(hm) == 1
    await aclose(c)


async def test_async_a_connection_in_use_is_not_closed_under_its_command(
    hm: Harness,
    moving_redis: MovingRedis,  # noqa: F811
) -> None:
    """While one task waits on a blocking read (allowed on the demoted primary), another's
    refused write closes the idle connections only: the read ends as it would have."""
    hm.instrument("ours_only")
    c = hm.aclient()
    assert await c.incr("n") == 1
    await c.xadd("s", {"f": "v"})
    moving_redis.fail_over()
    reader = asyncio.create_task(c.xread({"s": "$"}, block=300))
    await asyncio.sleep(0.05)  # the read is on the wire, its connection in use
    assert await c.incr("n") == 2  # refused, idle connections closed, resent
    assert await reader in ([], None)  # no new entry within the block: no error
    await aclose(c)


async def test_async_suppressed_instrumentation_is_not_retried(h: Harness) -> None:
    h.instrument()
    c = h.aclient()
    await c.get("warm")  # the command's plan is remembered: the check comes before it
    client_id = await c.client_id()
    h.reset_counts()
    killer = kill_mid_write(h.server, client_id)
    with suppress_instrumentation(), pytest.raises(redis.exceptions.ConnectionError):
        await c.set("k", "v")
    await asyncio.to_thread(killer.join)
    assert h.attempts["execute_command"] == 1 and not marked_by_us(h.exporter.get_finished_spans())
    await aclose(c)


async def test_async_suppress_recovery_steps_aside_while_contrib_still_traces(
    h: Harness,
) -> None:
    h.instrument()
    c = h.aclient()
    assert await c.get("k") is None  # its plan remembered: the compiled path
    h.reset_counts()
    h.exporter.clear()
    with suppress_recovery(), stopped(h.server), pytest.raises(redis.exceptions.TimeoutError):
        await c.get("k")
    assert h.attempts["execute_command"] == 1
    spans = h.exporter.get_finished_spans()
    assert [s.name for s in spans] == ["GET"] and marked_by_us(spans) == []
    breaker = h.ours.targets.known_breaker("127.0.0.1", h.server.port)
    assert breaker is not None
    breaker.force_open()
    before = breaker.snapshot()
    with suppress_recovery():
        assert await c.set("k", "v") is True  # not refused
    assert breaker.snapshot() == before
    with pytest.raises(RedisCircuitOpenError):
        await c.get("k")
    await aclose(c)


async def test_suppress_recovery_as_a_decorator_covers_the_whole_call(h: Harness) -> None:
    """As a decorator it holds for each call's whole run, a coroutine function's too (where
    ``contextlib``'s decorator form would end before the coroutine ran)."""
    h.instrument()
    c, ac = h.client(), h.aclient()
    assert c.get("k") is None and await ac.get("k") is None
    breaker = h.ours.targets.known_breaker("127.0.0.1", h.server.port)
    assert breaker is not None
    breaker.force_open()

    @suppress_recovery()
    def probe() -> Any:
        return c.get("k")

    @suppress_recovery()
    async def aprobe() -> Any:
        await asyncio.sleep(0)
        return await ac.get("k")

    assert probe() is None and await aprobe() is None  # not refused
    assert probe.__name__ == "probe" and inspect.iscoroutinefunction(aprobe)
    with pytest.raises(RedisCircuitOpenError):
        await ac.get("k")
    await aclose(ac)


async def test_async_a_wrapper_bug_does_not_break_the_call(
    h: Harness, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    h.instrument()
    c = h.aclient()
    _break_the_planner(monkeypatch)
    with caplog.at_level(logging.ERROR, logger="otel_recovery.instrumentors"):
        assert await c.set("k", "v") is True and await c.get("k") == b"v"
        with pytest.raises(redis.exceptions.ResponseError) as refused:
            await c.execute_command("NOSUCHCOMMAND")
    assert _reports(caplog, "redis.asyncio Redis.execute_command") == 1
    assert refused.value.__context__ is None  # see test_a_wrapper_bug_does_not_break_the_call
    await aclose(c)


async def test_async_client_pause_and_stopped_server_recover(h: Harness) -> None:
    h.instrument()
    c = h.aclient()
    await c.set("k", "v")
    h.reset_counts()
    with paused_from_the_next_attempt(h):
        assert await c.get("k") == b"v"
    assert h.attempts["execute_command"] == 2
    assert_recovered(h, "GET", attempts=2)
    h.reset_counts()
    stop_until_the_retry(h)
    assert await c.get("k") == b"v"
    assert h.attempts["execute_command"] == 2
    assert_recovered(h, "GET", attempts=2)
    await aclose(c)


async def test_async_incr_and_transactions_are_never_retried(h: Harness) -> None:
    h.instrument()
    c = h.aclient()
    client_id = await c.client_id()
    h.reset_counts()
    with stopped(h.server), pytest.raises(redis.exceptions.TimeoutError):
        await c.incr("counter")
    assert h.attempts["execute_command"] == 1
    client_id = await c.client_id()
    h.reset_counts()
    killer = kill_mid_write(h.server, client_id)
    pipe = c.pipeline()
    pipe.incr("counter")
    with pytest.raises(redis.exceptions.ConnectionError):
        await pipe.execute()
    await asyncio.to_thread(killer.join)
    assert h.attempts["execute"] == 1
    assert int(h.peek("get", "counter") or 0) <= 1
    await aclose(c)


async def test_async_idempotent_pipeline_is_refilled_and_retried(h: Harness) -> None:
    h.instrument()
    c = h.aclient()
    client_id = await c.client_id()
    h.reset_counts()
    killer = kill_mid_write(h.server, client_id)
    pipe = c.pipeline(transaction=False)
    pipe.set("a", "1").get("a")
    assert await pipe.execute() == [True, b"1"]
    await asyncio.to_thread(killer.join)
    assert h.attempts["execute"] == 2
    assert_recovered(h, "SET GET", attempts=2)
    await aclose(c)


# -- cluster clients (a private one-node cluster) ------------------------------------------


@pytest.fixture
def hc(private_redis_cluster: PrivateRedis) -> Iterator[Harness]:  # noqa: F811
    harness = Harness(private_redis_cluster)
    try:
        yield harness
    finally:
        harness.close()
        private_redis_cluster.heal()


# redis-py's cluster clients drop a node whose connection failed from their startup nodes
# and rebuild the slot table from those left. Our test cluster has one node, so that left
# none, and nothing could ever reach it again: redis-py fixed it in 7.2 (sync) and 8.0
# (asyncio). A real cluster keeps its other nodes.


@pytest.mark.skipif(REDIS_PY < (7, 2), reason="redis-py < 7.2 forgets a one-node cluster")
def test_cluster_command_and_pipeline_recover_from_a_kill(hc: Harness) -> None:
    hc.instrument()
    c = hc.cluster_client()
    client_id = c.execute_command("CLIENT", "ID")
    hc.reset_counts()
    killer = kill_mid_write(hc.server, client_id)
    assert c.set("k", "v") is True
    killer.join()
    assert hc.attempts["execute_command"] == 2
    assert_recovered(hc, "SET", attempts=2)
    # A cluster pipeline re-sends failed commands one by one through
    # RedisCluster.execute_command: there our per-command rules decide.
    client_id = c.execute_command("CLIENT", "ID")
    hc.reset_counts()
    killer = kill_mid_write(hc.server, client_id)
    pipe = c.pipeline()
    pipe.set("a", "1").incr("n")
    assert pipe.execute() == [True, 1]
    killer.join()
    assert hc.attempts["execute"] == 1 and hc.attempts["execute_command"] == 2
    assert hc.peek("get", "n") == b"1"
    c.close()


@pytest.fixture
def unanswered() -> Iterator[int]:
    """A port whose connects time out: its listen backlog (0) is taken by one connection
    nobody accepts, so the kernel drops every later handshake."""
    with socket.socket() as listener, socket.socket() as filler:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        filler.connect(listener.getsockname())
        yield int(listener.getsockname()[1])


@pytest.mark.parametrize(("dead", "retries"), [("refused", 0), ("refused", 3), ("silent", 3)])
def test_a_read_to_a_node_named_by_object_is_repeated_by_one_layer_only(
    hc: Harness, monkeypatch: pytest.MonkeyPatch, unanswered: int, dead: str, retries: int
) -> None:
    """A call to a node named by object (``target_nodes=node``) is never repeated by redis-py's
    cluster retry; before redis-py 6, though, the cluster's ``retry=`` went to every node's
    connections, which repeat a connect that timed out with it (not a refused one). Whichever
    layer repeats, only one does: we add attempts where redis-py made one (3 connects to a
    dead node), never on top of its own (a review counted 12 connects to a silent node on
    redis-py 4.5, for its 4)."""
    port = unanswered if dead == "silent" else free_port()
    connects: list[int] = []
    connect = redis.connection.Connection._connect

    def counted(conn: Any) -> Any:
        if conn.port == port:
            connects.append(port)
        return connect(conn)

    monkeypatch.setattr(redis.connection.Connection, "_connect", counted)
    seen = []
    for instrumented in (False, True):
        if instrumented:
            hc.instrument()
        # Not TIMEOUT: each connect to the silent node waits this out, and the live node's
        # connects complete in the kernel (loopback), however loaded the machine
        c = hc.cluster_client(retries=retries, socket_connect_timeout=0.4)
        try:
            c.ping()
            connects.clear()
            with pytest.raises((redis.exceptions.ConnectionError, redis.exceptions.TimeoutError)):
                c.dbsize(target_nodes=redis.cluster.ClusterNode("127.0.0.1", port))
            seen.append(len(connects))
        finally:
            c.close()
    alone, with_us = seen
    assert with_us == max(alone, 3), seen  # 3: our max_attempts


@pytest.mark.skipif(REDIS_PY < (8, 2), reason="RedisClusterUnreachableError came in 8.2")
def test_a_cluster_no_node_answers_is_repeated_by_redis_pys_retry_alone() -> None:
    """Once a slot-map refresh reached no node, redis-py 8.2 gives up with
    ``RedisClusterUnreachableError`` in place of the connection error its own retry was
    repeating: a failure it already retried, so we add no attempt (a review counted 12 of
    redis-py's attempts per call, its 4 times our 3). A one-node cluster of its own: the
    node is killed for good."""
    server = PrivateRedis(cluster=True)
    hc = Harness(server)
    seen = []
    try:
        hc.instrument()
        c = hc.cluster_client(retries=3, topology_refresh_min_interval=0)
        assert c.set("k", "v") is True
        server.crash()
        for _ in range(3):
            hc.reset_counts()
            with pytest.raises(
                (redis.exceptions.ConnectionError, redis.exceptions.RedisClusterUnreachableError)
            ) as raised:
                c.get("k")
            seen.append((type(raised.value).__name__, hc.attempts["execute_command"]))
        c.close()
    finally:
        hc.close()
        server.close()
    assert ("RedisClusterUnreachableError", 1) in seen, seen
    assert all(attempts == 1 for _, attempts in seen), seen


@pytest.mark.parametrize("attempts", [None, 5])
def test_a_routed_cluster_call_counts_what_redis_py_repeats_on_its_line(
    hc: Harness, attempts: int | None
) -> None:
    """What redis-py's cluster client repeats by itself, read as it reads it: from redis-py
    6 its ``retry``; before, ``cluster_error_retry_attempts`` (3 by default), where we read
    the ``retry`` it did not use and so added our attempts on top of its own (review)."""
    options = {} if attempts is None else {"cluster_error_retry_attempts": attempts}
    with warnings.catch_warnings():  # redis-py 6+ deprecates the setting in favour of retry
        warnings.simplefilter("ignore", DeprecationWarning)
        c = redis.cluster.RedisCluster(host="127.0.0.1", port=hc.server.port, **options)
    try:
        expected = c.retry.get_retries() if REDIS_PY >= (6,) else (attempts or 3)
        target = _redis_targets.cluster_target(c, ("GET", "k"))
        assert target.retries == expected
        assert redis.exceptions.ConnectionError in target.retried
    finally:
        c.close()


@pytest.mark.skipif(REDIS_PY < (8, 0), reason="redis-py < 8.0 forgets a one-node cluster")
async def test_async_cluster_command_recovers_and_incr_is_not_retried(hc: Harness) -> None:
    hc.instrument()
    c = hc.acluster_client()
    await c.initialize()
    node = c.get_default_node()
    client_id = await c.execute_command("CLIENT", "ID", target_nodes=node)
    hc.reset_counts()
    killer = kill_mid_write(hc.server, client_id)
    assert await c.set("k", "v") is True
    await asyncio.to_thread(killer.join)
    assert hc.attempts["execute_command"] == 2
    assert_recovered(hc, "SET", attempts=2)
    client_id = await c.execute_command("CLIENT", "ID", target_nodes=node)
    hc.reset_counts()
    killer = kill_mid_write(hc.server, client_id)
    with pytest.raises(redis.exceptions.ConnectionError):
        await c.incr("counter")
    await asyncio.to_thread(killer.join)
    assert hc.attempts["execute_command"] == 1
    assert hc.peek("get", "counter") is None
    await aclose(c)


# -- fallbacks ----------------------------------------------------------------------------


def test_a_per_operation_fallback_answers_only_dependency_failures(
    h: Harness, tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    policy = tmp_path / "policy.toml"
    # the section in lower case: calls name the command GET, and the section still applies
    policy.write_text(
        f'[targets."127.0.0.1:{h.server.port}"]\nmax_attempts = 1\n'
        f'[targets."127.0.0.1:{h.server.port}".operations."get"]\nfallback_value = "stale"\n'
    )
    monkeypatch.setenv("OTEL_RECOVERY_CONFIG", str(policy))
    h.instrument()
    c = h.client()
    c.lpush("list", "x")
    with pytest.raises(redis.exceptions.ResponseError, match="WRONGTYPE"):
        c.get("list")  # a command error is the caller's, never papered over
    h.reset_counts()
    stop_for(h.server)
    assert c.get("k") == "stale"
    with pytest.raises(redis.exceptions.TimeoutError):
        c.ttl("k")  # no fallback configured for TTL
    attrs = dict(h.spans_named("GET")[-1].attributes or {})
    assert attrs["otel_recovery.outcome"] == "fallback"


def test_the_services_fallback_answers_reads_but_not_writes(
    h: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A write that failed may have been applied (its reply lost), or not at all: a
    fallback set for the service must not make it look done, even for a ``SET`` that may
    be repeated. Only one named for the command would."""
    monkeypatch.setenv("OTEL_RECOVERY_FALLBACK_VALUE", "null")
    h.instrument(max_attempts=1)
    c = h.client(timeout=0.4)  # every command of it meets the stop: none has to beat this
    stop_for(h.server)
    assert c.get("k") is None
    assert dict(h.spans_named("GET")[-1].attributes or {})["otel_recovery.outcome"] == "fallback"
    for write in (lambda: c.incr("n"), lambda: c.set("k", "v", nx=True), lambda: c.set("k", "v")):
        with pytest.raises(redis.exceptions.TimeoutError):
            write()
    with pytest.raises(redis.exceptions.TimeoutError):
        c.pipeline(transaction=True).incr("n").incr("m").execute()


# -- a command whose connection could not be made ------------------------------------------


def _port_socket(port: int = 0) -> socket.socket:
    """A socket bound to ``port`` (0: any free one) that others with ``SO_REUSEPORT`` may
    share: the front keeps one for its whole life and listens on another, so the port is
    never free for anyone else to take, listening or not."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind(("127.0.0.1", port))
    return sock


class LateFront:
    """A TCP front for a real Redis, on a port it holds from the start (no race for it).

    Until :meth:`open`, connects to it are refused: nothing listens on the port, so the
    kernel answers a handshake with a reset. After :meth:`go_silent` they time out instead:
    a listener's one place in its backlog (``listen(0)``) is taken by a connection nobody
    accepts, so the kernel drops every later handshake. :meth:`open` accepts from then on
    and forwards each connection to ``target``; :meth:`refuse` stops listening again.
    :meth:`cut_at` cuts the next connection whose client sends a given command once the
    server has answered it (the command ran, its reply is lost), and refuses connects from
    then on. ``accepted`` counts the connections it forwarded.
    """

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.accepted = 0
        self._holder = _port_socket()
        self.port = int(self._holder.getsockname()[1])
        self._lock = threading.Lock()
        self._listener: socket.socket | None = None
        self._filler: socket.socket | None = None
        self._serving = False
        self._cut: bytes | None = None
        self._sockets: list[socket.socket] = []

    def go_silent(self) -> None:
        with self._lock:
            assert self._listener is None, "already listening"
            self._listener = _port_socket(self.port)
            self._listener.listen(0)
            self._filler = socket.create_connection(("127.0.0.1", self.port), timeout=5)

    def open(self) -> None:
        """Accept and forward from now on (again); nothing if it does already."""
        with self._lock:
            if self._serving:
                return
            listener = self._listener or _port_socket(self.port)
            if self._filler is not None:  # free the backlog: the next handshake completes
                listener.accept()[0].close()
                self._filler.close()
                self._filler = None
            listener.listen(16)
            self._listener, self._serving = listener, True
        threading.Thread(target=self._serve, args=(listener,), daemon=True).start()

    def refuse(self) -> None:
        """Stop listening: connects are refused; connections already made stay."""
        with self._lock:
            listener, self._listener, self._serving = self._listener, None, False
        if listener is not None:
            with contextlib.suppress(OSError):
                listener.shutdown(socket.SHUT_RDWR)  # wakes the accept
            listener.close()

    def cut_at(self, command: bytes) -> None:
        self._cut = command

    def _serve(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            self.accepted += 1
            self._sockets.append(client)
            threading.Thread(target=self._forward, args=(client,), daemon=True).start()

    def _forward(self, client: socket.socket) -> None:
        try:
            upstream = socket.create_connection(self.target, timeout=5)
        except OSError:
            client.close()
            return
        upstream.settimeout(None)
        self._sockets.append(upstream)
        cutting = threading.Event()

        def close_both() -> None:
            for sock in (upstream, client):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)

        def answers() -> None:
            with contextlib.suppress(OSError):
                while chunk := upstream.recv(65536):
                    if cutting.is_set():  # the server ran the command: lose its reply
                        self.refuse()  # before the client sees the close and reconnects
                        break
                    client.sendall(chunk)
            close_both()

        threading.Thread(target=answers, daemon=True).start()
        with contextlib.suppress(OSError):
            while chunk := client.recv(65536):
                cut = self._cut
                if cut is not None and cut in chunk:
                    self._cut = None
                    cutting.set()
                upstream.sendall(chunk)
        close_both()

    def close(self) -> None:
        self.refuse()
        for sock in [self._holder, self._filler, *self._sockets]:
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)  # wakes the forwarding threads
                sock.close()


class FrontedRedis:
    """What a :class:`Harness` needs of its server, for the private Redis behind a
    :class:`LateFront`: the address clients use (the front's), an admin client of the
    server itself."""

    def __init__(self, server: PrivateRedis, front: LateFront) -> None:
        self.port = front.port
        self.admin = server.admin


class OpeningClock(FakeClock):
    """A fake clock whose sleeps open the front: the server becomes reachable during our
    backoff before the second attempt (``asleep`` sleeps through ``sleep``)."""

    def __init__(self, front: LateFront) -> None:
        super().__init__()
        self.front = front

    def sleep(self, seconds: float) -> None:
        self.front.open()
        super().sleep(seconds)


@pytest.fixture
def front(server: PrivateRedis) -> Iterator[LateFront]:
    made = LateFront(("127.0.0.1", server.port))
    try:
        yield made
    finally:
        made.close()


@pytest.fixture
def hf(server: PrivateRedis, front: LateFront) -> Iterator[Harness]:
    """A harness whose clients talk to the private Redis through ``front``."""
    harness = Harness(FrontedRedis(server, front))  # type: ignore[arg-type]
    try:
        yield harness
    finally:
        harness.close()


def front_client(
    h: Harness,
    kind: str,
    retries: int = 0,
    retry_on_error: list[Any] | None = None,
    **options: Any,
) -> Any:
    """A counted client (``sync`` or ``async``) of the harness's address, whose own
    ``Retry`` repeats ``retries`` times what it repeats (redis-py's default errors from
    redis-py 6, before only those in ``retry_on_error``)."""
    sync = kind == "sync"
    module: Any = redis if sync else redis.asyncio
    retry_class: Any = Retry if sync else redis.asyncio.retry.Retry
    if retry_on_error is not None:
        options["retry_on_error"] = retry_on_error
    pool = module.ConnectionPool(
        host="127.0.0.1",
        port=h.server.port,
        socket_timeout=TIMEOUT,
        retry=retry_class(NoBackoff(), retries),
        connection_class=h._connection_class(module.Connection),
        **options,
    )
    h._owners.add(id(pool))
    return owning(module.Redis(connection_pool=pool))


def plain_client(kind: str, port: int, **options: Any) -> Any:
    """An uninstrumented client of ``port`` whose own ``Retry`` repeats nothing."""
    sync = kind == "sync"
    module: Any = redis if sync else redis.asyncio
    retry_class: Any = Retry if sync else redis.asyncio.retry.Retry
    options.setdefault("socket_timeout", TIMEOUT)
    return module.Redis(host="127.0.0.1", port=port, retry=retry_class(NoBackoff(), 0), **options)


async def close_client(client: Any) -> None:
    if isinstance(client, redis.asyncio.Redis):
        await aclose(client)
    else:
        client.close()


async def raised(call: Any) -> BaseException:
    """The error ``call()`` (sync, or returning an awaitable) ends in."""
    try:
        await maybe_await(call())
    except Exception as error:
        return error
    raise AssertionError("the call succeeded")


def unsent_incr_span(h: Harness) -> ReadableSpan:
    """The logical span of an INCR that was never written (whose spelling ``incr_name``
    cannot tell)."""
    names = {s.name for s in h.exporter.get_finished_spans()}
    return h.logical_span("INCRBY" if "INCRBY" in names else "INCR")


def pipeline_span(h: Harness) -> ReadableSpan:
    """contrib's span of the INCR-then-SET pipeline (named after what redis-py queued)."""
    names = {"INCRBY SET", "INCR SET"}
    (span,) = [s for s in h.exporter.get_finished_spans() if s.name in names]
    return span


@pytest.mark.parametrize("order", ["contrib_first", "ours_first", "ours_only"])
@pytest.mark.parametrize("kind", ["sync", "async"])
async def test_an_incr_whose_connect_was_refused_is_sent_again_and_applied_once(
    hf: Harness, front: LateFront, kind: str, order: str
) -> None:
    """The pool could not connect, so the INCR was never written: it is sent again (its
    client's own ``Retry`` resends nothing), once the front listens (during our backoff)."""
    clock = OpeningClock(front)
    hf.instrument(order, clock=clock)
    c = front_client(hf, kind)
    try:
        assert await maybe_await(c.incr("n")) == 1
        assert hf.attempts["execute_command"] == 2 and sent_incr(hf) == 1
        assert len(clock.sleeps) == 1 and front.accepted == 1
        span = assert_recovered(hf, incr_name(hf), attempts=2)
        failed = events(span, "otel_recovery.attempt.failed")[0]
        assert failed["error.type"] == "redis.exceptions.ConnectionError"
        assert "otel_recovery.retry.disallowed" not in (span.attributes or {})
        assert hf.peek("get", "n") == b"1"  # applied once
    finally:
        await close_client(c)


@pytest.mark.parametrize("kind", ["sync", "async"])
async def test_an_incr_whose_connect_timed_out_is_sent_again_and_applied_once(
    hf: Harness, front: LateFront, kind: str
) -> None:
    """``Timeout connecting to server``: the handshake never completed, nothing was
    written. (Loopback drops handshakes to a full backlog, so the connect times out every
    time, after the client's 0.2 s.)"""
    front.go_silent()
    clock = OpeningClock(front)
    hf.instrument("contrib_first", clock=clock)
    c = front_client(hf, kind, socket_connect_timeout=0.2)
    try:
        assert await maybe_await(c.incr("n")) == 1
        assert hf.attempts["execute_command"] == 2 and sent_incr(hf) == 1
        assert front.accepted == 1
        span = assert_recovered(hf, incr_name(hf), attempts=2)
        failed = events(span, "otel_recovery.attempt.failed")[0]
        assert failed["error.type"] == "redis.exceptions.TimeoutError"
        assert hf.peek("get", "n") == b"1"
    finally:
        await close_client(c)


@pytest.mark.parametrize("kind", ["sync", "async"])
@pytest.mark.parametrize("where", ["first_connect", "reconnect_after_it_ran"])
async def test_an_incr_is_not_sent_again_where_the_clients_own_retry_repeats_connections(
    hf: Harness, front: LateFront, kind: str, where: str
) -> None:
    """A client whose own ``Retry`` repeats connection errors resends a command after a
    dropped connection: a failed connect may end that resend, after the first send ran
    (``reconnect_after_it_ran``: the front loses the INCR's reply, then refuses the
    reconnects). So no failed connect proves anything on such a client, not even its
    first (``first_connect``): we never send it again on top. Were we to, our backoff
    would open the front and the INCR would be applied (once more)."""
    clock = OpeningClock(front)
    hf.instrument("ours_only", clock=clock)
    # before redis-py 6 a Retry repeats only what retry_on_error lists
    c = front_client(hf, kind, retries=2, retry_on_error=[redis.exceptions.ConnectionError])
    try:
        if where == "reconnect_after_it_ran":
            front.open()
            assert await maybe_await(c.ping()) is True  # a pooled connection, through the front
            front.cut_at(b"INCR")
        hf.reset_counts()
        with pytest.raises(redis.exceptions.ConnectionError, match=" connecting to "):
            await maybe_await(c.incr("n"))
        assert hf.attempts["execute_command"] == 1 and clock.sleeps == []
        assert hf.peek("get", "n") == (None if where == "first_connect" else b"1")
        attrs = dict(unsent_incr_span(hf).attributes or {})
        assert attrs["otel_recovery.retry.disallowed"] == "non_idempotent_command"
    finally:
        await close_client(c)


def test_a_retry_changed_in_place_to_resend_stops_our_resends_after_a_failed_reconnect(
    hf: Harness, front: LateFront
) -> None:
    """The target's facts are kept while its ``Retry`` is the same object: one changed in
    place (``update_retries``; redis-py 8 copies it into the connections made after) may
    have resent the INCR before its reconnect failed, so the failure is checked again."""
    clock = OpeningClock(front)
    hf.instrument("ours_only", clock=clock)
    retry = Retry(NoBackoff(), 0)
    c = hf.client(redis_py_retry=retry, retry_on_error=[redis.exceptions.ConnectionError])
    front.open()
    assert c.incr("n") == 1  # the target is made: redis-py resends nothing
    if hasattr(retry, "update_retries"):
        retry.update_retries(2)
    else:  # redis-py before 6
        retry._retries = 2
    c.connection_pool.reset()  # new connections, with the changed Retry
    assert c.ping() is True
    front.cut_at(b"INCR")
    hf.reset_counts()
    with pytest.raises(redis.exceptions.ConnectionError, match=" connecting to "):
        c.incr("n")
    assert hf.attempts["execute_command"] == 1 and clock.sleeps == []
    assert hf.peek("get", "n") == b"2"  # redis-py's send ran; ours would have run again
    c.close()


@pytest.mark.parametrize("kind", ["sync", "async"])
async def test_a_retry_without_retry_on_error_repeats_connections_from_redis_py_6(
    hf: Harness, front: LateFront, kind: str
) -> None:
    """A ``Retry`` alone: from redis-py 6 it repeats connection errors itself (so a failed
    connect proves nothing: we leave the INCR alone); before, only what ``retry_on_error``
    lists, nothing here: the refused connect is ours to repeat, and we do."""
    redis_py_repeats = not hasattr(redis.Redis, "_disconnect_raise")  # redis-py >= 6
    clock = OpeningClock(front)
    hf.instrument("ours_only", clock=clock)
    c = front_client(hf, kind, retries=2)
    try:
        if redis_py_repeats:
            with pytest.raises(redis.exceptions.ConnectionError, match=" connecting to "):
                await maybe_await(c.incr("n"))
            assert hf.attempts["execute_command"] == 1 and clock.sleeps == []
            assert hf.peek("get", "n") is None
        else:
            assert await maybe_await(c.incr("n")) == 1
            assert hf.attempts["execute_command"] == 2 and hf.peek("get", "n") == b"1"
    finally:
        await close_client(c)


@pytest.mark.parametrize("kind", ["sync", "async"])
@pytest.mark.parametrize("why", ["switched_off", "switched_off_by_env", "named_never_to_repeat"])
async def test_a_refused_connect_does_not_resend_an_incr_switched_off_or_named_never_to_repeat(
    hf: Harness, front: LateFront, monkeypatch: pytest.MonkeyPatch, kind: str, why: str
) -> None:
    """With ``redis_retry_refused`` off (or its variable), or the command named never to
    repeat, a refused connect ends the INCR as without us; a read is still retried."""
    clock = OpeningClock(front)
    settings: dict[str, Any] = {}
    if why == "switched_off":
        settings["redis_retry_refused"] = False
    elif why == "switched_off_by_env":
        monkeypatch.setenv("OTEL_RECOVERY_REDIS_RETRY_REFUSED", "false")
    else:  # redis-py's incr() sends INCRBY
        settings["redis_no_retry_commands"] = "INCRBY, INCR"
    hf.instrument("contrib_first", clock=clock, **settings)
    c = front_client(hf, kind)
    try:
        with pytest.raises(redis.exceptions.ConnectionError, match=" connecting to "):
            await maybe_await(c.incr("n"))
        assert hf.attempts["execute_command"] == 1 and clock.sleeps == []
        assert front.accepted == 0 and hf.peek("get", "n") is None
        attrs = dict(unsent_incr_span(hf).attributes or {})
        assert attrs["otel_recovery.retry.disallowed"] == "non_idempotent_command"
        assert attrs["otel_recovery.outcome"] == "failure"
        hf.reset_counts()
        assert await maybe_await(c.get("n")) is None  # refused too, retried once it listens
        assert hf.attempts["execute_command"] == 2 and front.accepted == 1
    finally:
        await close_client(c)


@pytest.mark.parametrize("kind", ["sync", "async"])
@pytest.mark.parametrize("transaction", [True, False])
async def test_an_incr_in_a_pipeline_whose_connect_was_refused_is_not_sent_again(
    hf: Harness, front: LateFront, kind: str, transaction: bool
) -> None:
    """Not inside MULTI/EXEC, nor a plain pipeline: the rule is for single commands."""
    clock = OpeningClock(front)
    hf.instrument("contrib_first", clock=clock)
    c = front_client(hf, kind)
    try:
        pipe = c.pipeline(transaction=transaction)
        pipe.incr("n").set("k", "v")
        with pytest.raises(redis.exceptions.ConnectionError, match=" connecting to "):
            await maybe_await(pipe.execute())
        assert hf.attempts["execute"] == 1 and clock.sleeps == [] and front.accepted == 0
        assert hf.peek("get", "n") is None and hf.peek("get", "k") is None
        attrs = dict(pipeline_span(hf).attributes or {})
        expected = "transaction" if transaction else "non_idempotent_command"
        assert attrs["otel_recovery.retry.disallowed"] == expected
    finally:
        await close_client(c)


# never_ran on what uninstrumented redis-py really raises


def kill_when_blocked(server: PrivateRedis, client_id: int) -> threading.Thread:
    """Kill our connection (CLIENT KILL) once its command waits on the server (a BLPOP)."""
    admin = server.admin()

    def run() -> None:
        with suppress_instrumentation():
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline:
                info = admin.execute_command("CLIENT", "LIST", "ID", client_id).decode()
                if "flags=b" in info:
                    break
                time.sleep(0.005)
            admin.execute_command("CLIENT", "KILL", "ID", client_id)
            admin.close()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


@pytest.mark.parametrize("kind", ["sync", "async"])
@pytest.mark.parametrize("failure", ["refused", "timed_out"])
async def test_never_ran_holds_for_a_connect_that_could_not_be_made(
    front: LateFront, kind: str, failure: str
) -> None:
    if failure == "timed_out":
        front.go_silent()
    c = plain_client(kind, front.port, socket_connect_timeout=0.2)
    try:
        error = await raised(lambda: c.incr("n"))
    finally:
        await close_client(c)
    if failure == "refused":
        assert type(error) is redis.exceptions.ConnectionError
        assert str(error).startswith(("Error 111 connecting to", "Error connecting to"))
    else:
        assert type(error) is redis.exceptions.TimeoutError
        assert str(error) == "Timeout connecting to server"
    assert _redis_errors.never_ran(error) is True


@pytest.mark.parametrize("kind", ["sync", "async"])
@pytest.mark.parametrize("failure", ["killed_while_blocked", "cut_after_it_ran", "read_timed_out"])
async def test_never_ran_does_not_hold_once_the_command_may_have_been_sent(
    server: PrivateRedis, front: LateFront, kind: str, failure: str
) -> None:
    """A connection lost, or a reply that never came, after the command was written."""
    port = front.port if failure == "cut_after_it_ran" else server.port
    # read_timed_out: TIMEOUT, which the 5 s BLPOP outlasts and the connect's handshake beats
    c = plain_client(kind, port, socket_timeout=TIMEOUT if failure == "read_timed_out" else 5)
    try:
        if failure == "killed_while_blocked":
            killer = kill_when_blocked(server, await maybe_await(c.client_id()))
            error = await raised(lambda: c.blpop(["q"], timeout=5))
            await asyncio.to_thread(killer.join)
        elif failure == "cut_after_it_ran":
            front.open()
            assert await maybe_await(c.ping()) is True
            front.cut_at(b"INCR")
            error = await raised(lambda: c.incr("n"))
            with suppress_instrumentation():
                admin = server.admin()
                assert admin.get("n") == b"1"  # it ran
                admin.close()
        else:
            error = await raised(lambda: c.blpop(["q"], timeout=5))
    finally:
        await close_client(c)
    expected = redis.exceptions.TimeoutError if failure == "read_timed_out" else None
    assert type(error) is (expected or redis.exceptions.ConnectionError), repr(error)
    assert _redis_errors.never_ran(error) is False, repr(error)


@pytest.mark.parametrize("kind", ["sync", "async"])
@pytest.mark.parametrize(
    ("failure", "proof"), [("readonly", True), ("auth", False), ("wrongtype", False)]
)
async def test_never_ran_holds_for_a_refusal_and_no_other_reply(
    server: PrivateRedis, front: LateFront, kind: str, failure: str, proof: bool
) -> None:
    """``READONLY`` refuses a command before it runs; a failed ``AUTH`` (a
    ``ConnectionError`` too, from the handshake) and a command error prove nothing."""
    replica, c = None, None
    try:
        if failure == "readonly":  # a replica of a primary it cannot reach (the front's)
            replica = PrivateRedis()
            with suppress_instrumentation():
                admin = replica.admin()
                admin.execute_command("REPLICAOF", "127.0.0.1", str(front.port))
                admin.close()
            c = plain_client(kind, replica.port)
            error = await raised(lambda: c.incr("n"))
            assert type(error) is redis.exceptions.ReadOnlyError
        elif failure == "auth":
            c = plain_client(kind, server.port, username="nobody", password="wrong")
            error = await raised(c.ping)
            assert isinstance(error, redis.exceptions.AuthenticationError)
            assert isinstance(error, redis.exceptions.ConnectionError)
        else:
            c = plain_client(kind, server.port)
            await maybe_await(c.lpush("l", "x"))
            error = await raised(lambda: c.incr("l"))
            assert type(error) is redis.exceptions.ResponseError
    finally:
        if c is not None:
            await close_client(c)
        if replica is not None:
            replica.close()
    assert _redis_errors.never_ran(error) is proof, repr(error)


@pytest.mark.parametrize("kind", ["sync", "async"])
async def test_never_ran_does_not_hold_for_our_open_circuit(h: Harness, kind: str) -> None:
    """Our rejection is a ``redis.ConnectionError`` that was never sent, and never resent."""
    ours = h.instrument().ours
    c = h.client() if kind == "sync" else h.aclient()
    try:
        await maybe_await(c.ping())
        assert ours.targets is not None
        (breaker,) = ours.targets.breakers()
        breaker.force_open()
        error = await raised(lambda: c.incr("n"))
    finally:
        await close_client(c)
    assert isinstance(error, RedisCircuitOpenError)
    assert isinstance(error, redis.exceptions.ConnectionError)
    assert _redis_errors.never_ran(error) is False


# -- our own bugs never replace redis-py's outcome; the client's own pool is not the server --


class Bug(RuntimeError):
    """What a broken piece of otel_recovery raises in these tests."""


def _bug(*args: Any, **kwargs: Any) -> Any:
    raise Bug("a bug of ours")


BROKEN = {
    # what breaks while the first failure is handled, and the command it breaks under:
    # deciding on a SET (a write we would retry), counting a failed INCR (never retried)
    "decide": (PolicyCore, "_decide", ("SET", "s", "v")),
    "record_failure": (CircuitBreaker, "record_failure", ("INCR", "n")),
}


@contextlib.contextmanager
def driver_errors(h: Harness, owner: Any, attribute: str) -> Iterator[list[BaseException]]:
    """What redis-py's own ``owner.attribute`` raised, recorded beneath every layer (spliced
    under the harness's counting layer, taken out again at the end)."""
    raised: list[BaseException] = []

    def record(wrapped: Any, instance: Any, args: Any, kwargs: Any) -> Any:
        try:
            result = wrapped(*args, **kwargs)
        except BaseException as error:
            raised.append(error)
            raise
        if not inspect.isawaitable(result):
            return result

        async def awaited() -> Any:
            try:
                return await result
            except BaseException as error:
                raised.append(error)
                raise

        return awaited()

    (counting,) = [p for o, a, p in h._proxies if (o, a) == (owner, attribute)]
    beneath = counting.__wrapped__
    counting.__wrapped__ = wrapt.FunctionWrapper(beneath, record)
    try:
        yield raised
    finally:
        counting.__wrapped__ = beneath


def _internal_errors(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.message for r in caplog.records if "otel_recovery internal error" in r.message]


@pytest.mark.parametrize("warm", [False, True], ids=["python_layer", "remembered_plan"])
@pytest.mark.parametrize("broken", sorted(BROKEN))
@pytest.mark.parametrize("kind", ["sync", "async"])
async def test_a_bug_of_ours_during_a_real_failure_gives_redis_pys_own_error_once(
    h: Harness,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    kind: str,
    broken: str,
    warm: bool,
) -> None:
    """A killed connection, and a bug of ours while handling it (deciding whether to retry,
    counting the failure on the breaker): the application gets redis-py's own exception
    object, the command is sent once, and the bug is logged once. ``remembered_plan``: the
    call takes the compiled layer where the extension is built."""
    owner, name, command = BROKEN[broken]
    h.instrument("contrib_first")
    c = h.client() if kind == "sync" else h.aclient()
    client = redis.client.Redis if kind == "sync" else redis.asyncio.client.Redis
    try:
        if warm:
            await maybe_await(c.execute_command(*command))
        client_id = await maybe_await(c.client_id())
        h.reset_counts()
        monkeypatch.setattr(owner, name, _bug)
        monkeypatch.setattr(_wrapping, "_reported", set())
        with driver_errors(h, client, "execute_command") as raised, caplog.at_level(logging.ERROR):
            killer = kill_mid_write(h.server, client_id)
            error = await raised_by(lambda: c.execute_command(*command))
            await asyncio.to_thread(killer.join)
    finally:
        await close_client(c)
    assert type(error) is redis.exceptions.ConnectionError
    assert raised == [error]  # the very object redis-py raised, its only attempt
    assert h.attempts["execute_command"] == 1 and h.sent[command[0]] == 1
    assert _internal_errors(caplog) == [
        f"otel_recovery internal error in redis 127.0.0.1:{h.server.port}: recovery; the "
        "call proceeds uninstrumented (reported once per site)"
    ]


async def raised_by(call: Any) -> BaseException:
    """The exception ``call()`` (sync, or returning an awaitable) ends in, whatever its type."""
    try:
        await maybe_await(call())
    except BaseException as error:
        return error
    raise AssertionError("the call succeeded")


def _take_connection(pool: Any) -> Any:
    """One connection out of ``pool`` (sync), the way redis-py 4.5 to 8 each accept."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            return pool.get_connection()
        except TypeError:  # before 5.x? the command name was required
            return pool.get_connection("PING")


async def _atake_connection(pool: Any) -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            pending = pool.get_connection()
        except TypeError:
            pending = pool.get_connection("PING")
        return await pending


POOLS = {
    # pool class, its options, what redis-py says when the application's pool is empty
    "blocking": ("BlockingConnectionPool", {"max_connections": 1, "timeout": 0.2}),
    "max_connections": ("ConnectionPool", {"max_connections": 1}),
}


def pool_requests(pool: Any) -> list[float]:
    """When each connection was asked of ``pool`` from now on (counted on the instance, above
    every layer on its class): how often a call waited for the pool, without timing it."""
    asked: list[float] = []
    get_connection = pool.get_connection

    def counted(*args: Any, **kwargs: Any) -> Any:
        asked.append(time.monotonic())
        return get_connection(*args, **kwargs)  # a coroutine for an asyncio pool

    pool.get_connection = counted
    return asked


@pytest.mark.parametrize("pool_kind", sorted(POOLS))
@pytest.mark.parametrize("kind", ["sync", "async"])
async def test_an_exhausted_pool_of_the_applications_is_not_the_servers_failure(
    h: Harness, kind: str, pool_kind: str
) -> None:
    """A ``BlockingConnectionPool`` with no free connection within its ``timeout`` ("No
    connection available."), a ``ConnectionPool`` at its ``max_connections`` ("Too many
    connections"): the server never saw the command. It is tried once, takes the pool's own
    time, counts neither way on the server's breaker nor spends its retry budget, and the
    next call, from another client, is answered."""
    ours = h.instrument("contrib_first").ours
    module: Any = redis if kind == "sync" else redis.asyncio
    class_name, options = POOLS[pool_kind]
    retry_class: Any = Retry if kind == "sync" else redis.asyncio.retry.Retry
    pool = getattr(module, class_name)(
        host="127.0.0.1", port=h.server.port, retry=retry_class(NoBackoff(), 0), **options
    )
    h._owners.add(id(pool))
    c = module.Redis(connection_pool=pool)
    other = h.client() if kind == "sync" else h.aclient()
    try:
        assert await maybe_await(c.set("k", "v")) is True
        held = _take_connection(pool) if kind == "sync" else await _atake_connection(pool)
        h.reset_counts()
        asked = pool_requests(pool)
        started = time.monotonic()
        error = await raised_by(lambda: c.get("k"))
        took = time.monotonic() - started
        assert isinstance(error, redis.exceptions.ConnectionError), repr(error)
        assert not isinstance(error, CircuitOpenError)
        assert h.attempts["execute_command"] == 1
        assert len(asked) == 1 and took >= 0.9 * options.get("timeout", 0.0)  # its own wait, once
        assert ours.targets is not None
        (breaker,) = ours.targets.breakers()
        snapshot = breaker.snapshot()
        assert (snapshot.state.name, snapshot.failed_calls) == ("CLOSED", 0)
        budget = ours.targets._target("127.0.0.1", h.server.port).budget.snapshot()
        assert (budget.total_retries, budget.total_refused) == (0, 0)
        assert await maybe_await(other.get("k")) == b"v"
        await maybe_await(pool.release(held))
        assert await maybe_await(c.get("k")) == b"v"
    finally:
        await close_client(other)
        await maybe_await(pool.disconnect())


def test_only_the_pools_own_errors_are_the_clients_own() -> None:
    """By type, or by message *and* origin: a server's reply of the same words, or a
    ``ConnectionError`` raised outside redis-py's pools, is the server's failure."""
    assert _redis_errors.pool_exhausted(redis.exceptions.MaxConnectionsError())
    lookalike = redis.exceptions.ConnectionError("No connection available.")
    assert not _redis_errors.pool_exhausted(lookalike)  # no traceback: not from a pool
    try:
        raise lookalike
    except redis.exceptions.ConnectionError as error:
        assert not _redis_errors.pool_exhausted(error)  # raised here, not by a pool
    assert not _redis_errors.pool_exhausted(redis.exceptions.ConnectionError("Connection reset"))
    assert not _redis_errors.pool_exhausted(redis.exceptions.TimeoutError("Too many connections"))


_STORED = redis.exceptions.ConnectionError("stored, raised again by a layer below")


def _raising(h: Harness, mode: list[str | None]) -> Any:
    """A client whose connection raises the one stored error object (``mode[0] ==
    "stored"``) or a new one each time (``"fresh"``), as a layer keeping a failure would."""
    client = h.client()
    base = client.connection_pool.connection_class

    class Raising(base):  # type: ignore[misc, valid-type]
        def send_command(self, *args: Any, **kwargs: Any) -> Any:
            if mode[0] == "stored":
                raise _STORED
            if mode[0] == "fresh":
                raise redis.exceptions.ConnectionError("fresh")
            return super().send_command(*args, **kwargs)

    client.connection_pool.connection_class = Raising
    client.connection_pool.disconnect()
    return client


def test_two_calls_failing_with_one_error_object_count_twice(h: Harness) -> None:
    """A failure counts once per breaker only where a layer knows it rose through another
    of the target's (asyncpg's pool callbacks): a mark left on the error object made a
    second call ending with the same object count nothing (found by a review)."""
    ours = h.instrument(order="ours_only").ours
    mode: list[str | None] = [None]
    client = _raising(h, mode)
    client.ping()
    assert ours.targets is not None
    (breaker,) = ours.targets.breakers()
    before = breaker.snapshot().failed_calls

    mode[0] = "stored"
    for _ in range(2):
        with pytest.raises(redis.exceptions.ConnectionError) as raised:
            client.get("k")
        assert raised.value is _STORED

    assert breaker.snapshot().failed_calls - before == 2


def test_a_probe_failing_with_an_error_object_counted_before_opens_the_circuit(
    h: Harness,
) -> None:
    clock = FakeClock()
    ours = h.instrument(order="ours_only", clock=clock).ours
    mode: list[str | None] = ["stored"]
    client = _raising(h, mode)
    with pytest.raises(redis.exceptions.ConnectionError):
        client.get("k")  # the stored error, counted once here
    assert ours.targets is not None
    (breaker,) = ours.targets.breakers()
    mode[0] = "fresh"
    for _ in range(100):
        if breaker.state is CircuitState.OPEN:
            break
        with contextlib.suppress(redis.exceptions.ConnectionError):
            client.get("k")
    assert breaker.state is CircuitState.OPEN
    clock.advance(3600)

    mode[0] = "stored"
    with pytest.raises(redis.exceptions.ConnectionError):
        client.get("k")  # the half-open probe fails with the stored error

    assert breaker.state is CircuitState.OPEN  # reopened, not left half-open
