"""An operator's overrides of a circuit breaker: force it open, disable it, dry-run it, reset it,
or end its open time early.

The three manual modes (FORCED_OPEN, DISABLED, METRICS_ONLY) are entered and left only from
here, never by the breaker's own counting, and ``reset()`` brings a breaker back to CLOSED
from anywhere. ``probe_now()`` is the one override that leaves the verdict to the calls: it
only ends an OPEN breaker's open time, for a signal from outside that the dependency is
worth trying again (a router sending traffic back to it). Each is one transition of the
state machine (:mod:`otel_recovery.policies.circuit_breaker`), made under its lock and
delivered to the listeners after it. The fleet-wide breaker overrides ``_manual()``,
``reset()`` and ``probe_now()`` to apply them to every process
(``stores/_shared_breaker.py``).

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
_OPEN = CircuitState.OPEN
_HALF_OPEN = CircuitState.HALF_OPEN
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

    def probe_now(self: _Controlled, reason: str = "probe_now") -> bool:
        """End an OPEN breaker's open time now: it goes HALF_OPEN, so its next calls are its
        probes, and their outcomes decide as they always do (closed after
        ``success_threshold`` successes; open again, for longer, on a failure). True if it
        moved.

        For a signal from outside that the dependency is worth trying again before the open
        time is up, such as a router that has just sent traffic back to it (the Redis
        instrumentor's, when redis-py's MultiDB makes a database active again: ``reason``
        ``multidb_active``). The signal is no call: it is counted as neither a success nor a
        failure, and it cannot close the breaker. Any other state is left as it is: a
        breaker forced open stays forced open (the operator's word), and a closed,
        half-open, disabled or dry-run one already lets calls through."""
        with self._lock:
            moved = self._state is _OPEN
            if moved:
                self._transition(_HALF_OPEN, reason, self._clock.now())
        if self._pending:
            self._dispatch()
        return moved

    def _manual(self: _Controlled, to_state: CircuitState, reason: str) -> None:
        with self._lock:
            if self._state is not to_state:
                self._transition(to_state, reason, self._clock.now())
        if self._pending:
            self._dispatch()
