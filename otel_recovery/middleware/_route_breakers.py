"""One circuit breaker per route, made on first use: what the middlewares guard a route with.

Why a server-side breaker: when a route keeps failing (its database is down, a dependency
times out), every request still costs a worker, a connection and the client's patience. An
open breaker answers at once with ``503`` and ``Retry-After``, which well-behaved clients
(ours included) honour, and lets one probe through after ``timeout`` to find out whether the
route has recovered. Envoy's outlier detection and resilience4j's server-side circuit do the
same.

What ``breaker=`` may be (:data:`BreakerChoice`), the breaker a route gets when it is not
given (:func:`default_breaker`), and the table of breakers per route (:class:`RouteBreakers`),
capped so that paths with ids in them cannot make a breaker per id.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from otel_recovery._forksafe import new_lock
from otel_recovery.policies.circuit_breaker import CircuitBreaker
from otel_recovery.telemetry import watch_breaker_globally

__all__ = ["DEFAULT_TIMEOUT", "BreakerChoice", "RouteBreakers", "default_breaker"]

_log = logging.getLogger("otel_recovery.middleware")

BreakerChoice = CircuitBreaker | Callable[[str], CircuitBreaker] | None

DEFAULT_TIMEOUT = 30.0
"""How long a route's default breaker stays open before it lets a probe through."""


def default_breaker(route: str) -> CircuitBreaker:
    """Five failures in a row open the route for 30 seconds, in this process only.

    ``store="memory://"``: a named breaker would otherwise be shared through
    ``OTEL_RECOVERY_STORE_URL`` when one is set, and every service's ``GET /health`` would
    share one fleet-wide breaker. Pass ``breaker=`` to share route breakers on purpose.
    """
    return CircuitBreaker(
        failure_threshold=5,
        timeout=DEFAULT_TIMEOUT,
        name=f"http.server {route}",
        store="memory://",
    )


class RouteBreakers:
    """One breaker per route, made on first use; at most ``max_routes`` of them.

    Routes are keys the middleware computes per request (by default ``"GET /path"``). Raw
    paths with ids in them would make a breaker per id, so the count is capped: past the
    cap, new routes pass through unguarded and a warning says to pass ``route=`` (for
    instance the framework's path template).
    """

    def __init__(self, breaker: BreakerChoice, max_routes: int) -> None:
        if isinstance(max_routes, bool) or not isinstance(max_routes, int) or max_routes < 1:
            raise ValueError(f"max_routes must be an int >= 1, got {max_routes!r}")
        self._shared: CircuitBreaker | None = None
        self._factory: Callable[[str], CircuitBreaker] = default_breaker
        if isinstance(breaker, CircuitBreaker):
            self._shared = breaker
        elif callable(breaker):
            self._factory = breaker
        elif breaker is not None:
            raise TypeError(
                "breaker must be a CircuitBreaker (one for every route), a function "
                "route -> CircuitBreaker (one per route), or None for the default "
                f"(5 failures open a route for {DEFAULT_TIMEOUT:g} s); got {breaker!r}"
            )
        self._max_routes = max_routes
        self._breakers: dict[str, CircuitBreaker] = {}
        self._lock = new_lock()
        self._warned = False
        if self._shared is not None:
            watch_breaker_globally(self._shared)

    def get(self, route: str) -> CircuitBreaker | None:
        if self._shared is not None:
            return self._shared
        breaker = self._breakers.get(route)
        if breaker is not None:
            return breaker
        with self._lock:
            breaker = self._breakers.get(route)
            if breaker is None:
                if len(self._breakers) >= self._max_routes:
                    self._warn_full()
                    return None
                breaker = self._factory(route)
                if not isinstance(breaker, CircuitBreaker):
                    raise TypeError(
                        f"the breaker function returned {breaker!r} for route {route!r}; "
                        "it must return a CircuitBreaker"
                    )
                watch_breaker_globally(breaker)  # before any request can use it
                self._breakers[route] = breaker
        return breaker

    def _warn_full(self) -> None:
        if not self._warned:
            self._warned = True
            _log.warning(
                "otel_recovery middleware: %d routes have breakers; new routes pass through "
                "unguarded. Pass route= (for instance the path template) so that routes "
                "do not multiply with path parameters, or raise max_routes.",
                self._max_routes,
            )

    def __getitem__(self, route: str) -> CircuitBreaker:
        """The breaker already made for ``route`` (for tests and dashboards)."""
        if self._shared is not None:
            return self._shared
        return self._breakers[route]
