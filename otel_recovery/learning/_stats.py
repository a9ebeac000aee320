"""The learner's small statistics: forgetting reward moments, a decaying rate cap, delays.

Each piece is a plain value object, mutated only under the learner's lock and serialisable to
JSON lists, so :mod:`otel_recovery.learning.strategy` stays about decisions, not bookkeeping.

Forgetting is by *time*, with a half-life, rather than by a per-update factor gamma: a
dependency that fails ten times a second and one that fails twice a day should both forget a
week-old lesson, which a per-update discount cannot do (it forgets in seconds for the first and
never for the second). A cap on the total weight adds a sliding-window flavour on top, so a
busy context never becomes too sure of itself to notice a change (research/adaptive.md 2.2:
discounted and sliding-window Thompson sampling).
"""

from __future__ import annotations

import math
from collections import deque

__all__ = ["DecayedMoments", "DecayedRatio", "DelaySamples", "decay"]


def decay(age: float, half_life: float) -> float:
    """The weight left after ``age`` seconds: 1 at age 0, 0.5 after one half-life."""
    if age <= 0.0:
        return 1.0
    return math.exp(-math.log(2.0) * age / half_life)


class DecayedMoments:
    """Forgetting reward statistics for one (context, arm): weight, sum and sum of squares.

    Enough for a posterior over the arm's mean reward with an *estimated* variance (see
    ``StrategyLearner._posterior``). Values are stored as of ``updated`` and decayed lazily
    when read, so an untouched arm costs nothing; capping the weight scales all three sums,
    which keeps the mean and the variance and only widens the uncertainty.
    """

    __slots__ = ("pulls", "total", "total_squares", "updated", "weight")

    def __init__(
        self,
        weight: float = 0.0,
        total: float = 0.0,
        total_squares: float = 0.0,
        pulls: int = 0,
        updated: float = 0.0,
    ) -> None:
        self.weight = weight
        self.total = total
        self.total_squares = total_squares
        self.pulls = pulls
        self.updated = updated

    def at(self, now: float, half_life: float) -> tuple[float, float, float]:
        """``(weight, sum, sum of squares)`` decayed to ``now``."""
        factor = decay(now - self.updated, half_life)
        return self.weight * factor, self.total * factor, self.total_squares * factor

    def add(self, reward: float, now: float, half_life: float, max_weight: float) -> None:
        self._put(now, half_life, max_weight, 1.0, reward, reward * reward, 1)

    def absorb(
        self, other: DecayedMoments, now: float, half_life: float, max_weight: float
    ) -> None:
        """Add ``other``'s evidence (both decayed to ``now``), then cap the weight.

        Decayed sums of disjoint observations add up exactly: this is how evidence learned
        by another replica, or since the last merge, joins this one
        (``_snapshot_merge.merge_snapshot``).
        """
        weight, total, squares = other.at(now, half_life)
        self._put(now, half_life, max_weight, weight, total, squares, other.pulls)

    def _put(
        self,
        now: float,
        half_life: float,
        max_weight: float,
        weight_in: float,
        total_in: float,
        squares_in: float,
        pulls: int,
    ) -> None:
        weight, total, squares = self.at(now, half_life)
        weight += weight_in
        total += total_in
        squares += squares_in
        if weight > max_weight:
            scale = max_weight / weight
            weight, total, squares = max_weight, total * scale, squares * scale
        self.weight, self.total, self.total_squares, self.updated = weight, total, squares, now
        self.pulls += pulls

    def copy(self) -> DecayedMoments:
        return DecayedMoments(self.weight, self.total, self.total_squares, self.pulls, self.updated)

    def to_list(self, age: float) -> list[float]:
        """JSON form; ``age`` is how long ago (seconds) the stored values were current."""
        return [
            round(self.weight, 6),
            round(self.total, 6),
            round(self.total_squares, 6),
            self.pulls,
            round(max(0.0, age), 3),
        ]

    @classmethod
    def from_list(cls, raw: object, now: float) -> DecayedMoments:
        if not isinstance(raw, list) or len(raw) != 5:
            raise ValueError(
                f"arm statistics must be [weight, sum, sum_squares, pulls, age], got {raw!r}"
            )
        weight, total, squares, pulls, age = (_number(v) for v in raw)
        if min(weight, total, squares, pulls, age) < 0 or total > weight or squares > weight:
            raise ValueError(f"arm statistics are inconsistent for rewards in [0, 1]: {raw!r}")
        return cls(weight, total, squares, int(pulls), now - age)


class DecayedRatio:
    """Retries against calls, both decaying with time constant ``tau`` seconds.

    The learner's own retry-ratio cap: ``retries + n <= ratio * calls + floor * tau`` for a
    decision that may spend ``n`` retries, the shape of
    :class:`~otel_recovery.policies.RetryBudget` (a steady rate of ``x`` per second sums to
    about ``x * tau``) with O(1) state. ``counted`` says whether the service's traffic is
    known at all (some calls were counted): where it is not, the cap cannot be computed and
    is not applied (see ``StrategyLearner.choose``).
    """

    __slots__ = ("calls", "counted", "retries", "updated")

    def __init__(self, calls: float = 0.0, retries: float = 0.0, updated: float = 0.0) -> None:
        self.calls = calls
        self.retries = retries
        self.updated = updated
        self.counted = False

    def _advance(self, now: float, tau: float) -> None:
        if now > self.updated:
            factor = math.exp(-(now - self.updated) / tau)
            self.calls *= factor
            self.retries *= factor
            self.updated = now

    def add(self, now: float, tau: float, *, calls: float = 0.0, retries: float = 0.0) -> None:
        self._advance(now, tau)
        self.calls += calls
        self.retries = max(0.0, self.retries + retries)

    def settle(self, now: float, tau: float, *, reserved: int, at: float, spent: int) -> None:
        """Replace a reservation of ``reserved`` retries made at time ``at`` by the retries
        actually ``spent``: what was not used is given back (as decayed since ``at``)."""
        still = reserved * math.exp(-max(0.0, now - at) / tau) if reserved else 0.0
        self.add(now, tau, retries=spent - still)

    def room(self, now: float, tau: float, ratio: float, floor: float) -> float:
        """How many more retries the cap allows now (may be negative)."""
        self._advance(now, tau)
        return ratio * self.calls + floor * tau - self.retries

    def used(self, now: float, tau: float) -> float:
        """Retries per call in the recent past (0 when no call was seen)."""
        self._advance(now, tau)
        return self.retries / self.calls if self.calls > 0 else 0.0


class DelaySamples:
    """The most recent recovery times of one dependency, for a learned backoff delay.

    A bounded ring rather than a streaming sketch: a few hundred floats are cheap, exact,
    serialise as a list and forget old regimes by themselves.
    """

    __slots__ = ("samples",)

    def __init__(self, size: int, samples: list[float] | None = None) -> None:
        self.samples: deque[float] = deque(samples or (), maxlen=size)

    def add(self, seconds: float) -> None:
        self.samples.append(seconds)

    def quantile(self, q: float) -> float:
        ordered = sorted(self.samples)
        position = q * (len(ordered) - 1)
        low = math.floor(position)
        high = min(low + 1, len(ordered) - 1)
        return ordered[low] + (ordered[high] - ordered[low]) * (position - low)

    def __len__(self) -> int:
        return len(self.samples)


def _number(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        raise ValueError(f"expected a number, got {value!r}")
    return float(value)
