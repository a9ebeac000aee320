"""Harness for the Celery tests: a real Celery app on a private redis-server, its worker in a
thread of this process, and everything put back afterwards.

A :class:`CeleryRun` is one Celery application (kombu's Redis transport as broker, Celery's
Redis result backend) on a :class:`~integrations.redis_queues.Stack`: redis-py alone, or with
our instrumentor (alone or with contrib's, in either load order). Every Redis connection the
app opens, the producer's, the worker's and the result backend's, is of the stack's trapping
class, so ``stack.sent`` counts each command written to a socket and ``stack.trap(...)`` fires
a real fault (CLIENT KILL, SIGSTOP, CLIENT PAUSE) at the moment a chosen command is sent;
``stack.attempts`` counts calls into redis-py beneath every layer.

The tasks count their own executions in memory (the worker runs in this process), which no
fault on the server can disturb: "ran twice" is read there, "queued twice" in Redis.

Celery is made for a process of its own. What it changes in ours, :meth:`CeleryRun.close`
puts back, every step running even if one fails: the worker is stopped (bounded), every
connection pool the app made is disconnected, the signal handlers, the root and Celery
loggers, the "join will block" flag and the current app are restored.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import kombu.transport.redis
import redis
from celery import Celery, _state
from celery.contrib.testing.worker import TestWorkController
from celery.result import AsyncResult
from celery.worker import state as worker_state
from opentelemetry.instrumentation.utils import suppress_instrumentation

from integrations.redis_queues import Stack

TIMEOUT = 0.4
"""Socket timeout of every client the app makes (broker and result backend), as in the
other queue tests: a SIGSTOP or CLIENT PAUSE of 0.6 s outlasts it."""
GET_TIMEOUT = 10.0
"""Bound on ``AsyncResult.get``: no wait in these tests may hang past it."""
WORKER_BOUND = 10.0
"""Bound on starting or stopping a worker."""
QUEUE = "celery"
_SIGNALS = tuple(s for s in signal.valid_signals() if s not in (signal.SIGKILL, signal.SIGSTOP))
_LOGGERS = ("", "celery", "celery.worker", "celery.app.trace", "celery.redirected", "kombu")


def _handlers() -> dict[int, Any]:
    handlers = {}
    for number in _SIGNALS:
        with contextlib.suppress(ValueError, OSError):
            handlers[number] = signal.getsignal(number)
    return handlers


@contextlib.contextmanager
def celery_leaves_the_process_alone() -> Iterator[None]:
    """Whatever a worker changes in the process (signal handlers, logging handlers and
    levels, the "join will block" flag, the thread's current app, the shutdown flags),
    put back as it was."""
    handlers = _handlers()
    loggers = {name: logging.getLogger(name) for name in _LOGGERS}
    saved = {
        name: (list(lg.handlers), lg.propagate, lg.level, lg.disabled)
        for name, lg in loggers.items()
    }
    will_block = _state.task_join_will_block()
    current = getattr(_state._tls, "current_app", None)
    default = _state.default_app
    try:
        yield
    finally:
        for number, handler in handlers.items():
            if signal.getsignal(number) is not handler and handler is not None:
                signal.signal(number, handler)
        for name, lg in loggers.items():
            kept, propagate, level, disabled = saved[name]
            for added in [h for h in lg.handlers if h not in kept]:
                lg.removeHandler(added)
            lg.propagate, lg.disabled = propagate, disabled
            lg.setLevel(level)
        _state._set_task_join_will_block(will_block)
        _state._tls.current_app = current
        _state.default_app = default
        worker_state.should_stop = None
        worker_state.should_terminate = None


class CeleryRun:
    """One Celery app on the stack's server: tasks ``record`` (acks on receipt, Celery's
    default) and ``record_late`` (``acks_late=True``), both returning their argument and
    counting their executions in :attr:`executions`."""

    def __init__(self, stack: Stack, **conf: Any) -> None:
        self.stack = stack
        self.executions: Counter[int] = Counter()
        self.pools: list[Any] = []
        self.backends: list[Any] = []
        self.worker: Any = None
        self.thread: threading.Thread | None = None
        self.crashed: list[BaseException] = []
        self._steps = contextlib.ExitStack()
        self._steps.enter_context(celery_leaves_the_process_alone())
        trapping = stack._trapping_class(redis.Connection, stack.traps)
        self.url = f"redis://127.0.0.1:{stack.server.port}/0"
        self.app = self._make_app(trapping, conf)
        executions = self.executions

        @self.app.task(name="record", shared=False)
        def record(n: int) -> int:
            executions[n] += 1
            return n

        @self.app.task(name="record_late", shared=False, acks_late=True)
        def record_late(n: int) -> int:
            executions[n] += 1
            return n

        self.record, self.record_late = record, record_late
        self.app.finalize()

    def _owned_pool(self, **params: Any) -> redis.ConnectionPool:
        """Every pool the app makes: counted by the stack, disconnected at close."""
        pool = redis.ConnectionPool(**params)
        self.stack._owners.add(id(pool))
        self.pools.append(pool)
        return pool

    def _make_app(self, trapping: type, conf: dict[str, Any]) -> Celery:
        run = self

        class Channel(kombu.transport.redis.Channel):  # type: ignore[misc]
            connection_class = trapping

            def _get_pool(self, asynchronous: bool = False) -> Any:
                params = self._connparams(asynchronous=asynchronous)
                self.keyprefix_fanout = self.keyprefix_fanout.format(db=params["db"])
                return run._owned_pool(**params)

        class Transport(kombu.transport.redis.Transport):  # type: ignore[misc]
            pass

        Transport.Channel = Channel

        class App(Celery):  # type: ignore[misc]
            def _get_backend(self) -> Any:
                """The result backend is per thread (the producer's, the worker's):
                each one's pool is ours."""
                backend = super()._get_backend()
                backend.connparams["connection_class"] = trapping
                backend._ConnectionPool = run._owned_pool
                run.backends.append(backend)
                return backend

        app = App(f"otelrec-{uuid.uuid4().hex[:8]}", set_as_current=False)
        settings: dict[str, Any] = {
            "broker_url": self.url,
            "broker_transport": Transport,
            # polling_interval is kombu's BRPOP timeout: a worker notices a stop request
            # within it (1 s by default)
            "broker_transport_options": {"socket_timeout": TIMEOUT, "polling_interval": 0.2},
            "broker_connection_retry_on_startup": True,
            "result_backend": self.url,
            "redis_socket_timeout": TIMEOUT,
            "redis_socket_connect_timeout": TIMEOUT,
            "result_expires": 600,
            "worker_hijack_root_logger": False,
            "worker_enable_remote_control": False,  # its pub/sub is not the queue path
            "worker_prefetch_multiplier": 1,
            "task_default_queue": QUEUE,
        }
        settings.update(conf)
        app.conf.update(settings)
        return app

    # -- worker --------------------------------------------------------------------------

    def start_worker(self) -> None:
        """A solo-pool worker in a thread (Celery's own TestWorkController), ready to
        consume; a worker that dies later is seen in :attr:`crashed` and ``worker_alive``."""
        self.worker = TestWorkController(
            app=self.app,
            concurrency=1,
            pool="solo",
            hostname=f"otelrec-{uuid.uuid4().hex[:8]}@localhost",
            loglevel="WARNING",
            ready_callback=None,
            without_heartbeat=True,
            without_mingle=True,
            without_gossip=True,
        )
        worker = self.worker

        def run() -> None:
            self.app.set_current()  # this thread's current app: the worker's request code
            try:
                worker.start()
            except BaseException as error:  # the worker's own loop re-raises nothing else
                self.crashed.append(error)

        self.thread = threading.Thread(target=run, name="celery-worker", daemon=True)
        self.thread.start()
        assert worker._on_started.wait(WORKER_BOUND), "the worker did not start"
        _state._set_task_join_will_block(False)  # this thread is the producer, not a task

    def worker_alive(self) -> bool:
        return self.thread is not None and self.thread.is_alive()

    def stop_worker(self) -> None:
        """Ask the worker to stop (as ``start_worker`` does) and wait, bounded."""
        thread = self.thread
        if thread is None:
            return
        self.thread = None
        worker_state.should_terminate = 0
        try:
            thread.join(WORKER_BOUND)
            assert not thread.is_alive(), "the worker did not stop"
        finally:
            worker_state.should_terminate = None

    # -- producer ------------------------------------------------------------------------

    def results(self, sent: list[AsyncResult], timeout: float = GET_TIMEOUT) -> list[Any]:
        """Every result, each ``get`` bounded; an exception is returned, not raised."""
        got: list[Any] = []
        for result in sent:
            try:
                got.append(result.get(timeout=timeout))
            except Exception as error:
                got.append(error)
        return got

    def until(self, condition: Callable[[], bool], timeout: float = GET_TIMEOUT) -> bool:
        deadline = time.monotonic() + timeout
        while not condition():
            if time.monotonic() > deadline:
                return False
            time.sleep(0.01)
        return True

    # -- the server's view ---------------------------------------------------------------

    def worker_waiting(self) -> bool:
        """Whether the worker is idle in BRPOP on the server: every message it took was
        acknowledged (kombu sends the next BRPOP only then, at prefetch 1)."""
        return any(
            row.get("cmd") == "brpop" and "b" in row.get("flags", "") for row in self.client_rows()
        )

    def wait_until_waiting(self) -> None:
        assert self.until(self.worker_waiting), "the worker never went back to BRPOP"

    def queued(self) -> int:
        return int(self.stack.peek("llen", QUEUE))

    def unacked(self) -> int:
        return int(self.stack.peek("hlen", "unacked"))

    def stored(self, result: AsyncResult) -> bool:
        return bool(self.stack.peek("exists", f"celery-task-meta-{result.id}"))

    def client_rows(self) -> list[dict[str, str]]:
        """CLIENT LIST of the server, the admin connection asking excluded."""
        admin = self.stack.server.admin()
        try:
            with suppress_instrumentation():
                me = admin.client_id()
                rows = admin.client_list()
        finally:
            admin.close()
        return [row for row in rows if int(row["id"]) != me]

    # -- teardown ------------------------------------------------------------------------

    def close(self) -> None:
        """Stop the worker, close every connection the app opened, restore the process;
        every step runs even if one fails (in this order: last registered, first run)."""
        with contextlib.ExitStack() as steps:
            steps.push(self._steps)
            steps.callback(self._disconnect_pools)
            steps.callback(self.app.close)
            for backend in self.backends:
                steps.callback(_close_result_consumer, backend)
            steps.callback(self.stop_worker)

    def _disconnect_pools(self) -> None:
        for pool in self.pools:
            pool.disconnect()


def _close_result_consumer(backend: Any) -> None:
    consumer = getattr(backend, "result_consumer", None)
    if consumer is not None and getattr(consumer, "_pubsub", None) is not None:
        consumer.stop()
        # an AsyncResult collected later unsubscribes through it: with no pub/sub left it
        # does nothing, instead of reconnecting to a server that may be gone by then
        consumer._pubsub = None
