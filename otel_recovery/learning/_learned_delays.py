"""How long each dependency takes to recover, as a strategy learner learns it: the backoff delay.

Besides which action works, a :class:`~otel_recovery.learning.StrategyLearner` learns how
long a service's recoveries take (:meth:`LearnedDelays.observe_recovery`) and offers a
quantile of that as the first backoff delay (:meth:`LearnedDelays.learned_delay`, and
:meth:`LearnedDelays.backoff` as a :class:`~otel_recovery.learning.LearnedBackoff`): the
first retry then waits about as long as the dependency usually needs. Each service keeps a
bounded sample of recent recovery times (:class:`~._stats.DelaySamples`), and at most
``max_contexts`` services are kept, the least recently observed going first. With a store,
each observation is also owed to it (:mod:`._snapshot_sharing`).

:class:`LearnedDelays` is a mixin of ``StrategyLearner``: it has no state of its own and works
on the learner's (``_Delaying`` lists what it uses); ``choose()`` puts
:meth:`LearnedDelays._learned_delay` in each recommendation, under the learner's lock.
"""

from __future__ import annotations

import math
import threading
from collections import OrderedDict
from typing import TYPE_CHECKING, Protocol, cast

from otel_recovery.learning._backoff import LearnedBackoff
from otel_recovery.learning._snapshot_sharing import SnapshotSharing
from otel_recovery.learning._stats import DelaySamples
from otel_recovery.policies.backoff import ExponentialBackoff

if TYPE_CHECKING:
    from otel_recovery.learning.strategy import StrategyLearner

__all__ = ["LearnedDelays"]


class _Delaying(Protocol):
    """The attributes and methods of ``StrategyLearner`` that :class:`LearnedDelays` uses."""

    delay_bounds: tuple[float, float]
    delay_quantile: float
    _delay_size: int
    _delays: OrderedDict[str, DelaySamples]
    _lock: threading.Lock
    _max_contexts: int
    _min_delay_samples: int
    _sharing: SnapshotSharing | None

    def _learned_delay(self, service: str) -> float | None: ...


class LearnedDelays:
    """The learned-delay part of ``StrategyLearner`` (see the module doc)."""

    __slots__ = ()

    def observe_recovery(self: _Delaying, service: str, seconds: float) -> None:
        """A recovery of ``service`` succeeded ``seconds`` after the first failure."""
        if (
            isinstance(seconds, bool)
            or not isinstance(seconds, (int, float))
            or not 0 <= seconds < math.inf  # inf would make every later save fail
        ):
            raise ValueError(f"seconds must be a finite number >= 0, got {seconds!r}")
        with self._lock:
            samples = self._delays.get(service)
            if samples is None:
                samples = self._delays[service] = DelaySamples(self._delay_size)
                if len(self._delays) > self._max_contexts:
                    self._delays.popitem(last=False)
            samples.add(float(seconds))
            if self._sharing is not None:
                self._sharing.pending.add_delay(
                    service, float(seconds), self._delay_size, self._max_contexts
                )

    def learned_delay(self: _Delaying, service: str) -> float | None:
        """The learned first backoff delay for ``service``, or None while data is thin.

        It is the ``delay_quantile`` of recent recovery times, clamped to ``delay_bounds``.
        The estimate corrects itself rather than ratcheting: if waits are longer than the
        dependency needs, recoveries come in just after the (jittered) waits and the
        quantile falls; if shorter, early retries fail and recoveries take longer.
        """
        with self._lock:
            return self._learned_delay(service)

    def _learned_delay(self: _Delaying, service: str) -> float | None:
        samples = self._delays.get(service)
        if samples is None or len(samples) < self._min_delay_samples:
            return None
        low, high = self.delay_bounds
        return min(high, max(low, samples.quantile(self.delay_quantile)))

    def backoff(
        self: _Delaying, service: str, base: ExponentialBackoff | None = None
    ) -> LearnedBackoff:
        """A :class:`~otel_recovery.policies.Backoff` starting at the learned delay of
        ``service`` (``base``'s initial delay until something is learned)."""
        learner = cast("StrategyLearner", self)  # for the type checker: self is the learner
        return LearnedBackoff(learner, service, base if base is not None else ExponentialBackoff())
