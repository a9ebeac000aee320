"""A Redis that stops answering costs every fleet-wide decision at most the decision bound.

``CLIENT PAUSE`` on a private ``redis-server``: the server accepts commands and replies to
none until the pause ends. The first exchange to wait for it (a caller's, or the link
thread's periodic sync) times out after ``DECISION_TIMEOUT`` and degrades the link; callers
queued behind it on the same breaker or budget then decide locally at once, instead of each
waiting for Redis in turn (8 threads used to wait 0.25, 0.5, ... 2.2 s). That no caller
queued to ask Redis behind another is counted (``callers_asking``); the time each caller
waited is real time, bounded with a wide margin for a busy machine.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time

import pytest
import redis

from otel_recovery import CircuitBreaker, CircuitState, RecoveryPolicy, RetryBudget

from .conftest import PrivateRedis, callers_asking, until

THREADS = 8
PAUSE_MS = 4000
BOUND = PAUSE_MS / 1000 / 2
"""The longest any caller may wait. The link's own bound is 2 x DECISION_TIMEOUT (0.5 s); a
caller that waited for Redis to answer would wait for the pause to end (4 s). Half of that
leaves a wide margin for a loaded machine."""


@pytest.fixture
def server(volatile_redis):
    return volatile_redis


def _pause(server: PrivateRedis, ms: int) -> None:
    admin = redis.Redis.from_url(server.url)
    admin.execute_command("CLIENT", "PAUSE", ms, "ALL")
    admin.close()


def _at_once(decide) -> list[float]:
    """Run ``decide`` in THREADS threads started together; how long each one took."""
    barrier = threading.Barrier(THREADS)
    waited: list[float] = []

    def run() -> None:
        barrier.wait()
        started = time.monotonic()
        decide()
        waited.append(time.monotonic() - started)

    threads = [threading.Thread(target=run) for _ in range(THREADS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert len(waited) == THREADS
    return sorted(waited)


def test_threads_recording_failures_each_wait_at_most_the_bound(server, caplog):
    url = f"{server.url}?prefix=stall:"
    breaker = CircuitBreaker(500, 30.0, name="pay", store=url)
    breaker.record_failure()
    time.sleep(0.3)  # the link thread syncs every 0.1 s meanwhile
    asked = callers_asking(breaker._link)
    with caplog.at_level(logging.INFO, logger="otel_recovery"):
        _pause(server, PAUSE_MS)
        waited = _at_once(breaker.record_failure)
        # At most one caller's exchange met the paused server; the others decided locally
        # instead of each sending theirs in turn.
        assert asked.count("run") <= 1, asked
        assert waited[-1] < BOUND, [round(w, 3) for w in waited]
        # Every failure counted: by the local breaker that took over, then pushed on resync.
        assert not breaker.shared and breaker.failure_count == 1 + THREADS
        assert until(lambda: breaker.shared)
        assert until(lambda: any("reachable again" in r.getMessage() for r in caplog.records))
    # One outage, reported once, however many callers and the thread ran into it (links to
    # earlier tests' servers, still retrying in this process, log too: not counted).
    messages = [r.getMessage() for r in caplog.records if f":{server.port}/" in r.getMessage()]
    assert sum("is unreachable" in m for m in messages) == 1, messages
    assert sum("reachable again" in m for m in messages) == 1, messages
    raw = redis.Redis.from_url(server.url)
    try:
        # a timed-out call may still have run once the pause ended (its reply was lost)
        assert int(raw.hget("stall:cb:pay", "fseq") or 0) >= 1 + THREADS
    finally:
        raw.close()
    assert breaker.state is CircuitState.CLOSED


def test_threads_withdrawing_retries_each_wait_at_most_the_bound(server):
    url = f"{server.url}?prefix=stall:"
    budget = RetryBudget(ratio=0.0, min_per_second=1.0, ttl=10, name="pay", store=url)
    assert budget.try_spend()
    time.sleep(0.3)
    asked = callers_asking(budget._link)
    _pause(server, PAUSE_MS)
    granted: list[bool] = []
    waited = _at_once(lambda: granted.append(budget.try_spend()))
    assert asked.count("run") <= 1, asked  # as for the breaker above
    assert waited[-1] < BOUND, [round(w, 3) for w in waited]
    # The local budget answered (its own floor of 10, one already spent) ...
    assert not budget.shared and sum(granted) == THREADS
    # ... and the retries it granted reach the fleet's window when Redis is back.
    assert until(lambda: budget.shared)
    other = RetryBudget(ratio=0.0, min_per_second=1.0, ttl=10, name="pay", store=url)
    assert other.sync()
    assert other.snapshot().retries_in_window >= 1 + THREADS


async def test_an_async_caller_behind_a_stuck_sync_blocks_the_loop_at_most_the_bound(server):
    """The link thread syncs every 10 ms: when the caller comes, the thread's exchange has
    been waiting for the paused server for a while; the caller used to wait for the rest of
    it and then for a whole exchange of its own, with the event loop blocked."""
    url = f"{server.url}?prefix=stall:"
    breaker = CircuitBreaker(500, 30.0, name="loop", store=url, sync_interval=0.01)
    assert breaker.sync()
    policy = RecoveryPolicy(breaker=breaker, telemetry=False)
    asked = callers_asking(breaker._link)

    async def down() -> None:
        raise ConnectionError("refused")

    _pause(server, PAUSE_MS)
    await asyncio.sleep(0.15)
    started = time.monotonic()
    with pytest.raises(ConnectionError):
        await policy.acall(down)
    waited = time.monotonic() - started
    # The loop waited at most for one turn (cut at DECISION_TIMEOUT), never for an exchange
    # of its own: counted, since a loaded machine stretches any wait measured in real time.
    assert "run" not in asked and asked.count("turn") <= 1, asked
    assert waited < BOUND, f"the loop was blocked for {waited:.3f}s"
    assert not breaker.shared and breaker.failure_count == 1
    assert until(lambda: breaker.shared)
