"""Fleet-wide retry budgets: retries <= ratio x calls + floor, counted across processes.

The fleet test runs 4 real processes (``_fleet_worker.py``) on the shared Redis under a unique
key prefix; the others use budgets in this process as members of a fleet on a FakeClock. The
outage test restarts a private ``redis-server`` without persistence.
"""

from __future__ import annotations

import gc
import logging
import time

import pytest
import redis

from otel_recovery import RecoveryPolicy, Retry, RetryBudget
from otel_recovery.stores import open_store
from otel_recovery.stores._shared_budget import SharedRetryBudget
from otel_recovery.testing import FakeClock

from ._fleet import Fleet
from .conftest import PrivateRedis, cleanup, require, store_url, unique


def _cleanup_after_sync(kind, name):
    """Remove the test's keys, also those a last background sync of a dropped breaker wrote."""
    gc.collect()
    cleanup(kind, name)
    time.sleep(0.2)
    cleanup(kind, name)


@pytest.fixture
def url(tmp_path):
    require("redis")
    name = unique("otr_")
    yield store_url("redis", tmp_path, name)
    _cleanup_after_sync("redis", name)


def test_four_processes_never_retry_more_than_ratio_times_calls_plus_floor(url):
    ratio, floor, ttl = 0.1, 0.5, 10.0
    config = {"budget": {"ratio": ratio, "min_per_second": floor, "ttl": ttl}}
    fleet = Fleet(url, "search", config)
    try:
        assert all(r["synced"] for r in fleet.all(op="calls", n=250).values())
        # Every process asks for 60 retries at the same time: 240 asked, 105 allowed.
        granted = [r["granted"] for r in fleet.all(op="spend", n=60).values()]
        assert sum(granted) == int(ratio * 1000 + floor * ttl), granted
        assert sum(r["granted"] for r in fleet.all(op="spend", n=5).values()) == 0
        # New calls anywhere make room everywhere.
        fleet.send(0, op="calls", n=100)
        assert sum(r["granted"] for r in fleet.all(op="spend", n=5).values()) == 10
    finally:
        fleet.close()


def _pair(url, clock, **options):
    options = {"name": "dep", "store": url, "clock": clock, "sync_interval": 60.0, **options}
    return RetryBudget(**options), RetryBudget(**options)


def test_the_floor_is_the_fleets_not_each_processes(url):
    a, b = _pair(url, FakeClock(), ratio=0.0, min_per_second=1.0, ttl=10)
    assert sum(a.try_spend() for _ in range(6)) == 6
    assert sum(b.try_spend() for _ in range(6)) == 4
    assert b.snapshot().retries_in_window == 10 and b.snapshot().available == 0


def test_deposits_are_batched_and_everything_expires_after_ttl(url):
    clock = FakeClock()
    a, b = _pair(url, clock, ratio=0.5, min_per_second=0.0, ttl=10)
    for _ in range(10):
        a.record_call()  # counted locally, lock-free ...
    assert a.sync()  # ... and pushed by the link thread, or here at once
    assert sum(b.try_spend() for _ in range(10)) == 5
    assert a.sync() and a.snapshot().calls_in_window == 10
    clock.advance(10.5)
    assert not b.try_spend()  # old deposits are gone
    for _ in range(4):
        a.record_call()
    assert sum(a.try_spend() for _ in range(4)) == 2  # a's own deposits travel with its ask
    snapshot = a.snapshot()
    assert (snapshot.total_calls, snapshot.total_retries, snapshot.total_refused) == (14, 2, 2)


def test_the_store_argument_and_the_environment_decide_what_is_shared(url, monkeypatch):
    monkeypatch.delenv("OTEL_RECOVERY_STORE_URL", raising=False)
    assert type(RetryBudget(name="x")) is RetryBudget
    assert type(RetryBudget(name="x", store="memory://")) is RetryBudget
    assert type(RetryBudget(name="x", store=url)) is SharedRetryBudget
    monkeypatch.setenv("OTEL_RECOVERY_STORE_URL", url)
    assert type(RetryBudget(name="x")) is SharedRetryBudget
    assert type(RetryBudget()) is RetryBudget
    with pytest.raises(ValueError, match="sync_interval"):
        RetryBudget(name="x", sync_interval=0)


def test_a_policy_spends_from_the_shared_budget(url):
    clock = FakeClock()
    a, b = _pair(url, clock, ratio=0.0, min_per_second=0.2, ttl=10)  # 2 retries, fleet-wide
    policy = RecoveryPolicy(
        retry=Retry(5, on=ConnectionError, backoff=lambda n, p: 0.0),
        budget=a,
        clock=clock,
        telemetry=False,
    )
    attempts = 0

    def down():
        nonlocal attempts
        attempts += 1
        raise ConnectionError("refused")

    with pytest.raises(ConnectionError):
        policy.call(down)
    assert attempts == 3  # the first attempt plus the fleet's 2 retries
    assert not b.try_spend()


def test_a_redis_restart_degrades_to_the_local_budget_and_resyncs(tmp_path, caplog):
    server = PrivateRedis(tmp_path, persistent=False)
    server.start()
    try:
        shared_url = f"{server.url}?prefix=fleet:"
        with caplog.at_level(logging.INFO, logger="otel_recovery"):
            budget = RetryBudget(
                ratio=0.5, min_per_second=0.0, ttl=10, name="api", store=shared_url,
                sync_interval=0.05,
            )  # fmt: skip
            for _ in range(4):
                budget.record_call()
            assert budget.try_spend()
            server.stop()
            for _ in range(6):
                budget.record_call()
            # The local budget answers: 10 local calls x 0.5 - 1 retry already booked = 4.
            assert sum(budget.try_spend() for _ in range(6)) == 4
            assert not budget.shared
            server.start()  # empty
            deadline = time.monotonic() + 10
            # the sync thread flips `shared` first, then logs the resync
            while time.monotonic() < deadline and not (
                budget.shared
                and any("is reachable again" in r.getMessage() for r in caplog.records)
            ):
                time.sleep(0.02)
            assert budget.shared
        # Resync pushed the calls it had not sent and the retries granted locally.
        other = RetryBudget(
            ratio=0.5, min_per_second=0.0, ttl=10, name="api", store=open_store(shared_url)
        )
        assert other.sync()
        assert (other.snapshot().calls_in_window, other.snapshot().retries_in_window) == (6, 4)
        degraded = [r for r in caplog.records if "is unreachable" in r.getMessage()]
        resynced = [r for r in caplog.records if "is reachable again" in r.getMessage()]
        assert len(degraded) == 1 and len(resynced) == 1
        raw = redis.Redis.from_url(server.url)
        assert raw.exists("fleet:rb:api")
        raw.close()
    finally:
        server.stop()
