"""One seed-API recovery in flight: what it knows, how it gives up, and the dict it returns.

``ErrorRecoveryInteraction.recover_from_error`` gathers what one recovery needs into a
:class:`Run` (the error and its classification, the checked context, the callables, the
breaker, the span) that the steps of the chosen action share and add to (calls made, whether
the fallback answered, extra result keys). Each step ends in an :class:`Outcome`, which
:func:`finish` turns into the seed API's result dict while it completes and ends the span,
so the dict and the span always tell the same story.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from opentelemetry.trace import Span, Status, StatusCode

from otel_recovery._callables import accepts_one_positional, resolve
from otel_recovery._clock import Clock
from otel_recovery._recovery_spans import MAX_VALUE, describe, span_outcome, type_name
from otel_recovery._redact import redact
from otel_recovery._strategy_selection import RecoveryAction, RecoveryStrategy
from otel_recovery.classify import ErrorInfo
from otel_recovery.policies import CircuitBreaker
from otel_recovery.telemetry import attributes as names
from otel_recovery.telemetry.attributes import RECOVERY_REASON

__all__ = ["Outcome", "Run", "fallback_hook", "finish", "give_up", "reason_for"]


@dataclass(slots=True)
class Run:
    """Everything one recovery knows; mutated only by the task running it."""

    service_id: str
    error: BaseException
    info: ErrorInfo
    context: dict[str, Any]
    strategy: RecoveryStrategy | None
    retry_func: Callable[..., Any] | None
    fallback: Callable[..., Any] | None
    breaker: CircuitBreaker
    span: Span
    calls: int = 0
    fallback_used: bool = False
    fallback_error: BaseException | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(slots=True)
class Outcome:
    """What one step of a recovery came to: the seed API's status, the value, why not."""

    status: str
    result: Any = None
    reason: str | None = None
    error: BaseException | None = None


def finish(
    run: Run, action: RecoveryAction, outcome: Outcome, elapsed: float, clock: Clock
) -> dict[str, Any]:
    """The result dict of the seed API; also completes and ends the recovery span."""
    info, span = run.info, run.span
    context = span.get_span_context()
    result: dict[str, Any] = {
        "recovery_status": outcome.status,
        "strategy": action.value,
        "attempts": run.calls,
        "result": outcome.result,
        "recovery_time": elapsed,
        "error_type": info.error_type,
        "category": info.category.value,
        "severity": info.severity.value,
        "fingerprint": info.fingerprint,
        "retryable": info.retryable,
        "service_id": run.service_id,
        "trace_id": format(context.trace_id, "032x") if context.is_valid else None,
    }
    result.update(run.extra)
    # The span speaks the library's outcome words (``failure``, ``rejected``), as every other
    # recovery span does, so one search finds them all; the result keeps the seed's.
    span.set_attribute(names.OUTCOME, span_outcome(outcome.status))
    span.set_attribute(names.ATTEMPTS, run.calls)
    if outcome.status != "success":
        result["reason"] = outcome.reason or outcome.status
        span.set_attribute(RECOVERY_REASON, redact(result["reason"])[:MAX_VALUE])
    if outcome.status == "circuit_open":
        result["retry_after"] = run.breaker.retry_after()
    if outcome.status in ("failed", "circuit_open"):
        final = outcome.error or run.error
        result["error"] = describe(final)
        span.set_attribute(names.ERROR_TYPE, type_name(final))
        span.set_status(Status(StatusCode.ERROR, result["error"]))
    span.end(end_time=int(clock.wall() * 1e9))
    return result


def fallback_hook(run: Run) -> Callable[[BaseException], Any]:
    """``fallback_func`` adapted to the engine: takes the error only if it accepts one
    argument, and records that it ran (or how it failed) on the run."""
    func = run.fallback
    assert func is not None
    takes_error = accepts_one_positional(func)

    async def hook(error: BaseException) -> Any:
        run.fallback_used = True
        try:
            return await resolve(func(error) if takes_error else func())
        except Exception as exc:
            run.fallback_error = exc
            raise

    return hook


async def give_up(run: Run, reason: str) -> Outcome:
    """No (more) calls: answer with the fallback if there is one, else fail."""
    if run.fallback is None:
        return Outcome("failed", reason=reason, error=run.error)
    try:
        value = await fallback_hook(run)(run.error)
    except Exception as exc:
        return Outcome("failed", reason=f"{reason}; fallback_func failed", error=exc)
    event = {names.FALLBACK_KIND: "function", names.ERROR_TYPE: run.info.error_type}
    run.span.add_event(names.EVENT_FALLBACK, event)
    return Outcome("fallback", value, reason=reason)


def reason_for(why: str, run: Run) -> str:
    """A readable reason from the selection's short one."""
    if why == "circuit_open":
        return f"circuit breaker for service {run.service_id!r} is open"
    if why == "not_retryable":
        return f"{run.info.error_type} is not retryable"
    if why == "explicit":
        return "fallback requested"
    if why == "not_idempotent":
        return "context['idempotent'] is False: the call is not made again"
    if why == "retry_on":
        return f"{run.info.error_type} is not matched by context['retry_on']"
    return f"{why} errors are not retried"
