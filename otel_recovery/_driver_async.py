"""The asyncio driver: the sync driver's twin, with awaiting, cancellation and timeouts.

Each attempt calls the function afresh, because a coroutine can be awaited only once; the
function may be a coroutine function, a plain function, or a lambda returning an awaitable
(the seed API's ``retry_func``). Time limits cancel the attempt for real here: the attempt's
own limit or what is left of the retry deadline, whichever is sooner. ``CancelledError`` is
never a failure: it releases the breaker permit, ends the trace and propagates.
"""

from __future__ import annotations

import asyncio
import inspect
import sys
from collections.abc import Awaitable, Callable
from types import CoroutineType
from typing import Any, ParamSpec, TypeVar

from otel_recovery._attempt import enter_attempt, leave_attempt
from otel_recovery._compiled import SPEEDUPS
from otel_recovery._config import SWITCHES
from otel_recovery._engine import Action, Decision
from otel_recovery._policy_core import AsyncRunner, PolicyCore
from otel_recovery._reraise import reraise, set_context
from otel_recovery._trio import running_trio
from otel_recovery.classify import ErrorInfo
from otel_recovery.policies.bulkhead import BulkheadFullError
from otel_recovery.policies.timeout import reset_deadline, set_deadline
from otel_recovery.telemetry import CallTrace

__all__ = ["AsyncDriver", "resolve"]

P = ParamSpec("P")
T = TypeVar("T")


async def resolve(value: Any) -> Any:
    """Await ``value`` if it is awaitable; plain values pass through."""
    if inspect.isawaitable(value):
        return await value
    return value


class AsyncDriver(PolicyCore):
    __slots__ = ()

    async def acall(
        self, fn: Callable[P, Awaitable[T] | T], /, *args: P.args, **kwargs: P.kwargs
    ) -> T:
        """Run ``fn`` under this policy in the running event loop."""
        if not SWITCHES.active:
            plain: T = await resolve(fn(*args, **kwargs))
            return plain
        now = self.clock.now
        started = now()
        breaker = self.breaker
        if breaker is not None and not breaker.can_execute():
            rejected: T = await self._areject(
                self._rejection(), started, fn, args, kwargs, release=False
            )
            return rejected
        bulkhead = self.bulkhead
        if bulkhead is not None:
            try:
                await bulkhead.aacquire()
            except BulkheadFullError as full:
                rejected = await self._areject(full, started, fn, args, kwargs, release=True)
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
            try:
                result: T = await self._attempt(fn, args, kwargs, begun, started)
            except Exception as error:
                first = error
            except BaseException:
                if breaker is not None:
                    breaker.release()
                raise
            else:
                if breaker is not None:
                    if self._needs_duration:
                        breaker.record_success(now() - begun)
                    else:
                        breaker.record_success()
                if self.fallback is not None:
                    self._remember(fn, args, kwargs, result, started)
                return result
            # outside the handler, so errors keep their own __context__ (see SyncDriver)
            try:
                recovered: T = await self._arecover(fn, args, kwargs, first, started, now() - begun)
                return recovered
            finally:
                del first  # see _arecover
        finally:
            if bulkhead is not None:
                bulkhead.release()

    def awrap(self, fn: Callable[P, Awaitable[T]]) -> Callable[P, Awaitable[T]]:
        """The async twin of ``SyncDriver.wrap``, for coroutine functions."""
        run = self.arunner()

        async def wrapper(*args: P.args, **kwargs: P.kwargs) -> T:
            result: T = await run(fn, args, kwargs)
            return result

        return wrapper

    def arunner(self) -> AsyncRunner:
        """The async twin of ``SyncDriver.runner``: ``await run(fn, args, kwargs)`` behaves
        exactly like ``await acall(fn, *args, **kwargs)``; a coroutine back from ``fn`` is
        awaited directly, any other awaitable or plain value goes through ``resolve``.
        Where the C extension is built, "guarded" below runs compiled: ``run(...)`` returns
        an ``AsyncRun`` (``_speedups_src/async_run.c``) that acts as its coroutine would."""
        if not self._happy_path_inlinable():
            acall = self.acall

            async def general(fn: Callable[..., Any], args: tuple[Any, ...], kwargs: Any) -> Any:
                return await acall(fn, *args, **kwargs)

            return general
        switches = SWITCHES
        now = self.clock.now
        arecover = self._arecover
        breaker, gate_unlocked, tallied, budget, deposit, remember = self._happy_path()
        if SPEEDUPS is not None:  # "guarded" below as an awaitable (_speedups_src/async_run.c)
            counter = None if deposit is None else budget._call_count  # type: ignore[union-attr]
            compiled: AsyncRunner = SPEEDUPS.Runner(
                switches, now, breaker, gate_unlocked, tallied, budget,
                counter, remember, arecover, self._areject, self._rejection, resolve=resolve,
            )  # fmt: skip
            return compiled
        if breaker is None and budget is None and remember is None:

            async def unguarded(fn: Callable[..., Any], args: tuple[Any, ...], kwargs: Any) -> Any:
                if not switches.active:
                    return await resolve(fn(*args, **kwargs))
                started = now()
                try:
                    pending = fn(*args, **kwargs)  # acall also accepts a plain value back
                    return await (pending if type(pending) is CoroutineType else resolve(pending))
                except Exception as error:
                    first = error
                try:  # outside the handler (see guarded)
                    return await arecover(fn, args, kwargs, first, started, now() - started)
                finally:
                    del first

            return unguarded
        areject = self._areject
        rejection = self._rejection

        async def guarded(fn: Callable[..., Any], args: tuple[Any, ...], kwargs: Any) -> Any:
            if not switches.active:
                return await resolve(fn(*args, **kwargs))
            started = now()
            if (
                breaker is not None
                and not (gate_unlocked and breaker._permit_all)
                and not breaker.can_execute()
            ):
                return await areject(rejection(), started, fn, args, kwargs, release=False)
            if budget is not None:
                if deposit is not None and started < budget._bucket_end:
                    deposit()
                else:
                    budget.record_call(started)
            try:
                pending = fn(*args, **kwargs)  # acall also accepts a plain value back
                result = await (pending if type(pending) is CoroutineType else resolve(pending))
            except Exception as error:
                first = error
            except BaseException:
                if breaker is not None:
                    breaker.release()
                raise
            else:
                if breaker is not None:
                    tally = breaker._tally if tallied else None
                    if tally is not None:
                        next(tally)
                    else:
                        breaker.record_success()
                if remember is not None:
                    remember(fn, args, kwargs, result, started)
                return result
            # outside the handler, so errors keep their own __context__ (see the sync twin)
            try:
                return await arecover(fn, args, kwargs, first, started, now() - started)
            finally:
                del first  # see _arecover

        return guarded

    async def _attempt(
        self,
        fn: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        attempt_start: float,
        started: float,
    ) -> Any:
        end = self._attempt_end(attempt_start, started)
        if end is None:
            return await resolve(fn(*args, **kwargs))
        limit = end - self.clock.now()
        if limit <= 0:  # the deadline is spent: an attempt now would only be cut mid-send
            raise self._attempt_timed_out(max(0.0, limit))
        token = set_deadline(end, self.clock)
        try:
            trio = running_trio()
            if trio is not None:  # trio's own scope: cancels the attempt, knows if it fired
                with trio.move_on_after(limit) as cut:
                    return await resolve(fn(*args, **kwargs))
                assert cut.cancelled_caught  # the with block returned otherwise
                raise self._attempt_timed_out(limit)
            if sys.version_info >= (3, 11):
                # A timeout scope in this task: it knows whether it fired (a client's own
                # timeout inside, aiohttp's ClientTimeout say, is not ours), and unlike
                # wait_for it needs no second task, whose exception cycle would keep the
                # failed attempt's frames alive until the garbage collector runs.
                scope = asyncio.timeout(limit)
                try:
                    async with scope:
                        return await resolve(fn(*args, **kwargs))
                except TimeoutError as timed_out:
                    if not scope.expired():
                        raise
                    raise self._attempt_timed_out(limit) from timed_out
            try:
                return await asyncio.wait_for(resolve(fn(*args, **kwargs)), limit)
            except asyncio.TimeoutError as timed_out:
                if timed_out.args:  # the callee's own timeout (an empty one looks like ours)
                    raise
                raise self._attempt_timed_out(limit) from timed_out
        finally:
            reset_deadline(token)

    async def _arecover(
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
                await self._aafter_failure(error, args)
                decision = self._decide(error, info, attempt, delay, started)
                if decision.action is Action.RETRY:
                    delay, advice = decision.delay, decision.advice
                    if trace is not None:
                        trace.retrying(attempt + 1, delay, info)
                    await self._abefore_retry(fn, args)
                    if delay > 0:
                        await clock.asleep(delay)
                    stop = self._after_backoff(fn, args, error, started)
                    if stop is not None:
                        decision = stop
                    elif trace is not None:
                        trace.retried(info)
                if decision.action is not Action.RETRY:
                    self._learn(decision.advice, success=False, seconds=0.0)
                    self._stopped(decision, error, info, attempt, started, trace, took)
                    settled = True
                    return await self._agive_up(
                        decision, error, info, attempt, trace, fn, args, kwargs
                    )
                attempt += 1
                attempt_start = clock.now()
                attempt_tokens = enter_attempt(attempt, self._marks_resends)
                try:
                    result = await self._attempt(fn, args, kwargs, attempt_start, started)
                except Exception as exc:
                    error, took, info = exc, clock.now() - attempt_start, self._classify(exc)
                    self._learn(advice, success=False, seconds=took)
                    continue
                finally:
                    leave_attempt(attempt_tokens)
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
        decision = self._rejected(error, started, release=release)
        info, trace = self._open_rejection_trace(error, started)
        try:
            return await self._agive_up(decision, error, info, 0, trace, fn, args, kwargs)
        finally:
            del error  # see _recover

    async def _agive_up(
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
        if decision.action is Action.FALLBACK:
            kind, plan = self._fallback_plan(error, fn, args, kwargs)
            if kind == "function":
                try:
                    value = await resolve(plan(error))
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
