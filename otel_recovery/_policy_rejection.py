"""A call refused before any attempt: by an open circuit, or by a full bulkhead.

A refused call never ran, so it has nothing to retry and no outcome to count: the breaker
gets back the permit it may have granted (a bulkhead that was full after the breaker let the
call in), the fallback may answer (:meth:`PolicyRejection._rejected`), and the trace says
which component refused it, with the circuit's ``retry_after`` when it was the breaker
(:meth:`PolicyRejection._open_rejection_trace`). The error an open circuit raises is made
by :meth:`PolicyRejection._rejection`; an instrumentor's policy makes one that is also the
client library's own connection error (``instrumentors/_target_policy.py``).

:class:`PolicyRejection` is a mixin of ``PolicyCore``: it has no slots of its own and works
on the policy's (``_Refusing`` lists those it uses).
"""

from __future__ import annotations

from typing import Protocol

from otel_recovery._engine import Decision, after_rejection
from otel_recovery.classify import ErrorInfo
from otel_recovery.policies.bulkhead import BulkheadFullError
from otel_recovery.policies.circuit_breaker import CircuitBreaker, CircuitOpenError
from otel_recovery.policies.fallback import Fallback
from otel_recovery.telemetry import CallTrace

__all__ = ["PolicyRejection"]


class _Refusing(Protocol):
    """The slots and methods of ``PolicyCore`` that :class:`PolicyRejection` uses."""

    breaker: CircuitBreaker | None
    fallback: Fallback | None

    def _classify(self, error: BaseException) -> ErrorInfo: ...

    def _trace(self, started: float) -> CallTrace | None: ...


class PolicyRejection:
    """How ``PolicyCore`` refuses a call before any attempt (see the module doc)."""

    __slots__ = ()

    def _rejection(self: _Refusing) -> CircuitOpenError:
        breaker = self.breaker
        assert breaker is not None
        return CircuitOpenError(breaker.name, breaker.retry_after())

    def _rejected(
        self: _Refusing, error: BaseException, started: float, *, release: bool
    ) -> Decision:
        """Bookkeeping for a call the breaker or bulkhead refused before any attempt."""
        if release and self.breaker is not None:
            self.breaker.release()
        return after_rejection(self.fallback, error)

    def _open_rejection_trace(
        self: _Refusing, error: BaseException, started: float
    ) -> tuple[ErrorInfo, CallTrace | None]:
        info = self._classify(error)
        trace = self._trace(started)
        if trace is not None:
            trace.rejected("rejected", _component(error), getattr(error, "retry_after", None))
        return info, trace


def _component(error: BaseException) -> str:
    if isinstance(error, CircuitOpenError):
        return "circuit_breaker"
    if isinstance(error, BulkheadFullError):
        return "bulkhead"
    return type(error).__name__
