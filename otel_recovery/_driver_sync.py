"""The synchronous driver: runs a callable in the calling thread under a policy.

``call`` is the happy path and is kept lean: a switch read, a clock read, the breaker's
permit and success record. The first exception hands over to ``_recover``, which loops on
the engine's decisions; nothing there runs for a call that succeeds first time.

Whatever escapes the loop (``KeyboardInterrupt`` during a backoff sleep, a bug in a user
predicate) still settles the call: the breaker's permit is given back if no outcome was
recorded, and the recovery trace is ended and detached.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from types import CoroutineType
from typing import Any, NoReturn, ParamSpec, TypeVar

from otel_recovery._attempt import enter_attempt, leave_attempt
from otel_recovery._compiled import SPEEDUPS
from otel_recovery._config import SWITCHES
from otel_recovery._engine import Action, Decision
from otel_recovery._policy_core import PolicyCore, Runner
from otel_recovery._reraise import reraise, set_context
from otel_recovery.classify import ErrorInfo
from otel_recovery.policies.bulkhead import BulkheadFullError
from otel_recovery.policies.timeout import reset_deadline, set_deadline
from otel_recovery.telemetry import CallTrace

__all__ = ["SyncDriver"]

P = ParamSpec("P")
T = TypeVar("T")


COROUTINE_REFUSED = (
    "{fn!r} returned a coroutine, which runs nothing until it is awaited: recovering a "
    "synchronous call cannot retry it or count its failures. Declare the function "
    "`async def` (so @recover awaits it) or use `await policy.acall(...)`"
)
"""Why a synchronous call's coroutine is refused; ``runner.c`` says the same."""


def _refuse_coroutine(fn: Callable[..., Any], pending: Any) -> NoReturn:
    """A synchronous call (``call()``, a runner, ``@recover`` on a plain ``def``) made a
    coroutine and ran none of it: returned, the caller would await it outside every retry,
    and the breaker would have counted a success. It is closed (no "never awaited"
    warning) and refused, naming the fix. A lambda or ``functools.partial`` around a
    coroutine function, or a decorator that hides one, is how such a call comes about."""
    pending.close()
    raise TypeError(COROUTINE_REFUSED.format(fn=fn))


class SyncDriver(PolicyCore):
    __slots__ = ()

    def call(self, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> T:
        """Run ``fn(*args, **kwargs)`` under this policy, in the calling thread."""
        if not SWITCHES.active:
            return fn(*args, **kwargs)
        now = self.clock.now
        started = now()
        breaker = self.breaker
        if breaker is not None and not breaker.can_execute():
            rejected: T = self._reject(self._rejection(), started, fn, args, kwargs, release=False)
            return rejected
        bulkhead = self.bulkhead
        if bulkhead is not None:
            try:
                bulkhead.acquire()
            except BulkheadFullError as full:
                rejected = self._reject(full, started, fn, args, kwargs, release=True)
                return rejected
            except BaseException:
                if breaker is not None:
                    breaker.release()
                raise
        # the first attempt starts now: a wait for a bulkhead slot is not the attempt's
        # time (its Timeout), though the deadline of the whole call counts it
        begun = now() if bulkhead is not None else started
        try:
            if self.budget is not None:
                self.budget.record_call(started)
            token = None
            if self._limits_attempts:
                end = self._attempt_end(begun, started)
                token = set_deadline(end, self.clock) if end is not None else None
            try:
                result = fn(*args, **kwargs)
            except Exception as error:
                first = error
            except BaseException:
                if breaker is not None:
                    breaker.release()
                raise
            else:
                if type(result) is CoroutineType:  # nothing ran: neither success nor failure
                    if breaker is not None:
                        breaker.release()
                    _refuse_coroutine(fn, result)
                if breaker is not None:
                    if self._needs_duration:
                        breaker.record_success(now() - begun)
                    else:
                        breaker.record_success()
                if self.fallback is not None:
                    self._remember(fn, args, kwargs, result, started)
                return result
            finally:
                if token is not None:
                    reset_deadline(token)
            # outside the handler, so errors keep their own __context__ (see runner())
            try:
                recovered: T = self._recover(fn, args, kwargs, first, started, now() - begun)
                return recovered
            finally:
                del first  # see _recover
        finally:
            if bulkhead is not None:
                bulkhead.release()

    def wrap(self, fn: Callable[P, T]) -> Callable[P, T]:
        """A wrapper running ``fn`` under this policy (what ``@recover`` installs)."""
        run = self.runner()

        def wrapper(*args: P.args, **kwargs: P.kwargs) -> T:
            result: T = run(fn, args, kwargs)
            return result

        return wrapper

    def runner(self) -> Runner:
        """``run(fn, args, kwargs)``, behaving exactly like ``call(fn, *args, **kwargs)``.

        For code that runs a policy on every call of something hot (the instrumentors, the
        decorator): unless a bulkhead, a time limit or slow-call timing is configured, the
        happy path is compiled into one closure with everything bound to locals, reading the
        breaker's and budget's lock-free state instead of calling them (see
        ``PolicyCore._happy_path``): one Python frame instead of five. Where the C extension
        is built (``otel_recovery._compiled``), the same closure runs compiled. A policy's
        components are configuration: don't swap them after asking for a runner.
        """
        if not self._happy_path_inlinable():
            call = self.call

            def general(fn: Callable[..., Any], args: tuple[Any, ...], kwargs: Any) -> Any:
                return call(fn, *args, **kwargs)

            return general
        switches = SWITCHES
        now = self.clock.now
        recover = self._recover
        breaker, gate_unlocked, tallied, budget, deposit, remember = self._happy_path()
        if SPEEDUPS is not None:  # the closures below, compiled (otel_recovery/_speedups_src/)
            counter = None if deposit is None else budget._call_count  # type: ignore[union-attr]
            compiled: Runner = SPEEDUPS.Runner(
                switches, now, breaker, gate_unlocked, tallied, budget,
                counter, remember, recover, self._reject, self._rejection,
            )  # fmt: skip
            return compiled
        if breaker is None and budget is None and remember is None:

            def unguarded(fn: Callable[..., Any], args: tuple[Any, ...], kwargs: Any) -> Any:
                if not switches.active:
                    return fn(*args, **kwargs)
                started = now()
                try:
                    result = fn(*args, **kwargs)
                except Exception as error:
                    first = error
                else:
                    if type(result) is CoroutineType:  # nothing ran: see call()
                        _refuse_coroutine(fn, result)
                    return result
                try:  # outside the handler (see guarded)
                    return recover(fn, args, kwargs, first, started, now() - started)
                finally:
                    del first

            return unguarded
        reject = self._reject
        rejection = self._rejection

        def guarded(fn: Callable[..., Any], args: tuple[Any, ...], kwargs: Any) -> Any:
            if not switches.active:
                return fn(*args, **kwargs)
            started = now()
            if (
                breaker is not None
                and not (gate_unlocked and breaker._permit_all)
                and not breaker.can_execute()
            ):
                return reject(rejection(), started, fn, args, kwargs, release=False)
            if budget is not None:
                if deposit is not None and started < budget._bucket_end:
                    deposit()
                else:
                    budget.record_call(started)
            try:
                result = fn(*args, **kwargs)
            except Exception as error:
                first = error
            except BaseException:
                if breaker is not None:
                    breaker.release()
                raise
            else:
                if type(result) is CoroutineType:  # nothing ran: see call()
                    if breaker is not None:
                        breaker.release()
                    _refuse_coroutine(fn, result)
                if breaker is not None:
                    tally = breaker._tally if tallied else None
                    if tally is not None:
                        next(tally)
                    else:
                        breaker.record_success()
                if remember is not None:
                    remember(fn, args, kwargs, result, started)
                return result
            # Recovery runs outside the handler: inside it, every later attempt's error
            # would take the first failure as its __context__, and the final one, raised
            # again, would lose its own (requests' ConnectionError its MaxRetryError): the
            # application gets the library's exception exactly as the library raised it.
            try:
                return recover(fn, args, kwargs, first, started, now() - started)
            finally:
                del first  # see _recover: no frame -> error -> traceback -> frame cycle

        return guarded

    def _recover(
        self,
        fn: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        error: BaseException,
        started: float,
        took: float,
    ) -> Any:
        clock = self.clock
        trace = self._trace(started)
        if trace is not None:
            trace.activate()
        attempt, delay, info = 1, 0.0, self._classify(error)
        settled = False  # has the breaker been told how this call ended?
        try:
            while True:
                if trace is not None:
                    trace.attempt_failed(attempt, info, took)
                self._after_failure(error, args)
                decision = self._decide(error, info, attempt, delay, started)
                if decision.action is Action.RETRY:
                    delay, advice = decision.delay, decision.advice
                    if trace is not None:
                        trace.retrying(attempt + 1, delay, info)
                    self._before_retry(fn, args)
                    if delay > 0:
                        clock.sleep(delay)
                    stop = self._after_backoff(fn, args, error, started)
                    if stop is not None:
                        decision = stop
                    elif trace is not None:
                        trace.retried(info)
                if decision.action is not Action.RETRY:
                    self._learn(decision.advice, success=False, seconds=0.0)
                    self._stopped(decision, error, info, attempt, started, trace, took)
                    settled = True
                    return self._give_up(decision, error, info, attempt, trace, fn, args, kwargs)
                attempt += 1
                attempt_start = clock.now()
                end = self._attempt_end(attempt_start, started)
                token = set_deadline(end, self.clock) if end is not None else None
                attempt_tokens = enter_attempt(attempt, self._marks_resends)
                try:
                    result = fn(*args, **kwargs)
                except Exception as exc:
                    error, took, info = exc, clock.now() - attempt_start, self._classify(exc)
                    self._learn(advice, success=False, seconds=took)
                    continue
                finally:
                    leave_attempt(attempt_tokens)
                    if token is not None:
                        reset_deadline(token)
                if type(result) is CoroutineType:  # nothing ran: see call()
                    _refuse_coroutine(fn, result)
                self._record_outcome(None, None, clock.now() - attempt_start)
                settled = True
                self._learn(advice, success=True, seconds=clock.now() - attempt_start)
                self._remember(fn, args, kwargs, result, clock.now())
                if trace is not None:
                    trace.end("success", attempt, info)
                return result
        except BaseException as escaped:
            self._abandon(settled, trace, attempt, info, escaped, started)
            raise
        finally:
            # The error leaving here carries a traceback through this frame: holding it in
            # a local too would make a reference cycle (error -> traceback -> frame ->
            # error) that only the garbage collector frees, keeping every frame of the
            # failed call, and what their locals hold, alive until it runs.
            del error

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
        decision = self._rejected(error, started, release=release)
        info, trace = self._open_rejection_trace(error, started)
        try:
            return self._give_up(decision, error, info, 0, trace, fn, args, kwargs)
        finally:
            del error  # see _recover

    def _give_up(
        self,
        decision: Decision,
        error: BaseException,
        info: ErrorInfo,
        attempts: int,
        trace: CallTrace | None,
        fn: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> Any:
        """Answer from the fallback if it applies, else re-raise the final error unchanged."""
        if decision.action is Action.FALLBACK:
            kind, plan = self._fallback_plan(error, fn, args, kwargs)
            if kind == "function":
                try:
                    value = plan(error)
                    if inspect.isawaitable(value):
                        close = getattr(value, "close", None)
                        if callable(close):
                            close()
                        raise TypeError(
                            f"fallback function {plan!r} returned an awaitable in a sync call; "
                            "use acall() or an async-decorated function, or a sync fallback"
                        )
                except BaseException as fallback_error:
                    self._failed(trace, attempts, None, fallback_error)
                    if fallback_error.__context__ is None:
                        set_context(fallback_error, error)
                    raise
                return self._fallback_done(trace, kind, error, info, attempts, value)
            if kind != "none":
                return self._fallback_done(trace, kind, error, info, attempts, plan)
        self._failed(trace, attempts, info, error)
        try:
            reraise(error)  # with the context its library gave it
        finally:
            del error  # see _recover: no frame -> error -> traceback -> frame cycle
