"""From a closed bucket's readings to anomaly onsets and ends, and telling each one.

The span processor (:mod:`._processor`) groups spans into series and closes their buckets;
this module judges what a closed bucket means. Each series has three signals, each with its
detector: the error rate (upward only), the log of the mean latency (upward only: a faster
dependency is nobody's problem) and the number of calls (both ways). A signal turns
anomalous after ``confirm`` consecutive buckets scoring at least ``threshold`` (the error
rate after one: its score is already a calibrated significance) and normal again after
``recover`` buckets below ``release``; the gap between the two levels keeps a score that
hovers near one of them from flapping.

An onset is told four ways: the :class:`~otel_recovery.learning.AnomalyBus` (which
``AdaptiveThresholds`` listens to), the ``otel_recovery.anomalies`` counter, one warning log
line, and an ``otel_recovery.anomaly`` span event on the next call of that series that starts
(an *annotation*, waiting here: at most six per series, for at most ``reconfirm`` seconds).
While an anomaly lasts the bus hears it again every ``reconfirm`` seconds, so a subscriber
that expires stale tightenings keeps this one; when its evidence stops (no calls, eviction,
shutdown) it is ended with ``score`` 0 and NaN value and expectation.
"""

from __future__ import annotations

import logging
import math
from typing import Any

from opentelemetry.metrics import Counter

from otel_recovery._forksafe import new_lock
from otel_recovery.learning._events import AnomalyBus, AnomalyEvent, SeriesKey
from otel_recovery.learning._series import Series, Signal
from otel_recovery.telemetry import attributes as names

__all__ = ["MAX_ANNOTATIONS", "Verdicts", "event_attributes"]

_log = logging.getLogger("otel_recovery")

MAX_ANNOTATIONS = 6
"""Span events kept per series for its next call: an onset and an end for each signal."""


class Verdicts:
    """The onset and end rules of every signal, and the annotations waiting for a call.

    ``judge`` and ``end`` run on the processor's worker under its process lock; the
    annotations are also read by ``take`` on the application's threads (a span starting),
    hence their own lock.
    """

    __slots__ = (
        "annotation_lock",
        "annotations",
        "bus",
        "confirm",
        "counter",
        "reconfirm",
        "recover",
        "release",
        "threshold",
    )

    def __init__(
        self,
        *,
        threshold: float,
        release: float,
        confirm: int,
        recover: int,
        reconfirm: float,
        bus: AnomalyBus,
        counter: Counter,
    ) -> None:
        self.threshold = threshold
        self.release = release
        self.confirm = confirm
        self.recover = recover
        self.reconfirm = reconfirm
        self.bus = bus
        self.counter = counter
        self.annotations: dict[SeriesKey, list[AnomalyEvent]] = {}
        self.annotation_lock = new_lock()

    def judge(self, series: Series, calls: int, errors: int, latency: float, at: float) -> None:
        """Update the three detectors of ``series`` with one closed bucket (``calls`` > 0,
        ``errors`` of them failed, ``latency`` seconds in all) and step each signal."""
        assert series.error_detector is not None
        assert series.latency_detector is not None and series.calls_detector is not None
        error_score = series.error_detector.update(errors, calls, at)
        error_est = series.error_detector.last
        mean_latency = latency / calls
        log_latency = math.log(max(mean_latency, 1e-9))  # latency varies by factors, not terms
        series.latency_detector.update(log_latency, at)
        latency_est = series.latency_detector.last
        # Only slower than expected is a problem for the callers; faster is good news.
        latency_score = latency_est.raw_score if log_latency > latency_est.expected else 0.0
        series.calls_detector.update(float(calls), at)
        calls_est = series.calls_detector.last
        readings = (
            (error_score, errors / calls, error_est.expected, 1),
            (latency_score, mean_latency, math.exp(latency_est.expected), self.confirm),
            (calls_est.raw_score, float(calls), calls_est.expected, self.confirm),
        )
        for signal, (score, value, expected, confirm) in zip(series.signals, readings, strict=True):
            self._step(series.key, signal, score, value, expected, confirm, at)

    def _step(
        self,
        key: SeriesKey,
        signal: Signal,
        score: float,
        value: float,
        expected: float,
        confirm: int,
        at: float,
    ) -> None:
        if not signal.active:
            signal.streak = signal.streak + 1 if score >= self.threshold else 0
            if signal.streak >= confirm:
                signal.active, signal.streak, signal.calm = True, 0, 0
                self._emit(AnomalyEvent(key, signal.name, score, value, expected, at, True))
                signal.published = at
        else:
            signal.calm = signal.calm + 1 if score < self.release else 0
            if signal.calm >= self.recover:
                signal.active, signal.streak, signal.calm = False, 0, 0
                self._emit(AnomalyEvent(key, signal.name, score, value, expected, at, False))
            elif at - signal.published >= self.reconfirm:
                # Still anomalous: tell subscribers again (bus only), so a subscriber that
                # expires stale tightenings keeps holding this one.
                signal.published = at
                self.bus.publish(AnomalyEvent(key, signal.name, score, value, expected, at, True))

    def _emit(self, event: AnomalyEvent) -> None:
        key = event.key
        if event.active:
            self.counter.add(
                1,
                {
                    names.ANOMALY_SERVICE: key.service,
                    names.SERVER_ADDRESS: key.server_address,
                    names.ANOMALY_OPERATION: key.operation,
                    names.ANOMALY_SIGNAL: event.signal,
                },
            )
            _log.warning(
                "anomaly: %s -> %s %s: %s %.4g, expected %.4g (score %.2f)",
                key.service,
                key.server_address or "-",
                key.operation,
                event.signal,
                event.value,
                event.expected,
                event.score,
            )
        else:
            _log.info(
                "anomaly over: %s -> %s %s: %s back to normal",
                key.service,
                key.server_address or "-",
                key.operation,
                event.signal,
            )
        with self.annotation_lock:
            pending = self.annotations.setdefault(key, [])
            pending.append(event)
            if len(pending) > MAX_ANNOTATIONS:
                del pending[0]
        self.bus.publish(event)

    def end(self, series: Series, why: str, at: float) -> None:
        """End the active anomalies of ``series`` for lack of evidence (bus and log only)."""
        for signal in series.signals:
            if not signal.active:
                continue
            signal.active, signal.streak, signal.calm = False, 0, 0
            key = series.key
            _log.info(
                "anomaly over: %s -> %s %s: %s unknown (%s)",
                key.service,
                key.server_address or "-",
                key.operation,
                signal.name,
                why,
            )
            self.bus.publish(AnomalyEvent(key, signal.name, 0.0, math.nan, math.nan, at, False))

    # -- annotations: the span events waiting for a series' next call ---------------------------

    def take(self, key: SeriesKey) -> list[AnomalyEvent] | None:
        """The events waiting for the call of ``key`` that starts now (they are its own)."""
        with self.annotation_lock:
            return self.annotations.pop(key, None)

    def forget(self, key: SeriesKey) -> None:
        """``key``'s series was evicted: its events will not find a call."""
        with self.annotation_lock:
            self.annotations.pop(key, None)

    def expire(self, now: float) -> None:
        """Drop the events of series whose newest one is older than ``reconfirm``."""
        if not self.annotations or self.reconfirm == math.inf:
            return
        stale = now - self.reconfirm
        with self.annotation_lock:
            for key in [k for k, events in self.annotations.items() if events[-1].at < stale]:
                del self.annotations[key]

    def clear(self) -> None:
        with self.annotation_lock:
            self.annotations.clear()


def event_attributes(event: AnomalyEvent) -> dict[str, Any]:
    """The attributes of the ``otel_recovery.anomaly`` span event telling ``event``."""
    return {
        names.ANOMALY_SIGNAL: event.signal,
        names.ANOMALY_ACTIVE: event.active,
        names.ANOMALY_SCORE: round(event.score, 4),
        names.ANOMALY_VALUE: event.value,
        names.ANOMALY_EXPECTED: event.expected,
        names.SERVER_ADDRESS: event.key.server_address,
        names.ANOMALY_OPERATION: event.key.operation,
    }
