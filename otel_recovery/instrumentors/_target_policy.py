"""The policy an instrumentor runs a call under, made to pass for the client library's own.

A plain :class:`~otel_recovery.recover.RecoveryPolicy` raises errors of its own and knows
nothing of the library beneath it; an application written against the library must not
notice it is there. So an open circuit raises the library's connection error and an attempt
our time limit cut its timeout error; a call the circuit refuses may still have to go out (a
transaction's own ``ROLLBACK``, :data:`PassesRefused`); what a failed attempt broke is
mended before a resend (:data:`Mend`); a failure the library's own retry already repeated,
or that another server answered, is not retried again; a call that is not retried says why
on its span; and an awaited call keeps to its own time limit where its site has one.
:class:`TargetPolicy` is that policy; :class:`~._targets.TargetPolicies` builds one per
target and call shape.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, TypeAlias

from otel_recovery._engine import Action, Decision, give_up
from otel_recovery._reraise import reraise
from otel_recovery.classify import ErrorInfo
from otel_recovery.instrumentors._attempt_site import (
    cut_call_limit,
    past_call_limit,
    site_of,
    within_call_limit,
)
from otel_recovery.instrumentors._client_retries import client_retries
from otel_recovery.instrumentors._elsewhere import answered_elsewhere
from otel_recovery.instrumentors._target_retries import (
    LayeredRetry,
    NeverRanRetry,
    is_session_bound,
)
from otel_recovery.instrumentors._wrapping import report_internal_error
from otel_recovery.policies.circuit_breaker import CircuitOpenError
from otel_recovery.recover import RecoveryPolicy
from otel_recovery.telemetry import CallTrace
from otel_recovery.telemetry.attributes import (
    HTTP_CLIENT_RETRIES,
    REDIS_CLIENT_RETRIES,
    RETRY_DISALLOWED,
)

__all__ = ["AMend", "Mend", "PassesRefused", "TargetPolicy"]

PassesRefused: TypeAlias = Callable[[tuple[Any, ...], dict[str, Any]], Callable[..., Any] | None]
"""``passes(args, kwargs)``: for a call an open circuit refuses that must still be sent (a
transaction's own ROLLBACK), the function that sends it ungated; None for every other call."""
Mend: TypeAlias = Callable[[BaseException, tuple[Any, ...]], None]
"""``mend(error, args)``: what an instrumentor repairs after a failed attempt of a call
with ``args`` (see ``PolicyCore._after_failure``)."""
AMend: TypeAlias = Callable[[BaseException, tuple[Any, ...]], Awaitable[None]]

_Left: TypeAlias = "tuple[CallTrace | None, int, bool]"
"""What the driver leaves of a call its own time limit cut: its trace, the attempts made,
and whether its outcome is already on the breaker."""


class TargetPolicy(RecoveryPolicy):
    """One target's policy as an instrumentor runs it.

    An open circuit raises ``rejection``: a ``CircuitOpenError`` that is also the client
    library's own connection error, so the application's ``except`` clauses, and frameworks
    that handle only the driver's errors (SQLAlchemy wraps DBAPI errors and lets anything
    else escape), treat it as the failure it stands for. A call that may not be retried
    says why on its trace (``otel_recovery.retry.disallowed``), on our own span as on
    contrib's.

    ``passes_refused`` names the calls an open circuit must not refuse (see
    :data:`PassesRefused`): they are sent as if we were not there, neither counted nor
    traced. It is asked only on the rejection path, so it costs nothing while the circuit
    is closed.

    A failure that the client library's own retry already repeated (marked by an HTTP
    site, see :mod:`._client_retries`) is not retried again; its trace says so.

    ``mend`` (and ``amend`` for awaited calls) repairs what a failed attempt revealed,
    before the call is sent again or given up; a failure of its own is logged once and the
    call goes on as if it had not been asked.
    """

    __slots__ = (
        "_amend",
        "_disallowed",
        "_home",
        "_mend",
        "_never_repeated",
        "_passes_refused",
        "_rejection_type",
        "_timeout_type",
    )
    _marks_resends = True  # the HTTP instrumentors' (Redis and SQL use GuardedPolicy)

    def __init__(
        self,
        rejection: type[CircuitOpenError],
        disallowed: str | None,
        passes_refused: PassesRefused | None = None,
        timeout: type[Exception] = TimeoutError,
        mend: Mend | None = None,
        amend: AMend | None = None,
        **options: Any,
    ) -> None:
        super().__init__(**options)
        self._rejection_type = rejection
        self._passes_refused = passes_refused
        self._timeout_type = timeout
        self._mend = mend
        self._amend = amend
        self._home: object = None
        """The table's target whose breaker and budget this runs (``TargetPolicies._build``):
        a plan kept by a client keeps it for the table to find again."""
        self._disallowed: str | None = None
        # a call that may never be repeated stops because it may not be, as one whose
        # repeats are allowed only after some failures does on the others (not because its
        # one attempt was used up: the same POST would say two things by the settings)
        self._never_repeated: str | None = None
        if disallowed is not None and isinstance(self.retry, NeverRanRetry):
            # retried after some failures: said only when it stops on one that may have run
            self._disallowed = disallowed
        else:
            self._never_repeated = disallowed

    def _after_failure(self, error: BaseException, args: tuple[Any, ...]) -> None:
        mend = self._mend
        if mend is not None:
            try:
                mend(error, args)
            except Exception as problem:
                report_internal_error(f"{self.name} after a failure", problem)

    async def _aafter_failure(self, error: BaseException, args: tuple[Any, ...]) -> None:
        amend = self._amend
        if amend is not None:
            try:
                await amend(error, args)
            except Exception as problem:
                report_internal_error(f"{self.name} after a failure", problem)

    def _before_retry(self, fn: Callable[..., Any], args: tuple[Any, ...]) -> None:
        site = site_of(fn)
        if site is not None:
            try:
                site.let_go(args)
            except Exception as problem:
                report_internal_error(f"{self.name} before a retry", problem)

    async def _abefore_retry(self, fn: Callable[..., Any], args: tuple[Any, ...]) -> None:
        site = site_of(fn)
        if site is not None:
            try:
                await site.alet_go(args)
            except Exception as problem:
                report_internal_error(f"{self.name} before a retry", problem)

    def _resend_refused(self, fn: Callable[..., Any], args: tuple[Any, ...]) -> bool:
        site = site_of(fn)
        if site is None:
            return False
        try:
            return site.closed(args)
        except Exception as problem:
            report_internal_error(f"{self.name} before a retry", problem)
            return False

    async def _arecover(
        self,
        fn: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        error: BaseException,
        started: float,
        took: float,
    ) -> Any:
        """Recovery within the call's own time limit, where its site has one (aiohttp's
        ``ClientTimeout.total``): see :mod:`._attempt_site`."""
        site, limit = site_of(fn), None
        if site is not None:
            try:
                limit = site.time_limit(args)
            except Exception as problem:
                report_internal_error(f"{self.name} reading the call's time limit", problem)
        recovering = super()._arecover(fn, args, kwargs, error, started, took)
        del error  # the coroutine has it: kept here too, it would make a frame cycle
        if limit is None:
            return await recovering

        def timed_out() -> BaseException:
            message = f"the call exceeded its own {limit:.3g}s time limit, retries included"
            try:
                own = None if site is None else site.time_limit_error(message)
            except Exception as problem:
                report_internal_error(f"{self.name} reading the call's time limit", problem)
                own = None
            return self._timeout_type(message) if own is None else own

        async def answer(cut: BaseException, left: _Left | None) -> Any:
            """The call gave up at its limit: a fallback answers it, or it fails there."""
            if left is None:  # the driver had settled the call already (a fallback's await)
                try:
                    reraise(cut)
                finally:
                    del cut
            trace, attempts, settled = left
            info = self._classify(cut)
            decision = give_up(self.fallback, cut, "deadline")
            if not settled:
                self._stopped(decision, cut, info, attempts, started, trace)
            return await self._agive_up(decision, cut, info, attempts, trace, fn, args, kwargs)

        return await within_call_limit(
            started, started + limit, self.clock.now(), recovering, timed_out, answer
        )

    def _abandon(
        self,
        settled: bool,
        trace: CallTrace | None,
        attempts: int,
        info: ErrorInfo | None,
        escaped: BaseException,
        started: float,
    ) -> None:
        """A call its own time limit cut (:func:`within_call_limit`) is not abandoned: it
        gave up at that limit, and is settled as such once the cut is caught (``answer`` in
        :meth:`_arecover`): counted on the breaker as the failure it is, its trace ended
        with ``stop_reason=deadline`` and the error the application gets (aiohttp's timeout
        error), or answered by the fallback, as when the limit is found to have passed
        before a retry. Not as a cancellation: no one cancelled the call, and a server that
        keeps every call past its limit would never count."""
        if isinstance(escaped, asyncio.CancelledError):
            limit = cut_call_limit(started)
            if limit is not None:
                limit.left = (trace, attempts, settled)
                return
        super()._abandon(settled, trace, attempts, info, escaped, started)

    def _attempt_timed_out(self, limit: float) -> BaseException:
        """A ``TimeoutError`` that is also the client library's own timeout error, so an
        application's ``except redis.RedisError`` / ``psycopg.Error`` (and SQLAlchemy's
        wrapping of DBAPI errors) handle an attempt our time limit cancelled."""
        return self._timeout_type(f"attempt exceeded its {limit:.3g}s time limit")

    def _decide(
        self, error: BaseException, info: ErrorInfo, attempt: int, delay: float, started: float
    ) -> Decision:
        if (
            self._never_repeated
            or client_retries(error)
            or answered_elsewhere(error)
            or is_session_bound(error)
        ):
            return give_up(self.fallback, error, "not_retryable")
        decision = super()._decide(error, info, attempt, delay, started)
        if decision.action is Action.RETRY and past_call_limit(
            started, self.clock.now(), decision.delay
        ):
            return give_up(self.fallback, error, "deadline")  # the client's own limit
        return decision

    def _stopped(
        self,
        decision: Decision,
        error: BaseException,
        info: ErrorInfo,
        attempts: int,
        started: float,
        trace: CallTrace | None,
        took: float | None = None,
    ) -> None:
        super()._stopped(decision, error, info, attempts, started, trace, took)
        if trace is None:
            return
        retry = self.retry
        # only where a retry could have mended it: a non-transient error (a WRONGTYPE) is
        # not retried for its own reason, which the classification gives
        why = self._never_repeated if info.retryable else None
        if (
            why is None
            and info.retryable
            and self._disallowed is not None
            and isinstance(retry, NeverRanRetry)
            and not retry.proves_never_ran(error)
        ):
            why = self._disallowed
        if why is None and answered_elsewhere(error):  # a redirect's target failed
            why = "redirected"  # (see _elsewhere); a call never repeated says why not
        if why is None and info.retryable and is_session_bound(error):
            why = "session"  # (see session_bound)
        if why is not None and not isinstance(error, CircuitOpenError):
            try:
                trace.span.set_attribute(RETRY_DISALLOWED, why)
            except Exception:  # telemetry must never replace the caller's error
                return
        retries, attribute = client_retries(error), HTTP_CLIENT_RETRIES
        if (  # on our own span; under contrib's, the DB layer says it (explain_no_retry)
            not retries
            and self._own_span
            and isinstance(retry, LayeredRetry)
            and isinstance(error, retry.not_retried)
        ):
            retries, attribute = retry.repeats, REDIS_CLIENT_RETRIES
        if retries:
            try:
                trace.span.set_attribute(RETRY_DISALLOWED, "client_retried")
                trace.span.set_attribute(attribute, retries)
            except Exception:  # telemetry must never replace the caller's error
                return

    def _record_outcome(
        self, error: BaseException | None, info: ErrorInfo | None, took: float
    ) -> None:
        """A failure met at another server (a redirect's target, see :mod:`._elsewhere`)
        is an answer of this one: a success on its breaker."""
        if error is not None and answered_elsewhere(error):
            error, info = None, None
        super()._record_outcome(error, info, took)

    def _passing(
        self, args: tuple[Any, ...], kwargs: dict[str, Any], release: bool
    ) -> Callable[..., Any] | None:
        passes = self._passes_refused
        if passes is None or release:  # release: a full bulkhead, not the circuit
            return None
        return passes(args, kwargs)

    def _reject(
        self,
        error: BaseException,
        started: float,
        fn: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        *,
        release: bool,
    ) -> Any:
        send = self._passing(args, kwargs, release)
        if send is not None:
            return send(*args, **kwargs)
        return super()._reject(error, started, fn, args, kwargs, release=release)

    async def _areject(
        self,
        error: BaseException,
        started: float,
        fn: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        *,
        release: bool,
    ) -> Any:
        send = self._passing(args, kwargs, release)
        if send is not None:
            return await send(*args, **kwargs)
        return await super()._areject(error, started, fn, args, kwargs, release=release)

    def _rejection(self) -> CircuitOpenError:
        breaker = self.breaker
        assert breaker is not None  # every target's policy has the target's breaker
        return self._rejection_type(breaker.name, breaker.retry_after())
