"""StrategyLearner: convergence, safety (allowed arms, hard caps), shadow mode, explain(),
persistence, forgetting, learned backoff and its use by the seed API. Virtual time only."""

from __future__ import annotations

import json
import random
import threading
from collections import Counter

import pytest

from otel_recovery import RecoveryPolicy
from otel_recovery.classify import Classifier
from otel_recovery.interaction import ErrorRecoveryInteraction
from otel_recovery.learning import (
    DecisionKey,
    HardCaps,
    LearnedBackoff,
    MemoryLearnerStore,
    RewardWeights,
    StrategyLearner,
    learned_retry,
)
from otel_recovery.policies import CircuitBreaker, ExponentialBackoff
from otel_recovery.testing import FakeClock

KEY = DecisionKey("checkout", "fp-1", "transient")
ARMS = {"fail_fast": 0, "retry_1": 1, "retry_3": 3}


def play(learner, env, clock, success_p, trials, *, key=KEY, arms=ARMS, step=1.0):
    """Run the bandit: arm k retries up to k times, each succeeding with success_p[arm]."""
    picks = []
    for _ in range(trials):
        rec = learner.choose(key, arms)
        retries, ok = 0, False
        for _ in range(arms[rec.action]):
            retries += 1
            if env.random() < success_p[rec.action]:
                ok = True
                break
        learner.record(rec, success=ok, retries=retries, recovery_time=0.05 * retries)
        picks.append(rec.action)
        clock.advance(step)
    return picks


def make(clock, **options):
    options.setdefault("rng", random.Random(7))
    options.setdefault("caps", HardCaps(max_retries=4, retry_ratio=1.0, min_retries_per_second=10))
    return StrategyLearner(clock=clock, **options)


# -- learning -----------------------------------------------------------------------------------


def test_converges_on_the_best_arm_of_a_known_bandit():
    clock = FakeClock()
    learner = make(clock)
    # expected rewards: retry_3 (p=0.8 per try) beats retry_1 (p=0.5) beats fail_fast (never)
    picks = play(learner, random.Random(1), clock, {"retry_1": 0.5, "retry_3": 0.8}, 300)
    assert Counter(picks[-100:])["retry_3"] >= 95
    assert Counter(picks)["fail_fast"] <= 10  # exploration of a hopeless arm stays cheap


def test_learns_to_fail_fast_when_retries_never_help():
    clock = FakeClock()
    learner = make(clock)
    picks = play(learner, random.Random(2), clock, {"retry_1": 0.0, "retry_3": 0.0}, 200)
    assert Counter(picks[-100:])["fail_fast"] >= 95


def test_tracks_a_switch_of_the_best_arm():
    clock = FakeClock()
    learner = make(clock, half_life=30.0)
    env = random.Random(3)
    before = play(learner, env, clock, {"retry_1": 0.9, "retry_3": 0.9}, 300)
    assert Counter(before[-50:])["fail_fast"] <= 2
    # the dependency now fails for good: retrying only burns attempts
    after = play(learner, env, clock, {"retry_1": 0.0, "retry_3": 0.0}, 200)
    assert Counter(after[-50:])["fail_fast"] >= 35
    assert after.index("fail_fast") < 100


def test_a_new_fingerprint_borrows_from_its_category():
    clock = FakeClock()
    learner = make(clock)
    play(learner, random.Random(4), clock, {"retry_1": 0.0, "retry_3": 0.0}, 150)
    fresh = DecisionKey("checkout", "fp-never-seen", "transient")
    means = learner.choose(fresh, ARMS).means
    assert means["fail_fast"] > means["retry_1"] and means["fail_fast"] > means["retry_3"]
    other = learner.choose(DecisionKey("billing", "fp-other", "transient"), ARMS).means
    assert other["fail_fast"] > other["retry_1"] > other["retry_3"]  # via ("*", category)


def test_reward_weighs_success_retries_and_time():
    weights = RewardWeights(attempt_cost=0.1, time_cost=0.1, slo=1.0, fallback_value=0.5)

    def score(**kw):
        return weights.score(max_retries=4, **kw)

    instant = score(success=True, fallback=False, retries=0, recovery_time=0.0)
    assert instant == 1.0
    assert score(success=True, fallback=False, retries=2, recovery_time=0.0) < instant
    assert score(success=True, fallback=False, retries=0, recovery_time=2.0) < instant
    fallback = score(success=False, fallback=True, retries=0, recovery_time=0.0)
    failed_fast = score(success=False, fallback=False, retries=0, recovery_time=0.0)
    failed_slow = score(success=False, fallback=False, retries=4, recovery_time=5.0)
    assert instant > fallback > failed_fast > failed_slow == 0.0


# -- safety -------------------------------------------------------------------------------------


def test_never_picks_a_forbidden_arm_even_when_it_looks_best():
    clock = FakeClock()
    learner = make(clock)
    play(learner, random.Random(5), clock, {"retry_1": 1.0, "retry_3": 1.0}, 100)
    rng = random.Random(6)
    for _ in range(300):
        allowed = {"fail_fast": 0, **{a: n for a, n in ARMS.items() if n and rng.random() < 0.5}}
        rec = learner.choose(KEY, allowed)
        assert rec.action in allowed and rec.learned in allowed
        assert set(rec.samples) <= set(allowed)
    assert learner.choose(KEY, {"fail_fast": 0}).action == "fail_fast"


def test_an_arm_set_without_a_way_to_give_up_is_refused():
    learner = make(FakeClock())
    with pytest.raises(ValueError, match="spends no retry"):
        learner.choose(KEY, {"retry_1": 1})
    with pytest.raises(ValueError, match="non-empty"):
        learner.choose(KEY, {})
    with pytest.raises(ValueError, match="default"):
        learner.choose(KEY, ARMS, default="hedge")


def test_max_retries_cap_clips_every_arm():
    learner = make(FakeClock(), caps=HardCaps(max_retries=2, retry_ratio=1.0))
    for _ in range(50):
        rec = learner.choose(KEY, {"fail_fast": 0, "retry_10": 10})
        assert rec.max_retries <= 2
        learner.record(rec, success=True, retries=rec.max_retries, recovery_time=0.1)
    never = make(FakeClock(), caps=HardCaps(max_retries=0))
    assert {never.choose(KEY, ARMS).action for _ in range(20)} == {"fail_fast"}


def test_retry_ratio_cap_holds_however_good_retrying_looks():
    clock = FakeClock()
    caps = HardCaps(max_retries=3, retry_ratio=0.1, min_retries_per_second=0.0, window=10.0)
    learner = make(clock, caps=caps)
    retries = calls = 0
    for _ in range(2000):
        learner.record_call("checkout", 9)  # nine calls that succeeded at once...
        rec = learner.choose(KEY, ARMS)  # ...and one that failed
        calls += 10
        spent = 1 if rec.action != "fail_fast" else 0
        learner.record(rec, success=bool(spent), retries=spent, recovery_time=0.01)
        retries += spent
        clock.advance(0.01)
    assert retries <= 0.1 * calls + 5
    assert retries >= 0.05 * calls  # the cap binds; it does not stop retries altogether
    capped = learner.choose(KEY, ARMS)
    if capped.capped:
        assert capped.action == "fail_fast" and set(capped.capped) == {"retry_1", "retry_3"}


# -- shadow mode ----------------------------------------------------------------------------------


def test_shadow_mode_learns_but_never_acts():
    clock = FakeClock()
    learner = make(clock, shadow=True)
    for _ in range(100):
        rec = learner.choose(KEY, ARMS, default="retry_1")
        assert rec.action == "retry_1" and rec.shadow and not rec.acted
        learner.record(rec, success=False, retries=1, recovery_time=0.2)
        clock.advance(1)
    # it learned that the default fails and would do something else, but still does not act
    rec = learner.choose(KEY, ARMS, default="retry_1")
    assert rec.action == "retry_1" and rec.learned != "retry_1"
    explained = learner.explain(KEY)
    assert explained["mode"] == "shadow" and explained["shadow_agreement"] < 0.5
    with pytest.raises(ValueError, match="shadow"):
        learner.choose(KEY, ARMS)


# -- explain and persistence ----------------------------------------------------------------------


def test_explain_shows_levels_posteriors_counts_and_the_last_decision():
    clock = FakeClock()
    learner = make(clock)
    play(learner, random.Random(8), clock, {"retry_1": 0.5, "retry_3": 0.8}, 120)
    rec = learner.choose(KEY, ARMS)
    explained = learner.explain(KEY)
    assert [level["scope"] for level in explained["levels"]] == ["checkout", "checkout", "*"]
    assert explained["levels"][0]["key"] == "fingerprint:fp-1"
    best = max(explained["posterior"], key=lambda a: explained["posterior"][a]["mean_reward"])
    assert best == "retry_3"
    posterior = explained["posterior"]["retry_3"]
    assert posterior["mean_reward"] > 0.5 and 0 < posterior["sd"] < 0.1
    assert explained["levels"][0]["arms"]["retry_3"]["pulls"] > 50
    assert explained["last_decision"]["action"] == rec.action
    assert set(explained["last_decision"]["samples"]) == set(ARMS)
    assert "retry_3" in explained["summary"] and "checkout" in explained["summary"]
    json.dumps(explained)  # JSON-friendly
    overview = learner.explain()
    assert any(c["best"] == "retry_3" for c in overview["contexts"])


def test_snapshot_round_trip_through_json_and_a_store():
    clock = FakeClock()
    store = MemoryLearnerStore()
    learner = make(clock, store=store)
    play(learner, random.Random(9), clock, {"retry_1": 0.5, "retry_3": 0.8}, 80)
    for seconds in (0.2, 0.3, 0.4, 0.5, 0.6):
        learner.observe_recovery("checkout", seconds)
    learner.flush()
    assert json.loads(store.text or "")["format"] == "otel_recovery.strategy_learner"

    again = make(FakeClock(start=clock.now(), wall_start=clock.wall()), store=store)
    assert again.explain(KEY)["posterior"] == learner.explain(KEY)["posterior"]
    assert again.learned_delay("checkout") == pytest.approx(0.4)
    copied = StrategyLearner.from_dict(json.loads(json.dumps(learner.to_dict())), clock=clock)
    assert copied.explain(KEY)["posterior"] == learner.explain(KEY)["posterior"]


def test_snapshot_evidence_keeps_decaying_while_on_the_shelf():
    clock = FakeClock()
    learner = make(clock, half_life=60.0)
    play(learner, random.Random(10), clock, {"retry_1": 0.5, "retry_3": 0.8}, 50)
    snapshot = learner.to_dict()
    later = FakeClock(start=5.0, wall_start=clock.wall() + 60.0)  # a restart, one half-life on
    restored = StrategyLearner.from_dict(snapshot, clock=later, half_life=60.0)
    before = learner.explain(KEY)["levels"][0]["arms"]["retry_3"]["weight"]
    after = restored.explain(KEY)["levels"][0]["arms"]["retry_3"]["weight"]
    assert after == pytest.approx(before / 2, rel=0.01)


@pytest.mark.parametrize(
    "snapshot",
    [
        {},
        {"format": "otel_recovery.strategy_learner", "version": 99},
        {"format": "otel_recovery.strategy_learner", "version": 1, "saved_at": 0, "contexts": 3},
        {
            "format": "otel_recovery.strategy_learner",
            "version": 1,
            "saved_at": 0,
            "contexts": [{"scope": "a", "key": "b", "arms": {"x": [1, 2, 0, 0, 0]}}],
        },
    ],
)
def test_a_bad_snapshot_is_refused_with_a_reason(snapshot):
    with pytest.raises(ValueError):
        make(FakeClock()).load_dict(snapshot)


# -- learned delays -----------------------------------------------------------------------------


def test_learned_delay_is_a_clamped_quantile_of_recovery_times():
    learner = make(FakeClock(), min_delay_samples=3, delay_bounds=(0.05, 2.0))
    assert learner.learned_delay("db") is None
    for seconds in (0.3, 0.1, 0.2):
        learner.observe_recovery("db", seconds)
    assert learner.learned_delay("db") == pytest.approx(0.2)
    for _ in range(10):
        learner.observe_recovery("db", 9.0)
    assert learner.learned_delay("db") == 2.0


def test_learned_backoff_drives_a_recovery_policy():
    clock = FakeClock()
    learner = make(clock, min_delay_samples=1)
    base = ExponentialBackoff(0.1, 2.0, 10.0, jitter="none")
    assert isinstance(learner.backoff("db", base), LearnedBackoff)
    retry = learned_retry(learner, "db", attempts=9, base=base, on=ConnectionError)
    assert retry.attempts == 5  # clipped to caps.max_retries + 1
    learner.observe_recovery("db", 0.8)
    failures = iter([ConnectionError("down")] * 2)

    def flaky():
        error = next(failures, None)
        if error is not None:
            raise error
        return "ok"

    policy = RecoveryPolicy(retry=retry, clock=clock, telemetry=False)
    assert policy.call(flaky) == "ok"
    assert clock.sleeps == [0.8, 1.6]


# -- concurrency ----------------------------------------------------------------------------------


def test_concurrent_choose_and_record_lose_nothing():
    learner = make(FakeClock())

    def worker(seed):
        rng = random.Random(seed)
        for _ in range(500):
            rec = learner.choose(KEY, ARMS)
            learner.record(rec, success=rng.random() < 0.5, retries=0, recovery_time=0.0)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    arms = learner.explain(KEY)["levels"][0]["arms"]
    assert sum(a["pulls"] for a in arms.values()) == 2000


# -- the seed API with a learner --------------------------------------------------------------------


class HTTPError(Exception):
    def __init__(self, status: int) -> None:
        super().__init__(f"HTTP {status}")
        self.status_code = status


def interaction(clock, learner):
    return ErrorRecoveryInteraction(
        classifier=Classifier(clock=clock),
        clock=clock,
        telemetry=False,
        learner=learner,
        breaker_factory=lambda name: CircuitBreaker(10_000, name=name, clock=clock),
    )


async def test_recover_from_error_uses_and_teaches_the_learner():
    clock = FakeClock()
    learner = make(clock)
    recovery = interaction(clock, learner)
    strategies = Counter()
    for _ in range(60):

        def never():
            raise HTTPError(503)

        result = await recovery.recover_from_error(
            HTTPError(503), {"service_id": "inventory", "retry_func": never}
        )
        strategies[result["strategy"]] += 1
        assert result["learner_mode"] == "active" and "learned_action" in result
    # retrying a dependency that never answers is learned to be pointless
    assert strategies["fail_fast"] > 40
    explained = learner.explain()
    assert any(c["best"] == "fail_fast" for c in explained["contexts"])


async def test_learner_is_not_consulted_for_forced_or_unsafe_cases(fake_clock):
    learner = make(fake_clock)
    recovery = interaction(fake_clock, learner)
    calls = []

    def ok():
        calls.append(1)
        return "ok"

    rejected = await recovery.recover_from_error(
        HTTPError(400), {"service_id": "s", "retry_func": ok}
    )
    assert rejected["strategy"] == "fail_fast" and "learned_action" not in rejected
    unsafe = await recovery.recover_from_error(
        HTTPError(503), {"service_id": "s", "retry_func": ok, "idempotent": False}
    )
    assert unsafe["strategy"] == "fail_fast" and not calls
    explicit = await recovery.recover_from_error(
        HTTPError(503), {"service_id": "s", "retry_func": ok, "strategy": "retry"}
    )
    assert explicit["strategy"] == "retry" and "learned_action" not in explicit
    assert learner.explain()["contexts"] == []


async def test_shadow_learner_reports_but_the_rule_runs(fake_clock):
    learner = make(fake_clock, shadow=True)
    recovery = interaction(fake_clock, learner)
    result = await recovery.recover_from_error(
        HTTPError(503), {"service_id": "s", "retry_func": lambda: "ok"}
    )
    assert result["strategy"] == "exponential_backoff" and result["recovery_status"] == "success"
    assert result["learner_mode"] == "shadow" and result["learned_action"] in {
        "exponential_backoff",
        "retry",
        "fail_fast",
    }


def test_a_store_caps_or_reward_of_the_wrong_type_is_refused_naming_the_setting():
    """A URL as the store was accepted; its errors read like a store outage in the log and
    nothing was ever saved. ``caps={...}`` failed with an AttributeError about ``window``."""
    with pytest.raises(
        TypeError, match=r"store must be a LearnerStore.*CheckpointLearnerStore\('sqlite"
    ):
        StrategyLearner(store="sqlite:///learner.db")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="caps must be a HardCaps"):
        StrategyLearner(caps={"max_retries": 2})  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="reward must be a RewardWeights"):
        StrategyLearner(reward=1.0)  # type: ignore[arg-type]
