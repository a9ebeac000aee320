"""Redis as a job queue and coordination service, under real faults, with and without us.

Services use Redis for more than GET/SET: RQ's queues and registries, blocking pops,
streams, pub/sub, redis-py's ``Lock``, Lua scripts and ``WATCH`` transactions. Each of them
has its own idea of what happens after a failure (RQ's worker sleeps and dequeues again, a
subscriber reconnects and resubscribes, a script that met ``NOSCRIPT`` is loaded and sent
again, ``transaction()`` loops on ``WatchError``), and our layer sits beneath all of them.
Our rules: only reads and state-idempotent writes are repeated, never inside MULTI/EXEC; a
Redis error reply (``NOSCRIPT``, ``WatchError``, a lock that is no longer ours) is an answer
and does not count on the breaker. So these tests assert, against a private redis-server
with CLIENT KILL, CLIENT PAUSE and SIGSTOP at chosen moments (``redis_queues.Trap``), that
every pop, push, publish and script runs exactly as often as with redis-py alone
(``baseline``), counting the commands sent and the effects left in Redis.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import time
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from instrumentors.test_redis import events
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import LockNotOwnedError
from redis.exceptions import TimeoutError as RedisTimeoutError
from rq import Queue, SimpleWorker, get_current_job

from integrations.redis_queues import (
    STACKS,
    STOP_SECONDS,
    Stack,
    client_id_of,
    kill_when_blocked,
)

pytestmark = pytest.mark.server

INSTRUMENTED = [s for s in STACKS if s != "baseline"]


# -- RQ 3: enqueue, and a SimpleWorker in burst mode in this process ----------------------


def record(key: str, n: int) -> int:
    """The job: one side effect per run, pushed by the worker's own connection."""
    job = get_current_job()
    assert job is not None
    job.connection.rpush(key, n)
    return n


_RQ_LOGGERS = ("rq.worker", "rq.job")
_SIGNALS = (signal.SIGINT, signal.SIGTERM)


@contextlib.contextmanager
def _rq_leaves_the_process_alone() -> Iterator[None]:
    """RQ's ``work()`` is made for a process of its own: it installs SIGINT/SIGTERM handlers
    (in pytest a CI cancel would only ask the burst worker to stop) and stream handlers on
    its loggers, with ``propagate=False``. Put all of that back as it was."""
    handlers = {number: signal.getsignal(number) for number in _SIGNALS}
    loggers = {name: logging.getLogger(name) for name in _RQ_LOGGERS}
    saved = {
        name: (list(logger.handlers), logger.propagate, logger.level)
        for name, logger in loggers.items()
    }
    try:
        yield
    finally:
        for number, handler in handlers.items():
            signal.signal(number, handler)
        for name, logger in loggers.items():
            kept, propagate, level = saved[name]
            for added in [h for h in logger.handlers if h not in kept]:
                logger.removeHandler(added)
            logger.propagate = propagate
            logger.setLevel(level)


class RQRun:
    """Three jobs enqueued by a producer client, run by a worker on another client."""

    JOBS = 3

    def __init__(self, stack: Stack) -> None:
        self.stack = stack
        self.producer = stack.connect()
        self.worker_client = stack.connect()
        self.queue = Queue("q", connection=self.producer)
        self.ids: list[str] = []

    def enqueue(self) -> list[BaseException]:
        failures: list[BaseException] = []
        for n in range(self.JOBS):
            try:
                self.ids.append(self.queue.enqueue(record, "side", n).id)
            except (RedisConnectionError, RedisTimeoutError) as error:
                failures.append(error)
        return failures

    def work(self) -> None:
        queue = Queue("q", connection=self.worker_client)
        worker = SimpleWorker([queue], connection=self.worker_client)
        with _rq_leaves_the_process_alone():
            worker._install_signal_handlers = lambda: None  # type: ignore[method-assign]
            worker.work(burst=True)  # RQ logs, sleeps 1 s after a dequeue failure, carries on

    def state(self) -> dict[str, Any]:
        """Where every job is, by the server's data (read without instrumentation)."""
        peek = self.stack.peek
        queued = [i.decode() for i in peek("lrange", "rq:queue:q", 0, -1)]
        intermediate = [i.decode() for i in peek("lrange", "rq:queue:q:intermediate", 0, -1)]
        finished = [i.decode() for i in peek("zrange", "rq:finished:q", 0, -1)]
        failed = [i.decode() for i in peek("zrange", "rq:failed:q", 0, -1)]
        side = sorted(int(v) for v in peek("lrange", "side", 0, -1))
        places = queued + intermediate + finished + failed
        jobs = sorted(k.decode() for k in peek("keys", "rq:job:*"))
        return {
            "side": side,
            "queued": len(queued),
            "intermediate": len(intermediate),
            "finished": len(finished),
            "failed": len(failed),
            "each_job_once": sorted(places) == sorted(set(places)),
            "job_hashes": len(jobs),
        }


@pytest.mark.parametrize("order", STACKS)
def test_rq_baseline_every_job_runs_once(stacks: Any, order: str) -> None:
    run = RQRun(stacks(order))
    assert run.enqueue() == []
    run.work()
    assert run.state() == {
        "side": [0, 1, 2],
        "queued": 0,
        "intermediate": 0,
        "finished": 3,
        "failed": 0,
        "each_job_once": True,
        "job_hashes": 3,
    }


@pytest.mark.parametrize(
    ("order", "fault"), [*(("contrib_first", f) for f in ["kill", "stop"]), ("baseline", "kill")]
)  # the baseline (redis-py alone) once: its behaviour is the premise
def test_rq_enqueue_is_never_repeated(stacks: Any, order: str, fault: str) -> None:
    """Enqueue is one MULTI/EXEC (HSET + RPUSH): killed, it is not applied; stopped, it is
    applied once though the producer saw a timeout. Either way, never twice."""
    stack = stacks(order)
    run = RQRun(stack)
    stack.trap("RPUSH", fault, skip=1)  # the second job's enqueue
    failures = run.enqueue()
    assert [type(f) for f in failures] == [
        RedisConnectionError if fault == "kill" else RedisTimeoutError
    ]
    assert stack.sent["RPUSH"] == 3  # one per job: the failed one was not sent again
    if fault == "stop":
        stack.settle()
    run.work()
    state = run.state()
    assert state["each_job_once"]
    assert state["side"] == ([0, 2] if fault == "kill" else [0, 1, 2])
    assert state["finished"] == (2 if fault == "kill" else 3)
    assert state["job_hashes"] == state["finished"]


@pytest.mark.parametrize("order", ["baseline", "contrib_first"])
@pytest.mark.parametrize("fault", ["kill", "stop", "pause"])
def test_rq_dequeue_lmove_is_never_repeated(stacks: Any, order: str, fault: str) -> None:
    """The worker's LMOVE (queue -> intermediate queue) meets a fault. Killed, it did
    nothing: RQ's dequeue loop waits 1 s and dequeues the job again. Stopped or paused for
    1.5 s, the worker just waits: RQ raises its connection's socket timeout to at least
    ``connection_timeout`` (11 s and more), so no attempt fails and nothing is repeated
    (a worker that gave up would close the connection, which ends the fault at once)."""
    stack = stacks(order)
    run = RQRun(stack)
    assert run.enqueue() == []
    stack.trap("LMOVE", fault, heal_after=STOP_SECONDS)
    run.work()
    assert run.state() == {
        "side": [0, 1, 2],
        "queued": 0,
        "intermediate": 0,
        "finished": 3,
        "failed": 0,
        "each_job_once": True,
        "job_hashes": 3,
    }
    # 3 jobs + the empty one at the end, + the killed one, which did nothing
    assert stack.sent["LMOVE"] == (5 if fault == "kill" else 4)
    assert stack.failed_calls() == (1 if fault == "kill" and stack.instrumented else 0)


@pytest.mark.parametrize("order", ["baseline", "contrib_first", "ours_only"])
def test_rq_job_fetch_after_dequeue_is_recovered_by_us(stacks: Any, order: str) -> None:
    """HGETALL of the job just moved to the intermediate queue fails once. redis-py alone:
    RQ's dequeue loop takes it as a connection failure, sleeps 1 s and dequeues the *next*
    job, leaving this one in the intermediate queue until maintenance. With us the read is
    repeated inside the call and every job runs, once."""
    stack = stacks(order)
    run = RQRun(stack)
    assert run.enqueue() == []
    stack.reset_counts()
    stack.trap("HGETALL", "kill")
    run.work()
    state = run.state()
    assert state["each_job_once"]
    if stack.instrumented:
        assert state["side"] == [0, 1, 2] and state["finished"] == 3
        assert state["intermediate"] == 0
        assert stack.sent["HGETALL"] == 4  # 3 jobs + our one repeat
        assert stack.failed_calls() == 0  # recovered
    else:
        assert state["side"] == [1, 2] and state["intermediate"] == 1
        assert stack.sent["HGETALL"] == 3  # 2 jobs + the failed one


@pytest.mark.parametrize("order", ["baseline", "contrib_first", "ours_only"])
def test_rq_job_success_transaction_killed(stacks: Any, order: str) -> None:
    """The worker's watched MULTI/EXEC that records a success is killed: not ours to
    repeat. redis-py turns the lost EXEC into a WatchError and RQ's loop runs it again."""
    stack = stacks(order)
    run = RQRun(stack)
    assert run.enqueue() == []
    stack.trap("HINCRBY", "kill")
    run.work()
    state = run.state()
    assert state["each_job_once"]
    assert state["side"] == [0, 1, 2]
    assert stack.sent["HINCRBY"] == 4  # RQ's rerun of the transaction, none of ours
    assert (state["finished"], state["failed"], state["job_hashes"]) == (3, 0, 3)


# -- blocking commands --------------------------------------------------------------------


def _seed(admin: Any, command: str) -> None:
    if command == "BZPOPMIN":
        admin.zadd("z", {"a": 1, "b": 2})
    else:
        admin.rpush("l", "a", "b")


def _block(client: redis.Redis, command: str, timeout: float) -> Any:
    if command == "BLPOP":
        return client.blpop(["l"], timeout)
    if command == "BRPOP":
        return client.brpop(["l"], timeout)
    if command == "BLMOVE":
        return client.blmove("l", "dest", timeout, "LEFT", "RIGHT")
    return client.bzpopmin(["z"], timeout)


def _left(stack: Stack, command: str) -> int:
    return int(stack.peek("zcard", "z") if command == "BZPOPMIN" else stack.peek("llen", "l"))


BLOCKING = ["BLPOP", "BRPOP", "BLMOVE", "BZPOPMIN"]


@pytest.mark.parametrize("order", ["baseline", "contrib_first", "ours_only"])
@pytest.mark.parametrize("command", BLOCKING)
def test_a_pop_killed_mid_block_is_not_sent_again(stacks: Any, order: str, command: str) -> None:
    """Killed while blocked on an empty key: redis-py alone raises; so must we, without a
    second pop that would take the element pushed right after the kill."""
    stack = stacks(order)
    client = stack.connect(timeout=5)
    client.ping()
    admin = stack.server.admin()
    stack.reset_counts()
    killer = kill_when_blocked(stack.server, command, then=lambda: _seed(admin, command))
    with pytest.raises(RedisConnectionError):
        _block(client, command, 3)
    killer.join()
    assert stack.sent[command] == 1
    assert _left(stack, command) == 2  # both elements still there
    assert stack.peek("llen", "dest") == 0
    if stack.instrumented:
        assert stack.attempts["execute_command"] == 1
        attrs = stack.span_attributes(command)
        assert attrs["otel_recovery.retry.disallowed"] == "non_idempotent_command"
        assert stack.failed_calls() == 1


@pytest.mark.parametrize(
    ("order", "command"),
    [("baseline", "BLPOP"), *(("contrib_first", c) for c in BLOCKING), ("ours_only", "BLMOVE")],
)
def test_a_pop_whose_reply_is_lost_pops_exactly_once(stacks: Any, order: str, command: str) -> None:
    """The server stops as the pop is sent; the client times out; the server wakes and pops
    one element for a client that is gone. A repeat would pop the second one too."""
    stack = stacks(order)
    client = stack.connect()
    _seed(stack.server.admin(), command)
    stack.reset_counts()
    stack.trap(command, "stop")
    with pytest.raises(RedisTimeoutError):
        _block(client, command, 2)
    stack.settle()
    assert stack.sent[command] == 1
    assert _left(stack, command) == 1
    if command == "BLMOVE":
        assert stack.peek("lrange", "dest", 0, -1) == [b"a"]


@pytest.mark.parametrize("order", ["baseline", *INSTRUMENTED])
def test_xread_block_killed_mid_block_is_retried_by_us(stacks: Any, order: str) -> None:
    """XREAD is a read: killed while blocked, we send it again (it blocks again) and it
    returns the entry added after the kill; redis-py alone raises."""
    stack = stacks(order)
    client = stack.connect(timeout=5)
    client.ping()
    admin = stack.server.admin()
    stack.reset_counts()
    killer = kill_when_blocked(stack.server, "XREAD", then=lambda: admin.xadd("s", {"f": "v"}))
    if not stack.instrumented:
        with pytest.raises(RedisConnectionError):
            client.xread({"s": "0-0"}, block=3000)
        killer.join()
        assert stack.sent["XREAD"] == 1
        return
    started = time.monotonic()
    ((stream, entries),) = client.xread({"s": "0-0"}, block=3000)
    killer.join()
    assert time.monotonic() - started < 2  # the second block ended with the entry
    assert stream == b"s" and entries[0][1] == {b"f": b"v"}
    assert stack.sent["XREAD"] == 2 and stack.attempts["execute_command"] == 2
    attrs = stack.span_attributes("XREAD")
    assert attrs["otel_recovery.outcome"] == "success"
    assert attrs["otel_recovery.retry.attempts"] == 2


@pytest.mark.parametrize("order", ["baseline", "contrib_first"])
def test_xread_block_longer_than_the_socket_timeout(stacks: Any, order: str) -> None:
    """A misconfiguration redis-py reports as a timeout (block 10 s, socket_timeout 1 s):
    still a timeout with us, after each of our attempts met it. (The PING must beat the
    socket timeout on a loaded machine too, which 0.2 s left little margin; a block far
    beyond it costs nothing, as each attempt's connection is closed when it times out.)"""
    stack = stacks(order, max_attempts=3)
    client = stack.connect(timeout=1.0)
    client.ping()
    stack.reset_counts()
    with pytest.raises(RedisTimeoutError):
        client.xread({"s": "0-0"}, block=10_000)
    assert stack.sent["XREAD"] == (3 if stack.instrumented else 1)
    if stack.instrumented:
        attrs = stack.span_attributes("XREAD")
        assert attrs["otel_recovery.retry.stop_reason"] == "attempts_exhausted"


@pytest.mark.parametrize("attempt_timeout", [None, 0.3])
def test_a_sync_blpop_is_not_cut_by_the_attempt_timeout(stacks: Any, attempt_timeout: Any) -> None:
    """Sync attempt limits are cooperative (README "Timeout") and redis-py is not told
    about them: a BLPOP 1 waits its second whatever OTEL_RECOVERY_ATTEMPT_TIMEOUT says."""
    stack = stacks("contrib_first", attempt_timeout=attempt_timeout)
    client = stack.connect(timeout=5)
    admin = stack.server.admin()
    started = time.monotonic()
    stack.server.after(0.6, lambda: admin.rpush("l", "late"))
    assert client.blpop(["l"], 1) == (b"l", b"late")  # only pushed at 0.6 s: not cut at 0.3
    assert time.monotonic() - started > 0.5
    assert stack.failed_calls() == 0 and stack.sent["BLPOP"] == 1


# -- pub/sub ------------------------------------------------------------------------------


SUBSCRIBER = "otelrec-subscriber"


def _read_until(pubsub: Any, wanted: tuple[str, Any], story: list[Any], reads: int = 5) -> None:
    """Read (1 s each) until ``wanted`` arrives, noting every message and exception; an
    empty read (``None``) is not part of the story: only what the application got is."""
    for _ in range(reads):
        try:
            message = pubsub.get_message(timeout=1)
        except Exception as error:  # the app's view: which exception
            story.append(type(error).__name__)
            continue
        if message is not None:
            story.append((message["type"], message["data"]))
            if story[-1] == wanted:
                return
    story.append(("never got", wanted))


def _is_subscriber(row: dict[str, str]) -> bool:
    """The pub/sub connection of the story's client (the only one subscribed, by name)."""
    return row.get("name") == SUBSCRIBER and "P" in row.get("flags", "")


def _subscriber_story(stack: Stack) -> list[Any]:
    """Subscribe, have the subscriber's connection killed, read on until redis-py has
    resubscribed, publish, read on until the message: what the application sees."""
    client = stack.connect(timeout=2, name=SUBSCRIBER)
    pubsub = client.pubsub()
    story: list[Any] = []
    admin = stack.server.admin()
    try:
        pubsub.subscribe("ch")
        _read_until(pubsub, ("subscribe", 1), story)
        subscriber = client_id_of(admin, _is_subscriber)
        admin.execute_command("CLIENT", "KILL", "ID", subscriber)
        _read_until(pubsub, ("subscribe", 1), story)  # redis-py's resubscription
        story.append(("receivers", client.publish("ch", "hello")))
        _read_until(pubsub, ("message", b"hello"), story)
    finally:
        pubsub.close()
        client.close()
        admin.close()
    return story


@pytest.mark.parametrize("order", ["ours_only", "contrib_first"])
def test_a_killed_subscriber_reconnects_as_without_us(stacks: Any, order: str) -> None:
    expected = _subscriber_story(stacks("baseline"))
    assert ("message", b"hello") in expected  # redis-py resubscribed by itself
    stack = stacks(order)
    assert _subscriber_story(stack) == expected
    assert stack.failed_calls() == 0  # pub/sub traffic is not ours to judge


@pytest.mark.parametrize(
    ("order", "fault"), [*(("contrib_first", f) for f in ["kill", "stop"]), ("baseline", "kill")]
)  # the baseline (redis-py alone) once: its behaviour is the premise
def test_publish_is_never_sent_twice(stacks: Any, order: str, fault: str) -> None:
    stack = stacks(order)
    listener = stack.server.admin().pubsub()
    try:
        listener.subscribe("ch")
        assert listener.get_message(timeout=1)["type"] == "subscribe"
        client = stack.connect()
        client.ping()
        stack.reset_counts()
        stack.trap("PUBLISH", fault)
        with pytest.raises(RedisConnectionError if fault == "kill" else RedisTimeoutError):
            client.publish("ch", "once")
        stack.settle()
        received = []
        while (message := listener.get_message(timeout=0.2)) is not None:
            received.append(message["data"])
        assert received == ([] if fault == "kill" else [b"once"])
        assert stack.sent["PUBLISH"] == 1
    finally:
        listener.close()


# -- redis-py Lock -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("order", "fault"),
    [*(("contrib_first", f) for f in ["kill", "stop", "pause"]), ("baseline", "kill")],
)  # the baseline (redis-py alone) once: its behaviour is the premise
def test_lock_acquire_under_a_fault_never_makes_two_holders(
    stacks: Any, order: str, fault: str
) -> None:
    """Acquire is SET NX PX (never repeated by us). Killed or paused, nobody holds the lock;
    stopped, the server took it for a token the caller never learnt: a rival must not get
    it either way it is held, and the caller's own lock object does not own it."""
    stack = stacks(order)
    client = stack.connect()
    mine = client.lock("res", timeout=5, blocking=False)
    stack.trap("SET", fault)
    with pytest.raises(RedisConnectionError if fault == "kill" else RedisTimeoutError):
        mine.acquire()
    stack.settle()
    rival = stack.server.admin().lock("res", timeout=5, blocking=False)
    held_by_ghost = fault == "stop"
    assert rival.acquire() is (not held_by_ghost)
    assert not mine.owned()
    assert stack.sent["SET"] == 1
    assert stack.failed_calls() == (1 if stack.instrumented else 0)


@pytest.mark.parametrize("order", ["baseline", "contrib_first", "ours_only"])
def test_release_of_a_lost_lock_raises_as_without_us(stacks: Any, order: str) -> None:
    stack = stacks(order)
    client = stack.connect()
    mine = client.lock("res", timeout=0.1)
    assert mine.acquire()
    time.sleep(0.15)  # the lock's own expiry is what is under test
    rival = stack.server.admin().lock("res", timeout=5)
    assert rival.acquire(blocking=False)
    with pytest.raises(LockNotOwnedError):
        mine.extend(1)
    with pytest.raises(LockNotOwnedError):
        mine.release()
    assert rival.owned()
    assert stack.failed_calls() == 0  # "not yours" is an answer


@pytest.mark.parametrize(
    ("order", "fault"), [*(("contrib_first", f) for f in ["kill", "stop"]), ("baseline", "kill")]
)  # the baseline (redis-py alone) once: its behaviour is the premise
def test_lock_extend_and_release_under_a_fault(stacks: Any, order: str, fault: str) -> None:
    """Extend and release are Lua scripts (EVALSHA): never repeated. Killed, extend did
    nothing; stopped, it extended once. Release then works (or says the lock is gone) as
    without us."""
    stack = stacks(order)
    client = stack.connect()
    mine = client.lock("res", timeout=2)
    assert mine.acquire() and mine.extend(0.1)  # the extend script is loaded now
    stack.reset_counts()
    stack.trap("EVALSHA", fault)
    with pytest.raises(RedisConnectionError if fault == "kill" else RedisTimeoutError):
        mine.extend(30)
    if fault == "stop":
        stack.settle()
    ttl = stack.peek("pttl", "res")
    assert (ttl > 20_000) is (fault == "stop")  # extended once, or not at all
    assert stack.sent["EVALSHA"] == 1
    mine.release()
    assert stack.peek("exists", "res") == 0


# -- scripts ------------------------------------------------------------------------------

BUMP = "redis.call('INCR', KEYS[1]) return redis.call('GET', KEYS[1])"


@pytest.mark.parametrize("order", STACKS)
def test_a_flushed_script_is_loaded_and_run_once(stacks: Any, order: str) -> None:
    """After SCRIPT FLUSH, redis-py's Script meets NOSCRIPT, loads and sends EVALSHA again:
    the side effect is applied once, and NOSCRIPT is an answer: never retried by us, never
    counted on the breaker. Like every failure it is traced (README "Choices"): the failed
    EVALSHA says ``invalid_request``, and the one that follows is a plain success."""
    stack = stacks(order)
    client = stack.connect()
    bump = client.register_script(BUMP)
    assert bump(keys=["n"]) == b"1"
    stack.server.admin().script_flush()
    stack.reset_counts()
    assert bump(keys=["n"]) == b"2"
    assert stack.peek("get", "n") == b"2"
    assert stack.sent["EVALSHA"] == 2 and stack.sent["SCRIPT"] == 1
    if stack.instrumented:
        breaker = stack.breaker()
        assert breaker is not None
        snapshot = breaker.snapshot()
        assert (snapshot.failed_calls, snapshot.state) == (0, "closed")
    if stack.contrib:
        noscript, rerun = stack.spans_named("EVALSHA")
        assert not events(noscript, "otel_recovery.retry")
        (failed,) = events(noscript, "otel_recovery.attempt.failed")
        assert failed["otel_recovery.error.category"] == "invalid_request"
        assert "otel_recovery.outcome" not in (rerun.attributes or {})
        assert len(stack.spans_named("SCRIPT LOAD")) == 1
    elif stack.instrumented:
        (span,) = stack.spans_named(f"recover redis 127.0.0.1:{stack.server.port}")
        assert (span.attributes or {})["otel_recovery.retry.attempts"] == 1


@pytest.mark.parametrize(
    ("order", "fault"), [*(("contrib_first", f) for f in ["kill", "stop"]), ("baseline", "kill")]
)  # the baseline (redis-py alone) once: its behaviour is the premise
def test_a_script_under_a_fault_runs_at_most_once(stacks: Any, order: str, fault: str) -> None:
    stack = stacks(order)
    client = stack.connect()
    bump = client.register_script(BUMP)
    assert bump(keys=["n"]) == b"1"
    stack.reset_counts()
    stack.trap("EVALSHA", fault)
    with pytest.raises(RedisConnectionError if fault == "kill" else RedisTimeoutError):
        bump(keys=["n"])
    if fault == "stop":
        stack.settle()
    assert stack.peek("get", "n") == (b"1" if fault == "kill" else b"2")
    assert stack.sent["EVALSHA"] == 1


# -- WATCH transactions -------------------------------------------------------------------


@pytest.mark.parametrize("order", STACKS)
def test_transaction_with_a_concurrent_writer_is_applied_once(stacks: Any, order: str) -> None:
    """``Redis.transaction`` repeats ``func`` on WatchError: twice a rival writes under the
    watch, the third run wins. Exactly one +10 lands, and WatchError is not a failure."""
    stack = stacks(order, breaker_window=4, breaker_minimum_calls=2)
    client, rival = stack.connect(), stack.connect()
    client.set("balance", 100)
    runs: list[int] = []

    def deposit(pipe: Any) -> None:
        balance = int(pipe.get("balance"))
        runs.append(balance)
        if len(runs) <= 2:
            rival.incr("balance")  # changes the watched key: this EXEC will be refused
        pipe.multi()
        pipe.set("balance", balance + 10)

    assert client.transaction(deposit, "balance") == [True]
    assert runs == [100, 101, 102]
    assert stack.peek("get", "balance") == b"112"
    assert stack.sent["EXEC"] == 3
    if stack.instrumented:
        breaker = stack.breaker()
        assert breaker is not None
        snapshot = breaker.snapshot()
        assert (snapshot.failed_calls, snapshot.state) == (0, "closed")


@pytest.mark.parametrize("order", ["baseline", "contrib_first"])
@pytest.mark.parametrize("fault", ["kill", "stop"])
def test_transaction_exec_under_a_fault_is_left_to_redis_py(
    stacks: Any, order: str, fault: str
) -> None:
    """redis-py's ``transaction()`` turns a connection error or timeout on a watched EXEC
    into a WatchError (``_disconnect_raise_on_watching``) and runs ``func`` again. Killed,
    the EXEC did nothing and the rerun applies it once; stopped, the EXEC was applied and
    the rerun applies it a second time (redis-py's own behaviour, 120 without us too). We
    add no attempt of our own: exactly redis-py's two EXECs, and the same balance."""
    stack = stacks(order)
    client = stack.connect()
    client.set("balance", 100)
    runs: list[int] = []

    def deposit(pipe: Any) -> None:
        runs.append(int(pipe.get("balance")))
        pipe.multi()
        pipe.incrby("balance", 10)

    stack.reset_counts()
    stack.trap("EXEC", fault)
    assert client.transaction(deposit, "balance") == [110 if fault == "kill" else 120]
    assert runs == ([100, 100] if fault == "kill" else [100, 110])
    assert stack.sent["EXEC"] == 2 and stack.attempts["execute"] == 2
    assert stack.peek("get", "balance") == (b"110" if fault == "kill" else b"120")
    if stack.contrib:
        (failed, _) = stack.spans_named("INCRBY")
        assert (failed.attributes or {})["otel_recovery.retry.disallowed"] == "transaction"
