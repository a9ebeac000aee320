"""Retrying a block of code: ``for attempt in policy.attempts(): with attempt: ...``.

Some work is not a single callable (several statements, a ``with`` block of its own, code
that assigns to local variables). tenacity's answer, kept here: an iterator of attempts,
each a context manager. A failing block is classified; if the engine says retry, the
exception is suppressed, the loop sleeps and yields the next attempt; otherwise the exception
propagates unchanged. The breaker is asked once before the first attempt and told the
outcome once, as for ``call``; the bulkhead slot is held for the whole loop, and given back
the moment the loop's outcome is known (not when the generator is finalised: an ``async
for`` left by an exception kept it until the event loop's finaliser ran); budget,
deadlines (published to :func:`remaining_time`, cooperative for blocks), telemetry and testing
mode behave the same. A fallback cannot answer for a block (a block has no return value), so
it is not consulted.

Async code uses ``async for attempt in policy.aattempts(): with attempt: ...``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from types import TracebackType
from typing import TYPE_CHECKING

from otel_recovery._attempt import AttemptTokens, enter_attempt, leave_attempt
from otel_recovery._config import SWITCHES
from otel_recovery._engine import Action
from otel_recovery.classify import ErrorInfo
from otel_recovery.policies.retry import RetryAdvice
from otel_recovery.policies.timeout import reset_deadline, set_deadline
from otel_recovery.telemetry import CallTrace

if TYPE_CHECKING:
    from otel_recovery._policy_core import PolicyCore
    from otel_recovery.policies.bulkhead import Bulkhead

__all__ = ["Attempt", "AttemptLoop"]


class AttemptLoop:
    """The state of one retried block; drives :class:`Attempt` s."""

    def __init__(self, policy: PolicyCore) -> None:
        self.policy = policy
        self.started = policy.clock.now()
        self.number = 0
        self.delay = 0.0
        self.done = False
        self.trace: CallTrace | None = None
        self.info: ErrorInfo | None = None
        self._permit = False
        self.advice: RetryAdvice | None = None  # the advisor's answer for the running retry
        self.error: BaseException | None = None  # the failure a retry was decided on
        self.took = 0.0  # how long that failed attempt took
        self.slot: Bulkhead | None = None  # the bulkhead slot this loop holds, if any

    def settle(self) -> None:
        """The loop's outcome is known: no more attempts, and the slot goes back now."""
        self.done = True
        slot, self.slot = self.slot, None
        if slot is not None:
            slot.release()

    def begin(self) -> None:
        """Ask the breaker once for the whole block; a rejection raises ``CircuitOpenError``.
        The budget counts the call once the bulkhead admitted it too (:meth:`admitted`)."""
        policy = self.policy
        breaker = policy.breaker
        if SWITCHES.active and breaker is not None:
            if not breaker.can_execute():
                error = policy._rejection()
                info, trace = policy._open_rejection_trace(error, self.started)
                policy._failed(trace, 0, info, error)
                raise error
            self._permit = True

    def admitted(self, slot: Bulkhead | None) -> None:
        """The bulkhead (if any) gave this loop ``slot``: the call counts for the budget."""
        self.slot = slot
        policy = self.policy
        if SWITCHES.active and policy.budget is not None:
            policy.budget.record_call(self.started)

    def reject_full(self, full: BaseException) -> None:
        """The bulkhead refused the block: give the breaker permit back and say so."""
        policy = self.policy
        if self._permit and policy.breaker is not None:
            policy.breaker.release()
        self.done = True
        info, trace = policy._open_rejection_trace(full, self.started)
        policy._failed(trace, 0, info, full)

    def stopped_by_the_wait(self) -> BaseException | None:
        """After the backoff: the failure to raise if the repeat must not go out after all
        (``PolicyCore._after_backoff``: the circuit opened meanwhile, the deadline passed),
        the loop then settled; None to go on."""
        error, policy = self.error, self.policy
        if error is None:
            return None
        stop = policy._after_backoff(_no_call, (), error, self.started) if SWITCHES.active else None
        if stop is None:
            if self.trace is not None and self.info is not None:
                self.trace.retried(self.info)
            return None
        self.settle()
        self.error = None
        policy._learn(stop.advice, success=False, seconds=0.0)
        info = self.info
        assert info is not None  # classified when the retry was decided (failed)
        policy._stopped(stop, error, info, self.number, self.started, self.trace, self.took)
        policy._failed(self.trace, self.number, info, error)
        return error

    def next_attempt(self) -> Attempt:
        self.error = None  # kept only through the wait: its traceback holds frames
        self.number += 1
        return Attempt(self, self.number)

    def succeeded(self) -> None:
        self.settle()
        self.policy._learn(self.advice, success=True, seconds=0.0)
        self.policy._record_outcome(None, None, self.policy.clock.now() - self.started)
        if self.trace is not None:
            self.trace.end("success", self.number, self.info)

    def cancelled(self) -> None:
        self.settle()
        if self._permit and self.policy.breaker is not None:
            self.policy.breaker.release()
        if self.trace is not None:
            self.trace.end("cancelled", self.number, self.info)

    def failed(self, error: BaseException, took: float) -> bool:
        """Decide after a failed attempt; True means "suppress and retry"."""
        policy = self.policy
        if not SWITCHES.active:
            self.settle()
            return False
        info = policy._classify(error)
        self.info = info
        policy._learn(self.advice, success=False, seconds=took)
        self.advice = None
        if self.trace is None:
            self.trace = policy._trace(self.started)
        trace = self.trace
        if trace is not None:
            trace.attempt_failed(self.number, info, took)
        decision = policy._decide(error, info, self.number, self.delay, self.started)
        if decision.action is Action.RETRY:
            self.delay, self.advice = decision.delay, decision.advice
            self.error, self.took = error, took
            if trace is not None:
                trace.retrying(self.number + 1, self.delay, info)
            return True
        self.settle()
        policy._learn(decision.advice, success=False, seconds=0.0)
        policy._stopped(decision, error, info, self.number, self.started, trace, took)
        policy._failed(trace, self.number, info, error)
        return False


class Attempt:
    """One try of the block; use it as ``with attempt:``."""

    __slots__ = (
        "_deadline_token",
        "_loop",
        "_span_token",
        "_start",
        "_token",
        "finished",
        "number",
    )

    def __init__(self, loop: AttemptLoop, number: int) -> None:
        self._loop = loop
        self.number = number
        self._start = 0.0
        self._token: AttemptTokens | None = None
        self._deadline_token: object | None = None
        self._span_token: object | None = None
        self.finished = False

    def __enter__(self) -> Attempt:
        policy = self._loop.policy
        self._start = policy.clock.now()
        self._token = enter_attempt(self.number, resends=False)
        end = policy._attempt_end(self._start, self._loop.started)
        if end is not None:
            self._deadline_token = set_deadline(end, policy.clock)
        trace = self._loop.trace
        if trace is not None:  # a retry: its spans are the recovery span's children
            self._span_token = trace.enter_attempt()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> bool:
        trace = self._loop.trace
        if trace is not None and self._span_token is not None:
            trace.leave_attempt(self._span_token)
            self._span_token = None
        if self._token is not None:
            leave_attempt(self._token)
            self._token = None
        if self._deadline_token is not None:
            reset_deadline(self._deadline_token)  # type: ignore[arg-type]
        self.finished = True
        loop = self._loop
        if error is None:
            loop.succeeded()
            return False
        if not isinstance(error, Exception):
            loop.cancelled()
            return False
        return loop.failed(error, loop.policy.clock.now() - self._start)


_NOT_ENTERED = "each attempt must be used as `with attempt:`; the loop cannot tell otherwise"


def iterate(policy: PolicyCore) -> Iterator[Attempt]:
    loop = AttemptLoop(policy)
    loop.begin()
    bulkhead = policy.bulkhead if SWITCHES.active else None
    if bulkhead is not None:
        try:
            bulkhead.acquire()
        except BaseException as full:
            loop.reject_full(full)
            raise
    loop.admitted(bulkhead)
    try:
        while not loop.done:
            attempt = loop.next_attempt()
            yield attempt
            if not attempt.finished:
                raise RuntimeError(_NOT_ENTERED)
            if not loop.done and loop.delay > 0:
                policy.clock.sleep(loop.delay)
            if not loop.done:
                stop = loop.stopped_by_the_wait()
                if stop is not None:
                    raise stop
    finally:
        if not loop.done:
            loop.cancelled()  # left early (break, an exception from the loop body)
        loop.settle()


async def aiterate(policy: PolicyCore) -> AsyncIterator[Attempt]:
    loop = AttemptLoop(policy)
    loop.begin()
    bulkhead = policy.bulkhead if SWITCHES.active else None
    if bulkhead is not None:
        try:
            await bulkhead.aacquire()
        except BaseException as full:
            loop.reject_full(full)
            raise
    loop.admitted(bulkhead)
    try:
        while not loop.done:
            attempt = loop.next_attempt()
            yield attempt
            if not attempt.finished:
                raise RuntimeError(_NOT_ENTERED)
            if not loop.done and loop.delay > 0:
                await policy.clock.asleep(loop.delay)
            if not loop.done:
                stop = loop.stopped_by_the_wait()
                if stop is not None:
                    raise stop
    finally:
        if not loop.done:
            loop.cancelled()
        loop.settle()


def _no_call() -> None:
    """What a block's retry has in place of a function: nothing a client could be closed for."""
