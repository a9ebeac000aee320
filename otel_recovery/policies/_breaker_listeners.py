"""Who hears of a circuit breaker's state transitions, and how they are told.

Listeners are the breaker's only outward effect (telemetry marks spans and counts
transitions through them), so their delivery is its own concern: a listener that raises is
logged once and stays subscribed; listeners run after the breaker's lock is released, one at
a time and in transition order, even when several threads cause transitions; and each runs
in the context (the current span) of the call that caused the transition, whichever thread
delivers it. The state machine (:mod:`otel_recovery.policies.circuit_breaker`) only queues
a :class:`StateTransition` and calls ``_dispatch()`` once its lock is released.

:class:`BreakerListeners` is a mixin of ``CircuitBreaker``: it has no slots of its own and
works on the breaker's (``_Listened`` lists those it uses).
``otel_recovery.policies.circuit_breaker`` re-exports :class:`StateTransition`.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable, Iterable
from contextvars import Context
from dataclasses import dataclass
from typing import Protocol

from otel_recovery.policies._breaker_states import CircuitState

__all__ = [
    "BreakerListeners",
    "Listener",
    "ListenerEntry",
    "StateTransition",
    "listener_entries",
]

_log = logging.getLogger("otel_recovery")


@dataclass(frozen=True, slots=True)
class StateTransition:
    """One state change, as delivered to listeners.

    ``reason`` is one of ``failure_threshold``, ``failure_rate``, ``slow_call_rate``,
    ``timeout_elapsed``, ``probe_failed``, ``probe_slow``, ``probes_succeeded``, ``force_open``,
    ``disable``, ``metrics_only``, ``reset``, ``probe_now`` (or the reason its caller gave:
    the Redis instrumentor's ``multidb_active``), and for a fleet-wide breaker ``local_trip``
    (a process opened its breaker while the store was unreachable and pushed that on
    resync).
    ``at`` is the breaker clock's ``now()``; a fleet-wide breaker reports when this process
    observed the transition.
    """

    name: str
    from_state: CircuitState
    to_state: CircuitState
    reason: str
    at: float


Listener = Callable[[StateTransition], None]


class ListenerEntry:
    """A listener plus whether its failure was already logged (log once, not per call)."""

    __slots__ = ("callback", "failed")

    def __init__(self, callback: Listener) -> None:
        self.callback = callback
        self.failed = False


def listener_entries(listeners: Iterable[Listener]) -> tuple[ListenerEntry, ...]:
    """The constructor's ``listeners``, checked."""
    if isinstance(listeners, (str, bytes)) or not isinstance(listeners, Iterable):
        raise TypeError(
            f"listeners must be an iterable of callables (e.g. [on_transition]), got {listeners!r}"
        )
    entries = []
    for listener in listeners:
        if not callable(listener):
            raise TypeError(f"listeners must be callables, got {listener!r}")
        entries.append(ListenerEntry(listener))
    return tuple(entries)


class _Listened(Protocol):
    """The slots of ``CircuitBreaker`` that :class:`BreakerListeners` uses."""

    _dispatch_lock: threading.Lock
    _listeners: tuple[ListenerEntry, ...]
    _lock: threading.Lock
    _pending: deque[tuple[StateTransition, Context]]
    name: str


class BreakerListeners:
    """The listener part of ``CircuitBreaker`` (see the module doc)."""

    __slots__ = ()

    def add_listener(self: _Listened, listener: Listener) -> Callable[[], None]:
        """Subscribe to transitions; returns a function that unsubscribes (idempotent).

        A listener runs in the context (the thread's or task's context variables, hence
        the current span) of the call that caused the transition, whichever thread delivers
        it; it must not block for long, as the next transitions wait for it."""
        if not callable(listener):
            raise TypeError(f"listener must be callable, got {listener!r}")
        entry = ListenerEntry(listener)
        with self._lock:
            self._listeners = (*self._listeners, entry)

        def unsubscribe() -> None:
            with self._lock:
                self._listeners = tuple(e for e in self._listeners if e is not entry)

        return unsubscribe

    def _dispatch(self: _Listened) -> None:
        """Deliver queued transitions to the listeners, in order, each in the context of the
        call that caused it.

        Whoever holds the dispatch lock delivers everything queued; other threads (and
        listeners that trigger transitions re-entrantly) just queue and leave. The outer
        loop closes the race where a transition is queued just before the lock is released.
        Delivered in the deliverer's own context, another thread's transition landed on the
        deliverer's span (telemetry marks the current span), so each runs in a copy of the
        context it was queued in (transitions are rare; the copy is O(1)).
        """
        pending = self._pending
        while pending:
            if not self._dispatch_lock.acquire(blocking=False):
                return
            try:
                while pending:
                    transition, context = pending.popleft()
                    for entry in self._listeners:
                        try:
                            context.run(entry.callback, transition)
                        except Exception:
                            if not entry.failed:
                                entry.failed = True
                                _log.exception(
                                    "circuit breaker %r: listener %r raised; it stays "
                                    "subscribed and its further errors are not logged",
                                    self.name,
                                    entry.callback,
                                )
            finally:
                self._dispatch_lock.release()
