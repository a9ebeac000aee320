"""One circuit breaker per service id, bounded: :class:`ErrorRecoveryInteraction`'s breakers.

Service ids come from callers, and some make them up per request (``"user-4711"``): one
breaker each, kept for good, grew without bound (20,000 ids held about 38 MB). Past
``max_breakers`` the registry forgets the least recently used breaker that has nothing to
lose: closed, with no failure in its window. A breaker that is open, half-open, forced or
counting failures is state a service still depends on, so it is kept even past the bound,
which then only limits the idle ones.

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
        for scanned, (service_id, breaker) in enumerate(self._breakers.items()):
            if scanned >= _SCAN:
                return
            idle = breaker.state is CircuitState.CLOSED and breaker.failure_count == 0
            if idle and service_id != but:
                del self._breakers[service_id]
                self._forgotten[service_id] = breaker
                return
