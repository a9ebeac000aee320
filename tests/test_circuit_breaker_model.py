"""Model-based test: a real CircuitBreaker against a deliberately naive reference model.

The model keeps every outcome in a plain list and recomputes windows by slicing/filtering, so
it shares nothing with the ring buffer and per-second buckets it checks. Hypothesis drives both
through random sequences of calls, outcomes, clock moves and manual commands, and after every
step state, permits, counters, rates, timers and emitted transitions must agree.
"""

from __future__ import annotations

import math
from typing import Any

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from otel_recovery._fake_clock import FakeClock
from otel_recovery.policies.circuit_breaker import (
    CircuitBreaker,
    CircuitOpenError,
    StateTransition,
)
from otel_recovery.recover import RecoveryPolicy

DURATIONS = st.sampled_from([None, 0.0, 0.5, 0.99, 1.0, 2.5])
STEPS = st.one_of(
    st.sampled_from([0.0, 0.25, 0.5, 1.0, 2.0, 5.0, 9.75, 10.0, 30.0]),
    st.floats(min_value=0.0, max_value=40.0, allow_nan=False),
)


class Model:
    """The breaker as the spec describes it, written for clarity rather than speed."""

    def __init__(self, cfg: dict[str, Any], clock: FakeClock) -> None:
        self.cfg = cfg
        self.clock = clock
        self.rate_mode = cfg.get("failure_rate_threshold") is not None
        self.base_timeout = float(cfg.get("timeout", 60.0))
        self.state = "closed"
        self.outcomes: list[tuple[int, bool, bool]] = []  # (second, failed, slow)
        self.consecutive = 0
        self.successes = 0
        self.failures = 0
        self.not_permitted = 0
        self.probes_out = 0
        self.probes_held = 0  # by this test's one context, in the current half-open period
        self.granted_at = 0.0
        self.probe_ok = 0
        self.timeout = self.base_timeout
        self.open_until = 0.0
        self.transitions: list[tuple[str, str, str]] = []

    # window ---------------------------------------------------------------------------
    def window(self) -> list[tuple[int, bool, bool]]:
        size = self.cfg.get("window_size", 100)
        if self.cfg.get("window", "count") == "count":
            return self.outcomes[-size:]
        now_sec = math.floor(self.clock.now())
        return [o for o in self.outcomes if now_sec - size < o[0]]

    def minimum(self) -> int:
        minimum: int = self.cfg.get("minimum_calls", 10)
        if self.cfg.get("window", "count") == "count":
            return min(minimum, self.cfg.get("window_size", 100))
        return minimum

    def rates(self) -> tuple[float | None, float | None, int]:
        if not self.rate_mode:
            return None, None, 0
        w = self.window()
        if len(w) < self.minimum():
            return None, None, len(w)
        return sum(o[1] for o in w) / len(w), sum(o[2] for o in w) / len(w), len(w)

    # transitions ----------------------------------------------------------------------
    def go(self, to: str, reason: str) -> None:
        if to != self.state:
            self.transitions.append((self.state, to, reason))
        self.state = to
        self.probes_out = 0
        self.probes_held = 0  # permits of an earlier period no longer count
        self.probe_ok = 0
        if to not in ("open", "forced_open"):
            self.outcomes = []
            self.consecutive = 0
        if to == "closed":
            self.timeout = self.base_timeout
        if to == "open":
            self.open_until = self.clock.now() + self.timeout

    def reopen(self, reason: str) -> None:
        self.timeout = min(
            self.timeout * self.cfg.get("timeout_multiplier", 1.0),
            self.cfg.get("max_timeout", math.inf),
        )
        self.go("open", reason)

    # operations -----------------------------------------------------------------------
    def can_execute(self) -> bool:
        if self.state in ("closed", "disabled", "metrics_only"):
            return True
        if self.state == "open" and self.clock.now() >= self.open_until:
            self.go("half_open", "timeout_elapsed")
        limit = self.cfg.get("half_open_max_calls", 1)
        if self.state == "half_open":
            lease = max(self.timeout, 30.0)  # permits out this long are presumed lost
            if self.probes_out >= limit and self.clock.now() - self.granted_at >= lease:
                self.probes_out = 0
                self.probes_held = 0  # their late reports are no probes
            if self.probes_out < limit:
                self.probes_out += 1
                self.probes_held += 1
                self.granted_at = self.clock.now()
                return True
        self.not_permitted += 1
        return False

    def record(self, failed: bool, duration: float | None) -> None:
        if self.state == "disabled":
            return
        if failed:
            self.failures += 1
        else:
            self.successes += 1
        slow_after = self.cfg.get("slow_call_duration")
        slow = slow_after is not None and duration is not None and duration >= slow_after
        if self.state in ("closed", "metrics_only"):
            self.consecutive = self.consecutive + 1 if failed else 0
            if not self.rate_mode:
                if self.state == "closed" and self.consecutive >= self.cfg["failure_threshold"]:
                    self.go("open", "failure_threshold")
                return
            self.outcomes.append((math.floor(self.clock.now()), failed, slow))
            failure_rate, slow_rate, _ = self.rates()
            if self.state != "closed" or failure_rate is None or slow_rate is None:
                return
            if failure_rate >= self.cfg["failure_rate_threshold"]:
                self.go("open", "failure_rate")
            elif slow_rate >= self.cfg.get("slow_call_rate_threshold", 1.0):
                self.go("open", "slow_call_rate")
        elif self.state == "half_open":
            if not self.probes_held:
                return  # not a probe: admitted before this half-open period
            self.probes_held -= 1
            self.probes_out = max(0, self.probes_out - 1)
            if failed:
                self.reopen("probe_failed")
            elif slow:
                self.reopen("probe_slow")
            else:
                self.probe_ok += 1
                if self.probe_ok >= self.cfg.get("success_threshold", 1):
                    self.go("closed", "probes_succeeded")

    def release(self) -> None:
        if self.state == "half_open" and self.probes_held:
            self.probes_held -= 1
            self.probes_out = max(0, self.probes_out - 1)

    def probe_now(self) -> bool:
        if self.state != "open":
            return False
        self.go("half_open", "probe_now")
        return True

    def manual(self, op: str) -> None:
        if op == "reset":
            self.go("closed", "reset")
        else:
            target = {"force_open": "forced_open", "disable": "disabled"}.get(op, op)
            if self.state != target:
                self.go(target, op)


def _succeed() -> str:
    return "ok"


def _fail() -> str:
    raise ConnectionError("refused")  # transient: counted against the dependency


class BreakerMachine(RuleBasedStateMachine):
    config: dict[str, Any] = {}

    def __init__(self) -> None:
        super().__init__()
        self.clock = FakeClock(start=1000.0)
        self.seen: list[StateTransition] = []
        self.breaker = CircuitBreaker(clock=self.clock, listeners=[self.seen.append], **self.config)
        self.model = Model(self.config, self.clock)
        policy = RecoveryPolicy(breaker=self.breaker, clock=self.clock, telemetry=False)
        self.run = policy.runner()

    @rule()
    def can_execute(self) -> None:
        assert self.breaker.can_execute() == self.model.can_execute()

    @rule(failed=st.booleans(), duration=DURATIONS)
    def call(self, failed: bool, duration: float | None) -> None:
        """The driver's protocol: ask, then report the outcome only if permitted."""
        permitted = self.breaker.can_execute()
        assert permitted == self.model.can_execute()
        if permitted:
            self.record(failed, duration)

    @rule(failed=st.booleans())
    def compiled_call(self, failed: bool) -> None:
        """A call through ``RecoveryPolicy.runner()``, whose happy path reads the breaker's
        lock-free ``_permit_all`` and ``_tally`` instead of calling it: same decisions."""
        permitted = self.model.can_execute()
        if not permitted:
            with pytest.raises(CircuitOpenError):
                self.run(_succeed, (), {})
        elif failed:
            with pytest.raises(ConnectionError):
                self.run(_fail, (), {})
        else:
            assert self.run(_succeed, (), {}) == "ok"
        if permitted:
            self.model.record(failed, None)

    @rule(failed=st.booleans(), duration=DURATIONS)
    def record(self, failed: bool, duration: float | None) -> None:
        if failed:
            self.breaker.record_failure(duration)
        else:
            self.breaker.record_success(duration)
        self.model.record(failed, duration)

    @rule(seconds=STEPS)
    def advance(self, seconds: float) -> None:
        self.clock.advance(seconds)

    @rule()
    def release(self) -> None:
        self.breaker.release()
        self.model.release()

    @rule(op=st.sampled_from(["force_open", "disable", "metrics_only", "reset"]))
    def manual(self, op: str) -> None:
        getattr(self.breaker, op)()
        self.model.manual(op)

    @rule()
    def probe_now(self) -> None:
        assert self.breaker.probe_now() == self.model.probe_now()

    @invariant()
    def agrees_with_model(self) -> None:
        m = self.model
        s = self.breaker.snapshot()
        assert self.breaker.state.value == m.state
        failure_rate, slow_rate, buffered = m.rates()
        assert (s.failure_rate, s.slow_call_rate, s.buffered_calls) == (
            failure_rate,
            slow_rate,
            buffered,
        )
        assert s.consecutive_failures == m.consecutive
        assert (s.successful_calls, s.failed_calls, s.not_permitted_calls) == (
            m.successes,
            m.failures,
            m.not_permitted,
        )
        assert s.current_timeout == m.timeout
        expected_open_until = m.open_until if m.state == "open" else None
        assert s.open_until == expected_open_until
        expected_retry = max(0.0, m.open_until - self.clock.now()) if m.state == "open" else None
        assert self.breaker.retry_after() == expected_retry
        if m.rate_mode:
            assert self.breaker.failure_count == sum(o[1] for o in m.window())
        else:
            assert self.breaker.failure_count == m.consecutive
        got = [(t.from_state.value, t.to_state.value, t.reason) for t in self.seen]
        assert got == m.transitions


MODEL_SETTINGS = settings(max_examples=200, stateful_step_count=40, deadline=None)


class ConsecutiveMachine(BreakerMachine):
    config = {
        "failure_threshold": 3,
        "timeout": 10,
        "half_open_max_calls": 2,
        "success_threshold": 2,
        "timeout_multiplier": 2.0,
        "max_timeout": 35,
    }


class CountWindowMachine(BreakerMachine):
    config = {
        "failure_rate_threshold": 0.5,
        "window": "count",
        "window_size": 5,
        "minimum_calls": 3,
        "slow_call_duration": 1.0,
        "slow_call_rate_threshold": 0.6,
        "timeout": 5,
        "half_open_max_calls": 2,
        "success_threshold": 2,
        "timeout_multiplier": 1.5,
        "max_timeout": 20,
    }


class SmallCountWindowMachine(BreakerMachine):
    """minimum_calls above window_size: the effective minimum is the window size."""

    config = {
        "failure_rate_threshold": 0.6,
        "window_size": 3,
        "minimum_calls": 10,
        "timeout": 3,
    }


class TimeWindowMachine(BreakerMachine):
    config = {
        "failure_rate_threshold": 0.5,
        "window": "time",
        "window_size": 10,
        "minimum_calls": 3,
        "slow_call_duration": 1.0,
        "slow_call_rate_threshold": 0.5,
        "timeout": 5,
        "half_open_max_calls": 3,
        "timeout_multiplier": 2.0,
    }


TestConsecutive = ConsecutiveMachine.TestCase
TestCountWindow = CountWindowMachine.TestCase
TestSmallCountWindow = SmallCountWindowMachine.TestCase
TestTimeWindow = TimeWindowMachine.TestCase
for _case in (TestConsecutive, TestCountWindow, TestSmallCountWindow, TestTimeWindow):
    _case.settings = MODEL_SETTINGS
