"""StrategyLearner hard caps against real traffic, bursts, bounded memory and bad arguments.

The retry-ratio cap compares retries with *calls*: where the learner cannot know the calls
(the retry advisor sees failures only) it is not applied; where it can (``record_call``, the
advisor's ``calls=`` counter, the seed API's recoveries) it holds, bursts included.
Virtual time only.
"""

from __future__ import annotations

import random

import pytest

from otel_recovery.classify import Classifier
from otel_recovery.interaction import ErrorRecoveryInteraction
from otel_recovery.learning import (
    DecisionKey,
    HardCaps,
    LearnedRetryAdvisor,
    StrategyLearner,
)
from otel_recovery.policies import CircuitBreaker, FixedBackoff, Retry, RetryBudget
from otel_recovery.recover import RecoveryPolicy
from otel_recovery.testing import FakeClock

KEY = DecisionKey("svc", "fp", "transient")


def _busy_dependency(clock, learner, *, calls, blip_rate, budget, advisor_calls=None):
    """``calls`` calls 1 ms apart; each first attempt fails with ``blip_rate``, and one retry
    always heals. Returns (blips, calls that still failed)."""
    counter = {} if advisor_calls is None else {"calls": advisor_calls}
    advisor = LearnedRetryAdvisor(learner, service="api:443", **counter)
    policy = RecoveryPolicy(
        retry=Retry(3, backoff=FixedBackoff(0.0), advisor=advisor),
        budget=budget,
        clock=clock,
        telemetry=False,
    )
    env = random.Random(1)
    blips = failed = 0
    for _ in range(calls):
        first = [True]

        def call():
            nonlocal blips
            if first[0]:
                first[0] = False
                if env.random() < blip_rate:
                    blips += 1
                    raise ConnectionResetError("connection reset by peer")
            return "ok"

        try:
            policy.call(call)
        except ConnectionResetError:
            failed += 1
        clock.advance(0.001)
    return blips, failed


# -- item: the advisor's ratio cap must not count failures as if they were all the traffic ------


@pytest.mark.parametrize("blip_rate", [0.01, 0.10])
def test_advisor_keeps_the_retries_of_a_busy_dependency_whose_blips_heal(blip_rate):
    """1000 calls/s, independent blips one retry heals: the default caps (ratio 0.5) compared
    with the failures alone refused about half of these retries (40-49 % not healed)."""
    clock = FakeClock()
    learner = StrategyLearner(clock=clock, rng=random.Random(0))
    budget = RetryBudget(ratio=0.2, clock=clock)
    blips, failed = _busy_dependency(
        clock, learner, calls=20_000, blip_rate=blip_rate, budget=budget
    )
    assert blips > 150
    assert failed <= 0.03 * blips  # only the learner's first explorations of giving up


def test_an_advisor_without_a_call_counter_does_not_apply_the_ratio_cap():
    clock = FakeClock()
    learner = StrategyLearner(clock=clock, rng=random.Random(0))
    _busy_dependency(clock, learner, calls=200, blip_rate=0.1, budget=RetryBudget(clock=clock))
    explained = learner.explain(DecisionKey("api:443", "x", "transient"))
    assert explained["caps"]["retry_ratio_applies"] is False  # it cannot know the traffic


def test_advisor_with_a_call_counter_caps_retries_against_real_traffic():
    """With ``calls=`` the cap is relative to all calls (not only the failures it sees)."""
    clock = FakeClock()
    caps = HardCaps(retry_ratio=0.05, min_retries_per_second=0.0)
    learner = StrategyLearner(clock=clock, rng=random.Random(0), caps=caps)
    budget = RetryBudget(ratio=1.0, clock=clock)  # out of the way: the learner's cap binds
    blips, failed = _busy_dependency(
        clock,
        learner,
        calls=20_000,
        blip_rate=0.10,
        budget=budget,
        advisor_calls=lambda: budget.total_calls,
    )
    retries = budget.snapshot().total_retries
    assert retries <= 0.05 * 20_000 + 5  # the cap: 5 % of the calls, not of the failures
    assert retries >= 0.04 * 20_000  # ...and it is the calls' 5 %: 0.05 x failures is 100
    assert failed == blips - retries
    explained = learner.explain(DecisionKey("api:443", "x", "transient"))
    assert explained["caps"]["retry_ratio_applies"] is True


@pytest.mark.parametrize("kind", ["float", "numpy"])
def test_a_count_kept_in_a_float_or_a_numpy_integer_still_caps_retries(kind):
    """A counter answering ``1000.0`` or ``numpy.int64(1000)`` switched the retry-ratio cap
    off without a word."""
    import numpy as np

    clock = FakeClock()
    caps = HardCaps(retry_ratio=0.05, min_retries_per_second=0.0)
    learner = StrategyLearner(clock=clock, rng=random.Random(0), caps=caps)
    budget = RetryBudget(ratio=1.0, clock=clock)
    convert = float if kind == "float" else np.int64
    _busy_dependency(
        clock, learner, calls=5_000, blip_rate=0.10, budget=budget,
        advisor_calls=lambda: convert(budget.total_calls),
    )  # fmt: skip
    assert budget.snapshot().total_retries <= 0.05 * 5_000 + 5
    explained = learner.explain(DecisionKey("api:443", "x", "transient"))
    assert explained["caps"]["retry_ratio_applies"] is True


def test_advisor_call_counter_is_checked():
    with pytest.raises(TypeError, match="calls must be a function"):
        LearnedRetryAdvisor(StrategyLearner(), service="s", calls=5)  # type: ignore[arg-type]


def test_the_ratio_cap_applies_once_calls_are_counted():
    learner = StrategyLearner(clock=FakeClock())
    assert learner.explain(KEY)["caps"]["retry_ratio_applies"] is False
    learner.choose(KEY, {"give_up": 0, "retry": 1}, calls=None)
    assert learner.explain(KEY)["caps"]["retry_ratio_applies"] is False
    learner.record_call("svc", 0)
    assert learner.explain(KEY)["caps"]["retry_ratio_applies"] is True


def test_without_counted_calls_the_ratio_cap_does_not_apply_but_max_retries_does():
    clock = FakeClock()
    learner = StrategyLearner(
        clock=clock,
        rng=random.Random(2),
        caps=HardCaps(max_retries=2, retry_ratio=0.0, min_retries_per_second=0.0),
    )
    other = DecisionKey("other", "fp", "transient")
    for _ in range(50):
        learner.observe(other, "retry", success=True, retries=1, recovery_time=0.01)
        learner.observe(other, "give_up", success=False, retries=0, recovery_time=0.0)
    recs = [learner.choose(KEY, {"give_up": 0, "retry": 5}, calls=None) for _ in range(50)]
    assert sum(r.action == "retry" for r in recs) > 40  # a zero ratio would have refused all
    assert all(r.max_retries <= 2 for r in recs)


async def test_seed_api_counts_each_recovery_as_a_call(fake_clock):
    """``ErrorRecoveryInteraction`` consults the learner on every recovery, so each one is a
    call it sees: its ratio cap applies, against the recoveries."""
    learner = StrategyLearner(clock=fake_clock, rng=random.Random(4))
    recovery = ErrorRecoveryInteraction(
        classifier=Classifier(clock=fake_clock),
        clock=fake_clock,
        telemetry=False,
        learner=learner,
        breaker_factory=lambda name: CircuitBreaker(10_000, name=name, clock=fake_clock),
    )
    result = await recovery.recover_from_error(
        ConnectionResetError("reset"), {"service_id": "inventory", "retry_func": lambda: "ok"}
    )
    assert "learned_action" in result
    explained = learner.explain(DecisionKey("inventory", "x", "transient"))
    assert explained["caps"]["retry_ratio_applies"] is True


# -- item: a burst of decisions must not overshoot the cap ------------------------------------


def _fond_of_retrying(clock, caps, retrying=("retry",)):
    learner = StrategyLearner(clock=clock, caps=caps, rng=random.Random(0))
    other = DecisionKey("other", "fp", "transient")  # same category: retrying pays
    for _ in range(100):
        for arm in retrying:
            learner.observe(other, arm, success=True, retries=1, recovery_time=0.05)
        learner.observe(other, "give_up", success=False, retries=0, recovery_time=0.0)
    return learner


def test_a_burst_of_decisions_stays_within_the_ratio_cap():
    clock = FakeClock()
    caps = HardCaps(max_retries=4, retry_ratio=0.1, min_retries_per_second=0.0)
    learner = _fond_of_retrying(clock, caps)
    learner.record_call("svc", 1000)
    recs = [learner.choose(KEY, {"give_up": 0, "retry": 4}) for _ in range(500)]
    allowed = sum(r.max_retries for r in recs if r.action == "retry")
    assert allowed <= 0.1 * 1500  # each decision reserved one retry but allowed 4: 600
    assert any(r.action == "retry" for r in recs)
    assert all(r.max_retries == 4 for r in recs if r.action == "retry")  # arms are not cut


def test_recording_gives_back_the_unspent_reservation():
    clock = FakeClock()
    caps = HardCaps(max_retries=4, retry_ratio=0.0, min_retries_per_second=0.4, window=10.0)
    learner = _fond_of_retrying(clock, caps, ("retry_3", "retry_4"))  # floor: 4 per window
    learner.record_call("svc", 0)
    first = learner.choose(KEY, {"give_up": 0, "retry_4": 4})
    assert first.action == "retry_4" and first.max_retries == 4
    second = learner.choose(KEY, {"give_up": 0, "retry_4": 4})
    assert second.capped == ("retry_4",) and second.action == "give_up"
    learner.record(first, success=True, retries=1, recovery_time=0.05)  # 3 come back
    third = learner.choose(KEY, {"give_up": 0, "retry_3": 3, "retry_4": 4})
    assert third.capped == ("retry_4",)
    assert "retry_3" in third.samples


def test_shadow_decisions_reserve_nothing():
    clock = FakeClock()
    caps = HardCaps(max_retries=4, retry_ratio=0.0, min_retries_per_second=0.1)
    learner = StrategyLearner(clock=clock, caps=caps, shadow=True, rng=random.Random(1))
    recs = [learner.choose(KEY, {"give_up": 0, "retry": 1}, default="retry") for _ in range(5)]
    assert all(r.action == "retry" and r.reserved_retries == 0 for r in recs)


# -- item: memory stays bounded however many services ------------------------------------------


def test_per_service_ratio_state_is_bounded():
    clock = FakeClock()
    learner = StrategyLearner(clock=clock, max_contexts=100)
    for i in range(5000):
        rec = learner.choose(DecisionKey(f"tenant-{i}", "fp", "transient"), {"give_up": 0})
        learner.record(rec, success=False, retries=0, recovery_time=0.0)
        learner.record_call(f"other-{i}")
        clock.advance(0.001)
    assert len(learner._ratios) <= 100
    assert len(learner._contexts) <= 100 and len(learner._last) <= 100


def test_a_busy_service_keeps_its_ratio_state_among_many_quiet_ones():
    clock = FakeClock()
    caps = HardCaps(retry_ratio=0.0, min_retries_per_second=0.0)
    learner = StrategyLearner(clock=clock, max_contexts=10, caps=caps)
    learner.record_call("busy", 1)
    for i in range(100):
        learner.record_call(f"quiet-{i}")
        learner.record_call("busy")  # touched: stays
    busy = learner.explain(DecisionKey("busy", "fp", "transient"))
    assert busy["caps"]["retry_ratio_applies"] is True  # least recently used go first
    early = learner.explain(DecisionKey("quiet-0", "fp", "transient"))
    assert early["caps"]["retry_ratio_applies"] is False


# -- item: bad arguments are refused at the call, naming the parameter -------------------------


@pytest.mark.parametrize(
    ("options", "error", "name"),
    [
        ({"prior_strength": float("nan")}, ValueError, "prior_strength"),
        ({"prior_strength": float("inf")}, ValueError, "prior_strength"),
        ({"max_weight": float("nan")}, ValueError, "max_weight"),
        ({"delay_quantile": float("nan")}, ValueError, "delay_quantile"),
        ({"delay_bounds": (1,)}, ValueError, "delay_bounds"),
        ({"delay_bounds": 1.0}, ValueError, "delay_bounds"),
    ],
)
def test_bad_options_are_refused(options, error, name):
    with pytest.raises(error, match=name):
        StrategyLearner(**options)


def test_bad_call_arguments_are_refused():
    learner = StrategyLearner(clock=FakeClock())
    arms = {"give_up": 0, "retry": 1}
    with pytest.raises(TypeError, match="key must be a DecisionKey"):
        learner.choose("svc", arms)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="calls must be"):
        learner.choose(KEY, arms, calls=-1)
    with pytest.raises(TypeError, match="key must be a DecisionKey or None"):
        learner.explain("svc")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="calls must be an int >= 0"):
        learner.record_call("svc", -5)
    with pytest.raises(ValueError, match="calls must be an int >= 0"):
        learner.record_call("svc", 1.5)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="service must be a str"):
        learner.record_call(None)  # type: ignore[arg-type]
    rec = learner.choose(KEY, arms)
    with pytest.raises(TypeError, match="success must be True or False"):
        learner.record(rec, success="no", retries=1, recovery_time=0.1)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="fallback must be True or False"):
        learner.record(rec, success=True, retries=1, recovery_time=0.1, fallback=1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="recovery_time"):
        learner.record(rec, success=True, retries=1, recovery_time=float("nan"))
    with pytest.raises(TypeError, match="recommendation must be"):
        learner.record(KEY, success=True, retries=1, recovery_time=0.1)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="key must be a DecisionKey"):
        learner.observe("svc", "retry", success=True, retries=1, recovery_time=0.1)  # type: ignore[arg-type]
    assert learner.explain(KEY)["levels"][0]["arms"] == {}  # nothing bad was learned
