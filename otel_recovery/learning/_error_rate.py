"""Anomalies in error rates, which are ratios of counts and must be judged as such.

One failure in two calls is a 50 % error rate and no evidence of anything; fifty in a hundred
is. A detector fed the bare ratio cannot tell them apart, so this one is fed both counts and asks
how surprising ``errors`` failures in ``calls`` calls would be under the learned error
probability:

- the baseline is a Beta posterior over the error probability: prior pseudo-counts plus
  exponentially forgotten observed errors and successes (``halflife`` observations);
- the question is one-sided and tolerant: could this bucket come from a rate of at most
  ``max(min_ratio * baseline, baseline + min_increase)``? Without the tolerance a busy endpoint
  whose rate drifts from 1.0 % to 1.3 % over a million calls would be "significant" and useless;
- the tail probability is beta-binomial, so a young baseline (few calls seen) is appropriately
  unsure, and a mature one converges to the binomial;
- the score is ``L / (L + significance)`` with ``L = -log10(tail probability)``: 0.5 at
  p = 1e-6 by default;
- while a bucket scores 0.5 or more it teaches the baseline only ``anomalous_weight`` of a
  normal bucket, so an outage does not become the new normal within minutes, yet a permanent
  change is still learned;
- a dependency called a few times per bucket never gives one bucket enough evidence: three
  failures in three calls is a tail probability of about 1e-5 against a 1 % baseline, under
  the threshold, however long the outage lasts. So while buckets keep coming in above the
  tolerated rate, a bucket of fewer than ``pool_calls`` calls is also judged together with
  the run of such buckets before it (at most ``pool_buckets``): ten minutes of failures at
  three calls per bucket score as the evidence they are. A bucket at or below the tolerated
  rate ends the run.

No statsmodels here: the model is exact and cheap (microseconds, and nothing at all for the
common bucket whose rate is at or below baseline).
"""

from __future__ import annotations

import math
import numbers
from collections import deque
from collections.abc import Callable
from typing import NamedTuple

__all__ = ["ErrorRateDetector", "ErrorRateEstimate", "log10_betabinom_sf"]

_LN10 = math.log(10.0)
_MAX_TERMS = 400


class ErrorRateEstimate(NamedTuple):
    expected: float
    """Baseline error probability before this bucket."""
    observed: float
    score: float
    significance: float
    """-log10 of the tail probability of this bucket."""


def log10_betabinom_sf(k: int, n: int, alpha: float, beta: float) -> float:
    """log10 P(X >= k) for X ~ BetaBinomial(n, alpha, beta), accurate far into the tail.

    Sums pmf terms upward from ``k`` in log space (they fall geometrically past the mode) and
    closes the sum with a geometric bound, so it never underflows and costs O(1) in the tail.
    """
    if k <= 0:
        return 0.0
    if k > n:
        return -math.inf
    lgamma = math.lgamma
    log_norm = lgamma(alpha + beta) - lgamma(alpha) - lgamma(beta)
    log_term = (
        lgamma(n + 1)
        - lgamma(k + 1)
        - lgamma(n - k + 1)
        + lgamma(k + alpha)
        + lgamma(n - k + beta)
        - lgamma(n + alpha + beta)
        + log_norm
    )
    total = 1.0  # terms relative to the first
    term = 1.0
    x = k
    ratio = 0.0
    for _ in range(_MAX_TERMS):
        if x >= n:
            break
        ratio = (n - x) * (x + alpha) / ((x + 1) * (n - x - 1 + beta))
        term *= ratio
        total += term
        x += 1
        if term < 1e-17 * total:
            break
    else:
        if x < n and ratio < 1.0:
            total += term * ratio / (1.0 - ratio)  # geometric bound on the rest
    return min(0.0, (log_term + math.log(total)) / _LN10)


def _check(name: str, value: object, accepted: str, ok: Callable[[float], bool]) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be {accepted}, got {value!r}")
    if not math.isfinite(value) or not ok(float(value)):
        raise ValueError(f"{name} must be {accepted}, got {value!r}")


class ErrorRateDetector:
    """Streaming error-rate anomaly score: ``update(errors, calls, timestamp=None) -> [0, 1]``.

    Forgetting is per observed bucket: an idle dependency keeps its baseline. ``timestamp`` is
    accepted for symmetry with :class:`AnomalyDetector` and recorded, never required.
    """

    __slots__ = (
        "_errors",
        "_keep",
        "_run",
        "_successes",
        "anomalous_weight",
        "last",
        "last_timestamp",
        "min_increase",
        "min_ratio",
        "pool_calls",
        "prior_errors",
        "prior_successes",
        "significance",
    )

    def __init__(
        self,
        *,
        halflife: float = 360.0,
        prior_rate: float = 0.01,
        prior_calls: float = 20.0,
        min_ratio: float = 2.0,
        min_increase: float = 0.01,
        significance: float = 6.0,
        anomalous_weight: float = 0.1,
        pool_calls: int = 20,
        pool_buckets: int = 30,
    ) -> None:
        _check("halflife", halflife, "a number of buckets > 0", lambda v: v > 0)
        _check("prior_rate", prior_rate, "a probability in (0, 1)", lambda v: 0 < v < 1)
        _check("prior_calls", prior_calls, "a number > 0", lambda v: v > 0)
        _check("min_ratio", min_ratio, "a number >= 1", lambda v: v >= 1)
        _check("min_increase", min_increase, "a number >= 0", lambda v: v >= 0)
        _check("significance", significance, "a number > 0", lambda v: v > 0)
        _check("anomalous_weight", anomalous_weight, "a number in [0, 1]", lambda v: 0 <= v <= 1)
        for name, count in (("pool_calls", pool_calls), ("pool_buckets", pool_buckets)):
            if isinstance(count, bool) or not isinstance(count, int) or count < 1:
                raise ValueError(f"{name} must be an int >= 1, got {count!r}")
        self.pool_calls = pool_calls
        self._run: deque[tuple[int, int]] = deque(maxlen=pool_buckets)
        """(errors, calls) of the latest buckets in a row above the tolerated rate."""
        self._keep = 0.5 ** (1.0 / halflife)
        self.prior_errors = prior_rate * prior_calls
        self.prior_successes = (1.0 - prior_rate) * prior_calls
        self._errors = 0.0
        self._successes = 0.0
        self.min_ratio = min_ratio
        self.min_increase = min_increase
        self.significance = significance
        self.anomalous_weight = anomalous_weight
        self.last = ErrorRateEstimate(prior_rate, 0.0, 0.0, 0.0)
        self.last_timestamp: object = None

    @property
    def baseline(self) -> float:
        """Posterior mean error probability."""
        a = self.prior_errors + self._errors
        return a / (a + self.prior_successes + self._successes)

    def update(self, errors: float, calls: float, timestamp: object = None) -> float:
        """Score a bucket of ``calls`` calls of which ``errors`` failed, then learn from it.

        Counts are rounded; ``errors`` is clamped to ``[0, calls]``. A bucket with no calls, or
        with a NaN or infinite count, is not evidence: it scores 0 and teaches nothing.
        """
        if not (math.isfinite(calls) and math.isfinite(errors)):
            return 0.0
        n = round(calls)
        if n <= 0:
            return 0.0  # no calls, no evidence
        k = min(max(round(errors), 0), n)
        a = self.prior_errors + self._errors
        b = self.prior_successes + self._successes
        expected = a / (a + b)
        tolerated = min(max(expected * self.min_ratio, expected + self.min_increase), 0.999)
        significance = 0.0
        strength = min(a + b, 1e7)
        alpha, beta = tolerated * strength, (1.0 - tolerated) * strength
        if k > tolerated * n:
            significance = -log10_betabinom_sf(k, n, alpha, beta)
            run = self._run
            run.append((k, n))
            if n < self.pool_calls and len(run) > 1:  # a quiet dependency: pooled evidence
                pooled_k, pooled_n = sum(e for e, _ in run), sum(c for _, c in run)
                pooled = -log10_betabinom_sf(pooled_k, pooled_n, alpha, beta)
                significance = max(significance, pooled)
        else:
            self._run.clear()
        score = significance / (significance + self.significance)
        weight = self.anomalous_weight if score >= 0.5 else 1.0
        keep = self._keep
        self._errors = self._errors * keep + weight * k
        self._successes = self._successes * keep + weight * (n - k)
        self.last = ErrorRateEstimate(expected, k / n, score, significance)
        self.last_timestamp = timestamp
        return score
