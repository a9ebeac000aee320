"""``StrategyLearner``: which recovery works best for each kind of error, learned online.

Why a bandit: after a failure we try one action and see one outcome; the other actions'
outcomes stay unknown (a contextual-bandit setting, research/adaptive.md 2.1). Why Thompson
sampling: it explores in proportion to the remaining doubt, needs no tuning of an
exploration rate, and is at least as good as UCB in the published comparisons (Chapelle &
Li 2011). Three changes make it fit recovery:

- **Forgetting** (discounted Thompson sampling): a dependency's behaviour changes, so
  evidence decays with a half-life in *time* and the weight per arm is capped; a switch of
  the best action is tracked within a few half-lives (:mod:`._stats`).
- **Back-off to coarser contexts**: a new fingerprint has no history, so its prior is the
  posterior of ``(service, category)``, whose prior is that of ``(any service, category)``,
  each worth ``prior_strength`` observations. Thin data borrows; enough data
  dominates. This is empirical-Bayes shrinkage rather than a hard "fewer than N, use the
  parent" switch, so decisions do not jump when a count crosses a threshold.
- **Estimated reward variance**: the posterior of an arm's mean reward is normal with the
  variance estimated from the rewards, not Beta-Bernoulli. Recovery rewards are often nearly
  deterministic (every retry into a dead dependency fails), and a Bernoulli posterior would
  keep sampling such an arm long after the answer is clear, sending retries into an outage.

The learner only ever chooses among the arms the caller allows (the safety rules: never
retry a non-retryable or non-idempotent call, Retry-After handled by the engine), and never
past :class:`HardCaps`. In shadow mode it learns and says what it would do, but the caller's
default is what happens. Rewards weigh success, retries spent and time
(:class:`RewardWeights`). It also learns how long each dependency takes to recover, and
offers that as a backoff delay (:meth:`backoff`, :func:`learned_retry`).

The retry-ratio cap (:class:`HardCaps`) compares retries with the calls made to a service,
so it needs to know that traffic: :meth:`record_call`, ``choose(..., calls=n)`` (by default
each decision counts as one call, which is right where every call is a decision, as in
``ErrorRecoveryInteraction``), or :class:`~otel_recovery.learning.LearnedRetryAdvisor`'s
``calls=`` source. Where no call was ever counted, the cap is not applied: comparing retries
with failures alone would refuse half the retries of a busy dependency whose blips a retry
always heals; the policy's :class:`~otel_recovery.policies.RetryBudget`, which counts every
call, still bounds the load there.

Persistence (``store=``) merges rather than overwrites: every ``save_interval`` the learner
adds what it learned since its last save to the store's snapshot, taking in what other
replicas saved meanwhile (:func:`._snapshot_merge.merge_snapshot`: each observation is
counted once; the bookkeeping is :mod:`._snapshot_sharing`), so one snapshot can be shared
by a fleet. A failed save never reaches the caller of :meth:`record` (logged once per kind of
error; the evidence is kept for the next save).

Thread-safe (one lock, never held across user code or store I/O). Time comes from the
injected clock.

This module is the algorithm: deciding and learning. The rest of :class:`StrategyLearner` is
mixed in from one module per part of its state, none with state of its own: the evidence per
context and the posterior composed from it (``_context_evidence``), the retry-ratio cap's
traffic (``_retry_ratio``) and the learned delays (``_learned_delays``). What it accepts is
checked in ``_learner_checks``.
"""

from __future__ import annotations

import logging
import math
import random
from collections import OrderedDict
from collections.abc import Mapping
from enum import Enum
from typing import Any

from otel_recovery._clock import Clock, Duration, clock_or_default, to_seconds
from otel_recovery._forksafe import new_lock
from otel_recovery._mixins import plain_self
from otel_recovery.learning._context_evidence import ContextEvidence
from otel_recovery.learning._decisions import DecisionKey, HardCaps, Recommendation, RewardWeights
from otel_recovery.learning._explain import describe_context, remember_decision
from otel_recovery.learning._learned_delays import LearnedDelays
from otel_recovery.learning._learner_checks import (
    check_options,
    check_outcome,
    check_settings,
    checked_choice,
    checked_delay_bounds,
    checked_half_life,
)
from otel_recovery.learning._retry_ratio import RetryRatioTraffic
from otel_recovery.learning._snapshot_format import Level, restore_snapshot, take_snapshot
from otel_recovery.learning._snapshot_merge import Pending
from otel_recovery.learning._snapshot_sharing import SnapshotSharing
from otel_recovery.learning._stats import DecayedMoments, DecayedRatio, DelaySamples
from otel_recovery.learning.store import LearnerStore

__all__ = ["StrategyLearner"]

_log = logging.getLogger("otel_recovery")


class StrategyLearner(ContextEvidence, RetryRatioTraffic, LearnedDelays):
    """Discounted, hierarchical Thompson sampling over recovery actions, under hard caps.

    Use: ``rec = learner.choose(key, {"retry": 3, "fail_fast": 0})`` after a failure (arm
    name -> retries it may spend; at least one arm must spend none, as giving up must always
    be possible), do ``rec.action``, then ``learner.record(rec, success=..., retries=...,
    recovery_time=...)``. Call ``record_call(service)`` for calls that succeed at once, so the
    retry-ratio cap sees all traffic (without any counted call, the cap is not applied to a
    service), and ``observe_recovery(service, seconds)`` with how long a successful recovery
    took, to learn the service's backoff delay.
    """

    def __init__(
        self,
        *,
        clock: Clock | None = None,
        store: LearnerStore | None = None,
        caps: HardCaps | None = None,
        reward: RewardWeights | None = None,
        half_life: Duration = 600.0,
        max_weight: float = 200.0,
        prior_strength: float = 2.0,
        shadow: bool = False,
        rng: random.Random | None = None,
        delay_quantile: float = 0.5,
        delay_samples: int = 256,
        min_delay_samples: int = 5,
        delay_bounds: tuple[Duration, Duration] = (0.01, 30.0),
        max_contexts: int = 10_000,
        save_interval: Duration = 30.0,
    ) -> None:
        self.clock: Clock = clock_or_default(clock)
        check_settings(caps, reward, store)
        self.caps = caps if caps is not None else HardCaps()
        self.reward = reward if reward is not None else RewardWeights()
        self._tau = to_seconds(self.caps.window, "caps.window")
        self.half_life = checked_half_life(half_life)
        check_options(
            max_weight=max_weight,
            prior_strength=prior_strength,
            delay_quantile=delay_quantile,
            counts={
                "delay_samples": delay_samples,
                "min_delay_samples": min_delay_samples,
                "max_contexts": max_contexts,
            },
        )
        low_delay, high_delay = checked_delay_bounds(delay_bounds)
        self.max_weight = float(max_weight)
        self.prior_strength = float(prior_strength)
        self.shadow = bool(shadow)
        self.delay_quantile = float(delay_quantile)
        self.delay_bounds = (low_delay, high_delay)
        self._delay_size = delay_samples
        self._min_delay_samples = min_delay_samples
        self._max_contexts = max_contexts
        save_every = to_seconds(save_interval, "save_interval", allow_inf=True)
        self._rng = rng if rng is not None else random.Random()
        self._lock = new_lock()
        self._contexts: OrderedDict[Level, dict[str, DecayedMoments]] = OrderedDict()
        self._delays: OrderedDict[str, DelaySamples] = OrderedDict()
        self._ratios: OrderedDict[str, DecayedRatio] = OrderedDict()
        self._last: OrderedDict[DecisionKey, dict[str, Any]] = OrderedDict()
        self._shadow_agreed = 0
        self._shadow_decisions = 0
        # What is owed to the store and who we are in its snapshot (None without a store).
        self._sharing: SnapshotSharing | None = None
        if store is not None:
            self._sharing = SnapshotSharing(self, store, save_every)
            try:
                snapshot = store.load()
                if snapshot is not None:
                    self.load_dict(snapshot)
            except Exception as problem:
                # A snapshot from a newer version (a downgrade), a broken one, a store that
                # cannot be read: start from the priors rather than stop the service.
                self._sharing.report("load", problem)

    # -- deciding ----------------------------------------------------------------------------

    def choose(
        self,
        key: DecisionKey,
        allowed: Mapping[str, int],
        *,
        default: str | None = None,
        calls: int | None = 1,
    ) -> Recommendation:
        """Pick an arm among ``allowed`` (arm -> retries it may spend) for one failure.

        ``default`` is what the caller would do without learning; shadow mode requires it
        and returns it as ``action``. ``calls`` is how many calls of ``key.service`` this
        decision stands for, for the retry-ratio cap: 1 (the failed call) by default; None
        when the caller counts calls elsewhere (:meth:`record_call`) or cannot know them.

        A retrying arm is eligible only if its whole allowance (clipped to
        ``caps.max_retries``) fits in what the retry-ratio cap has left; choosing it reserves
        that allowance, and :meth:`record` gives back what was not spent.
        """
        arms, default = checked_choice(key, allowed, default, calls, shadow=self.shadow)
        caps = self.caps
        tau = self._tau
        with self._lock:
            now = self.clock.now()
            ratio = self._ratio(key.service, now)
            if calls is not None:
                ratio.add(now, tau, calls=float(calls))
                ratio.counted = True
            room = (
                ratio.room(now, tau, caps.retry_ratio, caps.min_retries_per_second)
                if ratio.counted
                else math.inf
            )
            most = caps.max_retries
            eligible = {a: n for a, n in arms.items() if n == 0 or 0 < min(n, most) <= room}
            capped = tuple(a for a in arms if a not in eligible)
            samples: dict[str, float] = {}
            means: dict[str, float] = {}
            for arm in eligible:
                mean, spread, _ = self._posterior(key, arm, now)
                means[arm] = mean
                samples[arm] = self._rng.gauss(mean, spread)
            learned = max(samples, key=samples.__getitem__)
            action = default if self.shadow and default is not None else learned
            limit = arms[action] if self.shadow else min(arms[action], most)
            reserved = 0
            if not self.shadow and limit > 0:
                ratio.add(now, tau, retries=float(limit))
                reserved = limit
            if self.shadow:
                self._shadow_decisions += 1
                self._shadow_agreed += learned == action
            delay = self._learned_delay(key.service)
            recommendation = Recommendation(
                key,
                action,
                learned,
                self.shadow,
                limit,
                samples,
                means,
                capped,
                delay,
                reserved_retries=reserved,
                decided_at=now,
            )
            remember_decision(self._last, recommendation, now, self._max_contexts)
        return recommendation

    # -- learning ----------------------------------------------------------------------------

    def record(
        self,
        recommendation: Recommendation,
        *,
        success: bool,
        retries: int,
        recovery_time: float,
        fallback: bool = False,
    ) -> float:
        """Learn from how ``recommendation.action`` turned out; returns the reward in [0, 1].

        ``retries`` counts the attempts the recovery made (not the original failure); the
        part of the decision's reserved allowance it did not spend goes back to the
        retry-ratio cap. Never raises because of the store (a failed periodic save is
        logged once per kind of error).
        """
        if not isinstance(recommendation, Recommendation):
            raise TypeError(
                f"recommendation must be the Recommendation choose() returned, "
                f"got {recommendation!r}"
            )
        return self._learn(
            recommendation.key,
            recommendation.action,
            success=success,
            fallback=fallback,
            retries=retries,
            recovery_time=recovery_time,
            reserved=recommendation.reserved_retries,
            decided_at=recommendation.decided_at,
        )

    def observe(
        self,
        key: DecisionKey,
        arm: str,
        *,
        success: bool,
        retries: int,
        recovery_time: float,
        fallback: bool = False,
    ) -> float:
        """Learn from an outcome the learner did not choose (a forced strategy, a replay)."""
        if not isinstance(key, DecisionKey):
            raise TypeError(f"key must be a DecisionKey, got {key!r}")
        if isinstance(arm, Enum):
            arm = arm.value
        if not isinstance(arm, str):
            raise TypeError(f"arm must be an arm name (str), got {arm!r}")
        return self._learn(
            key,
            arm,
            success=success,
            fallback=fallback,
            retries=retries,
            recovery_time=recovery_time,
            reserved=0,
            decided_at=0.0,
        )

    def _learn(
        self,
        key: DecisionKey,
        arm: str,
        *,
        success: bool,
        fallback: bool,
        retries: int,
        recovery_time: float,
        reserved: int,
        decided_at: float,
    ) -> float:
        check_outcome(
            success=success, fallback=fallback, retries=retries, recovery_time=recovery_time
        )
        caps = self.caps
        score = self.reward.score(
            success=success,
            fallback=fallback,
            retries=retries,
            recovery_time=recovery_time,
            max_retries=caps.max_retries,
        )
        sharing = self._sharing
        save = False
        with self._lock:
            now = self.clock.now()
            owed = sharing.pending if sharing is not None else None
            for level in key.levels():
                self._arm(level, arm, now).add(score, now, self.half_life, self.max_weight)
                if owed is not None:
                    owed.add(level, arm, score, now, self.half_life, self._max_contexts)
            if reserved or retries:
                self._ratio(key.service, now).settle(
                    now, self._tau, reserved=reserved, at=decided_at, spent=retries
                )
            save = sharing is not None and sharing.due(now)
        if save and sharing is not None:
            sharing.save_quietly(self)
        return score

    # -- introspection and persistence ---------------------------------------------------------

    def explain(self, key: DecisionKey | None = None) -> dict[str, Any]:
        """What the learner believes and why, as a JSON-friendly dict.

        With a key: the evidence at each of its three levels, the composed posterior per arm
        (mean reward, its sd, the reward variance), the last decision (draws, chosen arm,
        caps that applied), the learned delay and a one-line ``summary``. Without: every
        context's best arm.
        """
        if key is not None and not isinstance(key, DecisionKey):
            raise TypeError(f"key must be a DecisionKey or None, got {key!r}")
        with self._lock:
            now = self.clock.now()
            return describe_context(self, key, now)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable snapshot of the learned statistics (caps and mode excluded)."""
        with self._lock:
            return take_snapshot(self, self.clock.now(), self.clock.wall())

    def load_dict(self, snapshot: Mapping[str, Any]) -> None:
        """Replace the learned statistics with those of ``snapshot`` (from :meth:`to_dict`).

        Evidence keeps decaying across the time the snapshot spent on the shelf. Only the
        ``max_contexts`` most recent contexts (and delay series) are kept.
        """
        contexts, delays = restore_snapshot(
            snapshot, self.clock.now(), self.clock.wall(), self._delay_size, self._max_contexts
        )
        with self._lock:
            self._contexts = contexts
            self._delays = delays
            if self._sharing is not None:
                self._sharing.pending = Pending()

    @classmethod
    def from_dict(cls, snapshot: Mapping[str, Any], **options: Any) -> StrategyLearner:
        """A new learner (``options`` as for the constructor) holding ``snapshot``."""
        learner = cls(**options)
        learner.load_dict(snapshot)
        return learner

    def flush(self) -> None:
        """Save to the store now (also done every ``save_interval`` seconds by :meth:`record`).

        Adds what this learner learned since its last save to the store's snapshot and takes
        in what other learners sharing it saved meanwhile
        (``_snapshot_merge.merge_snapshot``: each observation reaches the store once); a
        store with ``update`` does this atomically.
        The snapshot is trimmed to the store's ``max_bytes`` (the least recently learned
        fingerprints go first). Raises what the store raised; what was not saved is kept for
        the next save.
        """
        if self._sharing is not None:
            self._sharing.flush(self)

    def __repr__(self) -> str:
        mode = "shadow" if self.shadow else "active"
        return f"StrategyLearner({mode}, contexts={len(self._contexts)}, caps={self.caps!r})"


plain_self(StrategyLearner)
