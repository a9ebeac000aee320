"""The clients compared by ``benchmarks/fault_sim.py``: static baselines and ours.

Every policy is built from the library's real objects (``Retry``, ``ExponentialBackoff``,
``RetryBudget``, ``CircuitBreaker``, ``StrategyLearner``, ``AdaptiveThresholds``) on the
simulation's virtual clock; the simulation asks the real engine what to do after each failure.

"Ours" = the strategy learner choosing per error fingerprint among give up / 2 / 4
retries, with its learned backoff and hard caps, plus a rate-mode breaker and a retry budget
that :class:`AdaptiveThresholds` tightens while the anomaly signal is active. The anomaly
signal comes from :class:`ErrorRateAlarm`, a deliberately simple stand-in for the statsmodels
detector of ``otel_recovery.learning.anomaly`` (built in parallel): it publishes the same
:class:`AnomalyEvent` s on the same :class:`AnomalyBus`, so swapping the real detector in
changes nothing downstream.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from _fault_sim_core import DEADLINE, Call, Simulation

from otel_recovery.classify import ErrorInfo
from otel_recovery.learning import (
    AdaptiveThresholds,
    AnomalyBus,
    AnomalyEvent,
    DecisionKey,
    HardCaps,
    RewardWeights,
    SeriesKey,
    StrategyLearner,
    Tightening,
)
from otel_recovery.policies import CircuitBreaker, ExponentialBackoff, Retry, RetryBudget

SERVICE = "dependency"
SERIES = SeriesKey("client", "dependency:443", "GET /item")


class StaticPolicy:
    """A fixed configuration: the same Retry for every failure, optional breaker and budget."""

    def __init__(
        self,
        name: str,
        retry: Retry | None,
        *,
        breaker: CircuitBreaker | None = None,
        budget: RetryBudget | None = None,
        ignores_retry_after: bool = False,
    ) -> None:
        self.name = name
        self.retry = retry
        self.breaker = breaker
        self.budget = budget
        self.ignores_retry_after = ignores_retry_after

    def first_failure(self, call: Call, info: ErrorInfo) -> Retry | None:
        return self.retry

    def finished(self, call: Call, info: ErrorInfo | None) -> None:
        pass

    def first_success(self) -> None:
        pass

    def attempt_done(self, ok: bool, latency: float) -> None:
        pass

    def tick(self, now: float) -> None:
        pass


def _naive3(sim: Simulation) -> Retry:
    # tenacity's stop_after_attempt(3) + wait_exponential(multiplier=0.1), retry on any
    # exception (its default predicate), no jitter; Retry-After is stripped by the simulation.
    backoff = ExponentialBackoff(0.1, 2.0, 10.0, jitter="none")
    return Retry(3, on=Exception, backoff=backoff, rng=sim.policy_rng)


def _jitter(sim: Simulation, attempts: int) -> Retry:
    backoff = ExponentialBackoff(0.05, 2.0, 2.0, jitter="full")
    return Retry(attempts, backoff=backoff, deadline=DEADLINE, rng=sim.policy_rng)


def _breaker(sim: Simulation, timeout: float) -> CircuitBreaker:
    return CircuitBreaker(5, timeout, name="pybreaker-style", clock=sim.clock)


STATIC: dict[str, Any] = {
    "none": lambda sim: StaticPolicy("none", None),
    "naive3": lambda sim: StaticPolicy("naive3", _naive3(sim), ignores_retry_after=True),
    "jitter3": lambda sim: StaticPolicy("jitter3", _jitter(sim, 3)),
    "jitter5": lambda sim: StaticPolicy("jitter5", _jitter(sim, 5)),
    "breaker5s": lambda sim: StaticPolicy(
        "breaker5s", _naive3(sim), breaker=_breaker(sim, 5.0), ignores_retry_after=True
    ),
    "breaker60s": lambda sim: StaticPolicy(
        "breaker60s", _naive3(sim), breaker=_breaker(sim, 60.0), ignores_retry_after=True
    ),
    "budget10": lambda sim: StaticPolicy(
        "budget10",
        _jitter(sim, 3),
        budget=RetryBudget(0.1, min_per_second=1.0, ttl=10.0, clock=sim.clock),
    ),
}


@dataclass(frozen=True)
class OursConfig:
    """The knobs of ours; defaults frozen after tuning on seeds 0-9 (``--tune``)."""

    breaker_rate: float = 0.8
    breaker_minimum_calls: int = 20
    breaker_open: float = 1.0
    budget_ratio: float = 0.5
    budget_floor: float = 10.0
    tighten_rate: float = 0.8125  # 0.8 -> 0.65 while anomalous (a 429 storm fails ~50 %)
    tighten_budget: float = 0.05  # 50 % -> 2.5 % while anomalous
    half_life: float = 60.0
    arms: tuple[int, ...] = (0, 2, 4)  # retries each arm may spend; 0 is giving up
    learn: bool = True  # ablation: False always retries up to 4 times (no learner)
    adapt: bool = True  # ablation: False never tightens (no anomaly signal)


class Ours:
    """Learner + adaptive thresholds, wired as an instrumentor would wire them."""

    ignores_retry_after = False

    def __init__(self, sim: Simulation, config: OursConfig) -> None:
        self.name = "ours"
        self.sim = sim
        self.config = config
        clock = sim.clock
        self.breaker = CircuitBreaker(
            failure_rate_threshold=config.breaker_rate,
            window="time",
            window_size=2,
            minimum_calls=config.breaker_minimum_calls,
            timeout=config.breaker_open,
            name=SERVICE,
            clock=clock,
        )
        self.budget = RetryBudget(
            config.budget_ratio, min_per_second=config.budget_floor, ttl=10.0, clock=clock
        )
        self.learner = StrategyLearner(
            clock=clock,
            rng=sim.policy_rng,
            caps=HardCaps(
                max_retries=4,
                retry_ratio=config.budget_ratio,
                min_retries_per_second=config.budget_floor,
            ),
            # the benchmark's objective is success - 0.1 * retries per call: no time term
            reward=RewardWeights(attempt_cost=0.1, time_cost=0.0),
            half_life=config.half_life,
            min_delay_samples=20,
        )
        backoff = self.learner.backoff(SERVICE, ExponentialBackoff(0.05, 2.0, 2.0, "full"))
        self.arms = {f"retry_{n}" if n else "fail_fast": n for n in config.arms}
        self.retries = {
            n: Retry(n + 1, backoff=backoff, deadline=DEADLINE, rng=sim.policy_rng)
            for n in config.arms
            if n
        }
        bus = AnomalyBus()
        self.alarm = ErrorRateAlarm(bus, SERIES)
        if not config.adapt:
            return
        tightening = Tightening(
            failure_rate=config.tighten_rate,
            budget_ratio=config.tighten_budget,
            budget_floor=config.tighten_budget,
        )
        self.adaptive = AdaptiveThresholds(bus, tightening=tightening, clock=clock)
        self.adaptive.register(SERIES, breaker=self.breaker, budget=self.budget)

    def first_failure(self, call: Call, info: ErrorInfo) -> Retry | None:
        if not info.retryable:
            return None  # the safety rule: giving up is the only allowed arm, nothing to learn
        if not self.config.learn:
            return self.retries[max(self.config.arms)]
        rec = self.learner.choose(DecisionKey.of(SERVICE, info), self.arms)
        call.plan = (rec, self.sim.clock.t)
        return self.retries.get(rec.max_retries)

    def finished(self, call: Call, info: ErrorInfo | None) -> None:
        if call.plan is None:
            return
        rec, since = call.plan
        took = self.sim.clock.t - since
        retries = call.attempts - 1
        self.learner.record(rec, success=call.ok, retries=retries, recovery_time=took)
        if call.ok and retries:
            self.learner.observe_recovery(SERVICE, took)

    def first_success(self) -> None:
        self.learner.record_call(SERVICE)

    def attempt_done(self, ok: bool, latency: float) -> None:
        self.alarm.observe(ok, latency)

    def tick(self, now: float) -> None:
        self.alarm.tick(now)


class ErrorRateAlarm:
    """Stand-in anomaly detector over attempt outcomes, in 0.25-s buckets over the last 1 s.

    Error rate: anomalous when above the learned baseline by max(0.1, 4 binomial standard
    errors) with at least 20 attempts; normal again below half that margin (hysteresis).
    Latency: anomalous when the mean latency of answered attempts exceeds 3x its baseline plus
    20 ms. Baselines are EWMAs over normal buckets after a 3-s warm-up.
    """

    def __init__(self, bus: AnomalyBus, key: SeriesKey) -> None:
        self.bus = bus
        self.key = key
        self.ring: list[list[float]] = [[0.0, 0.0, 0.0, 0.0] for _ in range(4)]
        self.current = [0.0, 0.0, 0.0, 0.0]  # attempts, errors, answered, latency sum
        self.base_rate: float | None = None
        self.base_latency: float | None = None
        self.active = {"error_rate": False, "latency": False}

    def observe(self, ok: bool, latency: float) -> None:
        current = self.current
        current[0] += 1
        if ok:
            current[2] += 1
            current[3] += latency
        else:
            current[1] += 1

    def tick(self, now: float) -> None:
        self.ring.pop(0)
        self.ring.append(self.current)
        self.current = [0.0, 0.0, 0.0, 0.0]
        n, errors, answered, latency = (sum(b[i] for b in self.ring) for i in range(4))
        if n < 20:
            return
        rate = errors / n
        mean_latency = latency / answered if answered else None
        if now < 3.0 or self.base_rate is None or self.base_latency is None:
            self.base_rate = rate if self.base_rate is None else 0.8 * self.base_rate + 0.2 * rate
            if mean_latency is not None:
                self.base_latency = (
                    mean_latency
                    if self.base_latency is None
                    else 0.8 * self.base_latency + 0.2 * mean_latency
                )
            return
        base = self.base_rate
        margin = max(0.1, 4.0 * math.sqrt(max(base * (1 - base), 1e-4) / n))
        high = rate > base + (margin / 2 if self.active["error_rate"] else margin)
        self._publish("error_rate", high, rate, base, now)
        slow = mean_latency is not None and mean_latency > 3.0 * self.base_latency + 0.02
        self._publish("latency", slow, mean_latency or 0.0, self.base_latency, now)
        if not high:
            self.base_rate = 0.95 * base + 0.05 * rate
        if not slow and mean_latency is not None:
            self.base_latency = 0.95 * self.base_latency + 0.05 * mean_latency

    def _publish(
        self, signal: str, active: bool, value: float, expected: float, now: float
    ) -> None:
        if active != self.active[signal]:
            self.active[signal] = active
            score = 1.0 if active else 0.0
            self.bus.publish(AnomalyEvent(self.key, signal, score, value, expected, now, active))
