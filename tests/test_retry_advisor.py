"""A retry advisor (the learner) decides, per failure, whether one more retry is worth it."""

from __future__ import annotations

import random
from dataclasses import dataclass

import pytest

from otel_recovery._engine import Action, after_failure
from otel_recovery.classify import classify
from otel_recovery.instrumentors._settings import SettingsError, load_settings
from otel_recovery.instrumentors._targets import TargetPolicies
from otel_recovery.learning import StrategyLearner
from otel_recovery.policies import FixedBackoff, Retry
from otel_recovery.recover import RecoveryPolicy


@dataclass(frozen=True)
class Advice:
    retry: bool


class Scripted:
    """Answers from a script and records what it is told."""

    def __init__(self, *answers: bool) -> None:
        self.answers = list(answers)
        self.asked: list[int] = []
        self.learned: list[tuple[bool, bool]] = []

    def advise(self, error, info, attempt):
        self.asked.append(attempt)
        return Advice(self.answers.pop(0))

    def learn(self, advice, *, success, seconds):
        self.learned.append((advice.retry, success))


def test_the_engine_stops_when_the_advisor_says_give_up():
    error = ConnectionError()
    decision = after_failure(
        retry=Retry(3, advisor=Scripted(False)),
        budget=None,
        fallback=None,
        error=error,
        info=classify(error),
        attempt=1,
        previous_delay=0.0,
        started=0.0,
        now=0.0,
    )
    assert (decision.action, decision.reason) == (Action.GIVE_UP, "advised")


def test_the_advisor_is_not_asked_about_what_the_rules_forbid(fake_clock):
    advisor = Scripted()
    policy = RecoveryPolicy(retry=Retry(3, advisor=advisor), clock=fake_clock, telemetry=False)
    with pytest.raises(ValueError):
        policy.call(lambda: (_ for _ in ()).throw(ValueError("bad request")))
    assert advisor.asked == []


@pytest.mark.parametrize("style", ["sync", "block"])
def test_the_driver_reports_how_each_advice_turned_out(fake_clock, style):
    advisor = Scripted(True, True)
    policy = RecoveryPolicy(
        retry=Retry(3, backoff=FixedBackoff(0), advisor=advisor), clock=fake_clock, telemetry=False
    )
    outcomes = iter([ConnectionError(), ConnectionError(), "ok"])

    def flaky():
        item = next(outcomes)
        if isinstance(item, Exception):
            raise item
        return item

    if style == "sync":
        assert policy.call(flaky) == "ok"
    else:
        for attempt in policy.attempts():
            with attempt:
                flaky()
    assert advisor.asked == [1, 2]
    assert advisor.learned == [(True, False), (True, True)]  # the 2nd failed, the 3rd healed


async def test_async_give_up_advice_is_learned_at_once(fake_clock):
    advisor = Scripted(False)
    policy = RecoveryPolicy(retry=Retry(3, advisor=advisor), clock=fake_clock, telemetry=False)

    async def failing():
        raise ConnectionError()

    with pytest.raises(ConnectionError):
        await policy.acall(failing)
    assert advisor.learned == [(False, False)]


def test_a_broken_advisor_leaves_the_rules_in_charge(fake_clock):
    class Broken:
        def advise(self, error, info, attempt):
            raise RuntimeError("model crashed")

        def learn(self, advice, *, success, seconds):
            raise RuntimeError("model crashed")

    policy = RecoveryPolicy(
        retry=Retry(2, backoff=FixedBackoff(0), advisor=Broken()), clock=fake_clock, telemetry=False
    )
    outcomes = iter([ConnectionError(), "ok"])

    def flaky():
        item = next(outcomes)
        if isinstance(item, Exception):
            raise item
        return item

    assert policy.call(flaky) == "ok"  # the advisor failed; the rules retried


def _learning_targets(clock):
    settings = load_settings(
        {
            "learning": "on",
            "max_attempts": 2,
            "budget_ratio": 1.0,
            "breaker_window": 1000,
            "breaker_minimum_calls": 1000,
        },
        environ={},
    )
    learner = StrategyLearner(clock=clock, rng=random.Random(3))
    return learner, TargetPolicies("http", settings, clock=clock, learner=learner, telemetry=False)


def _attempts_per_call(policy, clock, heals: bool, calls: int = 300) -> list[int]:
    per_call = []
    for _ in range(calls):
        attempts = 0

        def dependency():
            nonlocal attempts
            attempts += 1
            if attempts == 1 or not heals:
                raise ConnectionError("refused")
            return "ok"

        try:
            policy.call(dependency)
        except ConnectionError:
            pass
        per_call.append(attempts)
        clock.advance(1.0)
    return per_call


def test_instrumentor_targets_learn_to_stop_retrying_what_never_heals(fake_clock):
    """With learning on, a dependency whose failures never heal stops costing a retry per call."""
    learner, targets = _learning_targets(fake_clock)
    policy = targets.policy_for("poison.local", 443, "GET /", retry_allowed=True)
    per_call = _attempts_per_call(policy, fake_clock, heals=False)
    assert sum(per_call[:20]) > 20  # it explored retrying
    assert sum(per_call[-100:]) / 100 < 1.05  # and learned that retrying never helps here
    assert learner.explain()["contexts"][0]["best"] == "give_up"


def test_instrumentor_targets_keep_retrying_what_a_retry_heals(fake_clock):
    learner, targets = _learning_targets(fake_clock)
    policy = targets.policy_for("blips.local", 443, "GET /", retry_allowed=True)
    per_call = _attempts_per_call(policy, fake_clock, heals=True)
    assert sum(per_call[-100:]) / 100 > 1.95  # every first failure is retried, and heals
    assert learner.explain()["contexts"][0]["best"] == "retry"


def test_learning_setting_is_validated():
    assert load_settings({"learning": "shadow"}, environ={}).learning == "shadow"
    with pytest.raises(SettingsError, match="'off', 'shadow' or 'on'"):
        load_settings(environ={"OTEL_RECOVERY_LEARNING": "yes"})
