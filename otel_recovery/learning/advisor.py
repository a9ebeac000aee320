"""A :class:`StrategyLearner` as a retry advisor: learned "retry once more, or give up".

The rules (classification, idempotency, attempts, budget, Retry-After) decide what *may* be
retried; the advisor decides, per failure, whether retrying is worth it *here*, from how
retries have turned out for the same kind of error at the same dependency. A dependency
whose 500s are never healed by a retry (a poison request, a broken deploy) stops costing a
retry per call; one whose blips always heal keeps getting them. Each failure is one bandit
decision between ``give_up`` (no retry spent) and ``retry`` (one more attempt), rewarded by
whether that attempt succeeded and what it cost; the learner's hard caps still apply.

In shadow mode the rules' answer (retry) is always taken and the learner only learns and
reports what it would have done (``explain()``).

The learner's retry-ratio cap needs the service's traffic, which the advisor does not see:
it is consulted on failures only, and the successful calls must stay free of extra work.
So by default it counts no calls and the ratio cap is not applied to its service (the
policy's :class:`~otel_recovery.policies.RetryBudget`, which counts every call, bounds the
load; ``caps.max_retries`` still applies). Give it ``calls=``, a function returning how many
calls the service has had so far (``lambda: budget.total_calls`` reads the count the policy's
budget already keeps), and the cap is applied against that real traffic: at each failure the
advisor adds the calls made since the previous one.
"""

from __future__ import annotations

import logging
import numbers
from collections.abc import Callable
from dataclasses import dataclass

from otel_recovery._first_times import FirstTimes
from otel_recovery._forksafe import new_lock
from otel_recovery.classify import ErrorInfo
from otel_recovery.learning._decisions import DecisionKey, Recommendation
from otel_recovery.learning.strategy import StrategyLearner

__all__ = ["LearnedAdvice", "LearnedRetryAdvisor"]

_ARMS = {"give_up": 0, "retry": 1}
_log = logging.getLogger("otel_recovery")
_reported_counters = FirstTimes()


@dataclass(frozen=True, slots=True)
class LearnedAdvice:
    retry: bool
    recommendation: Recommendation


class LearnedRetryAdvisor:
    """``Retry(advisor=LearnedRetryAdvisor(learner, service="payments:443"))``.

    ``calls``: optional, a function returning the service's total calls so far (for example
    ``lambda: budget.total_calls``), so the learner's retry-ratio cap compares retries with
    real traffic; without it the ratio cap is not applied (see the module docstring). Give
    one advisor per call counter: two advisors reading the same counter for one service
    would count its calls twice.
    """

    __slots__ = ("_calls_lock", "_seen", "calls", "learner", "service")

    def __init__(
        self,
        learner: StrategyLearner,
        *,
        service: str,
        calls: Callable[[], int] | None = None,
    ) -> None:
        if not isinstance(learner, StrategyLearner):
            raise TypeError(f"learner must be a StrategyLearner, got {learner!r}")
        if not isinstance(service, str):
            raise TypeError(f"service must be a str, got {service!r}")
        if calls is not None and not callable(calls):
            raise TypeError(
                f"calls must be a function returning the service's total calls, got {calls!r}"
            )
        self.learner = learner
        self.service = service
        self.calls = calls
        self._calls_lock = new_lock()
        self._seen = self._read_calls() or 0

    def _read_calls(self) -> int | None:
        source = self.calls
        if source is None:
            return None
        try:
            total = source()
        except Exception:
            if _reported_counters.first(id(source)):
                _log.exception(
                    "call counter %r of retry advisor %r failed (logged once per counter); "
                    "the retry-ratio cap waits for it to answer",
                    source, self,
                )  # fmt: skip
            return None
        answered: object = total
        if isinstance(answered, numbers.Integral) and not isinstance(answered, bool):
            total = int(answered)  # a numpy integer, say
        elif isinstance(answered, float) and answered.is_integer():
            total = int(answered)  # a count kept in a float
        if isinstance(total, bool) or not isinstance(total, int) or total < 0:
            if _reported_counters.first(("value", id(source))):
                _log.warning(
                    "call counter %r of retry advisor %r answered %r, not a count of calls; "
                    "the retry-ratio cap does not apply until it does (logged once)",
                    source, self, total,
                )  # fmt: skip
            return None
        return total

    def _new_calls(self) -> int | None:
        """Calls since the last failure, or None without a counter."""
        total = self._read_calls()
        if total is None:
            return None
        with self._calls_lock:
            new = max(0, total - self._seen)
            self._seen = max(self._seen, total)
        return new

    def advise(self, error: BaseException, info: ErrorInfo, attempt: int) -> LearnedAdvice:
        key = DecisionKey(self.service, info.fingerprint, info.category.value)
        # A failed retry is no new call: only the counter's news counts (None: unknown).
        recommendation = self.learner.choose(key, _ARMS, default="retry", calls=self._new_calls())
        return LearnedAdvice(recommendation.action == "retry", recommendation)

    def learn(self, advice: object, *, success: bool, seconds: float) -> None:
        if not isinstance(advice, LearnedAdvice):
            return
        self.learner.record(
            advice.recommendation,
            success=success,
            retries=1 if advice.retry else 0,
            recovery_time=max(0.0, seconds),  # a clock that stepped back is no bad argument
        )

    def __repr__(self) -> str:
        return f"LearnedRetryAdvisor(service={self.service!r})"
