"""How a recovered call is recorded: its trace, and how it ended told to whoever counts it.

A call that failed at least once leaves three records, whichever way it ends: the recovery
trace (:meth:`PolicyOutcome._trace` opens it, every way of ending ends it), one outcome on
the circuit breaker (:meth:`PolicyOutcome._record_outcome`: once per logical call, never
per attempt, and a failure that is an answer of a healthy dependency counts as a success,
:func:`says_dependency_is_up`), and the retry advisor's lesson
(:meth:`PolicyOutcome._learn`). Each ending is one method here: retrying is over without
success (:meth:`PolicyOutcome._stopped`), the call fails (:meth:`PolicyOutcome._failed`),
or an exception left the recovery (:meth:`PolicyOutcome._abandon`). A telemetry failure
opening the trace only leaves the call without one, and an advisor that fails to learn is
logged: neither replaces the caller's error or result.

:class:`PolicyOutcome` is a mixin of ``PolicyCore``: it has no slots of its own and works
on the policy's (``_Recorded`` lists those it uses).
"""

from __future__ import annotations

import logging
from typing import Protocol

from otel_recovery._clock import Clock
from otel_recovery._engine import Decision
from otel_recovery._inner_recovery import note_decided
from otel_recovery.classify import ErrorCategory, ErrorInfo, ErrorKind
from otel_recovery.policies.budget import RetryBudget
from otel_recovery.policies.circuit_breaker import CircuitBreaker
from otel_recovery.policies.retry import Retry, RetryAdvice
from otel_recovery.telemetry import CallTrace, Telemetry, get_telemetry
from otel_recovery.telemetry._suppressed import telemetry_suppressed

__all__ = ["PolicyOutcome", "says_dependency_is_up"]

_log = logging.getLogger("otel_recovery")

_ANSWERED_CATEGORIES = frozenset({ErrorCategory.INVALID_REQUEST, ErrorCategory.CONFIGURATION})
_ANSWERED_KINDS = frozenset({ErrorKind.SERIALIZATION, ErrorKind.READONLY})


def says_dependency_is_up(info: ErrorInfo) -> bool:
    """Whether a failure is an answer from a healthy dependency, which a breaker counts as a
    success: the request was wrong (invalid, a syntax error, a missing table, bad
    credentials), lost a race to another one (a serialization failure, a deadlock, a
    Redis ``WATCH`` conflict) or reached a replica that refuses writes (Redis ``READONLY``,
    PostgreSQL 25006: a failover moved the primary, and reads there still work).

    Counting those as failures would let one endpoint's bad query, or one hot row, open the
    circuit for everything else that talks to the same server (Envoy's outlier detection
    likewise ignores 4xx answers). A configuration error of the connection itself (a name
    that does not resolve, a certificate that does not verify) is no answer: it counts.
    """
    if info.kind is ErrorKind.CONNECTION:
        return False
    return info.category in _ANSWERED_CATEGORIES or info.kind in _ANSWERED_KINDS


class _Recorded(Protocol):
    """The slots and methods of ``PolicyCore`` that :class:`PolicyOutcome` uses."""

    _needs_duration: bool
    _own_span: bool
    _telemetry: Telemetry | bool
    breaker: CircuitBreaker | None
    budget: RetryBudget | None
    clock: Clock
    name: str
    retry: Retry | None

    def _record_outcome(
        self, error: BaseException | None, info: ErrorInfo | None, took: float
    ) -> None: ...


class PolicyOutcome:
    """The records ``PolicyCore`` keeps of a recovered call (see the module doc)."""

    __slots__ = ()

    def _trace(self: _Recorded, started: float) -> CallTrace | None:
        """Open the recovery trace; a telemetry failure never breaks the call. None inside
        ``suppress_instrumentation()`` (an exporter's own send, recovered by ``@recover``,
        would otherwise export a span per failed export: see ``telemetry._suppressed``)."""
        telemetry = self._telemetry
        if telemetry is False or telemetry_suppressed():
            return None
        try:
            if telemetry is True:
                telemetry = get_telemetry()
            assert isinstance(telemetry, Telemetry)
            return telemetry.start_call(self.name, started, self.clock, own_span=self._own_span)
        except Exception:
            return None

    def _record_outcome(
        self: _Recorded, error: BaseException | None, info: ErrorInfo | None, took: float
    ) -> None:
        """Tell the breaker how the logical call ended (once per call, never per attempt)."""
        breaker = self.breaker
        if breaker is None:
            return
        duration = took if self._needs_duration else None
        if error is None or (info is not None and says_dependency_is_up(info)):
            breaker.record_success(duration)
        else:
            breaker.record_failure(duration)

    def _stopped(
        self: _Recorded,
        decision: Decision,
        error: BaseException,
        info: ErrorInfo,
        attempts: int,
        started: float,
        trace: CallTrace | None,
        took: float | None = None,
    ) -> None:
        """Retrying is over without success: count it on the breaker and in the trace.

        ``took``: the last attempt's duration, what the breaker's slow-call timing reads, as
        for a success after retries: the call as a whole includes our own backoff waits,
        and counted, they made a call of fast attempts "slow" and opened the circuit on
        ``slow_call_rate``. None (a call cut by its own limit): the whole call."""
        self._record_outcome(error, info, self.clock.now() - started if took is None else took)
        if trace is not None:
            trace.stopped(decision.reason, info, self.budget.name if self.budget else None)

    def _learn(
        self: _Recorded, advice: RetryAdvice | None, *, success: bool, seconds: float
    ) -> None:
        """Tell the retry advisor how its advice turned out (never raises)."""
        retry = self.retry
        if advice is None or retry is None or retry.advisor is None:
            return
        try:
            retry.advisor.learn(advice, success=success, seconds=seconds)
        except Exception:
            _log.exception("retry advisor %r failed to learn", retry.advisor)

    def _abandon(
        self: _Recorded,
        settled: bool,
        trace: CallTrace | None,
        attempts: int,
        info: ErrorInfo | None,
        escaped: BaseException,
        started: float,
    ) -> None:
        """Settle a call (started at ``started``) whose recovery was left by an exception
        (cancellation, a bug).

        The breaker gets its half-open permit back unless the outcome was already recorded,
        and the trace is ended (a no-op if the normal path already ended it).
        """
        if not settled and self.breaker is not None:
            self.breaker.release()
        if trace is not None:
            if isinstance(escaped, Exception):
                trace.end("failure", attempts, None, escaped)
            else:
                trace.end("cancelled", attempts, info)

    @staticmethod
    def _failed(
        trace: CallTrace | None, attempts: int, info: ErrorInfo | None, error: BaseException
    ) -> None:
        """The call ends without success (every way of giving up, rejections included)."""
        note_decided(error)
        if trace is not None:
            trace.end("failure" if attempts else "rejected", attempts, info, error)
