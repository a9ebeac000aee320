"""The value types of the strategy learner: what it decides about, under which limits, for what.

Kept apart from :mod:`otel_recovery.learning.strategy` so the learner module reads as the
algorithm; these are the words it speaks (all re-exported from ``otel_recovery.learning``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from otel_recovery._clock import Duration, to_seconds
from otel_recovery.classify import ErrorInfo

__all__ = [
    "DecisionKey",
    "HardCaps",
    "Recommendation",
    "RewardWeights",
]


@dataclass(frozen=True, slots=True)
class DecisionKey:
    """What a decision is about: one kind of error from one dependency.

    Statistics are kept at three levels, finest first, and a thin fine level borrows from
    the coarser ones (see :class:`~otel_recovery.learning.StrategyLearner`):
    ``(service, fingerprint)``, ``(service, category)``, ``(any service, category)``.
    """

    service: str
    fingerprint: str
    category: str

    @classmethod
    def of(cls, service: str, info: ErrorInfo) -> DecisionKey:
        return cls(service, info.fingerprint, info.category.value)

    def levels(self) -> tuple[tuple[str, str], tuple[str, str], tuple[str, str]]:
        category = "category:" + self.category
        return (
            (self.service, "fingerprint:" + self.fingerprint),
            (self.service, category),
            ("*", category),
        )


def _nonnegative(value: object, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
        raise ValueError(f"{name} must be a number >= 0, got {value!r}")
    if math.isinf(value):
        raise ValueError(f"{name} must be finite, got {value!r}")
    return float(value)


@dataclass(frozen=True, slots=True)
class HardCaps:
    """Limits the learner can never exceed, however good an arm looks.

    - ``max_retries``: retries one recovery may spend; an arm asking for more is clipped.
    - ``retry_ratio`` / ``min_retries_per_second`` / ``window``: retries recommended per
      service stay within ``retry_ratio`` of the service's calls plus a floor, over roughly
      ``window`` seconds (a :class:`~otel_recovery.policies.RetryBudget`-shaped limit). A
      decision reserves all the retries its arm may spend, so a burst of decisions cannot
      overshoot; recording the outcome gives back what was not spent. Learning is driven by
      each caller's own outcome, and a retry that helps its caller can still hurt everyone
      by adding load; this cap is what keeps a learner that loves retrying from turning an
      overload into a metastable failure. It needs the service's calls counted
      (``StrategyLearner.record_call``, ``choose(calls=...)``, or the retry advisor's
      ``calls=``); for a service whose calls were never counted it is not applied, and the
      policy's ``RetryBudget`` (which counts every call) is what bounds the load.
    """

    max_retries: int = 4
    retry_ratio: float = 0.5
    min_retries_per_second: float = 1.0
    window: Duration = 10.0

    def __post_init__(self) -> None:
        retries = self.max_retries
        if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
            raise ValueError(f"max_retries must be an int >= 0, got {retries!r}")
        object.__setattr__(self, "retry_ratio", _nonnegative(self.retry_ratio, "retry_ratio"))
        floor = _nonnegative(self.min_retries_per_second, "min_retries_per_second")
        object.__setattr__(self, "min_retries_per_second", floor)
        window = to_seconds(self.window, "window")
        if window <= 0:
            raise ValueError(f"window must be > 0 seconds, got {self.window!r}")
        object.__setattr__(self, "window", window)


@dataclass(frozen=True, slots=True)
class RewardWeights:
    """How one recovery is scored, before scaling to [0, 1].

    ``value - attempt_cost * retries - time_cost * min(1, recovery_time / slo)``, where value
    is 1 for success, ``fallback_value`` for an answer from the fallback and 0 for failure.
    ``attempt_cost = 0.1`` means a retry must raise the chance of success by more than 10
    points to pay for itself, the same bar as the SRE book's 10 % retry budget
    (research/adaptive.md 2.1). Time is charged on failures too: failing slowly is worse
    than failing fast.
    """

    attempt_cost: float = 0.1
    time_cost: float = 0.1
    slo: Duration = 1.0
    fallback_value: float = 0.5

    def __post_init__(self) -> None:
        object.__setattr__(self, "attempt_cost", _nonnegative(self.attempt_cost, "attempt_cost"))
        object.__setattr__(self, "time_cost", _nonnegative(self.time_cost, "time_cost"))
        slo = to_seconds(self.slo, "slo")
        if slo <= 0:
            raise ValueError(f"slo must be > 0 seconds, got {self.slo!r}")
        object.__setattr__(self, "slo", slo)
        value = _nonnegative(self.fallback_value, "fallback_value")
        if value > 1:
            raise ValueError(f"fallback_value must be in [0, 1], got {self.fallback_value!r}")
        object.__setattr__(self, "fallback_value", value)

    def score(
        self, *, success: bool, fallback: bool, retries: int, recovery_time: float, max_retries: int
    ) -> float:
        """The reward scaled to [0, 1] (0: slow failure with every retry spent; 1: instant win)."""
        value = 1.0 if success else self.fallback_value if fallback else 0.0
        spent = min(max(retries, 0), max_retries)
        slo = to_seconds(self.slo, "slo")
        lost_time = min(1.0, max(0.0, recovery_time) / slo)
        worst = self.attempt_cost * max_retries + self.time_cost
        raw = value - self.attempt_cost * spent - self.time_cost * lost_time
        return min(1.0, max(0.0, (raw + worst) / (1.0 + worst)))


@dataclass(frozen=True, slots=True)
class Recommendation:
    """One decision: what to do now and what the learner believes.

    ``action`` is what the caller should do: the learner's choice (``learned``), or in
    shadow mode the caller's own ``default``. ``max_retries`` is the retry allowance of
    ``action`` after the hard caps. ``samples`` are the Thompson draws and ``means`` the
    posterior mean rewards of the arms that were eligible; ``capped`` names the arms the
    hard caps removed. ``backoff_initial`` is the learned first delay for the service, if any.
    """

    key: DecisionKey
    action: str
    learned: str
    shadow: bool
    max_retries: int
    samples: Mapping[str, float] = field(default_factory=dict)
    means: Mapping[str, float] = field(default_factory=dict)
    capped: tuple[str, ...] = ()
    backoff_initial: float | None = None
    reserved_retries: int = 0
    """Retries this decision holds against the retry-ratio cap until it is recorded."""
    decided_at: float = 0.0
    """When the decision was made (the learner's clock), to settle the reservation."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "samples", MappingProxyType(dict(self.samples)))
        object.__setattr__(self, "means", MappingProxyType(dict(self.means)))

    @property
    def acted(self) -> bool:
        """Whether the caller follows the learner (False in shadow mode)."""
        return not self.shadow
