"""One circuit breaker per service id, bounded: :class:`ErrorRecoveryInteraction`'s breakers.

Service ids come from callers, and some make them up per request (``"user-4711"``): one
breaker each, kept for good, grew without bound (20,000 ids held about 38 MB). Past
``max_breakers`` the registry forgets the least recently used closed breaker, one with no
failure in its window first (nothing to lose), else one a few failures short of opening
(the least recently used loses the least). A breaker that is open, half-open or forced is
state a service still depends on: it is kept even past the bound.

A forgotten breaker someone still holds (a policy built on it, a caller's variable) comes
back when its id is asked for again, so one service never has two breakers; one nobody
holds is gone, and the id gets a fresh, closed one, as it would after a restart.
"""

from __future__ import annotations

import weakref
from collections import OrderedDict
from collections.abc import Callable

from otel_recovery._forksafe import new_lock
from otel_recovery.policies import CircuitBreaker, CircuitState

__all__ = ["BreakerRegistry"]

_SCAN = 64
"""Breakers looked at, oldest first, for one to forget: bounded, so a registry full of busy
breakers costs each new id a fixed amount."""


class BreakerRegistry:
    """The breakers by service id, made by ``make`` on first use."""

    def __init__(self, make: Callable[[str], CircuitBreaker], max_breakers: int) -> None:
        if isinstance(max_breakers, bool) or not isinstance(max_breakers, int):
            raise TypeError(f"max_breakers must be an int >= 1, got {max_breakers!r}")
        if max_breakers < 1:
            raise ValueError(f"max_breakers must be an int >= 1, got {max_breakers!r}")
        self._make = make
        self._max = max_breakers
        self._breakers: OrderedDict[str, CircuitBreaker] = OrderedDict()
        self._forgotten: weakref.WeakValueDictionary[str, CircuitBreaker]
        self._forgotten = weakref.WeakValueDictionary()
        self._lock = new_lock()

    def get(self, service_id: str) -> CircuitBreaker:
        with self._lock:
            breaker = self._breakers.get(service_id)
            if breaker is not None:
                self._breakers.move_to_end(service_id)
                return breaker
            breaker = self._forgotten.pop(service_id, None) or self._make(service_id)
            self._breakers[service_id] = breaker
            if len(self._breakers) > self._max:
                self._forget_one_idle(but=service_id)
            return breaker

    def items(self) -> dict[str, CircuitBreaker]:
        with self._lock:
            return dict(self._breakers)

    def _forget_one_idle(self, but: str) -> None:
        """Forget the least recently used closed breaker, one with an empty window first.
        Breakers that are not closed are passed over and moved to the back, and the scan
        goes on past them once: ids that opened their circuit and were never asked for
        again must not stop the forgetting for good."""
        for _ in range(2):
            forget, passed = self._candidate(but)
            for service_id in passed:
                self._breakers.move_to_end(service_id)
            if forget is not None:
                self._forgotten[forget] = self._breakers.pop(forget)
                return
            if not passed:
                return

    def _candidate(self, but: str) -> tuple[str | None, list[str]]:
        """The breaker to forget among the :data:`_SCAN` oldest, and those passed over.

        A closed breaker a few failures short of opening is chosen only if no idle one is
        there: its failures go with it, and the least recently used one loses the least
        (keeping them all would be the unbounded growth again)."""
        passed: list[str] = []
        fallback: str | None = None
        for scanned, (service_id, breaker) in enumerate(self._breakers.items()):
            if scanned >= _SCAN:
                break
            if service_id == but:
                continue
            if breaker.state is not CircuitState.CLOSED:
                passed.append(service_id)
            elif breaker.failure_count == 0:
                return service_id, passed
            elif fallback is None:
                fallback = service_id
        return fallback, passed
