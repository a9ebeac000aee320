"""Recovery that never lets a bug of ours, or a failure of the client's own, reach the
application as a failure of the server: the guarded policy of the Redis and PostgreSQL
instrumentors.

The shared drivers run a call's attempts and let whatever their machinery raises escape.
For an HTTP request the layer settles that itself (it keeps every attempt's outcome); the
Redis and PostgreSQL layers hand the runner the driver's own method, so the promise lives
here, in the recovery step the compiled runners call too:

- **An internal error never replaces the call's outcome.** The original is wrapped, once a
  first attempt has failed, in a recorder (:class:`Attempts`); if classification, the
  breaker's or budget's bookkeeping, the decision or telemetry raise, the error is logged
  once per target and the application gets what the driver did on its latest attempt (the
  same exception object, or its result). Nothing is sent again: an ``INSERT`` or ``INCR``
  never is because our code broke.
- **The client's own failures are not the server's.** Waiting for the application's own
  connection pool (marked by :func:`clients_own`, or recognised by a library's subclass)
  is neither retried nor counted on the breaker.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Coroutine
from types import FrameType
from typing import Any

from otel_recovery._engine import Action, Decision
from otel_recovery._reraise import reraise
from otel_recovery.classify import ErrorInfo
from otel_recovery.instrumentors._attempt_site import is_call_limit
from otel_recovery.instrumentors._target_policy import TargetPolicy
from otel_recovery.instrumentors._wrapping import report_internal_error
from otel_recovery.policies.circuit_breaker import CircuitOpenError

__all__ = [
    "AsyncAttempts",
    "Attempts",
    "GuardedPolicy",
    "clients_own",
    "outcome_or_refusal",
    "raised_in",
    "told_beneath",
]


_CLIENTS_OWN = "_otel_recovery_clients_own"
"""Set on a failure that the client made by itself, without the server (see
:func:`clients_own`)."""


def clients_own(error: BaseException) -> None:
    """Mark ``error`` as the client's own doing, not the server's: waiting for the
    application's own connection pool (asyncpg's ``acquire(timeout=)`` on an exhausted pool,
    the pool closing). :class:`GuardedPolicy` neither retries nor counts such a failure, and
    it reaches the application unchanged."""
    try:
        setattr(error, _CLIENTS_OWN, True)
    except Exception:  # an exception type with __slots__: counted as any failure
        return


_TOLD_BENEATH = "_otel_recovery_told_beneath"
"""Set on a failure that a layer beneath the one it now rises through already counted on
the target's breaker (see :func:`told_beneath`)."""


def told_beneath(error: BaseException) -> None:
    """Mark ``error`` as counted on the target's breaker by a layer nested in the one it
    rises through now (asyncpg: a statement of a pool's ``setup`` callback, inside the
    ``acquire()``): that layer gives its permit back instead of counting it again, and the
    mark goes with it, so the same object raised by a later call counts again."""
    with contextlib.suppress(Exception):  # refusing attributes: counted twice, as before
        setattr(error, _TOLD_BENEATH, True)


def _take_told_beneath(error: BaseException) -> bool:
    if getattr(error, _TOLD_BENEATH, False) is not True:
        return False
    with contextlib.suppress(Exception):
        delattr(error, _TOLD_BENEATH)
    return True


def raised_in(error: BaseException) -> FrameType | None:
    """The innermost frame of ``error``'s traceback: where the driver raised it, which tells
    the client's own refusals (its pool, its checks before sending) from the server's
    replies. None without a traceback."""
    traceback = error.__traceback__
    if traceback is None:
        return None
    while traceback.tb_next is not None:
        traceback = traceback.tb_next
    return traceback.tb_frame


class _Outcome:
    """What the original function did on the latest attempt of one call: the result it
    returned or the exception it raised (or, awaited, the time-limit error our driver raised
    in its place). What the application gets when our own machinery fails after an attempt
    (:class:`GuardedPolicy`); ``made`` says whether the original was called at all."""

    __slots__ = ("fn", "made", "raised", "value")

    def __init__(self, fn: Callable[..., Any], first: BaseException | None = None) -> None:
        self.fn = fn
        self.made = first is not None
        self.raised = first is not None
        self.value: Any = first

    @property
    def __self__(self) -> Any:
        """The site the original is a bound method of, if any: what
        :func:`~._attempt_site.site_of` asks (an asyncpg connect's own time limit)."""
        return getattr(self.fn, "__self__", None)

    def note(self, error: BaseException) -> None:
        """The driver ended an attempt with ``error`` (its own time-limit error, say)."""
        self.raised, self.value = True, error

    def delivers(self, error: BaseException) -> bool:
        """``error`` is the outcome itself: what the application gets anyway."""
        return self.raised and error is self.value

    def deliver(self) -> Any:
        """Return the latest result, or raise the latest exception unchanged (its
        ``__context__`` its own: :func:`~otel_recovery._reraise.reraise`). Whoever made this
        object :meth:`forget` s it once the call is over."""
        value = self.value
        if self.raised:
            try:
                reraise(value)  # with the context its library gave it
            finally:
                del value  # no frame -> error -> traceback -> frame cycle
        return value

    def forget(self) -> None:
        """Drop the outcome: an exception kept here would hold, through its traceback, the
        frame that holds this object (a cycle only the garbage collector frees)."""
        self.value = None


class Attempts(_Outcome):
    """The original function, recording each outcome (:class:`_Outcome`)."""

    __slots__ = ()

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.made = True
        try:
            value = self.fn(*args, **kwargs)
        except BaseException as error:
            self.raised, self.value = True, error
            raise
        self.raised, self.value = False, value
        return value


class AsyncAttempts(_Outcome):
    """The awaited twin of :class:`Attempts` (the original may return any awaitable)."""

    __slots__ = ()

    async def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.made = True
        try:
            value = self.fn(*args, **kwargs)
            if inspect.isawaitable(value):
                value = await value
        except BaseException as error:
            self.raised, self.value = True, error
            raise
        self.raised, self.value = False, value
        return value


class GuardedPolicy(TargetPolicy):
    """A target's policy as the Redis and PostgreSQL layers run it, with two promises the
    shared drivers do not make by themselves:

    - *An internal error never replaces the call's outcome.* When our own machinery
      (classification, the breaker's or budget's bookkeeping, the decision, telemetry)
      raises while recovering, the error is logged once per target and the application
      gets what the original did on its latest attempt: the driver's own exception object,
      or its result. No further attempt is made: an ``INSERT`` or ``INCR`` is never sent
      again because our code broke.
    - *The client's own failures are not the server's* (:meth:`_clients_own`): waiting for
      the application's own connection pool is neither retried nor counted on the breaker
      (its permit is given back, as for a cancelled call), and reaches the application
      unchanged, after the time the pool itself took.
    - *One failure counts once on a breaker* where a layer knows it rose through another
      of the target's (:func:`told_beneath`: a statement in asyncpg's pool ``setup``
      callback, then the ``acquire()`` around it): the outer layer gives its permit back.

    Both live in the recovery step (``_recover``/``_arecover``), which the compiled runners
    (``_speedups.Runner``) call too, so they hold on every path. The happy path's own
    bookkeeping before the first attempt and after a success (the breaker's gate and
    success count, the budget's deposit) is the runner's and is not covered here.

    The Redis and PostgreSQL instrumentors build their targets' policies of this class
    (``RecoveryInstrumentor.policy_class``); libraries with failures of their own to
    recognise subclass it (``_clients_own``).
    """

    __slots__ = ()
    _marks_resends = False  # a Redis command or a statement is no HTTP resend

    def _clients_own(self, error: BaseException) -> bool:
        """Whether ``error`` is the client's own doing, not the server's (marked by
        :func:`clients_own`; a library's subclass may recognise more)."""
        return getattr(error, _CLIENTS_OWN, False) is True

    def _is_clients_own(self, error: BaseException) -> bool:
        try:
            return self._clients_own(error)
        except Exception as problem:  # our check must not replace the outcome either
            report_internal_error(f"{self.name}: recognising the client's own failures", problem)
            return False

    def _let_go(self, error: BaseException) -> Any:
        """A first attempt failed by the client's own doing: give the breaker its permit
        back (nothing is counted) and raise ``error`` as it is, at once."""
        breaker = self.breaker
        try:
            if breaker is not None:
                breaker.release()
        except Exception as problem:
            report_internal_error(f"{self.name}: recovery", problem)
        try:
            reraise(error)
        finally:
            del error  # see _Outcome.forget

    def _recover(
        self,
        fn: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        error: BaseException,
        started: float,
        took: float,
    ) -> Any:
        try:
            if self._is_clients_own(error):
                return self._let_go(error)
            attempts = fn if isinstance(fn, Attempts) else Attempts(fn, error)
            try:
                try:
                    return super()._recover(attempts, args, kwargs, error, started, took)
                except Exception as problem:
                    if attempts.delivers(problem):
                        raise
                    report_internal_error(f"{self.name}: recovery", problem)
                return attempts.deliver()  # outside the handler: the outcome stays its own
            finally:
                if attempts is not fn:
                    attempts.forget()
        finally:
            del error  # see _Outcome.forget

    async def _arecover(
        self,
        fn: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        error: BaseException,
        started: float,
        took: float,
    ) -> Any:
        try:
            if self._is_clients_own(error):
                return self._let_go(error)
            attempts = fn if isinstance(fn, AsyncAttempts) else AsyncAttempts(fn, error)
            try:
                try:
                    return await super()._arecover(attempts, args, kwargs, error, started, took)
                except Exception as problem:
                    if attempts.delivers(problem) or is_call_limit(problem):
                        raise  # the outcome, or the call's own time limit passing
                    report_internal_error(f"{self.name}: recovery", problem)
                return attempts.deliver()
            finally:
                if attempts is not fn:
                    attempts.forget()
        finally:
            del error

    def _attempt(
        self,
        fn: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        attempt_start: float,
        started: float,
    ) -> Coroutine[Any, Any, Any]:
        """An awaited attempt; under :class:`AsyncAttempts`, the error it ends with is
        noted there (the driver raises its own time-limit error for an attempt it cut)."""
        attempt = super()._attempt(fn, args, kwargs, attempt_start, started)
        if not isinstance(fn, AsyncAttempts):
            return attempt
        return _noting(fn, attempt)

    def _decide(
        self, error: BaseException, info: ErrorInfo, attempt: int, delay: float, started: float
    ) -> Decision:
        if self._is_clients_own(error):  # a later attempt met the client's own failure
            return Decision(Action.GIVE_UP, reason="not_retryable")
        return super()._decide(error, info, attempt, delay, started)

    def _record_outcome(
        self, error: BaseException | None, info: ErrorInfo | None, took: float
    ) -> None:
        breaker = self.breaker
        if (
            error is not None
            and breaker is not None
            and (self._is_clients_own(error) or _take_told_beneath(error))
        ):
            breaker.release()  # not the server's, or told already by a layer beneath
            return
        super()._record_outcome(error, info, took)
        if error is not None and breaker is not None:
            self._counted(error)

    def _counted(self, error: BaseException) -> None:
        """``error`` was just counted on the breaker (a library's subclass notes it where an
        enclosing layer of the target should not count it again: :func:`told_beneath`)."""


async def _noting(attempts: AsyncAttempts, attempt: Coroutine[Any, Any, Any]) -> Any:
    try:
        return await attempt
    except Exception as error:
        attempts.note(error)
        raise


def outcome_or_refusal(attempts: _Outcome, error: BaseException) -> bool:
    """``error`` is what the call was meant to end with: the latest attempt's outcome, the
    breaker's refusal of a call that was never made, or the call's own time limit passing
    (:func:`~._attempt_site.is_call_limit`: an asyncpg ``connect(timeout=)``)."""
    return (
        attempts.delivers(error)
        or (not attempts.made and isinstance(error, CircuitOpenError))
        or is_call_limit(error)
    )
