"""What the psycopg and asyncpg instrumentors have in common, kept once for both.

The two drivers connect and run statements differently, each in its own module, but
PostgreSQL asks the same of both instrumentors: contrib's span is the statement's span, no
fallback value ever stands in for SQL, failures are classified by
:class:`~._pg_errors.PostgresClassifier`, the recovery step is guarded (``GuardedPolicy``),
and while a server's circuit is open the pools' and ORMs' health checks ask its breaker
(:mod:`._health_checks`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar, Literal

from otel_recovery._clock import Clock
from otel_recovery.classify import Classifier
from otel_recovery.instrumentors._base import RecoveryInstrumentor
from otel_recovery.instrumentors._guarded import GuardedPolicy
from otel_recovery.instrumentors._health_checks import HEALTH_CHECKS
from otel_recovery.instrumentors._pg_errors import PostgresClassifier
from otel_recovery.instrumentors._target_policy import TargetPolicy
from otel_recovery.policies.circuit_breaker import CircuitBreaker

__all__ = ["PostgresInstrumentor"]


class PostgresInstrumentor(RecoveryInstrumentor):
    """What the psycopg and asyncpg instrumentors have in common: contrib's span is the
    statement's span, failures are classified by :class:`PostgresClassifier`, and no
    fallback value ever stands in for SQL."""

    span_mode: ClassVar[Literal["own", "current"]] = "current"
    fallback_on: ClassVar[tuple[type[BaseException], ...]] = ()
    """Never: no stand-in value can replace a connection or a statement's cursor."""
    policy_class: ClassVar[type[TargetPolicy]] = GuardedPolicy

    _unguard: Callable[[], None] | None = None

    def _classifier(self, clock: Clock | None) -> Classifier | None:
        return PostgresClassifier(clock=clock)

    def _instrument(self, **kwargs: Any) -> None:
        super()._instrument(**kwargs)
        if self._patches is not None:  # installed (not switched off, library present)
            self._unguard = HEALTH_CHECKS.register(self._guard)

    def _uninstrument(self, **kwargs: Any) -> None:
        unguard, self._unguard = self._unguard, None
        if unguard is not None:
            unguard()
        super()._uninstrument(**kwargs)

    def _guard(self, connection: Any) -> CircuitBreaker | None:
        """Our breaker for ``connection``'s server, where it is this driver's connection
        (pools' and ORMs' health checks, see :mod:`._health_checks`)."""
        targets = self.targets
        target = self._server_of(connection)
        if targets is None or target is None:
            return None
        return targets.known_breaker(*target)

    def _server_of(self, connection: Any) -> tuple[str, int | None] | None:
        """Host and port of ``connection`` if it is this driver's; None otherwise."""
        raise NotImplementedError
