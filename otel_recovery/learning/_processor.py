"""``AnomalySpanProcessor``: per-dependency call, error and latency series from finished spans.

Cost model. ``on_end`` runs on the application's thread for every span, so it does one thing:
append the span to a lock-free deque (or count it as dropped when ``max_pending`` spans are
already waiting). Everything else happens on one worker thread, every ``flush_interval``:
grouping spans into series, closing buckets, updating detectors (and their amortised statsmodels
refits), publishing events. ``on_end`` therefore never waits for a model fit, a lock held by the
worker, or I/O.

Series. Spans are grouped by ``SeriesKey(service, server address, operation group)``; which
spans count and how they are grouped is in :mod:`._series`. A span is an error when its status
is ERROR or it carries ``error.type``. At most ``max_series`` series are tracked: a new one
evicts the least recently used series if that one has been idle ``idle_buckets`` buckets,
otherwise its spans are counted in one overflow series without detectors (``overflow_spans``).

Buckets. A span belongs to the bucket of its end time (``bucket`` seconds, default 10). A bucket
closes once the clock has passed its end by ``grace`` seconds; a span for an already closed
bucket is counted in the open one, so no call is lost or counted twice. A bucket with no calls is
a gap, not a zero: "nobody called" is not evidence about the dependency. The processor's clock
is the reference for "now": a span ending more than ``bucket + grace`` seconds after it (stamped
during a wall-clock step forward) is counted in the current bucket (``future_spans``) rather than
opening a bucket that would not close until the clock got there, and when the clock steps back
the series whose open bucket lies that far ahead are closed and go on from the current bucket.

Probes. A span started inside :func:`~otel_recovery.instrumentors.suppress_recovery` (a
readiness check, redis-py's MultiDB health checks) is left out of every series and counted in
``suppressed_spans``: such a probe calls a server whatever the application is doing, often one
the application has stopped using, so its errors would raise that server's error rate (and,
through :class:`~otel_recovery.learning.AdaptiveThresholds`, tighten its breaker) with no
application call failing. Which spans were started there is known only in ``on_start`` (the
finished span carries no context), so it keeps their span ids until ``on_end`` takes them.

Anomalies. Each closed bucket updates the series' three detectors (error rate, log mean
latency, calls), and :mod:`._anomaly_verdicts` turns their scores into onsets and ends
(``threshold`` and ``confirm``, ``release`` and ``recover``), told on
:attr:`AnomalySpanProcessor.bus`, the ``otel_recovery.anomalies`` counter, the log and an
``otel_recovery.anomaly`` event on the series' next span (matched on the attributes the span
has at start). An anomaly needs evidence to last: when its series has had no calls for
``reconfirm`` seconds, is evicted, or the processor shuts down, it ends (``active=False`` on
the bus with ``score`` 0 and NaN ``value`` and ``expected``), so subscribers relax what it
tightened. Every :meth:`~AnomalySpanProcessor.process` (each ``flush_interval``) also calls
:meth:`AnomalyBus.tick`, which lets :class:`~otel_recovery.learning.AdaptiveThresholds` expire
tightenings nobody reconfirmed (``max_tightened``) without a call on any request path.

This module is the series and their buckets. The worker thread's life (starting it, again in
a forked child; answering flushes; shutdown) is mixed in from ``_processor_worker``, and the
detectors a series gets by default are made in ``_series_detectors``.
"""

from __future__ import annotations

import contextlib
import logging
import math
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable

from opentelemetry.context import Context
from opentelemetry.metrics import MeterProvider, get_meter
from opentelemetry.sdk.trace import ReadableSpan, Span, SpanProcessor
from opentelemetry.trace import StatusCode

from otel_recovery import __about__
from otel_recovery._clock import Clock, Duration, clock_or_default, to_seconds
from otel_recovery._forksafe import new_lock, reset_in_child
from otel_recovery._mixins import plain_self
from otel_recovery.instrumentors._suppression import RECOVERY_OFF_KEY, read_context
from otel_recovery.learning._anomaly_verdicts import Verdicts, event_attributes
from otel_recovery.learning._detector import StreamingDetector
from otel_recovery.learning._error_rate import ErrorRateDetector
from otel_recovery.learning._events import AnomalyBus, SeriesKey
from otel_recovery.learning._processor_worker import ProcessorWorker, greenlets
from otel_recovery.learning._series import (
    OVERFLOW,
    Series,
    default_include,
    key_fields,
    series_key,
)
from otel_recovery.learning._series_detectors import default_factories
from otel_recovery.telemetry import attributes as names

__all__ = ["AnomalySpanProcessor", "series_key"]

_log = logging.getLogger("otel_recovery")
_MAX_OPEN_PROBES = 10_000
"""Probe spans remembered between their start and end; a span never ended is forgotten
once this many are open, so a leak of the application's cannot grow the processor."""


class AnomalySpanProcessor(ProcessorWorker, SpanProcessor):
    """Feeds anomaly detectors from finished spans; see the module docstring."""

    def __init__(
        self,
        *,
        service: str | None = None,
        bucket: Duration = 10.0,
        max_series: int = 1000,
        idle_buckets: int = 360,
        threshold: float = 0.6,
        release: float = 0.4,
        confirm: int = 2,
        recover: int = 3,
        grace: Duration = 2.0,
        reconfirm: Duration = 300.0,
        flush_interval: Duration = 1.0,
        max_pending: int = 100_000,
        clock: Clock | None = None,
        bus: AnomalyBus | None = None,
        meter_provider: MeterProvider | None = None,
        detector_factory: Callable[[], StreamingDetector] | None = None,
        error_rate_factory: Callable[[], ErrorRateDetector] | None = None,
        include: Callable[[ReadableSpan], bool] | None = None,
        start_worker: bool = True,
    ) -> None:
        self._bucket = to_seconds(bucket, "bucket")
        if self._bucket <= 0:
            raise ValueError("bucket must be > 0 seconds")
        for setting, value in (
            ("max_series", max_series),
            ("max_pending", max_pending),
            ("confirm", confirm),
            ("recover", recover),
            ("idle_buckets", idle_buckets),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{setting} must be an int >= 1, got {value!r}")
        for setting, number in (("threshold", threshold), ("release", release)):
            if isinstance(number, bool) or not isinstance(number, (int, float)):
                raise TypeError(f"{setting} must be a number in [0, 1], got {number!r}")
        if not 0.0 <= release <= threshold <= 1.0:  # NaN fails this too
            raise ValueError(
                f"need 0 <= release <= threshold <= 1, got release={release!r}, "
                f"threshold={threshold!r}"
            )
        self._grace = to_seconds(grace, "grace")
        self._reconfirm = to_seconds(reconfirm, "reconfirm", allow_inf=True)
        self._interval = to_seconds(flush_interval, "flush_interval")
        if self._interval <= 0:  # the worker would spin, a core's worth of polling
            raise ValueError(f"flush_interval must be > 0 seconds, got {flush_interval!r}")
        if self._reconfirm <= 0:  # every anomaly would end the moment it began
            raise ValueError(f"reconfirm must be > 0 seconds, got {reconfirm!r}")
        self._service = service
        self._max_series = max_series
        self._idle = idle_buckets
        self._max_pending = max_pending
        self._clock = clock_or_default(clock)
        self.bus = bus if bus is not None else AnomalyBus()
        if detector_factory is None:
            detector_factory, calls_factory = default_factories()
            self._calls_factory: Callable[[], StreamingDetector] | None = calls_factory
        else:
            self._calls_factory = None  # the application's factory makes both

        self._detector_factory = detector_factory
        self._error_factory = error_rate_factory or ErrorRateDetector
        self._include = include or default_include
        counter = get_meter("otel_recovery", __about__.VERSION, meter_provider).create_counter(
            names.METRIC_ANOMALIES,
            unit="{anomaly}",
            description="Anomaly onsets detected in dependency call series.",
        )
        self._verdicts = Verdicts(
            threshold=threshold,
            release=release,
            confirm=confirm,
            recover=recover,
            reconfirm=self._reconfirm,
            bus=self.bus,
            counter=counter,
        )
        # Built once gevent has patched (app code in a ``gunicorn -k gevent`` worker), the
        # worker is a greenlet on the hub's thread: scoring a bucket refits a statsmodels
        # model per series, tens of ms each, and a bucket of 40 series stopped every other
        # greenlet for 2 s. It then yields after each series (_close). Built before the
        # patch, its locks are real ones, which a greenlet must never hold across a switch,
        # and its worker a real thread: it never yields.
        self._yields = greenlets()
        self._pending: deque[ReadableSpan] = deque()
        self._series: OrderedDict[tuple[str, str, str], Series] = OrderedDict()
        self._overflow: dict[str, Series] = {}
        self._annotations = self._verdicts.annotations  # read without a lock by on_start
        self._process_lock = new_lock()
        self._latest = 0  # newest bucket index seen
        self._resource: object = None
        self._resource_service = ""
        self.dropped = 0
        self.overflow_spans = 0
        self.future_spans = 0
        self.suppressed_spans = 0
        # ids of spans started under suppress_recovery() that have not ended yet (an ordered
        # set: add and take are single dict operations; only forgetting the oldest locks)
        self._probes: dict[int, None] = {}
        self._probes_lock = new_lock()
        self._failed = False
        self._stop = threading.Event()
        self._wake = threading.Event()  # a flush asked for, or shutdown
        self._flushes: deque[threading.Event] = deque()  # each set once its spans are in
        self._shut = False
        self._flush_lock = new_lock()  # a flush is queued before shutdown, or not at all
        self._worker: threading.Thread | None = None
        if start_worker:
            self._start_worker()
        reset_in_child(self)

    @property
    def threshold(self) -> float:
        """The score a bucket needs to count towards an onset (see :mod:`._anomaly_verdicts`)."""
        return self._verdicts.threshold

    @threshold.setter
    def threshold(self, value: float) -> None:
        self._verdicts.threshold = value

    @property
    def release(self) -> float:
        """The score below which a bucket counts towards an anomaly's end."""
        return self._verdicts.release

    @release.setter
    def release(self, value: float) -> None:
        self._verdicts.release = value

    # ------------------------------------------------------------ SpanProcessor

    def on_start(self, span: Span, parent_context: Context | None = None) -> None:
        """Note a probe's span (see the module docstring), or mark the next call of a series
        that just turned anomalous (free when none did)."""
        if read_context().get(RECOVERY_OFF_KEY) or (
            parent_context is not None and parent_context.get(RECOVERY_OFF_KEY)
        ):
            self._note_probe(span)
            return
        if not self._annotations:
            return
        try:
            key = series_key(span.name, span.attributes or {}, self._service_of(span))
            for event in self._verdicts.take(key) or ():
                span.add_event(names.EVENT_ANOMALY, event_attributes(event))
        except Exception:  # never break the application's span
            _log.debug("anomaly annotation failed", exc_info=True)

    def on_end(self, span: ReadableSpan) -> None:
        """O(1) and lock-free: hand the span to the worker (none once shut down: nothing
        would ever take it, and the queue would hold it for the process's life)."""
        if self._shut:
            return
        if self._probes and self._was_probe(span):
            return
        pending = self._pending
        if len(pending) < self._max_pending:
            pending.append(span)
        else:
            self.dropped += 1

    def _note_probe(self, span: Span) -> None:
        probes = self._probes
        if len(probes) >= _MAX_OPEN_PROBES:  # spans that never ended: forget the oldest
            # an on_end may take one meanwhile: then there is room already
            with self._probes_lock, contextlib.suppress(RuntimeError, StopIteration, KeyError):
                del probes[next(iter(probes))]
        probes[span.get_span_context().span_id] = None

    def _was_probe(self, span: ReadableSpan) -> bool:
        """Whether ``span`` is a probe's, forgetting it (one dict operation: no lock)."""
        context = span.context
        if context is None or self._probes.pop(context.span_id, 0) is not None:
            return False
        self.suppressed_spans += 1
        return True

    # ------------------------------------------------------------ worker side

    def process(self) -> int:
        """Drain finished spans into their series, then close every bucket that is due.

        Called by the worker; tests (with ``start_worker=False``) call it directly. Returns the
        number of spans taken from the queue.
        """
        with self._process_lock:
            taken = self._drain(self._clock.wall())
            self._close_due(self._clock.wall())
            self.bus.tick()
            return taken

    def _drain(self, now: float) -> int:
        pending = self._pending
        taken = 0
        width = self._bucket
        # Beyond this bucket a span's end is not plausible (see the module docstring).
        limit = int((now + width + self._grace) // width)
        current = int(now // width)
        while True:
            try:
                span = pending.popleft()
            except IndexError:
                return taken
            taken += 1
            try:
                if not self._include(span):
                    continue
                attrs = span.attributes or {}
                end = span.end_time or 0
                index = int(end / 1e9 // width)
                if index > limit:
                    index = current
                    self.future_spans += 1
                self._latest = max(self._latest, index)  # before the lookup: idleness needs it
                series = self._lookup(key_fields(span.name, attrs, self._service_of(span)))
                if series.bucket < 0:
                    series.bucket = index
                elif index > series.bucket:
                    self._close(series)
                    series.bucket = index
                # a span of an already closed bucket is counted in the open one
                series.calls += 1
                failed = span.status.status_code is StatusCode.ERROR or "error.type" in attrs
                if failed:
                    series.errors += 1
                start = span.start_time or end
                series.latency += max(0, end - start) / 1e9
            except Exception:
                _log.debug("span skipped by the anomaly processor", exc_info=True)

    def _service_of(self, span: ReadableSpan) -> str:
        if self._service is not None:
            return self._service
        resource = span.resource
        if resource is self._resource:  # spans of one provider share one resource
            return self._resource_service
        name = resource.attributes.get("service.name") if resource is not None else None
        service = str(name) if name else "unknown_service"
        self._resource, self._resource_service = resource, service
        return service

    def _lookup(self, fields: tuple[str, str, str]) -> Series:
        series = self._series.get(fields)
        if series is not None:
            self._series.move_to_end(fields)
            return series
        if len(self._series) >= self._max_series:
            oldest_fields, oldest = next(iter(self._series.items()))
            if self._latest - max(oldest.bucket, oldest.last_bucket) < self._idle:
                self.overflow_spans += 1
                spill = self._overflow.get(fields[0])
                if spill is None:
                    spill = Series(SeriesKey(fields[0], OVERFLOW, OVERFLOW), None, None)
                    self._overflow[fields[0]] = spill
                return spill
            self._close(oldest)
            del self._series[oldest_fields]
            self._verdicts.end(oldest, "series evicted", self._clock.wall())
            self._verdicts.forget(oldest.key)
        series = Series(
            SeriesKey(*fields), self._detector_factory, self._error_factory, self._calls_factory
        )
        self._series[fields] = series
        return series

    def _close_due(self, now: float) -> None:
        width = self._bucket
        due = int((now - self._grace) // width)  # buckets with index < due are over
        ahead = int((now + width + self._grace) // width)
        forever = self._reconfirm == math.inf
        quiet = -1 if forever else int((now - self._reconfirm) // width)
        if self._latest > ahead:  # the wall clock stepped back
            self._latest = int(now // width)
        for series in list(self._series.values()) + list(self._overflow.values()):
            if 0 <= series.bucket < due and series.calls:
                self._close(series)
            elif series.bucket > ahead:
                # The wall clock stepped back: this bucket would stay open until the clock
                # caught up with it. Close it now and go on from the current bucket.
                self._close(series)
                series.bucket = series.last_bucket = int(now // width)
            elif 0 <= series.bucket < quiet and not series.calls:
                self._verdicts.end(series, f"no calls for {self._reconfirm:.0f}s", now)
        self._verdicts.expire(now)

    def _close(self, series: Series) -> None:
        """Score the open bucket of ``series`` and reset it."""
        calls, errors, latency = series.calls, series.errors, series.latency
        at = (series.bucket + 1) * self._bucket
        series.total_calls += calls
        series.total_errors += errors
        series.last_bucket = series.bucket
        series.calls = series.errors = 0
        series.latency = 0.0
        if calls == 0 or series.error_detector is None:
            return
        try:
            self._verdicts.judge(series, calls, errors, latency, at)
        except Exception:  # a detector bug must not stop counting; say so once
            if not self._failed:
                self._failed = True
                _log.exception("otel_recovery anomaly detector failed (logged once)")
        if self._yields:
            time.sleep(0)  # gevent's: the hub's other greenlets run (see __init__)

    # ------------------------------------------------------------ inspection

    def series(self) -> dict[SeriesKey, tuple[int, int]]:
        """(calls, errors) counted so far per series, closed and open buckets included."""
        with self._process_lock:
            out = {
                s.key: (s.total_calls + s.calls, s.total_errors + s.errors)
                for s in self._series.values()
            }
            for spill in self._overflow.values():
                out[spill.key] = (
                    spill.total_calls + spill.calls,
                    spill.total_errors + spill.errors,
                )
            return out

    def active(self) -> list[tuple[SeriesKey, str]]:
        """Signals currently anomalous."""
        with self._process_lock:
            return [
                (s.key, signal.name)
                for s in self._series.values()
                for signal in s.signals
                if signal.active
            ]


plain_self(AnomalySpanProcessor)
