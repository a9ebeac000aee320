"""A circuit breaker's settings: checked at construction, exposed read-only, tuned at run time.

Everything here is about what a :class:`~otel_recovery.policies.CircuitBreaker` was *told*,
not what it has seen: the checks behind its constructor's errors (each names the argument and
what it accepts), the window its rate mode counts in, the thresholds and timings it exposes as
properties, and :meth:`BreakerSettings.tune` / :meth:`BreakerSettings.restore`, by which
anomaly detection tightens and relaxes a running breaker in place. The constructor calls the
checks in the order it always did, so a call with several bad arguments reports the same one.

:class:`BreakerSettings` is a mixin of ``CircuitBreaker``: it has no slots of its own and
works on the breaker's (``_Configured`` lists those it uses).
"""

from __future__ import annotations

import math
import threading
from typing import Protocol

from otel_recovery._clock import Duration, to_seconds
from otel_recovery.policies._windows import CountWindow, OutcomeWindow, TimeWindow

__all__ = [
    "BreakerSettings",
    "check_name",
    "check_sync_interval",
    "checked_multiplier",
    "max_open_time",
    "positive_int",
    "ratio",
    "slow_call_after",
]


def ratio(value: object, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a ratio in (0, 1], got {type(value).__name__}")
    if not 0 < value <= 1:
        hint = f"; did you mean {value / 100:g}?" if 1 < value <= 100 else ""
        raise ValueError(f"{name} must be in (0, 1], got {value!r}{hint}")
    return float(value)


def positive_int(value: object, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int >= 1, got {type(value).__name__} {value!r}")
    if value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    return value


def check_sync_interval(sync_interval: Duration) -> None:
    """Checked by every breaker, although only a fleet-wide one syncs."""
    if to_seconds(sync_interval, "sync_interval") <= 0:
        raise ValueError(f"sync_interval must be > 0 seconds, got {sync_interval!r}")


def check_name(name: str) -> str:
    if not isinstance(name, str):
        raise TypeError(f"name must be a str, got {type(name).__name__}")
    if not name:
        raise ValueError("name must be a non-empty str, got ''")
    return name


def slow_call_after(slow_call_duration: Duration | None, rate_mode: bool) -> float:
    """Seconds from which a call counts as slow; ``math.inf`` when slow calls are not judged."""
    slow_after = math.inf
    if slow_call_duration is not None:
        slow_after = to_seconds(slow_call_duration, "slow_call_duration")
        if slow_after <= 0:
            raise ValueError(f"slow_call_duration must be > 0 seconds, got {slow_call_duration!r}")
        if not rate_mode:
            raise ValueError(
                "slow_call_duration is only evaluated in rate mode; set "
                "failure_rate_threshold too (e.g. failure_rate_threshold=0.5)"
            )
    return slow_after


def checked_multiplier(timeout_multiplier: float) -> float:
    if isinstance(timeout_multiplier, bool) or not isinstance(timeout_multiplier, (int, float)):
        raise TypeError(
            f"timeout_multiplier must be a number >= 1, got {type(timeout_multiplier).__name__}"
        )
    if not 1 <= timeout_multiplier < math.inf:
        raise ValueError(
            f"timeout_multiplier must be a finite number >= 1, got {timeout_multiplier!r}"
        )
    return float(timeout_multiplier)


def max_open_time(max_timeout: Duration | None, base_timeout: float) -> float:
    """The longest open time, in seconds, that reopening may grow to (``math.inf``: no cap)."""
    longest = math.inf
    if max_timeout is not None:
        longest = to_seconds(max_timeout, "max_timeout", allow_inf=True)
        if longest < base_timeout:
            raise ValueError(
                f"max_timeout must be >= timeout ({base_timeout:g}s), got {max_timeout!r}"
            )
    return longest


class _Configured(Protocol):
    """The slots of ``CircuitBreaker`` that :class:`BreakerSettings` uses."""

    _base_timeout: float
    _configured_rate: float
    _configured_threshold: int
    _failure_threshold: int
    _lock: threading.Lock
    _minimum_calls: int
    _rate_threshold: float
    _slow_after: float
    _window: OutcomeWindow | None


class BreakerSettings:
    """The settings part of ``CircuitBreaker`` (see the module doc)."""

    __slots__ = ()

    def _make_window(self: _Configured, window: str, window_size: int | Duration) -> OutcomeWindow:
        if window == "count":
            if isinstance(window_size, bool) or not isinstance(window_size, int):
                raise TypeError(
                    "window_size must be an int number of calls when window='count', "
                    f"got {type(window_size).__name__} {window_size!r}"
                )
            if window_size < 1:
                raise ValueError(f"window_size must be >= 1 call, got {window_size!r}")
            # A count window never holds more than window_size calls.
            self._minimum_calls = min(self._minimum_calls, window_size)
            return CountWindow(window_size)
        if window == "time":
            seconds = to_seconds(window_size, "window_size")
            if seconds < 1 or seconds != int(seconds):
                raise ValueError(
                    "window_size must be a whole number of seconds >= 1 when window='time' "
                    f"(one bucket per second), got {window_size!r}"
                )
            return TimeWindow(int(seconds))
        raise ValueError(f"window must be 'count' or 'time', got {window!r}")

    # -- reading ----------------------------------------------------------------------------

    @property
    def failure_threshold(self: _Configured) -> int:
        return self._failure_threshold

    @property
    def failure_rate_threshold(self: _Configured) -> float | None:
        """The failure rate that trips a rate-mode breaker; None in consecutive mode."""
        return None if self._window is None else self._rate_threshold

    @property
    def tuned(self: _Configured) -> bool:
        """Whether :meth:`tune` changed a threshold that :meth:`restore` has not put back."""
        return (
            self._failure_threshold != self._configured_threshold
            or self._rate_threshold != self._configured_rate
        )

    @property
    def timeout(self: _Configured) -> float:
        """The base open time in seconds (before any growth)."""
        return self._base_timeout

    @property
    def slow_call_duration(self: _Configured) -> float | None:
        """Seconds from which a call counts as slow, or None when slow calls are not judged.

        Drivers read it to decide whether a call's duration must be measured at all.
        """
        return None if self._slow_after == math.inf else self._slow_after

    # -- run-time tuning (adaptive thresholds) -----------------------------------------------

    def tune(
        self: _Configured,
        *,
        failure_threshold: int | None = None,
        failure_rate_threshold: float | None = None,
    ) -> None:
        """Change the trip thresholds while the breaker runs; :meth:`restore` undoes it.

        Anomaly detection tightens the breaker of a dependency that behaves abnormally and
        relaxes it afterwards (:class:`otel_recovery.learning.AdaptiveThresholds`); tuning in
        place keeps the state, windows, counters and listeners that replacing the breaker
        would lose. The new values apply from the next recorded outcome: tuning never trips
        or closes the breaker by itself, and the closed-state fast paths are untouched.
        ``failure_rate_threshold`` exists only in rate mode.
        """
        threshold = (
            None
            if failure_threshold is None
            else positive_int(failure_threshold, "failure_threshold")
        )
        rate = None
        if failure_rate_threshold is not None:
            if self._window is None:
                raise ValueError(
                    "failure_rate_threshold can only be tuned in rate mode; this breaker counts "
                    "consecutive failures (tune failure_threshold instead)"
                )
            rate = ratio(failure_rate_threshold, "failure_rate_threshold")
        with self._lock:
            if threshold is not None:
                self._failure_threshold = threshold
            if rate is not None:
                self._rate_threshold = rate

    def restore(self: _Configured) -> None:
        """Put back the thresholds given at construction (the end of an anomaly)."""
        with self._lock:
            self._failure_threshold = self._configured_threshold
            self._rate_threshold = self._configured_rate
