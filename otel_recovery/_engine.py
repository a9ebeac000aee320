"""The pure decision step: after a failure (or a rejection), what happens next?

The drivers own the loop, the sleeping and the telemetry; this module owns the rules, so the
rules can be tested as plain functions over constructed inputs (tenacity's
``make_retry_state`` idea) and reused by every driver (sync, async, instrumentors, the seed
API). No I/O, no OpenTelemetry, no clock reads: ``now`` is an argument.

Decision order after attempt *n* failed, each step able to end recovery:

1. ``retry`` missing or the failure is not retryable        -> give up ("not_retryable")
2. *n* reached the attempt limit (or the testing cap)        -> give up ("attempts_exhausted")
2b. the retry advisor (a learner), if any, says give up      -> give up ("advised")
3. the server's Retry-After exceeds the cap                  -> give up ("retry_after_too_long")
4. the sleep would end past the total deadline, or past the
   deadline of an outer policy's attempt around this call    -> give up ("deadline")
5. the retry budget is spent                                 -> give up ("budget_exhausted")
6. otherwise                                                 -> sleep, then attempt *n+1*

A give-up becomes a fallback when the fallback handles the error. Budget is consulted last
so that a refusal is only counted for a retry that would otherwise have happened.
"""

from __future__ import annotations

import enum
import logging
from dataclasses import dataclass

from otel_recovery._clock import MAX_SECONDS
from otel_recovery._config import SWITCHES
from otel_recovery.classify import ErrorInfo
from otel_recovery.policies.budget import RetryBudget
from otel_recovery.policies.fallback import Fallback
from otel_recovery.policies.retry import Retry, RetryAdvice

__all__ = ["Action", "Decision", "after_failure", "after_rejection", "give_up"]

_log = logging.getLogger("otel_recovery")


class Action(enum.Enum):
    RETRY = "retry"
    FALLBACK = "fallback"
    GIVE_UP = "give_up"


@dataclass(frozen=True, slots=True)
class Decision:
    """What to do next; ``delay`` is the sleep before the retry, ``reason`` why we stop."""

    action: Action
    delay: float = 0.0
    reason: str = ""
    advice: RetryAdvice | None = None
    """The retry advisor's answer, for the driver to report its outcome (``learn``)."""


def give_up(fallback: Fallback | None, error: BaseException, reason: str) -> Decision:
    """Stop for ``reason``: the fallback if it handles ``error``, else give up."""
    if fallback is not None and fallback.handles(error):
        return Decision(Action.FALLBACK, reason=reason)
    return Decision(Action.GIVE_UP, reason=reason)


def after_failure(
    *,
    retry: Retry | None,
    budget: RetryBudget | None,
    fallback: Fallback | None,
    error: BaseException,
    info: ErrorInfo,
    attempt: int,
    previous_delay: float,
    started: float,
    now: float,
    outer_deadline: float | None = None,
) -> Decision:
    """Decide after attempt number ``attempt`` (1-based) failed with ``error``;
    ``outer_deadline``: when the attempt of an outer policy around this call ends."""
    if retry is None or not retry.is_retryable(error, info):
        return give_up(fallback, error, "not_retryable")
    limit = retry.attempts
    testing = SWITCHES.testing
    if testing:
        limit = min(limit, SWITCHES.max_attempts)
    if attempt >= limit:
        return give_up(fallback, error, "attempts_exhausted")
    advice = None
    if retry.advisor is not None:
        try:
            advice = retry.advisor.advise(error, info, attempt)
        except Exception:
            _log.exception("retry advisor %r failed; the rules decide alone", retry.advisor)
        if advice is not None and not advice.retry:
            stop = give_up(fallback, error, "advised")
            return Decision(stop.action, reason=stop.reason, advice=advice)
    try:
        delay = retry.delay_for(attempt, previous_delay, info)
    except Exception:
        _log.exception("backoff %r failed; not retrying", retry.backoff)
        return give_up(fallback, error, "backoff_failed")
    if delay is None:
        return give_up(fallback, error, "retry_after_too_long")
    if not delay < MAX_SECONDS:  # inf (a custom backoff's "give up"), NaN, or decades
        return give_up(fallback, error, "retry_after_too_long")
    if testing:
        delay = 0.0
    if retry.deadline is not None and (now - started) + delay >= retry.deadline:
        return give_up(fallback, error, "deadline")
    if outer_deadline is not None and now + delay >= outer_deadline:
        return give_up(fallback, error, "deadline")
    if budget is not None and not budget.try_spend(now):
        return give_up(fallback, error, "budget_exhausted")
    return Decision(Action.RETRY, delay=delay, advice=advice)


def after_rejection(fallback: Fallback | None, error: BaseException) -> Decision:
    """A breaker or bulkhead refused the call before any attempt was made."""
    return give_up(fallback, error, "rejected")
