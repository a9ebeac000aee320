"""Pools' and ORMs' connection health checks, while a server's circuit is open: answered, not sent.

A pool checks a pooled connection before handing it out: psycopg_pool's
``check=ConnectionPool.check_connection`` (which Django's pool passes when
``CONN_HEALTH_CHECKS`` is on), SQLAlchemy's ``pool_pre_ping``, Django's ``is_usable()``. The
check is a statement, so it goes through our statement layer, and an open circuit refuses it
like any statement. The pool then takes our refusal for a dead connection:

- it discards a connection that was good (and reconnects all of them once the circuit closes);
- psycopg_pool asks for a new connection, which the open circuit refuses too, and waits for
  one until its timeout (30 s by default): the wait a circuit breaker exists to prevent.

So while the circuit of the connection's server refuses calls (open, forced open, or
half-open with every probe permit taken: ``CircuitBreaker.would_refuse()``), the check is
not sent and answers "healthy"; a check that asked just as the circuit refused (a moment
after ``would_refuse()`` said no, or a fleet-wide breaker that had to ask Redis) is
answered "healthy" too, when our refusal comes back from it (Django's ``is_usable()``
swallows errors itself, so there only the first answer applies). The application's
statement that follows fails fast with the circuit's error, which the driver's users already
handle (``PsycopgCircuitOpenError`` is a ``psycopg.OperationalError``,
``AsyncPGCircuitOpenError`` an ``asyncpg.InterfaceError``; pools and ORMs treat them as
errors, not disconnects), and the pooled connection is kept for when the circuit closes.
Once a probe may go, checks go through the breaker again like any statement (one of them may
be the half-open probe). A skipped check leaves an ``otel_recovery.health_check.skipped``
event on the current span.

The checks are patched when their library is imported (a post-import hook, since
``opentelemetry-instrument`` instruments before the application imports its ORM), while at
least one of our PostgreSQL instrumentors is instrumented; each instrumentor registers a
*guard* that finds its breaker for a driver connection.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

from opentelemetry import trace

from otel_recovery._config import SWITCHES
from otel_recovery.instrumentors._import_patches import PatchedOnImport
from otel_recovery.instrumentors._suppression import instrumentation_enabled
from otel_recovery.instrumentors._wrapping import PatchSet, Wrapper, report_internal_error
from otel_recovery.policies.circuit_breaker import CircuitBreaker, CircuitOpenError

__all__ = ["HEALTH_CHECKS", "SKIPPED_EVENT", "Guard", "HealthChecks"]

SKIPPED_EVENT = "otel_recovery.health_check.skipped"

Guard = Callable[[Any], "CircuitBreaker | None"]
"""An instrumentor's breaker for a driver connection's server; None when the connection is not
its driver's, or no call has reached that server yet."""


def _first_argument(instance: Any, args: tuple[Any, ...]) -> Any:
    return args[0] if args else None


def _adapted_first_argument(instance: Any, args: tuple[Any, ...]) -> Any:
    """SQLAlchemy's asyncio dialects hand their pool an adapter; the driver's connection is
    its ``driver_connection``."""
    connection = _first_argument(instance, args)
    return getattr(connection, "driver_connection", connection)


def _instance_connection(instance: Any, args: tuple[Any, ...]) -> Any:
    return getattr(instance, "connection", None)


def _healthy_none() -> None:
    return None


async def _healthy_none_awaited() -> None:
    return None


def _healthy_true() -> bool:
    return True


class _CheckSite(NamedTuple):
    module: str
    """The module defining ``owner``: importing it makes the site patchable."""
    owner: str
    attribute: str
    connection: Callable[[Any, tuple[Any, ...]], Any]
    """The driver connection a call checks, from ``(instance, args)``."""
    healthy: Callable[[], Any]
    """The check's own answer for a connection that works."""
    name: str


_SITES = (
    _CheckSite(
        "psycopg_pool.pool",
        "ConnectionPool",
        "check_connection",
        _first_argument,
        _healthy_none,
        "psycopg_pool ConnectionPool.check_connection",
    ),
    _CheckSite(
        "psycopg_pool.pool_async",
        "AsyncConnectionPool",
        "check_connection",
        _first_argument,
        _healthy_none_awaited,
        "psycopg_pool AsyncConnectionPool.check_connection",
    ),
    _CheckSite(
        "sqlalchemy.engine.default",
        "DefaultDialect",
        "_do_ping_w_event",
        _adapted_first_argument,
        _healthy_true,
        "sqlalchemy pool_pre_ping",
    ),
    _CheckSite(
        "django.db.backends.postgresql.base",
        "DatabaseWrapper",
        "is_usable",
        _instance_connection,
        _healthy_true,
        "django DatabaseWrapper.is_usable",
    ),
)


class HealthChecks(PatchedOnImport[_CheckSite]):
    """The patched health checks, installed while at least one guard is registered."""

    def __init__(self, sites: tuple[_CheckSite, ...] = _SITES) -> None:
        super().__init__(sites)
        self._guards: list[Guard] = []

    def register(self, guard: Guard) -> Callable[[], None]:
        """Add ``guard``; returns the call that removes it (and the patches with the last)."""
        with self._lock:
            self._guards.append(guard)
            if self._patches is None:
                self._patches = PatchSet("otel_recovery health checks")
                self._patches.enabled = True
        self._patch_sites()

        def unregister() -> None:
            with self._lock:
                if guard in self._guards:
                    self._guards.remove(guard)
                if self._guards or self._patches is None:
                    return
                patches, self._patches = self._patches, None
                self._installed.clear()
            patches.remove_all()

        return unregister

    def _wrapper(self, site: _CheckSite, owner: Any) -> Wrapper:
        awaits = site.healthy is _healthy_none_awaited

        def check(wrapped: Callable[..., Any], instance: Any, args: Any, kwargs: Any) -> Any:
            try:
                breaker = self._refusing(site.connection(instance, args))
                if breaker is not None:
                    _note_skipped(site, breaker.name)
                    return site.healthy()
            except Exception as error:
                report_internal_error(site.name, error)
            if awaits:
                return _refusal_answered(site, wrapped(*args, **kwargs))
            try:
                return wrapped(*args, **kwargs)
            except Exception as error:
                refusal = _refusal_in(error)
                if refusal is None:
                    raise
                _note_skipped(site, refusal.name)
                return site.healthy()

        return check

    def _refusing(self, connection: Any) -> CircuitBreaker | None:
        """The breaker refusing calls to ``connection``'s server now, if any guard knows one
        (none inside ``suppress_instrumentation()`` or :func:`~._suppression.suppress_recovery`,
        where the check's statement reaches the server untouched)."""
        if connection is None or not SWITCHES.active or not instrumentation_enabled():
            return None
        for guard in tuple(self._guards):
            breaker = guard(connection)
            if breaker is not None:
                return breaker if breaker.would_refuse() else None
        return None


def _refusal_in(error: BaseException) -> CircuitOpenError | None:
    """Our circuit's refusal behind ``error``: the check asked just as the circuit refused
    (``would_refuse`` said no a moment before, or a fleet-wide breaker had to ask Redis).
    Drivers and ORMs may wrap it (SQLAlchemy's asyncpg dialect adapts asyncpg's errors)."""
    seen = 0
    pending: BaseException | None = error
    while pending is not None and seen < 8:
        if isinstance(pending, CircuitOpenError):
            return pending
        orig = getattr(pending, "orig", None)
        pending = orig if isinstance(orig, BaseException) else pending.__cause__
        seen += 1
    return None


async def _refusal_answered(site: _CheckSite, pending: Any) -> Any:
    try:
        return await pending
    except Exception as error:
        refusal = _refusal_in(error)
        if refusal is None:
            raise
        _note_skipped(site, refusal.name)
        return None


def _note_skipped(site: _CheckSite, breaker: str) -> None:
    span = trace.get_current_span()
    if span.is_recording():
        span.add_event(
            SKIPPED_EVENT,
            {"otel_recovery.health_check": site.name, "otel_recovery.breaker": breaker},
        )


HEALTH_CHECKS = HealthChecks()
"""The process's patched health checks; the PostgreSQL instrumentors register their guards."""
