"""Running totals of recoveries, for ``ErrorRecoveryInteraction.get_recovery_stats()``.

Counters only (no per-recovery history), so memory stays constant however long the process
runs; one lock makes every update and every snapshot consistent across threads and tasks.
"""

from __future__ import annotations

from typing import Any

from otel_recovery._forksafe import new_lock

__all__ = ["RecoveryStats"]


class RecoveryStats:
    """Totals by status, strategy and category, plus the summed recovery time."""

    def __init__(self) -> None:
        self._lock = new_lock()
        self._total = 0
        self._successful = 0
        self._time = 0.0
        self._by_strategy: dict[str, dict[str, int]] = {}
        self._by_category: dict[str, int] = {}
        self._by_status: dict[str, int] = {}

    def record(self, *, status: str, strategy: str, category: str, recovery_time: float) -> None:
        success = status == "success"
        with self._lock:
            self._total += 1
            self._successful += success
            self._time += recovery_time
            entry = self._by_strategy.setdefault(strategy, {"total": 0, "success": 0})
            entry["total"] += 1
            entry["success"] += success
            self._by_category[category] = self._by_category.get(category, 0) + 1
            self._by_status[status] = self._by_status.get(status, 0) + 1

    def snapshot(self) -> dict[str, Any]:
        """A consistent copy; rates are 0.0 before the first recovery."""
        with self._lock:
            total = self._total
            return {
                "total_recoveries": total,
                "successful_recoveries": self._successful,
                "success_rate": self._successful / total if total else 0.0,
                "avg_recovery_time": self._time / total if total else 0.0,
                "by_strategy": {k: dict(v) for k, v in self._by_strategy.items()},
                "by_category": dict(self._by_category),
                "by_status": dict(self._by_status),
            }

    def reset(self) -> None:
        with self._lock:
            self._total = self._successful = 0
            self._time = 0.0
            self._by_strategy.clear()
            self._by_category.clear()
            self._by_status.clear()
