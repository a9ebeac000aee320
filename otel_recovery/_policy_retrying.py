"""What a policy does between a failed attempt and its repeat: decide, wait, check again.

After each failed attempt, both drivers take the same steps: let an instrumentor mend what
the failure revealed (:meth:`PolicyRetrying._after_failure`), ask the engine whether to
repeat the call (:meth:`PolicyRetrying._decide`; never while another caller holds the
circuit open), let go of what the attempt holds before the backoff
(:meth:`PolicyRetrying._before_retry`), and after it ask whether the repeat may still go
out (:meth:`PolicyRetrying._after_backoff`): the wait is where time passes, so what was
decided before it may no longer hold. The loop over an application's own block
(``_attempts``) asks only the two questions, with no hooks. The hooks do nothing here; an
instrumentor's policy (``instrumentors/_target_policy.py``) overrides them, and adds its
own reasons not to retry to :meth:`PolicyRetrying._decide`.

:class:`PolicyRetrying` is a mixin of ``PolicyCore``: it has no slots of its own and works
on the policy's (``_Retrying`` lists those it uses). None of it runs for a call that
succeeds first time.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from otel_recovery._clock import Clock
from otel_recovery._engine import Decision, after_failure, after_rejection, give_up
from otel_recovery.classify import ErrorInfo
from otel_recovery.policies.budget import RetryBudget
from otel_recovery.policies.circuit_breaker import CircuitBreaker, CircuitState
from otel_recovery.policies.fallback import Fallback
from otel_recovery.policies.retry import Retry
from otel_recovery.policies.timeout import inherited_deadline

__all__ = ["PolicyRetrying"]

_OPEN_STATES = (CircuitState.OPEN, CircuitState.FORCED_OPEN)
_NOT_CLOSED = (*_OPEN_STATES, CircuitState.HALF_OPEN)


class _Retrying(Protocol):
    """The slots and methods of ``PolicyCore`` that :class:`PolicyRetrying` uses."""

    _deadline: float | None
    breaker: CircuitBreaker | None
    budget: RetryBudget | None
    clock: Clock
    fallback: Fallback | None
    retry: Retry | None

    def _resend_refused(self, fn: Callable[..., Any], args: tuple[Any, ...]) -> bool: ...


class PolicyRetrying:
    """The steps of ``PolicyCore`` between a failed attempt and its repeat (see the module
    doc)."""

    __slots__ = ()

    def _decide(
        self: _Retrying,
        error: BaseException,
        info: ErrorInfo,
        attempt: int,
        delay: float,
        started: float,
    ) -> Decision:
        breaker = self.breaker
        if breaker is not None and breaker.state in _OPEN_STATES:
            # Another caller opened the circuit while we were failing: stop hammering.
            return after_rejection(self.fallback, error)
        return after_failure(
            retry=self.retry,
            budget=self.budget,
            fallback=self.fallback,
            error=error,
            info=info,
            attempt=attempt,
            previous_delay=delay,
            started=started,
            now=self.clock.now(),
            outer_deadline=inherited_deadline(self.clock),
        )

    def _after_failure(self, error: BaseException, args: tuple[Any, ...]) -> None:
        """Called after each failed attempt, before deciding whether to repeat it: where an
        instrumentor repairs what the failure revealed (pooled connections to a server that
        became a replica), for the repeat or for the next call. Asked on the failure path
        only; nothing by default."""

    async def _aafter_failure(self, error: BaseException, args: tuple[Any, ...]) -> None:
        """The async twin of :meth:`_after_failure`."""

    def _before_retry(self, fn: Callable[..., Any], args: tuple[Any, ...]) -> None:
        """Called once a failed attempt will be repeated, before the backoff: where a call
        lets go of what that attempt holds (an HTTP response, and with it a pooled
        connection), so the wait does not keep it from others. Not called when the call
        gives up: what the last attempt holds is then the application's. Nothing by
        default."""

    async def _abefore_retry(self, fn: Callable[..., Any], args: tuple[Any, ...]) -> None:
        """The async twin of :meth:`_before_retry`."""

    def _after_backoff(
        self: _Retrying,
        fn: Callable[..., Any],
        args: tuple[Any, ...],
        error: BaseException,
        started: float,
    ) -> Decision | None:
        """Asked after the backoff, before the repeat: why the repeat must not go out after
        all, or None. The wait is where time passes, so what was decided before it may no
        longer hold: another caller opened the circuit meanwhile (or it went half-open, and
        its one probe is someone's: a straggler admitted while it was closed would send
        requests beside it), the total deadline passed during a sleep that woke late (the
        attempt would be refused unsent, and the call end with a made-up timeout instead of
        the failure it met), or the client was closed (:meth:`_resend_refused`)."""
        breaker = self.breaker
        if breaker is not None and breaker.state in _NOT_CLOSED:
            return after_rejection(self.fallback, error)
        now = self.clock.now()
        if self._deadline is not None and now >= started + self._deadline:
            return give_up(self.fallback, error, "deadline")
        outer = inherited_deadline(self.clock)
        if outer is not None and now >= outer:  # an outer policy's attempt is over
            return give_up(self.fallback, error, "deadline")
        if self._resend_refused(fn, args):  # the client was closed meanwhile
            return give_up(self.fallback, error, "client_closed")
        return None

    def _resend_refused(self, fn: Callable[..., Any], args: tuple[Any, ...]) -> bool:
        """Asked after the backoff, before the repeat: whether the call can no longer be
        made (an HTTP client the application closed during the wait). The call then gives
        up on the failure it has (``stop_reason=client_closed``), which is what the
        application would have had without the retry, instead of the client's own "closed"
        error, which no server caused. Never by default."""
        return False
