"""Learned backoff: the first retry waits about as long as the dependency usually needs.

A parameter provider in the sense of DESIGN.md section 2: the engine stays pure and knows
nothing of learning; it just calls ``Backoff.delay``. Retry-After still wins, because
:meth:`otel_recovery.policies.Retry.delay_for` consults the server's wait before any backoff.
"""

from __future__ import annotations

import random
from typing import TYPE_CHECKING, Any

from otel_recovery.policies.backoff import ExponentialBackoff
from otel_recovery.policies.retry import Retry

if TYPE_CHECKING:
    from otel_recovery.learning.strategy import StrategyLearner

__all__ = ["LearnedBackoff", "learned_retry"]


class LearnedBackoff:
    """``base`` with its initial delay replaced by the learner's delay for ``service``.

    Multiplier, maximum and jitter stay ``base``'s; the maximum is raised to the learned
    delay if that is larger. Until the learner knows the service, this is exactly ``base``.
    """

    __slots__ = ("_cache", "base", "learner", "service")

    def __init__(self, learner: StrategyLearner, service: str, base: ExponentialBackoff) -> None:
        if not isinstance(base, ExponentialBackoff):
            raise TypeError(f"base must be an ExponentialBackoff, got {base!r}")
        self.learner = learner
        self.service = service
        self.base = base
        self._cache: tuple[float, ExponentialBackoff] | None = None

    def current(self) -> ExponentialBackoff:
        """The backoff in force now (rebuilt only when the learned delay changed)."""
        learned = self.learner.learned_delay(self.service)
        if learned is None:
            return self.base
        cache = self._cache
        if cache is not None and cache[0] == learned:
            return cache[1]
        base = self.base
        backoff = ExponentialBackoff(
            learned, base.multiplier, max(base.maximum, learned), base.jitter
        )
        self._cache = (learned, backoff)
        return backoff

    def delay(self, retry_number: int, previous_delay: float, rng: random.Random) -> float:
        return self.current().delay(retry_number, previous_delay, rng)

    def __repr__(self) -> str:
        return f"LearnedBackoff(service={self.service!r}, now={self.current()!r})"


def learned_retry(
    learner: StrategyLearner,
    service: str,
    *,
    attempts: int = 3,
    base: ExponentialBackoff | None = None,
    **options: Any,
) -> Retry:
    """A :class:`~otel_recovery.policies.Retry` for ``RecoveryPolicy`` with the learned backoff.

    ``attempts`` is clipped to the learner's hard cap (``caps.max_retries + 1``); other
    keyword arguments go to ``Retry``. For example
    ``RecoveryPolicy(retry=learned_retry(learner, "payments"), budget=RetryBudget())``.
    """
    limit = min(attempts, learner.caps.max_retries + 1)
    return Retry(limit, backoff=learner.backoff(service, base), **options)
