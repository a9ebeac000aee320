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
"""

from __future__ import annotations

from dataclasses import dataclass

from otel_recovery.classify import ErrorInfo
from otel_recovery.learning._decisions import DecisionKey, Recommendation
from otel_recovery.learning.strategy import StrategyLearner

__all__ = ["LearnedAdvice", "LearnedRetryAdvisor"]

_ARMS = {"give_up": 0, "retry": 1}


@dataclass(frozen=True, slots=True)
class LearnedAdvice:
    retry: bool
    recommendation: Recommendation


class LearnedRetryAdvisor:
    """``Retry(advisor=LearnedRetryAdvisor(learner, service="payments:443"))``."""

    __slots__ = ("learner", "service")

    def __init__(self, learner: StrategyLearner, *, service: str) -> None:
        if not isinstance(learner, StrategyLearner):
            raise TypeError(f"learner must be a StrategyLearner, got {learner!r}")
        self.learner = learner
        self.service = service

    def advise(self, error: BaseException, info: ErrorInfo, attempt: int) -> LearnedAdvice:
        key = DecisionKey(self.service, info.fingerprint, info.category.value)
        recommendation = self.learner.choose(key, _ARMS, default="retry")
        return LearnedAdvice(recommendation.action == "retry", recommendation)

    def learn(self, advice: object, *, success: bool, seconds: float) -> None:
        if not isinstance(advice, LearnedAdvice):
            return
        self.learner.record(
            advice.recommendation,
            success=success,
            retries=1 if advice.retry else 0,
            recovery_time=seconds,
        )

    def __repr__(self) -> str:
        return f"LearnedRetryAdvisor(service={self.service!r})"
