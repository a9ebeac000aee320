"""A strategy learner's evidence per context level, and the posterior composed from it.

A :class:`~otel_recovery.learning.DecisionKey` names three contexts, finest first:
``(service, fingerprint)``, ``(service, category)``, ``(any service, category)``. The learner
keeps, per context and arm, the decayed moments of the rewards seen there
(:class:`~._stats.DecayedMoments`): :meth:`ContextEvidence._arm` finds or makes that entry
(at most ``max_contexts`` contexts, the least recently used going first), and
:meth:`ContextEvidence._posterior` composes an arm's posterior coarse to fine, each level's
prior being its parent's (the back-off to coarser contexts and the estimated reward variance
of the learner's module docstring). ``choose()`` samples from that posterior and
``record()`` adds to the entries, both under the learner's lock.

:class:`ContextEvidence` is a mixin of ``StrategyLearner``: it has no state of its own and
works on the learner's (``_Evidenced`` lists what it uses).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import Protocol

from otel_recovery.learning._decisions import DecisionKey
from otel_recovery.learning._snapshot_format import Level
from otel_recovery.learning._stats import DecayedMoments

__all__ = ["ContextEvidence"]


class _Evidenced(Protocol):
    """The attributes of ``StrategyLearner`` that :class:`ContextEvidence` uses."""

    half_life: float
    prior_strength: float
    _contexts: OrderedDict[Level, dict[str, DecayedMoments]]
    _max_contexts: int


class ContextEvidence:
    """The per-context statistics of ``StrategyLearner`` (see the module doc)."""

    __slots__ = ()

    def _posterior(
        self: _Evidenced, key: DecisionKey, arm: str, now: float
    ) -> tuple[float, float, float]:
        """``(mean, sd, variance)``: the posterior of ``arm``'s mean reward and its spread,
        and the estimated variance of a single reward.

        Built coarse to fine: the coarsest level starts from mean 0.5 and variance 0.25 (the
        widest a reward in [0, 1] can have); every level's prior is its parent's mean and
        variance worth ``prior_strength`` observations (a normal model with unknown
        variance). The variance is *estimated* rather than assumed Bernoulli, because
        recovery rewards are often nearly deterministic (a dead dependency fails every
        retry), and Beta-Bernoulli sampling would keep exploring such arms long after the
        answer is clear, each exploration being retries sent into an outage.
        """
        mean, variance = 0.5, 0.25
        prior = self.prior_strength
        count = prior
        half_life = self.half_life
        for level in reversed(key.levels()):
            stats = self._contexts.get(level)
            entry = stats.get(arm) if stats is not None else None
            if entry is None:
                count = prior
                continue
            weight, total, squares = entry.at(now, half_life)
            count = prior + weight
            if weight <= 0.0:
                continue
            own_mean = total / weight
            within = max(0.0, squares - total * own_mean)
            between = prior * weight / count * (own_mean - mean) ** 2
            variance = (prior * variance + within + between) / count
            mean = (prior * mean + total) / count
        variance = max(variance, 1e-4)
        return mean, math.sqrt(variance / count), variance

    def _arm(self: _Evidenced, level: Level, arm: str, now: float) -> DecayedMoments:
        stats = self._contexts.get(level)
        if stats is None:
            stats = self._contexts[level] = {}
            if len(self._contexts) > self._max_contexts:
                self._contexts.popitem(last=False)
        else:
            self._contexts.move_to_end(level)
        entry = stats.get(arm)
        if entry is None:
            entry = stats[arm] = DecayedMoments(updated=now)
        return entry
