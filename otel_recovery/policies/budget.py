"""``RetryBudget``: retries limited to a share of recent calls (Finagle / tower style).

Per-request attempt caps do not stop retry storms: at 100 % failure three attempts triple the
load on a dependency that is already down. A budget caps *retries across all calls*:

    retries in the last ``ttl`` seconds <= ratio * calls in that window + min_per_second * ttl

The floor lets a quiet client still retry a little; the ratio bounds amplification to about
``1 + ratio`` under total failure (research/adaptive.md 1.2). Each call deposits, each retry
withdraws; entries expire after ``ttl``. Time is split into ``ttl / 10`` buckets so updates
are O(1) and memory is constant.

Deposits are on every call's happy path, so they take no lock: an atomic lock-free
counter (``policies/_counting.py``) counts calls, and each bucket remembers the count at
which it began (calls in the window = count now - count when the oldest live bucket
began). Buckets turn over under the lock, at most ten times per ``ttl``. Retries are rare
and take the lock.

A refusal is an outcome of its own (``otel_recovery.retry_budget.exhausted`` span event,
``refused`` counter), never silent.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from otel_recovery._clock import Clock, Duration, clock_or_default, to_seconds
from otel_recovery._forksafe import new_lock
from otel_recovery.policies._counting import new_counter, peek

if TYPE_CHECKING:
    from otel_recovery.stores._base import Store

__all__ = ["BudgetSnapshot", "RetryBudget"]

_BUCKETS = 10
_ENV_STORE_URL = "OTEL_RECOVERY_STORE_URL"  # stores.ENV_STORE_URL, not imported: import cycle


@dataclass(frozen=True, slots=True)
class BudgetSnapshot:
    """Counters for telemetry and tests; ``available`` is the retries allowed right now."""

    name: str
    available: float
    calls_in_window: int
    retries_in_window: int
    total_calls: int
    total_retries: int
    total_refused: int


class RetryBudget:
    """A shared allowance of retries, typically one per dependency.

    ``store`` shares the allowance with every process using the same ``name``: a ``redis://``
    URL or a Redis store builds a fleet-wide budget (deposits pushed every ``sync_interval``
    seconds, withdrawals atomic; see :mod:`otel_recovery.stores._shared_budget`), and
    ``memory://`` keeps it local. Without ``store``, a *named* budget is shared when
    ``OTEL_RECOVERY_STORE_URL`` is a Redis URL, and local otherwise.
    """

    def __new__(cls, *args: Any, store: Store | str | None = None, **kwargs: Any) -> RetryBudget:
        # The fleet-wide budget is a subclass chosen here: record_call() stays as it is.
        if cls is RetryBudget and (store is not None or _ENV_STORE_URL in os.environ):
            from otel_recovery.stores._sharing import budget_class

            return super().__new__(budget_class(store, kwargs.get("name", "default")))
        return super().__new__(cls)

    __slots__ = (
        "_bucket_end",
        "_call_count",
        "_configured",
        "_current",
        "_lock",
        "_marks",
        "_retries",
        "_sum_retries",
        "_width",
        "clock",
        "min_per_second",
        "name",
        "ratio",
        "total_refused",
        "total_retries",
        "ttl",
    )

    def __init__(
        self,
        ratio: float = 0.2,
        min_per_second: float = 10.0,
        ttl: Duration = 10.0,
        *,
        name: str = "default",
        clock: Clock | None = None,
        store: Store | str | None = None,
        sync_interval: Duration = 0.1,
    ) -> None:
        if to_seconds(sync_interval, "sync_interval") <= 0:
            raise ValueError(f"sync_interval must be > 0 seconds, got {sync_interval!r}")
        _check_ratio(ratio)
        _check_floor(min_per_second)
        self.ttl = to_seconds(ttl, "ttl")
        if not 1.0 <= self.ttl <= 3600.0:
            raise ValueError(f"ttl must be between 1 and 3600 seconds, got {self.ttl}")
        self.ratio = float(ratio)
        self.min_per_second = float(min_per_second)
        self.name = name
        self.clock = clock_or_default(clock)
        self._width = self.ttl / _BUCKETS
        self._call_count = new_counter()
        self._marks = [0] * _BUCKETS  # call count when each live bucket began
        self._retries = [0] * _BUCKETS
        self._sum_retries = 0
        self._current = math.floor(self.clock.now() / self._width)
        self._bucket_end = (self._current + 1) * self._width
        self._lock = new_lock()
        self.total_retries = 0
        self.total_refused = 0
        self._configured = (self.ratio, self.min_per_second)

    def _rotate(self, now: float) -> int:
        """Expire buckets older than ``ttl`` (under the lock); returns the current bucket's slot."""
        bucket = math.floor(now / self._width)
        current = self._current
        if bucket > current:
            count = peek(self._call_count)
            stale = min(bucket - current, _BUCKETS)
            for step in range(1, stale + 1):
                index = (current + step) % _BUCKETS
                self._sum_retries -= self._retries[index]
                self._retries[index] = 0
                self._marks[index] = count
            self._current = bucket
            self._bucket_end = (bucket + 1) * self._width
        return self._current % _BUCKETS

    def _calls_in_window(self) -> int:
        oldest = (self._current + 1) % _BUCKETS
        return peek(self._call_count) - self._marks[oldest]

    def _allowance(self) -> float:
        calls = self._calls_in_window()
        return self.ratio * calls + self.min_per_second * self.ttl - self._sum_retries

    @property
    def total_calls(self) -> int:
        return peek(self._call_count)

    def record_call(self, now: float | None = None) -> None:
        """Deposit: one logical call started (first attempts only, never retries)."""
        if now is None:
            now = self.clock.now()
        if now >= self._bucket_end:
            with self._lock:
                self._rotate(now)
        next(self._call_count)

    def try_spend(self, now: float | None = None) -> bool:
        """Withdraw one retry if the budget allows it; a refusal is counted."""
        if now is None:
            now = self.clock.now()
        with self._lock:
            index = self._rotate(now)
            if self._allowance() >= 1.0:
                self._retries[index] += 1
                self._sum_retries += 1
                self.total_retries += 1
                return True
            self.total_refused += 1
            return False

    def tune(self, *, ratio: float | None = None, min_per_second: float | None = None) -> None:
        """Change the allowance while the budget runs; :meth:`restore` undoes it.

        Adaptive thresholds shrink the budget of a dependency that behaves abnormally (retries
        then mostly add load) and give it back afterwards. Deposits and withdrawals already in
        the window are kept, so a tightened budget that is already overspent refuses at once.
        """
        if ratio is not None:
            _check_ratio(ratio)
        if min_per_second is not None:
            _check_floor(min_per_second)
        with self._lock:
            if ratio is not None:
                self.ratio = float(ratio)
            if min_per_second is not None:
                self.min_per_second = float(min_per_second)

    def restore(self) -> None:
        """Put back the ratio and floor given at construction."""
        with self._lock:
            self.ratio, self.min_per_second = self._configured

    @property
    def tuned(self) -> bool:
        """Whether :meth:`tune` changed the allowance and :meth:`restore` has not put it back."""
        return (self.ratio, self.min_per_second) != self._configured

    def snapshot(self, now: float | None = None) -> BudgetSnapshot:
        """The budget's counts in its window at ``now`` (the clock's time by default) and
        how many retries it would allow: for dashboards and tests."""
        if now is None:
            now = self.clock.now()
        with self._lock:
            self._rotate(now)
            return BudgetSnapshot(
                name=self.name,
                available=max(0.0, self._allowance()),
                calls_in_window=self._calls_in_window(),
                retries_in_window=self._sum_retries,
                total_calls=peek(self._call_count),
                total_retries=self.total_retries,
                total_refused=self.total_refused,
            )

    def __repr__(self) -> str:
        return (
            f"RetryBudget(ratio={self.ratio}, min_per_second={self.min_per_second}, "
            f"ttl={self.ttl}, name={self.name!r})"
        )


def _check_ratio(ratio: object) -> None:
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 <= ratio <= 1:
        hint = ""
        if isinstance(ratio, (int, float)) and 1 < ratio <= 100:  # 10 meant as 10 %
            hint = f"; did you mean {ratio / 100:g}?"
        raise ValueError(f"ratio must be in [0, 1], got {ratio!r}{hint}")


def _check_floor(min_per_second: object) -> None:
    if (
        isinstance(min_per_second, bool)
        or not isinstance(min_per_second, (int, float))
        or not 0 <= min_per_second < math.inf  # NaN fails this too
    ):
        raise ValueError(f"min_per_second must be a finite number >= 0, got {min_per_second!r}")
