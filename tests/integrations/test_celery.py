"""Celery (kombu's Redis transport, Redis result backend) under real faults, with and without us.

Celery is the most common job queue in Python services, and every one of its Redis calls
runs through our layer: the producer's LPUSH, the worker's QoS pipelines (MULTI ZADD HSET
EXEC on receipt, MULTI ZREM HDEL EXEC on ack), the result store (MULTI SETEX PUBLISH EXEC),
the result reads, and the PING kombu sends whenever it (re)connects. Only the worker's BRPOP
bypasses us (kombu writes it on the raw connection and reads it from its event loop).

Celery and kombu repeat on their own: a publish is retried by kombu's ``Connection.ensure``
on any Redis connection error or timeout, a result store by the backend's ``ensure``, a lost
broker connection by the consumer's restart loop. So the rules for us are: never add a send
of what is not idempotent (LPUSH, the MULTI/EXEC pipelines), never turn what Celery takes for
a connection failure into something it does not know, never keep the worker from consuming
after the server is back. Each test runs redis-py alone (``baseline``) as its premise, and
asserts that with us no task is lost, none runs more often, no result is lost, the worker
keeps consuming, and publish raises what it raises without us (kombu's own types; while the
circuit is open, wrapping our ``RedisCircuitOpenError``, which is a ``redis.ConnectionError``).

Baseline behaviour recorded here (Celery 5.7 / kombu 5.7 alone, not ours):
- a publish whose LPUSH was applied but whose reply was lost (SIGSTOP past the socket
  timeout) is published twice by kombu's retry, and the task runs twice;
- an ack that fails on a connection error stalls the worker for good: kombu's ``QoS.ack``
  raises before it forgets the delivery, so at prefetch 1 no BRPOP is ever sent again.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest
from kombu.exceptions import OperationalError

from integrations.celery_app import CeleryRun
from integrations.redis_queues import STACKS, Stack, client_id_of
from otel_recovery.instrumentors.redis import RedisCircuitOpenError
from otel_recovery.testing import FakeClock

pytestmark = [
    pytest.mark.server,
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),  # celery's own setex call
    pytest.mark.filterwarnings("ignore::celery.exceptions.CPendingDeprecationWarning"),
]

PUBLISH_BOUND = 3.0
"""No publish may take longer than this, with or without us (kombu's retries included)."""


@pytest.fixture
def runs(stacks: Any) -> Iterator[Any]:
    """``runs(order, conf=None, **settings)``: a :class:`CeleryRun` on a new stack; the
    previous one is closed first, the last when the test ends."""
    made: list[CeleryRun] = []

    def make(order: str, conf: dict[str, Any] | None = None, **settings: Any) -> CeleryRun:
        while made:
            made.pop().close()
        run = CeleryRun(stacks(order, **settings), **(conf or {}))
        made.append(run)
        return run

    yield make
    while made:
        made.pop().close()


def _recovery_spans(stack: Stack, command: str) -> list[dict[str, Any]]:
    """Attributes of the spans that carry our recovery attributes for ``command``: contrib's
    span of that name, or our own ``recover`` span without contrib."""
    name = command if stack.contrib else f"recover redis 127.0.0.1:{stack.server.port}"
    return [
        dict(s.attributes or {})
        for s in stack.spans_named(name)
        if "otel_recovery.outcome" in (s.attributes or {})
    ]


def _ran(run: CeleryRun, numbers: list[int]) -> bool:
    return all(run.executions[n] >= 1 for n in numbers)


# -- the happy path -------------------------------------------------------------------------


@pytest.mark.parametrize("order", STACKS)
def test_every_task_runs_once_and_every_result_arrives(runs: Any, order: str) -> None:
    """delay() and apply_async(), early and late acks: one LPUSH, one receipt, one ack, one
    result store per task, exactly as without us, and nothing counted as a failure."""
    run = runs(order)
    run.start_worker()
    run.stack.reset_counts()
    sent = [run.record.delay(0), run.record.apply_async((1,)), run.record_late.delay(2)]
    sent.append(run.record_late.apply_async((3,), countdown=0))
    assert run.results(sent) == [0, 1, 2, 3]
    assert run.executions == {0: 1, 1: 1, 2: 1, 3: 1}
    assert run.until(run.worker_waiting)  # every ack sent
    sent_counts = run.stack.sent
    assert [sent_counts[c] for c in ("LPUSH", "ZADD", "ZREM", "SETEX", "PUBLISH")] == [4] * 5
    assert run.queued() == 0 and run.unacked() == 0
    assert run.stack.failed_calls() == 0
    if run.stack.instrumented:
        assert _recovery_spans(run.stack, "LPUSH") == []  # nothing to recover, nothing said


# -- the producer ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("order", "fault"),
    [
        *((o, f) for o in ["baseline", "contrib_first"] for f in ["kill", "stop", "pause"]),
        ("ours_first", "stop"),
        ("ours_only", "stop"),
    ],
)
def test_a_publish_under_a_fault_is_repeated_only_by_kombu(
    runs: Any, order: str, fault: str
) -> None:
    """The LPUSH meets a fault; kombu's publish retry sends it once more, and delay()
    returns. Killed or paused, the first LPUSH did nothing: one task, one run. Stopped, it
    was applied and its reply lost: kombu publishes the task a second time and it runs twice
    (kombu's behaviour, the baseline's too). We never send the LPUSH again ourselves."""
    run = runs(order)
    run.stack.trap("LPUSH", fault, heal_after=0.6)
    started = time.monotonic()
    result = run.record.delay(1)  # raises nothing: kombu repeated the publish
    assert time.monotonic() - started < PUBLISH_BOUND
    run.stack.settle()
    copies = 2 if fault == "stop" else 1
    assert run.stack.sent["LPUSH"] == 2  # the faulted one and kombu's
    assert run.queued() == copies
    run.start_worker()
    assert run.results([result]) == [1]
    assert run.until(lambda: run.executions[1] == copies and run.queued() == 0)
    assert run.executions == {1: copies}
    if run.stack.instrumented:
        (failed,) = _recovery_spans(run.stack, "LPUSH")
        assert failed["otel_recovery.retry.disallowed"] == "non_idempotent_command"
        assert failed["otel_recovery.retry.attempts"] == 1
        assert run.stack.failed_calls() == 1


# -- the worker -----------------------------------------------------------------------------


def _kill(run: CeleryRun, how: str) -> None:
    admin = run.stack.server.admin()
    try:
        if how == "brpop":  # the worker's own connection, by its address
            worker = client_id_of(admin, lambda r: r.get("cmd") == "brpop")
            admin.execute_command("CLIENT", "KILL", "ID", worker)
        elif how == "type_normal":
            admin.execute_command("CLIENT", "KILL", "TYPE", "normal")
        else:  # every connection to the server's address, pub/sub included
            laddr = f"127.0.0.1:{run.stack.server.port}"
            admin.execute_command("CLIENT", "KILL", "LADDR", laddr)
    finally:
        admin.close()


@pytest.mark.parametrize("order", ["baseline", "ours_only"])
@pytest.mark.parametrize("how", ["brpop", "type_normal", "laddr"])
def test_a_waiting_worker_whose_connections_are_killed_consumes_on(
    runs: Any, order: str, how: str
) -> None:
    """CLIENT KILL of the idle worker's BRPOP connection (or of every normal client, or of
    every client by the server's LADDR): kombu reconnects, and the next tasks run once each
    and their results arrive."""
    run = runs(order)
    run.start_worker()
    assert run.results([run.record.delay(0)]) == [0]
    run.wait_until_waiting()
    _kill(run, how)
    sent = [run.record.delay(n) for n in (1, 2, 3)]
    assert run.results(sent) == [1, 2, 3]
    assert run.executions == {0: 1, 1: 1, 2: 1, 3: 1}
    assert run.worker_alive()


@pytest.mark.parametrize("order", ["baseline", "ours_only"])
def test_a_server_restart_while_the_worker_waits(runs: Any, order: str) -> None:
    """The server is killed and started again on the same port (empty). The worker's BRPOP
    connection ends, Celery's consumer reconnects; the producer's pooled connections are
    replaced. Tasks published after the restart run once, their results arrive."""
    run = runs(order)
    run.start_worker()
    assert run.results([run.record.delay(0)]) == [0]
    run.wait_until_waiting()
    run.stack.server.restart()
    sent = [run.record.delay(n) for n in (1, 2, 3)]
    assert run.results(sent) == [1, 2, 3]
    assert run.executions == {0: 1, 1: 1, 2: 1, 3: 1}
    assert run.worker_alive()
    assert run.stack.failed_calls() <= 1  # at most the one call that met the dead socket


@pytest.mark.parametrize("order", ["baseline", "contrib_first"])
def test_a_failed_ack_stalls_the_worker_as_without_us(runs: Any, order: str) -> None:
    """The worker's ack (MULTI ZREM HDEL EXEC) is killed. kombu alone: ``QoS.ack`` raises
    before it forgets the delivery, Celery logs "Failed to acknowledge", and at prefetch 1
    the worker never sends BRPOP again (the baseline's behaviour). We repeat nothing (one
    ZREM) and change nothing: the same tasks stay queued, none runs twice."""
    run = runs(order)
    run.start_worker()
    run.stack.trap("ZREM", "kill")
    first = run.record_late.delay(0)
    assert run.results([first]) == [0]
    assert run.until(lambda: run.stack.sent["ZREM"] == 1)
    later = [run.record.apply_async((n,), ignore_result=True) for n in (1, 2)]
    assert len(later) == 2
    # kombu's poll interval is 0.2 s: five of them without a BRPOP is a stalled worker
    time.sleep(1.0)
    assert run.executions == {0: 1}
    assert run.queued() == 2 and run.unacked() == 1
    assert run.stack.sent["ZREM"] == 1 and run.stack.sent["BRPOP"] == 1
    assert run.worker_alive() and not run.worker_waiting()


@pytest.mark.parametrize("order", ["baseline", "contrib_first"])
def test_a_result_store_under_a_fault_is_repeated_only_by_celery(runs: Any, order: str) -> None:
    """The worker's MULTI SETEX PUBLISH EXEC is killed: not applied. Celery's backend
    retries it; we add no attempt (a transaction): two sends, the result arrives, the task
    ran once, and the worker consumes on. (SIGSTOP here also stops the producer's own reads
    of the result, in both stacks alike, so its outcome is a race, not a property.)"""
    run = runs(order)
    run.start_worker()
    run.stack.trap("SETEX", "kill")
    assert run.results([run.record.delay(1)]) == [1]
    assert run.stack.sent["SETEX"] == 2
    assert run.results([run.record.delay(2)]) == [2]
    assert run.executions == {1: 1, 2: 1}
    if run.stack.instrumented:
        (failed,) = _recovery_spans(run.stack, "SETEX PUBLISH")
        assert failed["otel_recovery.retry.disallowed"] == "transaction"


# -- a longer outage: the circuit ----------------------------------------------------------

OUTAGE = {"breaker_window": 4, "breaker_minimum_calls": 2, "breaker_open_seconds": 30.0}
AFTER_OUTAGE = 6.0
"""Bound on the worker's consuming again after the outage: Celery's consumer retries its
connection 2 s after a failure (measured ~2 s without us)."""


def _cause(error: BaseException | None) -> BaseException | None:
    """What kombu's ``OperationalError`` wraps (it raises it from the client's error)."""
    seen = error
    while seen is not None and isinstance(seen, OperationalError):
        seen = seen.__cause__ or seen.__context__
    return seen


def _publish_during_outage(run: CeleryRun, n: int) -> tuple[BaseException | None, str]:
    """One publish while the server is down (``ignore_result``: no result subscription,
    whose own reconnect loop takes 20 tries): what it raised, and the circuit's state."""
    started = time.monotonic()
    try:
        run.record.apply_async((n,), ignore_result=True)
        raised: BaseException | None = None
    except Exception as error:
        raised = error
    assert time.monotonic() - started < PUBLISH_BOUND
    breaker = run.stack.breaker()
    return raised, ("closed" if breaker is None else str(breaker.snapshot().state.value))


@pytest.mark.parametrize("order", ["baseline", "contrib_first"])  # 6 s a stack
def test_the_circuit_opens_in_an_outage_and_the_worker_consumes_after(
    runs: Any, order: str
) -> None:
    """The server is down (killed) while the worker waits and the producer publishes.
    Without us each publish raises kombu's ``OperationalError`` after its retries, and the
    worker's consumer keeps reconnecting until the server is back, then consumes. With us,
    the failures open the circuit for the server (one breaker for broker and backend):
    publishes are then refused at once, as kombu's ``OperationalError`` too, since our
    refusal is a ``redis.ConnectionError`` (``RedisCircuitOpenError``). The worker's consumer
    meets the open circuit the same way and keeps reconnecting: a plain
    ``CircuitOpenError`` stopped it for good. When the server is back and the circuit's open
    time has passed, a probe closes it, and the worker must consume what is published then,
    as without us."""
    clock = FakeClock()
    run = runs(order, clock=clock, **OUTAGE) if order != "baseline" else runs(order)
    run.start_worker()
    assert run.results([run.record.delay(0)]) == [0]
    run.wait_until_waiting()
    server = run.stack.server
    server.crash()
    try:
        outcomes = [_publish_during_outage(run, n) for n in (1, 2)]
    finally:
        server.start_again()
    assert all(isinstance(raised, OperationalError) for raised, _ in outcomes), outcomes
    breaker = run.stack.breaker()
    if breaker is not None:
        assert breaker.snapshot().state.value == "open"
        refused, state = outcomes[-1]
        assert state == "open" and isinstance(_cause(refused), RedisCircuitOpenError), refused
        rejected = breaker.snapshot().not_permitted_calls
        # the worker's consumer reconnects on its own schedule (2 s): let it meet the
        # open circuit, as a worker would while the circuit waits out its open time
        assert run.until(lambda: breaker.snapshot().not_permitted_calls > rejected, 8)
        clock.advance(OUTAGE["breaker_open_seconds"] + 1)
    sent = [run.record.apply_async((n,)) for n in (10, 11, 12)]
    assert run.until(lambda: _ran(run, [10, 11, 12]), AFTER_OUTAGE), (
        f"the worker stopped consuming (alive: {run.worker_alive()})"
    )
    assert run.executions == {0: 1, 10: 1, 11: 1, 12: 1}
    assert all(run.until(lambda r=r: run.stored(r)) for r in sent)  # no result lost
    assert run.worker_alive()
    if breaker is not None:
        assert breaker.snapshot().state.value == "closed"
