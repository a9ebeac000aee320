"""What anomaly detection tells the rest of the library, and how it is delivered.

The detector side (``learning/anomaly.py``, statsmodels) publishes :class:`AnomalyEvent` s on an
:class:`AnomalyBus`, and ticks it while it runs; subscribers (adaptive thresholds, the metric and
log writers, users) react.
This module imports nothing heavy, so subscribers never pull statsmodels in.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

from otel_recovery._forksafe import new_lock

__all__ = ["SIGNALS", "AnomalyBus", "AnomalyEvent", "SeriesKey"]

_log = logging.getLogger("otel_recovery")


@dataclass(frozen=True, slots=True)
class SeriesKey:
    """One dependency as seen from one service: the unit a baseline is learned for."""

    service: str
    server_address: str
    operation: str


SIGNALS = frozenset({"error_rate", "latency", "calls"})
"""The signals an anomaly event names (:attr:`AnomalyEvent.signal`)."""


@dataclass(frozen=True, slots=True)
class AnomalyEvent:
    """A change of anomaly state of one signal of one series.

    ``active`` is True when the signal becomes (or stays) anomalous and False when it is back
    to normal, so subscribers can tighten and later relax. ``signal`` is ``"error_rate"``,
    ``"latency"`` or ``"calls"``; ``value`` is what was observed and ``expected`` the
    baseline's prediction for the same bucket; ``score`` is in [0, 1]; ``at`` is epoch seconds.
    """

    key: SeriesKey
    signal: str
    score: float
    value: float
    expected: float
    at: float
    active: bool


class AnomalyBus:
    """Fan-out of anomaly events; a failing subscriber is logged and never stops the others."""

    def __init__(self) -> None:
        self._subscribers: list[Callable[[AnomalyEvent], None]] = []
        self._tickers: list[Callable[[], None]] = []
        self._lock = new_lock()

    def subscribe(self, callback: Callable[[AnomalyEvent], None]) -> Callable[[], None]:
        """Call ``callback`` for every event; returns a function that unsubscribes it."""
        with self._lock:
            self._subscribers.append(callback)

        def unsubscribe() -> None:
            with self._lock:
                if callback in self._subscribers:
                    self._subscribers.remove(callback)

        return unsubscribe

    def on_tick(self, callback: Callable[[], None]) -> Callable[[], None]:
        """Call ``callback`` on every :meth:`tick`; returns a function that stops it."""
        with self._lock:
            self._tickers.append(callback)

        def stop() -> None:
            with self._lock:
                if callback in self._tickers:
                    self._tickers.remove(callback)

        return stop

    def publish(self, event: AnomalyEvent) -> None:
        with self._lock:
            subscribers = list(self._subscribers)
        for callback in subscribers:
            try:
                callback(event)
            except Exception:
                _log.exception("anomaly subscriber %r failed", callback)

    def tick(self) -> None:
        """The publisher is alive: lets subscribers act on deadlines when no event comes
        (``AdaptiveThresholds`` expires stale tightenings). ``AnomalySpanProcessor`` ticks
        every ``flush_interval``; another publisher should tick every few seconds."""
        tickers = self._tickers
        if not tickers:
            return
        with self._lock:
            tickers = list(tickers)
        for callback in tickers:
            try:
                callback()
            except Exception:
                _log.exception("anomaly tick subscriber %r failed", callback)
