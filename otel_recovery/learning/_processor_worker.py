"""The anomaly span processor's worker: its thread's life, the flushes it answers, shutdown.

``AnomalySpanProcessor.on_end`` only queues a span; one worker thread does the rest, every
``flush_interval`` or when woken: it calls ``process()`` (spans into series, buckets closed,
detectors updated), then answers the ``force_flush`` calls that were waiting for those spans.
This module is that thread's life: starting it (again in a forked child, which has none),
its loop, answering flushes (:meth:`ProcessorWorker.force_flush` waits at most its timeout,
as a model refit may take longer than a request can spare), and
:meth:`ProcessorWorker.shutdown`, which stops it, aggregates what is left and ends every
active anomaly. Under gevent the worker is a greenlet (:func:`greenlets` says whether it will
be), which the processor makes yield between series.

:class:`ProcessorWorker` is a mixin of ``AnomalySpanProcessor``: it has no state of its own
and works on the processor's (``_Working`` lists what it uses).
"""

from __future__ import annotations

import logging
import threading
import time
import types
from collections import OrderedDict, deque
from typing import Protocol

from otel_recovery._clock import Clock
from otel_recovery.learning._anomaly_verdicts import Verdicts
from otel_recovery.learning._series import Series

__all__ = ["ProcessorWorker", "greenlets"]

_log = logging.getLogger("otel_recovery")


def greenlets() -> bool:
    """Whether gevent (or eventlet) has patched ``time``, hence ``threading``, by now:
    ``time.sleep`` is then no longer the builtin."""
    return not isinstance(time.sleep, types.BuiltinFunctionType)


class _Working(Protocol):
    """The attributes and methods of ``AnomalySpanProcessor`` that :class:`ProcessorWorker`
    uses."""

    _clock: Clock
    _flush_lock: threading.Lock
    _flushes: deque[threading.Event]
    _interval: float
    _process_lock: threading.Lock
    _series: OrderedDict[tuple[str, str, str], Series]
    _shut: bool
    _stop: threading.Event
    _verdicts: Verdicts
    _wake: threading.Event
    _worker: threading.Thread | None

    def process(self) -> int: ...

    def _answer_flushes(self, count: int | None = None) -> None: ...

    def _run(self) -> None: ...

    def _start_worker(self) -> None: ...


class ProcessorWorker:
    """The worker-thread part of ``AnomalySpanProcessor`` (see the module doc)."""

    __slots__ = ()

    # The processor's, which this part assigns: declared for the type checker only.
    _flushes: deque[threading.Event]
    _worker: threading.Thread | None

    def _start_worker(self: _Working) -> None:
        self._worker = threading.Thread(target=self._run, name="otel_recovery-anomaly", daemon=True)
        self._worker.start()

    def _after_fork_in_child(self: _Working) -> None:
        """A forked child has no worker thread: start the child's own, as the SDK's batch span
        processor does (the locks the parent's worker held, ``_process_lock`` for a whole
        ``process()``, are fork-safe: ``otel_recovery._forksafe``). Spans still pending
        were finished before the fork; the child aggregates them too, on top of the parent's
        series it inherited."""
        stopped = self._stop.is_set()
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._flushes = deque()
        if stopped:
            self._stop.set()
        elif self._worker is not None:
            self._start_worker()

    def shutdown(self: _Working) -> None:
        """Stop the worker, aggregate what is pending, and end every active anomaly: nothing
        will reconfirm them, so subscribers should not keep acting on them."""
        with self._flush_lock:
            self._shut = True
        self._stop.set()
        self._wake.set()
        worker = self._worker
        if worker is not None and worker is not threading.current_thread():
            worker.join(timeout=5.0)
        self.process()
        self._answer_flushes()
        with self._process_lock:
            now = self._clock.wall()
            for series in self._series.values():
                self._verdicts.end(series, "anomaly processor shut down", now)
            self._verdicts.clear()

    def force_flush(self: _Working, timeout_millis: int = 30000) -> bool:
        """Aggregate every finished span now (buckets still close on the clock).

        The worker does it, and the caller waits at most ``timeout_millis``: closing a bucket
        refits statsmodels models, which may take longer than the caller (the SDK's
        ``force_flush`` at the end of a request or a serverless invocation) can spare.
        False when the time ran out first. Without a running worker it is done here."""
        worker = self._worker
        done = threading.Event()
        with self._flush_lock:
            queued = not (
                self._shut
                or worker is None
                or not worker.is_alive()
                or worker is threading.current_thread()
            )
            if queued:  # shutdown, if it comes now, answers it
                self._flushes.append(done)
        if not queued:
            self.process()
            return True
        self._wake.set()
        return done.wait(max(timeout_millis, 0) / 1000.0)

    def _run(self: _Working) -> None:
        # The idle wait is an interruptible Event wait, not a time reading: every decision
        # about buckets uses the injected clock.
        while True:
            self._wake.wait(self._interval)
            self._wake.clear()  # before the check: shutdown sets the stop, then the wake
            if self._stop.is_set():
                return  # shutdown processes what is left and answers the flushes
            asked = len(self._flushes)  # those asked before this pass: it takes their spans
            try:
                self.process()
            except Exception:
                _log.exception("otel_recovery anomaly worker failed; continuing")
            self._answer_flushes(asked)

    def _answer_flushes(self: _Working, count: int | None = None) -> None:
        flushes = self._flushes
        for _ in range(len(flushes) if count is None else count):
            try:
                flushes.popleft().set()
            except IndexError:  # a shutdown whose join timed out answered them already
                return
