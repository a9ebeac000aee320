"""The traffic behind a strategy learner's retry-ratio cap: each service's calls and retries.

:class:`~otel_recovery.learning.HardCaps` bounds the retries sent to a service to a share of
the calls made to it (``retry_ratio``, with a floor of ``min_retries_per_second``) over the
window ``caps.window``. That needs the traffic, per service: the calls counted
(:meth:`RetryRatioTraffic.record_call`, or a decision's ``calls=``) and the retries reserved
by decisions and settled by their outcomes. Each service's counts are a
:class:`~._stats.DecayedRatio`, bounded like the learner's contexts (the least recently used
service goes first). Where no call was ever counted the cap is not applied (why: the
learner's module docstring).

:class:`RetryRatioTraffic` is a mixin of ``StrategyLearner``: it has no state of its own and
works on the learner's (``_Counting`` lists what it uses); ``choose()`` and ``record()``
reserve and settle retries on what :meth:`RetryRatioTraffic._ratio` returns, under the
learner's lock.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Protocol

from otel_recovery._clock import Clock
from otel_recovery.learning._stats import DecayedRatio

__all__ = ["RetryRatioTraffic"]


class _Counting(Protocol):
    """The attributes and methods of ``StrategyLearner`` that :class:`RetryRatioTraffic`
    uses."""

    clock: Clock
    _lock: threading.Lock
    _max_contexts: int
    _ratios: OrderedDict[str, DecayedRatio]
    _tau: float

    def _ratio(self, service: str, now: float) -> DecayedRatio: ...


class RetryRatioTraffic:
    """The retry-ratio bookkeeping of ``StrategyLearner`` (see the module doc)."""

    __slots__ = ()

    def _ratio(self: _Counting, service: str, now: float) -> DecayedRatio:
        """The service's retry-ratio state (under the lock); bounded like the contexts."""
        ratios = self._ratios
        ratio = ratios.get(service)
        if ratio is None:
            ratio = ratios[service] = DecayedRatio(updated=now)
            if len(ratios) > self._max_contexts:
                ratios.popitem(last=False)
        else:
            ratios.move_to_end(service)
        return ratio

    def record_call(self: _Counting, service: str, calls: int = 1) -> None:
        """Count calls the learner did not see fail (for the retry-ratio cap, which applies
        to a service once any of its calls was counted)."""
        if not isinstance(service, str):
            raise TypeError(f"service must be a str, got {service!r}")
        if isinstance(calls, bool) or not isinstance(calls, int) or calls < 0:
            raise ValueError(f"calls must be an int >= 0, got {calls!r}")
        tau = self._tau
        with self._lock:
            now = self.clock.now()
            ratio = self._ratio(service, now)
            ratio.add(now, tau, calls=float(calls))
            ratio.counted = True
