"""An operator's overrides of a circuit breaker: force it open, disable it, dry-run it, reset it.

The three manual modes (FORCED_OPEN, DISABLED, METRICS_ONLY) are entered and left only from
here, never by the breaker's own counting, and ``reset()`` brings a breaker back to CLOSED
from anywhere. Each is one transition of the state machine
(:mod:`otel_recovery.policies.circuit_breaker`), made under its lock and delivered to the
listeners after it. The fleet-wide breaker overrides ``_manual()`` and ``reset()`` to apply
them to every process (``stores/_shared_breaker.py``).

:class:`BreakerManual` is a mixin of ``CircuitBreaker``: it has no slots of its own and works
on the breaker's (``_Controlled`` lists those it uses).
"""

from __future__ import annotations

import threading
from collections import deque
from contextvars import Context
from typing import TYPE_CHECKING, Protocol

from otel_recovery._clock import Clock
from otel_recovery.policies._breaker_states import CircuitState

if TYPE_CHECKING:
    from otel_recovery.policies._breaker_listeners import StateTransition

__all__ = ["BreakerManual"]

_CLOSED = CircuitState.CLOSED
_FORCED_OPEN = CircuitState.FORCED_OPEN
_DISABLED = CircuitState.DISABLED
_METRICS_ONLY = CircuitState.METRICS_ONLY


class _Controlled(Protocol):
    """The slots and methods of ``CircuitBreaker`` that :class:`BreakerManual` uses."""

    _clock: Clock
    _lock: threading.Lock
    _pending: deque[tuple[StateTransition, Context]]
    _state: CircuitState

    def _enter(self, to_state: CircuitState) -> None: ...

    def _transition(self, to_state: CircuitState, reason: str, now: float) -> None: ...

    def _dispatch(self) -> None: ...

    def _manual(self, to_state: CircuitState, reason: str) -> None: ...


class BreakerManual:
    """The manual-control part of ``CircuitBreaker`` (see the module doc)."""

    __slots__ = ()

    def force_open(self: _Controlled) -> None:
        """Reject every call until ``reset()`` (maintenance, known outage)."""
        self._manual(_FORCED_OPEN, "force_open")

    def disable(self: _Controlled) -> None:
        """Permit every call and count nothing until ``reset()`` or another manual mode."""
        self._manual(_DISABLED, "disable")

    def metrics_only(self: _Controlled) -> None:
        """Permit every call but keep counting, to watch what a breaker would do (dry run)."""
        self._manual(_METRICS_ONLY, "metrics_only")

    def reset(self: _Controlled) -> None:
        """Back to CLOSED with empty windows and the base open time; counters are kept."""
        with self._lock:
            now = self._clock.now()
            if self._state is _CLOSED:
                self._enter(_CLOSED)
            else:
                self._transition(_CLOSED, "reset", now)
        if self._pending:
            self._dispatch()

    def _manual(self: _Controlled, to_state: CircuitState, reason: str) -> None:
        with self._lock:
            if self._state is not to_state:
                self._transition(to_state, reason, self._clock.now())
        if self._pending:
            self._dispatch()
