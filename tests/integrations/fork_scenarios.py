"""Fork scenarios for ``test_fork.py``, each run in a fresh interpreter: never in pytest.

``python fork_scenarios.py SCENARIO`` sets something up, forks with :func:`os.fork` (once or
a few times), lets each child do ordinary instrumented work, and prints one line of JSON with
what the children and the parent saw. A child that deadlocks is not waited for: a
``faulthandler`` watchdog in the child dumps every thread's stack and ends it after
``CHILD_TIMEOUT`` seconds, so the scenario reports ``"hung": true`` with the stacks instead of
hanging the test suite.

A lock held by *another* thread at the moment of ``fork()`` stays held forever in the child:
only the forking thread exists there. The ``held_*`` scenarios make that window
deterministic: a thread takes the lock (inside the real code path where it can: a Redis
exchange of the shared-state thread, a breaker listener, an anomaly-detector callback; else
by acquiring the object's lock directly, which stands for the few instructions a per-call
path holds it), the main thread forks, and the child makes an ordinary call that needs it.

Targets: failures come from a refused port (``closed_port``), which costs no server; the
fleet-wide state lives in the shared Redis on 6379 under a unique key prefix, deleted at the
end; recovered calls go through :class:`ResettingFront`, a TCP front for Redis that resets
the connection of whoever asked for it.
"""

from __future__ import annotations

import contextlib
import faulthandler
import json
import os
import socket
import struct
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

CHILD_TIMEOUT = 4.0
"""Seconds a child may take before it counts as hung (its calls take milliseconds)."""
REDIS = ("127.0.0.1", 6379)
PREFIX = os.environ.get("FORK_SCENARIO_PREFIX") or f"otelrec-fork-{uuid.uuid4().hex[:10]}:"
"""Every Redis key a scenario makes starts with it (test_fork deletes them afterwards)."""
STORE_URL = f"redis://{REDIS[0]}:{REDIS[1]}/0?prefix={PREFIX}"
SYNC_THREAD = "otel-recovery-shared-state"
FAST = {"max_attempts": 2, "backoff_initial": 0.001, "backoff_max": 0.001}
"""Settings for instrument(): two attempts, no real waiting between them."""

Report = dict[str, Any]

# -- forking ------------------------------------------------------------------------------


class Child:
    """A forked child running a scenario's function; :meth:`wait` gives its report."""

    def __init__(self, child: Callable[[], Report], *, exit_normally: bool = False) -> None:
        """``exit_normally``: end the child with ``sys.exit`` (atexit handlers, the SDK's
        shutdown among them, run as in a real worker's exit) rather than ``os._exit``."""
        read_end, self._write_end = os.pipe()
        self._stacks = tempfile.TemporaryFile()
        self.pid = os.fork()
        if self.pid == 0:  # the child: report, then leave without returning to the scenario
            os.close(read_end)
            self._run(child, exit_normally)
        os.close(self._write_end)
        self._read_end = read_end

    def _run(self, child: Callable[[], Report], exit_normally: bool) -> None:
        faulthandler.dump_traceback_later(CHILD_TIMEOUT, exit=True, file=self._stacks)
        try:
            report: Report = {"done": True, **child()}
        except BaseException as error:  # noqa: BLE001 - reported to the parent
            report = {"done": True, "raised": f"{type(error).__name__}: {error}"}
        with os.fdopen(self._write_end, "w") as pipe:
            pipe.write(json.dumps(report, default=str))
        if exit_normally:
            sys.exit(0)  # nothing above the scenario catches it: atexit handlers run
        os._exit(0)

    def wait(self) -> Report:
        deadline = time.monotonic() + CHILD_TIMEOUT + 10
        status: int | None = None
        while status is None:
            done, raw = os.waitpid(self.pid, os.WNOHANG)
            if done:
                status = os.waitstatus_to_exitcode(raw)
            elif time.monotonic() > deadline:  # even the watchdog did not fire: kill it
                os.kill(self.pid, 9)
                status = os.waitstatus_to_exitcode(os.waitpid(self.pid, 0)[1])
            else:
                time.sleep(0.01)
        with os.fdopen(self._read_end) as pipe:
            text = pipe.read()
        self._stacks.seek(0)
        dump = self._stacks.read().decode(errors="replace")
        report: Report = json.loads(text) if text else {"done": False}
        report["exit_code"] = status
        report["hung"] = "Timeout (" in dump
        report["stacks"] = dump
        return report


def fork(child: Callable[[], Report], *, exit_normally: bool = False) -> Report:
    """Run ``child`` in a forked process; its report, or how it failed to give one."""
    return Child(child, exit_normally=exit_normally).wait()


def held_by_thread(lock: Any) -> threading.Event:
    """A daemon thread takes ``lock`` and keeps it until the returned event is set."""
    taken, release = threading.Event(), threading.Event()

    def hold() -> None:
        with lock:
            taken.set()
            release.wait()

    threading.Thread(target=hold, name="lock-holder", daemon=True).start()
    if not taken.wait(5):
        raise RuntimeError("the lock was not free in the parent")
    return release


_HELD_PORTS: list[socket.socket] = []
"""Sockets bound, never listening, for the scenario process's life: their ports stay
refused. A probe closed at once let another process bind the port (the suite runs in
parallel workers): a "failing" GET then reached that server and succeeded."""


def closed_port() -> int:
    """A loopback port nobody listens on, held so that nobody can: connecting is refused."""
    held = socket.socket()
    held.bind(("127.0.0.1", 0))  # bound, not listening: refused
    _HELD_PORTS.append(held)
    return int(held.getsockname()[1])


class ResettingFront:
    """A TCP front for the shared Redis that resets one connection per :meth:`arm` call.

    It runs in the scenario's parent process; a child arms it through a file (the parent's
    memory is not the child's), so a child can make exactly its own next connection fail.
    """

    def __init__(self) -> None:
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self._listener.getsockname()[1])
        self._flag = tempfile.mktemp(prefix="otelrec-fork-reset-")  # noqa: S306 - a flag file
        threading.Thread(target=self._serve, name="resetting-front", daemon=True).start()

    def arm(self) -> None:
        with open(self._flag, "w"):
            pass

    def _serve(self) -> None:
        while True:
            client, _ = self._listener.accept()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._flag)
                client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                client.close()
                continue
            upstream = socket.create_connection(REDIS, timeout=5)
            for source, sink in ((client, upstream), (upstream, client)):
                threading.Thread(target=_pump, args=(source, sink), daemon=True).start()


def _pump(source: socket.socket, sink: socket.socket) -> None:
    with contextlib.suppress(OSError):
        while chunk := source.recv(65536):
            sink.sendall(chunk)
    for end in (source, sink):
        with contextlib.suppress(OSError):
            end.shutdown(socket.SHUT_RDWR)


# -- instrumented clients -----------------------------------------------------------------


def tracing() -> tuple[Any, Any]:
    """An SDK tracer provider exporting to memory through a batch processor (as in prod)."""
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(BatchSpanProcessor(exporter, schedule_delay_millis=50))
    return provider, exporter


def instrument_redis(provider: Any = None, **settings: Any) -> Any:
    """Our Redis instrumentor on ``provider`` (default: a fresh SDK provider); ``"global"``
    follows the global providers, as under ``opentelemetry-instrument``."""
    from opentelemetry import trace

    from otel_recovery.instrumentors.redis import RedisRecoveryInstrumentor

    instrumentor = RedisRecoveryInstrumentor()
    if provider is None:
        provider = tracing()[0]
    if provider == "global":
        trace.set_tracer_provider(tracing()[0])
        instrumentor.instrument(**{**FAST, **settings})
    else:
        instrumentor.instrument(tracer_provider=provider, **{**FAST, **settings})
    return instrumentor


def redis_client(port: int, **options: Any) -> Any:
    """A redis-py client with no retries of its own: ours is the only retry layer."""
    import redis
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    return redis.Redis(
        port=port,
        retry=Retry(NoBackoff(), 0),
        socket_connect_timeout=1,
        socket_timeout=2,
        **options,
    )


def failing_get(port: int) -> Report:
    """A GET to a refused port: two attempts, then the ConnectionError, in the child."""
    import redis

    try:
        redis_client(port).get("k")
    except redis.ConnectionError as error:
        return {"error": type(error).__name__}
    return {"error": None}


@contextlib.contextmanager
def shared_state() -> Iterator[None]:
    """Breakers and budgets share state through the real Redis (unique key prefix)."""
    os.environ["OTEL_RECOVERY_STORE_URL"] = STORE_URL
    owner = os.getpid()
    try:
        yield
    finally:
        if os.getpid() != owner:  # a child leaving through sys.exit: the keys are not its own
            return
        import redis

        admin = redis.Redis(*REDIS)
        keys = list(admin.scan_iter(match=f"{PREFIX}*"))
        if keys:
            admin.delete(*keys)
        admin.close()


def stall_sync(link: Any, script_marker: str) -> tuple[threading.Event, threading.Event]:
    """Make the shared-state thread's next exchange whose keys contain ``script_marker``
    wait inside ``Link.run`` (as behind a slow Redis) until released; returns (entered,
    release). The caller's own exchanges are not held."""
    entered, release = threading.Event(), threading.Event()
    real_run = link.run
    parent = os.getpid()  # a child's own sync thread is never held: only the fork's moment

    def run(source: str, keys: Any, args: Any) -> Any:
        if (
            os.getpid() == parent
            and threading.current_thread().name == SYNC_THREAD
            and any(script_marker in key for key in keys)
            and not release.is_set()
        ):
            entered.set()
            release.wait()
        return real_run(source, keys, args)

    link.run = run
    return entered, release


# -- scenarios: locks held at fork time ---------------------------------------------------


def shared_breaker_mid_sync() -> Report:
    """The shared-state thread is exchanging a breaker's counts with Redis (holding the
    breaker's ``_talk`` lock) when the process forks; the child's call then fails."""
    with shared_state():
        port = closed_port()
        instrumentor = instrument_redis()
        failing_get(port)  # the target's fleet-wide breaker exists and is synced
        (breaker,) = instrumentor.targets.breakers()
        entered, release = stall_sync(breaker._link, ":cb:")
        assert entered.wait(5), "the shared-state thread never synced the breaker"
        child = fork(lambda: failing_get(port))
        release.set()
        return {"child": child, "breaker": type(breaker).__name__}


def shared_budget_mid_sync() -> Report:
    """As above, with the thread in the retry budget's exchange: the child's first retry
    needs the budget's ``_talk`` lock."""
    with shared_state():
        port = closed_port()
        instrumentor = instrument_redis()
        failing_get(port)
        (breaker,) = instrumentor.targets.breakers()
        entered, release = stall_sync(breaker._link, ":rb:")
        failing_get(port)  # new deposits: the budget is due for a sync
        assert entered.wait(5), "the shared-state thread never synced the budget"
        child = fork(lambda: failing_get(port))
        release.set()
        return {"child": child}


def _follows_fleet(stalled: bool) -> Report:
    from otel_recovery.policies import CircuitBreaker, CircuitState

    with shared_state():
        name = f"fork-{uuid.uuid4().hex[:8]}"
        breaker = CircuitBreaker(name=name, store=STORE_URL, sync_interval=0.05)
        assert breaker.sync(), "Redis is not reachable"
        release = None
        if stalled:
            entered, release = stall_sync(breaker._link, ":cb:")
            assert entered.wait(5)

        def child() -> Report:
            # the parent forces the breaker open fleet-wide 0.3 s after the fork; the
            # child learns it only through its own shared-state thread
            deadline = time.monotonic() + 2.0
            while time.monotonic() < deadline and breaker.state is not CircuitState.FORCED_OPEN:
                time.sleep(0.02)
            return {"state": breaker.state.value}

        def force_open_soon() -> None:
            time.sleep(0.3)
            breaker.force_open()  # the parent is another process of the fleet for the child

        threading.Thread(target=force_open_soon, daemon=True).start()
        running = Child(child)
        if release is not None:
            release.set()  # the parent's own exchange, and its force_open, may go on now
        return {"child": running.wait()}


def shared_breaker_follows_fleet() -> Report:
    """Control: forked while the shared-state thread was idle, the child keeps following
    the fleet (the link's at-fork handler restarts the thread)."""
    return _follows_fleet(stalled=False)


def shared_breaker_follows_fleet_mid_sync() -> Report:
    """Forked while the thread was in an exchange: the child's thread must still follow."""
    return _follows_fleet(stalled=True)


def _held(find_lock: Callable[[Any, int], Any], child_call: Callable[[int], Report]) -> Report:
    port = closed_port()
    instrumentor = instrument_redis("global")
    failing_get(port)  # the target, its breaker, budget and plans exist
    release = held_by_thread(find_lock(instrumentor, port))
    child = fork(lambda: child_call(port))
    release.set()
    return {"child": child}


def _breaker(instrumentor: Any, port: int) -> Any:
    (breaker,) = instrumentor.targets.breakers()
    return breaker


def _new_target(port: int) -> Report:
    return failing_get(closed_port())


def _new_command(port: int) -> Report:
    import redis

    try:
        redis_client(port).exists("k")  # EXISTS: a command shape not planned yet
    except redis.ConnectionError as error:
        return {"error": type(error).__name__}
    return {"error": None}


def _plan_cache(instrumentor: Any, port: int) -> Any:
    import gc

    from otel_recovery.instrumentors._db_plans import PlanCache

    (cache,) = [
        o for o in gc.get_objects() if type(o) is PlanCache and o.targets is instrumentor.targets
    ]
    return cache._lock


def _metrics_lock(instrumentor: Any, port: int) -> Any:
    from otel_recovery.telemetry import get_telemetry

    telemetry = instrumentor.targets._telemetry
    if telemetry is True:
        telemetry = get_telemetry()
    return telemetry.metrics._lock


def _telemetry_lock(instrumentor: Any, port: int) -> Any:
    import otel_recovery.telemetry as telemetry

    return telemetry._lock


def _classifier_lock(instrumentor: Any, port: int) -> Any:
    from otel_recovery.classify import get_default_classifier

    return get_default_classifier()._lock


HELD: dict[str, tuple[Callable[[Any, int], Any], Callable[[int], Report]]] = {
    # breaker._lock: a failure recorded by another thread, or the metric reader's snapshot()
    "breaker_lock": (lambda i, p: _breaker(i, p)._lock, failing_get),
    # budget._lock: another thread's retry (try_spend) or a bucket rotation
    "budget_lock": (lambda i, p: next(iter(i.targets._targets.values())).budget._lock, failing_get),
    # the process-wide classifier: every failed attempt of every target records a repeat
    "classifier_lock": (_classifier_lock, failing_get),
    # RecoveryMetrics._lock: the metric reader thread listing the breakers to observe
    "metrics_lock": (_metrics_lock, _new_target),
    # otel_recovery.telemetry._lock: another thread meeting a new target
    "telemetry_lock": (_telemetry_lock, _new_target),
    # TargetPolicies._lock: another thread meeting a new target
    "targets_lock": (lambda i, p: i.targets._lock, _new_target),
    # PlanCache._lock: another thread's first call of a new command shape
    "plan_cache_lock": (_plan_cache, _new_command),
}


def held(name: str) -> Report:
    find_lock, child_call = HELD[name]
    return _held(find_lock, child_call)


def dispatch_mid_delivery() -> Report:
    """A thread is inside a breaker listener (delivering a transition) at fork time; the
    child's breaker then trips: its own listener must hear about it."""
    from otel_recovery.policies import CircuitBreaker

    breaker = CircuitBreaker(failure_threshold=1, timeout=60.0, name="fork-dispatch")
    inside, release = threading.Event(), threading.Event()
    heard: list[str] = []

    def listener(transition: Any) -> None:
        heard.append(transition.to_state.value)
        if os.getpid() == parent and not release.is_set():
            inside.set()
            release.wait()

    parent = os.getpid()
    breaker.add_listener(listener)
    threading.Thread(target=breaker.record_failure, daemon=True).start()  # CLOSED -> OPEN
    assert inside.wait(5)

    def child() -> Report:
        heard.clear()
        breaker.reset()  # -> CLOSED (manual)
        breaker.record_failure()  # -> OPEN
        return {"heard": list(heard), "state": breaker.state.value}

    report = fork(child)
    release.set()
    return {"child": report}


# -- scenarios: the anomaly span processor ------------------------------------------------


def _anomaly_provider(include: Callable[[Any], bool] | None = None) -> tuple[Any, Any]:
    from opentelemetry.sdk.trace import TracerProvider

    from otel_recovery.learning.anomaly import AnomalySpanProcessor

    processor = AnomalySpanProcessor(flush_interval=0.05, bucket=1.0, include=include)
    provider = TracerProvider()
    provider.add_span_processor(processor)
    return provider, processor


def _client_spans(provider: Any, count: int) -> None:
    from opentelemetry.trace import SpanKind

    tracer = provider.get_tracer("fork-test")
    for _ in range(count):
        attributes = {"db.system": "redis", "server.address": "cache", "server.port": 6379}
        with tracer.start_as_current_span("GET", kind=SpanKind.CLIENT, attributes=attributes):
            pass


def anomaly_worker_after_fork() -> Report:
    """The processor aggregates spans on its worker thread; a forked child has no such
    thread unless someone starts one. Does the child's processor still count its spans?"""
    provider, processor = _anomaly_provider()
    _client_spans(provider, 3)
    time.sleep(0.3)
    counted_before = sum(calls for calls, _ in processor.series().values())

    def child() -> Report:
        _client_spans(provider, 5)
        time.sleep(0.5)  # ten flush intervals
        return {
            "counted": sum(calls for calls, _ in processor.series().values()),
            "pending": len(processor._pending),
        }

    return {"parent_counted": counted_before, "child": fork(child)}


def anomaly_mid_process() -> Report:
    """The worker is inside ``process()`` (here: in the user's ``include`` callback) at fork
    time; the child exits normally, so the SDK's atexit shutdown runs the processor's
    ``shutdown()``, which processes what is left."""
    parent = os.getpid()
    inside, release = threading.Event(), threading.Event()

    def include(span: Any) -> bool:
        if os.getpid() == parent and not release.is_set():
            inside.set()
            release.wait()
        return True

    provider, _ = _anomaly_provider(include)
    _client_spans(provider, 1)
    assert inside.wait(5)

    def child() -> Report:
        _client_spans(provider, 2)
        return {}

    report = fork(child, exit_normally=True)
    release.set()
    return {"child": report}


# -- scenarios: what the child inherits ---------------------------------------------------


def child_recovers_and_exports() -> Report:
    """The parent instruments (SDK with a batch processor, contrib above ours) and calls
    Redis; the forked child's call fails once and is retried, and the child's own batch
    processor (restarted by the SDK at fork) exports the annotated span."""
    from opentelemetry.instrumentation.redis import RedisInstrumentor

    front = ResettingFront()
    provider, exporter = tracing()
    RedisInstrumentor().instrument(tracer_provider=provider)
    instrument_redis(provider)
    client = redis_client(front.port)
    key = f"{PREFIX}k"
    client.set(key, "v")
    assert client.get(key) == b"v"
    provider.force_flush()
    exporter.clear()

    def child() -> Report:
        front.arm()
        value = client.get(key)
        deadline = time.monotonic() + 2.0  # no force_flush: the batch thread must do it
        while time.monotonic() < deadline and not exporter.get_finished_spans():
            time.sleep(0.02)
        return {
            "value": value.decode() if value else None,
            "spans": [
                {
                    "name": span.name,
                    "pid": os.getpid(),
                    "attributes": {
                        k: v for k, v in (span.attributes or {}).items() if "otel_recovery" in k
                    },
                    "events": [event.name for event in span.events],
                }
                for span in exporter.get_finished_spans()
            ],
        }

    report = fork(child)
    provider.force_flush()
    parent_spans = [span.name for span in exporter.get_finished_spans()]
    client.delete(key)
    return {"child": report, "parent_spans": parent_spans}


def inherited_redis_pool() -> Report:
    """The child uses the client (and pool) the parent connected: redis-py gives it its own
    connection; our layer must not add a retry or a failure to that hand-over."""
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    instrumentor = instrument_redis(provider)
    client = redis_client(REDIS[1])
    key = f"{PREFIX}pool"
    client.set(key, "parent")
    parent_id = client.client_id()

    def child() -> Report:
        exporter.clear()
        value = client.get(key)
        own_id = client.client_id()
        (breaker,) = instrumentor.targets.breakers()
        snap = breaker.snapshot()
        return {
            "value": value.decode() if value else None,
            "same_connection": own_id == parent_id,
            "recover_spans": [s.name for s in exporter.get_finished_spans()],
            "failed_calls": snap.failed_calls,
        }

    report = fork(child)
    exporter.clear()
    after = client.get(key)
    result = {
        "child": report,
        "parent_value_after": after.decode() if after else None,
        "parent_same_connection_after": client.client_id() == parent_id,
        "parent_recover_spans": [s.name for s in exporter.get_finished_spans()],
    }
    client.delete(key)
    return result


def inherited_psycopg_connection() -> Report:
    """The child runs a statement on the parent's psycopg connection and closes it (libpq
    sends Terminate on the shared socket). The parent's next statement
    then fails: psycopg's problem, but ours must run it exactly once and not retry it."""
    import psycopg
    import wrapt
    from opentelemetry.instrumentation.psycopg import PsycopgInstrumentor
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from otel_recovery.instrumentors.psycopg import PsycopgRecoveryInstrumentor

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    executed: list[str] = []

    def count(wrapped: Any, instance: Any, args: Any, kwargs: Any) -> Any:
        executed.append(str(args[0]))
        return wrapped(*args, **kwargs)

    # beneath every other wrapper (installed first): what really reached psycopg
    wrapt.wrap_function_wrapper(psycopg.Cursor, "execute", count)
    PsycopgInstrumentor().instrument(tracer_provider=provider)
    PsycopgRecoveryInstrumentor().instrument(tracer_provider=provider, **FAST)
    conn = psycopg.connect("host=127.0.0.1 port=5432 user=postgres dbname=test", autocommit=True)
    assert conn.execute("SELECT 1").fetchone() == (1,)

    def child() -> Report:
        row = conn.execute("SELECT 2").fetchone()
        conn.close()  # what a child tidying up (or its garbage collector) does
        return {"row": list(row) if row else None}

    report = fork(child)
    exporter.clear()
    executed.clear()
    error = None
    try:
        conn.execute("SELECT 3").fetchone()
    except psycopg.Error as exc:
        error = type(exc).__name__
    spans = [
        {"name": span.name, "attributes": dict(span.attributes or {})}
        for span in exporter.get_finished_spans()
    ]
    fresh = psycopg.connect("host=127.0.0.1 port=5432 user=postgres dbname=test")
    fresh_row = fresh.execute("SELECT 4").fetchone()
    fresh.close()
    return {
        "child": report,
        "parent_error": error,
        "parent_spans": spans,
        "fresh_row": list(fresh_row) if fresh_row else None,
        "executed": executed,
    }


def inherited_open_breaker() -> Report:
    """The parent's breaker for a target is OPEN when it forks: the child starts from that
    state (its call is rejected without an attempt), then the two evolve apart."""
    import redis

    from otel_recovery.policies import CircuitOpenError

    port = closed_port()
    instrumentor = instrument_redis(
        breaker_window=2, breaker_minimum_calls=2, breaker_failure_rate=0.5
    )
    failing_get(port)
    failing_get(port)
    (breaker,) = instrumentor.targets.breakers()
    before = breaker.state.value

    def child() -> Report:
        try:
            redis_client(port).get("k")
            outcome = "answered"
        except CircuitOpenError:
            outcome = "rejected"
        except redis.ConnectionError:
            outcome = "attempted"
        breaker.reset()
        return {"outcome": outcome, "after_reset": breaker.state.value}

    report = fork(child)
    return {"parent_before": before, "child": report, "parent_after": breaker.state.value}


def thread_owned_state() -> Report:
    """Another thread holds a breaker's only half-open probe permit and a bulkhead's only
    slot (a second thread waits for it) when the process forks. In the child none of those
    threads exists: the permit, the slot and the waiter must not stay taken for good."""
    from otel_recovery.policies import Bulkhead, CircuitBreaker
    from otel_recovery.recover import RecoveryPolicy
    from otel_recovery.testing import FakeClock

    clock = FakeClock()
    breaker = CircuitBreaker(failure_threshold=1, timeout=1.0, clock=clock, name="probe")
    breaker.record_failure()  # open
    clock.advance(2.0)  # the open time is over: the next call takes the only probe permit
    probing = RecoveryPolicy(breaker=breaker, clock=clock)
    bulkhead = Bulkhead(max_concurrent=1, max_wait=30)
    guarded = RecoveryPolicy(bulkhead=bulkhead)
    inside = [threading.Event(), threading.Event()]
    release = threading.Event()

    def hold(index: int) -> str:
        inside[index].set()
        release.wait()
        return "held"

    threading.Thread(target=lambda: probing.call(hold, 0), daemon=True).start()
    threading.Thread(target=lambda: guarded.call(hold, 1), daemon=True).start()
    if not (inside[0].wait(5) and inside[1].wait(5)):
        raise RuntimeError("the holders did not start")
    waiting = threading.Thread(target=lambda: guarded.call(lambda: "waited"), daemon=True)
    waiting.start()
    time.sleep(0.1)  # the waiter is queued in the bulkhead's line

    def child() -> Report:
        clock.advance(100.0)
        probe = probing.call(lambda: "probed")  # the parent's permit is not out here
        slots = [guarded.call(lambda: "slot") for _ in range(2)]
        return {"probe": probe, "state": breaker.state.value, "slots": slots,
                "in_use": bulkhead.in_use}  # fmt: skip

    report = fork(child)
    release.set()
    waiting.join(5)
    return {"child": report, "parent_in_use": bulkhead.in_use}


def postgres_store_after_fork() -> Report:
    """A PostgreSQL store (checkpoints, learned statistics) used in the parent, then by a
    forked child that closes it when done. The SQLite store opens a new connection in a
    child (it checks the pid); a child sharing the parent's session instead ends it on
    close, and the parent's next store call fails."""
    import psycopg

    from otel_recovery.stores.postgres import PostgresStore

    table = f"otelrec_fork_{uuid.uuid4().hex[:10]}"
    url = "postgresql://postgres@127.0.0.1:5432/test"
    store = PostgresStore(url, table=table)
    try:
        store.put("parent", b'"p"')
        parent_session = store._conn.info.backend_pid

        def child() -> Report:
            store.put("child", b'"c"')
            session = store._conn.info.backend_pid
            store.close()  # a tidy worker closes what it uses
            return {"same_session": session == parent_session}

        report = fork(child)
        try:
            record = store.get("child")
            parent_get = record.data.decode() if record else None
        except Exception as error:  # noqa: BLE001 - reported
            parent_get = type(error).__name__
        store.close()
        return {"child": report, "parent_get": parent_get}
    finally:
        with psycopg.connect(url, autocommit=True) as conn:
            for part in ("meta", "records", "heads", "counters", "batches"):
                conn.execute(f'DROP TABLE IF EXISTS "{table}_{part}"')


def permit_ids_after_fork() -> Report:
    """Three workers forked from one parent share a fleet-wide breaker in HALF_OPEN that
    allows two probes at a time: the fleet must grant exactly two."""
    from otel_recovery.policies import CircuitBreaker

    with shared_state():
        name = f"fork-permits-{uuid.uuid4().hex[:8]}"
        breaker = CircuitBreaker(
            name=name,
            store=STORE_URL,
            failure_threshold=1,
            timeout=0.3,
            half_open_max_calls=2,
        )
        breaker.record_failure()  # -> OPEN fleet-wide for 0.3 s
        assert breaker.state.value == "open", breaker.state
        time.sleep(0.4)  # the open time is over: the next can_execute() asks for a permit
        granted = []
        for _ in range(3):  # one at a time: each holds its probe while the next asks

            def child() -> Report:
                return {"granted": breaker.can_execute()}

            granted.append(fork(child))
        return {"children": granted, "permit_prefix": breaker._id}


SCENARIOS: dict[str, Callable[[], Report]] = {
    "shared_breaker_mid_sync": shared_breaker_mid_sync,
    "shared_budget_mid_sync": shared_budget_mid_sync,
    "shared_breaker_follows_fleet": shared_breaker_follows_fleet,
    "shared_breaker_follows_fleet_mid_sync": shared_breaker_follows_fleet_mid_sync,
    "dispatch_mid_delivery": dispatch_mid_delivery,
    "anomaly_worker_after_fork": anomaly_worker_after_fork,
    "anomaly_mid_process": anomaly_mid_process,
    "child_recovers_and_exports": child_recovers_and_exports,
    "inherited_redis_pool": inherited_redis_pool,
    "inherited_psycopg_connection": inherited_psycopg_connection,
    "permit_ids_after_fork": permit_ids_after_fork,
    "inherited_open_breaker": inherited_open_breaker,
    "postgres_store_after_fork": postgres_store_after_fork,
    "thread_owned_state": thread_owned_state,
    **{f"held:{name}": (lambda name=name: held(name)) for name in HELD},
}


def main() -> None:
    name = sys.argv[1]
    report = SCENARIOS[name]()
    print(json.dumps(report, default=str), flush=True)


if __name__ == "__main__":
    main()
