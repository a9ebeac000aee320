"""Reading a circuit breaker without moving it: its state, counts, wait and snapshot.

Dashboards, health checks, telemetry and tests read a breaker far more often than it changes,
and none of them may change it: nothing here performs the OPEN -> HALF_OPEN transition,
takes a probe permit or emits a transition (``can_execute()`` does, in the state machine of
:mod:`otel_recovery.policies.circuit_breaker`). :meth:`BreakerView.snapshot` reads every
count under the breaker's lock, so the values it returns are consistent with each other.

:class:`BreakerView` is a mixin of ``CircuitBreaker``: it has no slots of its own and works
on the breaker's (``_Viewed`` lists those it uses). ``otel_recovery.policies.circuit_breaker``
re-exports :class:`BreakerSnapshot`.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

from otel_recovery._clock import Clock
from otel_recovery.policies._breaker_states import PERMIT_ALL, CircuitState
from otel_recovery.policies._counting import peek
from otel_recovery.policies._windows import OutcomeWindow

__all__ = ["BreakerSnapshot", "BreakerView"]

_OPEN = CircuitState.OPEN
_HALF_OPEN = CircuitState.HALF_OPEN


@dataclass(frozen=True, slots=True)
class BreakerSnapshot:
    """A consistent view of the breaker, taken under its lock, for telemetry and tests.

    ``failure_rate``/``slow_call_rate`` are None in consecutive mode and while the window holds
    fewer than ``minimum_calls`` calls (the rate is not evaluated then, so reporting it would
    suggest a decision that is not being made). The ``*_calls`` counters are cumulative since
    creation and survive ``reset()``.
    """

    state: CircuitState
    failure_rate: float | None
    slow_call_rate: float | None
    buffered_calls: int
    consecutive_failures: int
    successful_calls: int
    failed_calls: int
    not_permitted_calls: int
    open_until: float | None
    current_timeout: float


class _Viewed(Protocol):
    """The slots and methods of ``CircuitBreaker`` that :class:`BreakerView` uses."""

    _clock: Clock
    _consecutive_failures: int
    _current_timeout: float
    _failed_calls: int
    _fast_successes: Iterator[int]
    _half_open_max: int
    _in_flight: int
    _lock: threading.Lock
    _minimum_calls: int
    _not_permitted: int
    _open_until: float
    _permit_all: bool
    _state: CircuitState
    _successful_calls: int
    _window: OutcomeWindow | None

    def _fold(self) -> None: ...

    def _probes_lost(self) -> bool: ...


class BreakerView:
    """The reading part of ``CircuitBreaker`` (see the module doc)."""

    __slots__ = ()

    @property
    def state(self: _Viewed) -> CircuitState:
        """The current state; OPEN stays OPEN until ``can_execute()`` moves it to HALF_OPEN."""
        return self._state

    @property
    def failure_count(self: _Viewed) -> int:
        """Consecutive failures (consecutive mode) or failures in the window (rate mode)."""
        with self._lock:
            self._fold()
            window = self._window
            if window is None:
                return self._consecutive_failures
            if window.needs_clock:
                window.expire(self._clock.now())
            return window.failures

    def retry_after(self: _Viewed) -> float | None:
        """Seconds until an OPEN breaker lets a probe through; None in every other state."""
        with self._lock:
            if self._state is not _OPEN:
                return None
            return max(0.0, self._open_until - self._clock.now())

    def would_refuse(self: _Viewed) -> bool:
        """Whether :meth:`can_execute` would refuse a call now, asked without taking a probe
        permit or moving OPEN to HALF_OPEN: for callers that must not spend a probe on the
        question (a pool's health check, see ``instrumentors/_health_checks.py``)."""
        if self._permit_all:
            return False
        with self._lock:
            state = self._state
            if state in PERMIT_ALL:
                return False
            if state is _OPEN:
                return self._clock.now() < self._open_until
            if state is _HALF_OPEN:
                return self._in_flight >= self._half_open_max and not self._probes_lost()
            return True  # forced open

    def snapshot(self: _Viewed) -> BreakerSnapshot:
        """The breaker's state and window counts at this moment, consistent with each
        other (read under its lock): for dashboards, health endpoints and tests."""
        with self._lock:
            self._fold()
            failure_rate = slow_rate = None
            buffered = 0
            window = self._window
            if window is not None:
                if window.needs_clock:
                    window.expire(self._clock.now())
                buffered = window.calls
                if buffered >= self._minimum_calls:
                    failure_rate = window.failures / buffered
                    slow_rate = window.slows / buffered
            return BreakerSnapshot(
                state=self._state,
                failure_rate=failure_rate,
                slow_call_rate=slow_rate,
                buffered_calls=buffered,
                consecutive_failures=self._consecutive_failures,
                successful_calls=self._successful_calls + peek(self._fast_successes),
                failed_calls=self._failed_calls,
                not_permitted_calls=self._not_permitted,
                open_until=self._open_until if self._state is _OPEN else None,
                current_timeout=self._current_timeout,
            )
