"""Carrying out the action the seed API chose for one recovery.

:meth:`~otel_recovery.interaction.ErrorRecoveryInteraction.recover_from_error` decides what
to do (the table in :mod:`otel_recovery.interaction`); :func:`execute` does it and answers an
:class:`~otel_recovery._recovery_run.Outcome`: give up or fall back, isolate the service,
roll back compensations, restore a checkpoint, heal, and for every action that calls
``retry_func`` again, :func:`retry_through_policy` through the ordinary engine
(:class:`~otel_recovery.recover.RecoveryPolicy`), so there is one retry loop in the library.
The interaction is handed in per call (``owner``) and its checkpoints, healing registry,
backoff, clock and telemetry are read there, at the call.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from otel_recovery._callables import accepts_keyword, accepts_one_positional, resolve
from otel_recovery._config import SWITCHES
from otel_recovery._recovery_context import classification_context
from otel_recovery._recovery_run import Outcome, Run, fallback_hook, give_up, reason_for
from otel_recovery._rollback import rollback
from otel_recovery._strategy_selection import RecoveryAction
from otel_recovery.checkpoint import CheckpointError
from otel_recovery.policies import (
    Backoff,
    CircuitBreaker,
    CircuitOpenError,
    CircuitState,
    Fallback,
    FixedBackoff,
    Retry,
)
from otel_recovery.recover import RecoveryPolicy
from otel_recovery.telemetry import attributes as names
from otel_recovery.telemetry.attributes import (
    CHECKPOINT_ID,
    CHECKPOINT_VERSION,
    EVENT_CHECKPOINT_RESTORED,
)

if TYPE_CHECKING:
    from otel_recovery.interaction import ErrorRecoveryInteraction

__all__ = ["circuit_is_open", "execute", "retry_through_policy"]


_OPEN = (CircuitState.OPEN, CircuitState.FORCED_OPEN)


def circuit_is_open(breaker: CircuitBreaker) -> bool:
    """Open and still within its open time (an elapsed OPEN breaker would allow a probe)."""
    state = breaker.state
    if state is CircuitState.FORCED_OPEN:
        return True
    return state in _OPEN and (breaker.retry_after() or 0.0) > 0.0


class Shifted:
    """The engine numbers its retries from 1, but its first attempt is already our retry 1:
    the original failure was attempt zero, so every delay moves one step along."""

    __slots__ = ("inner",)

    def __init__(self, inner: Backoff) -> None:
        self.inner = inner

    def delay(self, retry_number: int, previous_delay: float, rng: random.Random) -> float:
        return self.inner.delay(retry_number + 1, previous_delay, rng)

    def __repr__(self) -> str:
        return f"Shifted({self.inner!r})"


async def execute(
    owner: ErrorRecoveryInteraction, action: RecoveryAction, why: str, run: Run
) -> Outcome:
    """Do ``action`` for ``run``; ``why`` is the selection's short reason."""
    if action is RecoveryAction.FAIL_FAST or action is RecoveryAction.FALLBACK:
        if action is RecoveryAction.FALLBACK and run.fallback is None:
            needs = "FALLBACK needs context['fallback_func'] or RecoveryStrategy(fallback=...)"
            return Outcome("failed", reason=needs)
        learned_why = "the strategy learner chose to give up" if why == "learned" else None
        return await give_up(run, learned_why or reason_for(why, run))
    if action is RecoveryAction.CIRCUIT_BREAK:
        if not circuit_is_open(run.breaker):
            run.breaker.force_open()
        reason = f"circuit breaker for service {run.service_id!r} is open"
        if run.fallback is not None:
            return await give_up(run, reason)
        rejection = CircuitOpenError(run.breaker.name, run.breaker.retry_after())
        return Outcome("circuit_open", reason=reason, error=rejection)
    if action is RecoveryAction.TRANSACTION_ROLLBACK:
        status, why_not, error, ran = await rollback(run.context.get("compensations"), run.span)
        run.extra["compensations_run"] = ran
        return Outcome(status, reason=why_not, error=error)
    func = run.retry_func
    invoke: Callable[[], Any] | None = func
    if action is RecoveryAction.CHECKPOINT_RESTORE:
        checkpoint_id = run.context.get("checkpoint_id")
        version = run.context.get("checkpoint_version")
        try:
            found = await owner.checkpoints.aload(checkpoint_id, version)  # type: ignore[arg-type]
        except (CheckpointError, TypeError) as problem:
            return await give_up(run, str(problem))
        cid, number = found.checkpoint_id, found.version
        run.span.add_event(
            EVENT_CHECKPOINT_RESTORED, {CHECKPOINT_ID: cid, CHECKPOINT_VERSION: number}
        )
        run.extra.update(checkpoint_id=cid, checkpoint_version=number)
        if func is None:
            return Outcome("success", found.state)  # restoring was the whole recovery
        if accepts_one_positional(func):
            # A fresh copy per attempt: an attempt that mutated the state and failed
            # must not hand its half-done changes to the next one.

            async def invoke() -> Any:  # aload: a store's I/O never blocks the loop
                restored = await owner.checkpoints.aload(cid, number)
                return await resolve(func(restored.state))

    if func is None or invoke is None:
        return await give_up(run, "no retry_func in context")
    if action is RecoveryAction.SELF_HEAL:
        report = await owner.healing.heal(
            run.error, run.info, service_id=run.service_id, context=run.context
        )
        run.extra["healing"] = [r.to_dict() for r in report.results]
        timeout = report.context.get("timeout")
        if timeout is not None and accepts_keyword(func, "timeout"):

            def invoke() -> Any:
                return func(timeout=timeout)

    return await retry_through_policy(owner, run, action, invoke)


async def retry_through_policy(
    owner: ErrorRecoveryInteraction, run: Run, action: RecoveryAction, invoke: Callable[[], Any]
) -> Outcome:
    """Call ``invoke`` again through a RecoveryPolicy, after the first backoff wait."""
    strategy = run.strategy
    backoff = strategy.backoff if strategy and strategy.backoff else None
    if backoff is None:
        backoff = FixedBackoff(0.1) if action is RecoveryAction.RETRY else owner.backoff
    retry = Retry(
        strategy.max_attempts if strategy else owner.max_attempts,
        backoff=Shifted(backoff),
        attempt_timeout=strategy.timeout if strategy else None,
        on=run.context.get("retry_on"),
        retry_after_jitter=0.0,
    )
    delay = retry.delay_for(0, 0.0, run.info)
    if delay is None:
        return await give_up(run, f"asked to wait {run.info.retry_after:g}s, over the cap")
    if SWITCHES.active and not SWITCHES.testing and delay > 0:
        run.span.add_event(names.EVENT_RETRY, {names.ATTEMPT: 1, names.BACKOFF: delay})
        await owner.clock.asleep(delay)
    policy = RecoveryPolicy(
        retry=retry,
        breaker=run.breaker,
        fallback=Fallback(func=fallback_hook(run)) if run.fallback else None,
        classifier=owner._classifier,
        name=run.service_id,
        context=classification_context(run.context) or None,
        clock=owner.clock,
        telemetry=owner.telemetry,
    )

    def attempt() -> Any:
        run.calls += 1
        return invoke()

    try:
        value = await policy.acall(attempt)
    except CircuitOpenError as rejected:
        if run.calls:
            return Outcome(
                "failed", reason=f"retry_func failed {run.calls} time(s)", error=rejected
            )
        return Outcome("circuit_open", reason=str(rejected), error=rejected)
    except Exception as final:
        if final is run.fallback_error:
            return Outcome("failed", reason="fallback_func failed", error=final)
        return Outcome("failed", reason=f"retry_func failed {run.calls} time(s)", error=final)
    if run.fallback_used:
        reason = f"retry_func failed {run.calls} time(s)" if run.calls else "circuit open"
        return Outcome("fallback", value, reason=f"{reason}; answered by fallback_func")
    return Outcome("success", value)
