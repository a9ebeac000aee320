"""A Redis that is slow, not down: a push that timed out may still be applied, once.

The fleet-wide breaker and budget count locally what a timed-out exchange carried (the link
degrades), and push the outage's counts when Redis answers again. A private
``redis-server`` stopped with SIGSTOP for longer than the decision bound makes the exchange
time out with its request already in the server's socket buffer: resumed, the server runs
the script anyway. Without an id per push, the resync then pushed the same failure, calls or
retry a second time (a threshold-2 circuit opened on one failure; 50 calls became 100).
Every push carries its member's sequence number now, and the resync first sends the push in
doubt again under its own number: Redis applies it once, whichever copy arrives first.
Real time is the thing under test (the decision bound, the reconnect interval).
"""

from __future__ import annotations

import os
import signal
import threading
import time

import redis

from otel_recovery import CircuitBreaker, CircuitState, RetryBudget
from otel_recovery.stores._base import StoreUnavailableError
from otel_recovery.stores._shared_link import DECISION_TIMEOUT
from otel_recovery.testing import FakeClock

from .conftest import PrivateRedis, budget_counts, until

STALL = DECISION_TIMEOUT + 0.25
"""Long enough for the exchange to time out, short enough that the server then runs it."""


def _stall(server: PrivateRedis) -> None:
    """Stop the server now; resume it after STALL seconds (what it had read, it then runs)."""
    assert server.process is not None
    os.kill(server.process.pid, signal.SIGSTOP)
    timer = threading.Timer(STALL, os.kill, (server.process.pid, signal.SIGCONT))
    timer.daemon = True
    timer.start()


def _field(server: PrivateRedis, key: str, field: str) -> str | None:
    admin = redis.Redis.from_url(server.url, decode_responses=True)
    try:
        value: str | None = admin.hget(key, field)
        return value
    finally:
        admin.close()


def test_a_failure_whose_push_timed_out_is_counted_once_fleet_wide(volatile_redis):
    breaker = CircuitBreaker(2, 30.0, name="pay", store=f"{volatile_redis.url}?prefix=slow:")
    breaker.sync()

    _stall(volatile_redis)
    breaker.record_failure()  # times out; the server runs it when it resumes

    assert not breaker.shared  # decided locally: the failure is counted here
    assert until(lambda: breaker.shared)  # resynced
    assert _field(volatile_redis, "slow:cb:pay", "cf") == "1"
    assert breaker.state is CircuitState.CLOSED  # one failure under a threshold of two

    breaker.record_failure()
    assert breaker.state is CircuitState.OPEN
    assert _field(volatile_redis, "slow:cb:pay", "cf") == "2"


def test_a_rate_windows_calls_whose_push_timed_out_are_counted_once(volatile_redis):
    url = f"{volatile_redis.url}?prefix=slow:"
    breaker = CircuitBreaker(
        name="db",
        store=url,
        failure_rate_threshold=0.9,
        minimum_calls=1000,
        window="count",
        window_size=1000,
        sync_interval=60,  # the successes travel with the failure, not with a sync
    )
    breaker.sync()
    for _ in range(5):
        breaker.record_success()
    _stall(volatile_redis)
    breaker.record_failure()  # carries the five successes and itself; times out

    assert until(lambda: breaker.shared)
    assert _field(volatile_redis, "slow:cb:db", "wc") == "6"
    assert _field(volatile_redis, "slow:cb:db", "wf") == "1"


def test_a_budgets_deposits_and_retry_whose_push_timed_out_are_counted_once(volatile_redis):
    url = f"{volatile_redis.url}?prefix=slow:"
    # the deposits travel with the withdrawal, not with a sync
    budget = RetryBudget(
        ratio=0.5, min_per_second=1, ttl=60, name="calls", store=url, sync_interval=60
    )
    budget.sync()
    for _ in range(50):
        budget.record_call()

    _stall(volatile_redis)
    assert budget.try_spend()  # carries the 50 deposits; times out; granted locally

    assert until(lambda: budget.shared)
    assert budget_counts(volatile_redis.url, "slow:rb:calls")[:2] == (50, 1)


def test_a_push_in_doubt_is_sent_again_when_the_server_never_ran_it(volatile_redis):
    """Stopped for good, then restarted empty: the failure in doubt never landed, so the
    resync's second copy is the one Redis counts."""
    breaker = CircuitBreaker(3, 30.0, name="pay", store=f"{volatile_redis.url}?prefix=gone:")
    breaker.sync()
    assert volatile_redis.process is not None
    os.kill(volatile_redis.process.pid, signal.SIGSTOP)
    breaker.record_failure()  # times out; the server will never run it
    volatile_redis.process.kill()
    volatile_redis.process.wait()
    volatile_redis.start()  # empty: persistence is off

    assert until(lambda: breaker.shared)
    assert _field(volatile_redis, "gone:cb:pay", "cf") == "1"


class _Outage:
    """A member's link kept degraded (its PING fails) while ``held``. ``refusals`` counts
    the PINGs refused: one after the outage is held again proves the link's thread is done
    with what it was doing (the next PING comes only from its loop)."""

    def __init__(self, ping) -> None:
        self._ping, self._lock = ping, threading.Lock()
        self.held, self.refusals = True, 0

    def __call__(self) -> bool:
        with self._lock:
            if self.held:
                self.refusals += 1
                return False
        return self._ping()

    def release(self) -> int:
        """End the outage; the refusals so far (a later one is after the next hold)."""
        with self._lock:
            self.held = False
            return self.refusals


def _hold_outage(monkeypatch, member) -> _Outage:
    """Keep the member's link degraded while the returned outage is ``held``."""
    outage = _Outage(member._link._ping)
    monkeypatch.setattr(member._link, "_ping", outage)
    return outage


class _LostReplies:
    """A link's ``run`` for one member (the calls naming ``key``), counted from 1: those
    numbered in ``lose`` reach Redis and run there, but their reply is lost, as a timeout
    loses it (a slow Redis, made exact); those in ``drop`` never reach it. With an
    ``outage``, call ``hold_from`` holds it again as it goes out: held by the test thread
    once the call was seen, the link could have pinged and shared again in between."""

    def __init__(self, run, key: str, lose=(), drop=(), outage=None, hold_from=None) -> None:
        self._run, self._key, self.calls = run, key, 0
        self._lose, self._drop = set(lose), set(drop)
        self._outage, self._hold_from = outage, hold_from

    def __call__(self, source, keys, args):
        if self._key not in keys:
            return self._run(source, keys, args)
        self.calls += 1
        if self._outage is not None and self.calls == self._hold_from:
            self._outage.held = True
        if self.calls in self._drop:
            raise StoreUnavailableError("no reply") from TimeoutError("timed out")
        reply = self._run(source, keys, args)
        if self.calls in self._lose:
            raise StoreUnavailableError("reply lost") from TimeoutError("timed out")
        return reply


def _lose(monkeypatch, member, lose=(), drop=(), outage=None, hold_from=None) -> _LostReplies:
    key = member._keys[0] if hasattr(member, "_keys") else member._key
    lost = _LostReplies(member._link.run, key, lose, drop, outage, hold_from)
    monkeypatch.setattr(member._link, "run", lost)
    return lost


def test_a_resync_whose_own_push_is_lost_is_counted_once_at_the_next(volatile_redis, monkeypatch):
    url = f"{volatile_redis.url}?prefix=lost:"
    breaker = CircuitBreaker(10, 30.0, name="pay", store=url, sync_interval=60)
    lost = _lose(monkeypatch, breaker, lose={2, 4})
    breaker.sync()  # 1

    breaker.record_failure()  # 2: applied, in doubt
    breaker.record_failure()  # local
    breaker.record_failure()  # local
    # resync: 3 sends 2 again (skipped), 4 pushes the two local failures (applied, in doubt)
    assert until(lambda: lost.calls >= 4)
    breaker.record_failure()  # local again
    # resync: 5 sends 4 again (skipped), 6 pushes the one failure since
    assert until(lambda: breaker.shared)

    assert lost.calls == 6
    assert _field(volatile_redis, "lost:cb:pay", "cf") == "4"


def test_a_budget_resync_whose_own_push_is_lost_is_counted_once_at_the_next(
    volatile_redis, monkeypatch
):
    url = f"{volatile_redis.url}?prefix=lost:"
    budget = RetryBudget(
        ratio=0.5, min_per_second=1, ttl=60, name="calls", store=url, sync_interval=60
    )
    lost = _lose(monkeypatch, budget, lose={2, 4})
    budget.sync()  # 1
    for _ in range(20):
        budget.record_call()

    assert budget.try_spend()  # 2: 20 deposits and a withdrawal, applied, in doubt
    assert budget.try_spend()  # granted locally
    # resync: 3 sends 2 again (skipped), 4 forces the local retry (applied, in doubt)
    assert until(lambda: lost.calls >= 4)
    assert budget.try_spend()  # granted locally
    # resync: 5 sends 4 again (skipped), 6 forces the one retry since
    assert until(lambda: budget.shared)

    assert lost.calls == 6
    assert budget_counts(volatile_redis.url, "lost:rb:calls")[:2] == (20, 3)


def _time_window_breaker(url: str, seconds: int, clock: FakeClock | None = None) -> CircuitBreaker:
    """A rate breaker over a time window that never trips (it counts, the test reads)."""
    return CircuitBreaker(
        name="db", store=url, failure_rate_threshold=0.99, minimum_calls=1000,
        window="time", window_size=seconds, sync_interval=60, clock=clock,
    )  # fmt: skip


def _budget(url: str, ratio: float, clock: FakeClock | None = None) -> RetryBudget:
    return RetryBudget(
        ratio=ratio, min_per_second=1, ttl=10, name="b", store=url, sync_interval=60, clock=clock
    )


def test_a_retry_granted_here_after_redis_refused_its_lost_withdrawal_is_counted(
    volatile_redis, monkeypatch
):
    url = f"{volatile_redis.url}?prefix=refused:"
    fleet = _budget(url, ratio=0.1)
    for _ in range(10):  # the fleet spends the whole floor (1 x 10 s)
        assert fleet.try_spend()
    budget = _budget(url, ratio=0.1)
    budget.sync()
    _lose(monkeypatch, budget, lose={1})

    assert budget.try_spend()  # 1: Redis refuses, the reply is lost; the local floor grants
    assert until(lambda: budget.shared)

    assert budget_counts(volatile_redis.url, "refused:rb:b")[:2] == (0, 11)  # it went out


def test_a_retry_redis_granted_in_a_lost_reply_but_refused_here_stays_counted(
    volatile_redis, monkeypatch
):
    """Stricter by one, on purpose: Redis counted it in a bucket that may be gone by the
    resync, and a give-back in the current bucket would then lift the fleet's bound until
    that one expires (a review saw 11 retries granted where the floor allows 10)."""
    url = f"{volatile_redis.url}?prefix=phantom:"
    fleet, budget = _budget(url, ratio=0.5), _budget(url, ratio=0.5)
    for _ in range(10):
        assert budget.try_spend()  # its own floor is spent, here and in Redis
    for _ in range(100):
        fleet.record_call()
    fleet.sync()  # the fleet's calls allow 50 more in Redis
    budget.sync()
    _lose(monkeypatch, budget, lose={1})

    assert not budget.try_spend()  # 1: Redis grants, the reply is lost; refused here
    assert until(lambda: budget.shared)

    assert budget_counts(volatile_redis.url, "phantom:rb:b")[:2] == (100, 11)


def test_a_push_in_doubt_resent_after_a_long_outage_counts_only_what_the_window_holds(
    volatile_redis, monkeypatch
):
    url = f"{volatile_redis.url}?prefix=stale:"
    clock = FakeClock()
    budget = _budget(url, 0.5, clock)
    budget.sync()
    outage = _hold_outage(monkeypatch, budget)
    _lose(monkeypatch, budget, drop={1})
    for _ in range(50):
        budget.record_call()
    assert budget.try_spend()  # 1: never reaches Redis, in doubt; granted here
    clock.advance(100)  # the outage outlasts the window: the calls and the retry left it
    for _ in range(3):
        budget.record_call()

    outage.release()
    assert until(lambda: budget.shared)
    assert budget_counts(volatile_redis.url, "stale:rb:b")[:2] == (3, 0)


def test_handed_failures_leave_with_the_outcomes_they_counted(volatile_redis, monkeypatch):
    """Each push in doubt's failures stop being taken off when the outcomes it carried
    leave the window: not kept by a later push in doubt, nor counted from when it was
    handed over (both hid a later failure; found by two reviews)."""
    url = f"{volatile_redis.url}?prefix=second:"
    clock = FakeClock()
    breaker = _time_window_breaker(url, 10, clock)
    breaker.sync()
    outage = _hold_outage(monkeypatch, breaker)
    lost = _lose(monkeypatch, breaker, lose={1, 3}, outage=outage, hold_from=3)
    breaker.record_failure()  # F1 at 0 s: 1 applied, in doubt
    clock.advance(1)
    breaker.record_failure()  # F2 at 1 s: here
    clock.advance(7)
    refused = outage.release()  # at 8 s: 2 resends 1 (skipped), 3 pushes F2: in doubt
    # 3 held the outage again; a PING refused since then: the resync is over, at 8 s
    assert until(lambda: lost.calls >= 3 and outage.refusals > refused)
    clock.advance(4)  # 12 s: F1 and F2 left the window here; Redis holds F2 (pushed at 8 s)
    breaker.record_failure()  # F3: here

    outage.release()  # resync: 4 resends 3 (skipped), 5 pushes F3
    assert until(lambda: breaker.shared)
    wc, wf = (_field(volatile_redis, "second:cb:db", f) for f in ("wc", "wf"))
    assert (wc, wf) == ("2", "2")


def test_a_failure_in_doubt_that_left_the_time_window_takes_no_later_one_with_it(
    volatile_redis, monkeypatch
):
    url = f"{volatile_redis.url}?prefix=window:"
    breaker = _time_window_breaker(url, 1)
    breaker.sync()
    outage = _hold_outage(monkeypatch, breaker)
    _lose(monkeypatch, breaker, lose={1})
    breaker.record_failure()  # 1: applied, in doubt; counted here too
    time.sleep(2.1)  # the outage outlasts the window: the failure leaves it, here and in Redis
    for _ in range(3):
        breaker.record_failure()  # here only

    outage.release()
    assert until(lambda: breaker.shared)
    assert (
        _field(volatile_redis, "window:cb:db", "wc"),
        _field(volatile_redis, "window:cb:db", "wf"),
    ) == ("3", "3")


def test_sending_a_push_in_doubt_again_does_not_close_a_breaker_open_here(
    volatile_redis, monkeypatch
):
    """The resend's reply is Redis's state before the resync's own push (closed, one
    failure): adopted, it closed the breaker opened here during the outage, fired two
    transitions, and, when the resync's push then got no reply, admitted calls."""
    breaker = CircuitBreaker(2, 30.0, name="pay", store=f"{volatile_redis.url}?prefix=open:")
    seen = []
    breaker.add_listener(lambda t: seen.append((t.from_state.value, t.to_state.value)))
    breaker.sync()
    outage = _hold_outage(monkeypatch, breaker)
    lost = _lose(monkeypatch, breaker, lose={1}, drop={3}, outage=outage, hold_from=3)
    breaker.record_failure()  # 1: applied (one failure in Redis), the reply is lost
    breaker.record_failure()  # here: the threshold of 2, open for 30 s
    assert breaker.state is CircuitState.OPEN

    refused = outage.release()  # resync: 2 sends 1 again (skipped), 3 (open) gets no reply
    # 3 held the outage again; a PING refused since then: the resync is over
    assert until(lambda: lost.calls >= 3 and outage.refusals > refused)
    assert not breaker.shared and breaker.state is CircuitState.OPEN
    assert not breaker.can_execute()

    outage.release()  # resync: 4 sends 3 again: the circuit opens fleet-wide
    assert until(lambda: breaker.shared)
    assert breaker.state is CircuitState.OPEN
    assert seen == [("closed", "open")]
