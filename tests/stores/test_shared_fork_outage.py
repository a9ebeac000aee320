"""A fork during a Redis outage: the outage's counts are the parent's to push, once.

A pre-fork server (gunicorn ``--preload``, Celery prefork, ``multiprocessing`` with fork)
may fork its workers while the shared store is unreachable. Each child inherited the
outage's local counts and pushed them again at its own resync: 3 failures opened a
threshold-5 circuit fleet-wide, 5 retries became 10. A child forked while a parent thread
waited for a probe permit refused every call for good.
"""

from __future__ import annotations

import os
import threading
import time
from typing import Any

import pytest
import redis

from otel_recovery import CircuitBreaker, CircuitState, RetryBudget

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")


def _fork_child_that_lives(seconds: float, then: Any = None) -> int:
    """A child that keeps running (its sync thread with it) for ``seconds``, then exits."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 0
        try:
            time.sleep(seconds)
            if then is not None:
                code = then()
        finally:
            os._exit(code)
    return pid


def _wait_until(condition: Any, seconds: float = 10.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and not condition():
        time.sleep(0.05)
    return bool(condition())


def _resynced(component: Any) -> Any:
    """The child's last step: exit 0 once its own sync thread has resynced (what would
    push the outage again), 3 if it never did (the test would prove nothing)."""
    return lambda: 0 if _wait_until(lambda: component.shared) else 3


def test_a_child_forked_during_an_outage_does_not_push_the_parents_failures(volatile_redis):
    breaker = CircuitBreaker(5, 30.0, name="forked", store=volatile_redis.url)
    assert breaker.sync()
    volatile_redis.stop()
    for _ in range(3):
        breaker.record_failure()
    assert not breaker.shared and breaker.state is CircuitState.CLOSED
    child = _fork_child_that_lives(0.0, then=_resynced(breaker))
    volatile_redis.start()
    assert _wait_until(lambda: breaker.shared)
    _, status = os.waitpid(child, 0)
    assert os.WEXITSTATUS(status) == 0  # the child resynced too
    time.sleep(0.2)  # a push the child made on its way out has landed
    raw = redis.Redis.from_url(volatile_redis.url)
    stored = raw.hgetall("otel_recovery:cb:forked")
    raw.close()
    assert stored[b"cf"] == b"3"  # the parent's three, once
    assert breaker.sync() and breaker.state is CircuitState.CLOSED


def test_a_child_forked_during_an_outage_does_not_push_the_parents_retries(volatile_redis):
    budget = RetryBudget(
        ratio=0.2, min_per_second=1, ttl=60, name="forked", store=volatile_redis.url
    )
    assert budget.sync()
    volatile_redis.stop()
    assert sum(budget.try_spend() for _ in range(5)) == 5
    child = _fork_child_that_lives(0.0, then=_resynced(budget))
    volatile_redis.start()
    assert _wait_until(lambda: budget.shared)
    _, status = os.waitpid(child, 0)
    assert os.WEXITSTATUS(status) == 0  # the child resynced too
    time.sleep(0.2)
    raw = redis.Redis.from_url(volatile_redis.url)
    stored = raw.hgetall("otel_recovery:rb:forked")
    raw.close()
    assert sum(int(v) for k, v in stored.items() if k.startswith(b"r")) == 5


def test_a_child_forked_while_a_thread_asks_for_a_probe_can_still_probe(volatile_redis):
    breaker = CircuitBreaker(1, 1.0, name="asking", store=volatile_redis.url)
    assert breaker.sync()
    breaker.record_failure()
    time.sleep(1.1)  # the open time is over: the next call asks Redis for the probe
    raw = redis.Redis.from_url(volatile_redis.url)
    raw.execute_command("CLIENT", "PAUSE", 150, "ALL")  # its answer comes a little late
    asking = threading.Thread(target=breaker.can_execute)
    asking.start()
    time.sleep(0.05)

    def child_probes() -> int:  # the parent's permit lease (1 s) is long over by now
        return 0 if any(breaker.can_execute() or time.sleep(0.3) for _ in range(10)) else 1

    child = _fork_child_that_lives(2.5, then=child_probes)
    asking.join()
    _, status = os.waitpid(child, 0)
    raw.close()
    assert os.WEXITSTATUS(status) == 0  # it was refused every time before


def test_an_unnamed_breaker_or_budget_given_a_redis_store_is_refused(volatile_redis):
    """Two unnamed breakers for two dependencies, both given ``store=``, shared one
    ``"default"`` circuit: one dependency's failures opened the other's."""
    from otel_recovery.stores import StoreConfigError, open_store

    for store in (volatile_redis.url, open_store(volatile_redis.url)):
        with pytest.raises(StoreConfigError, match=r"Pass name='payments'"):
            CircuitBreaker(3, store=store)
        with pytest.raises(StoreConfigError, match=r"Pass name='payments'"):
            RetryBudget(store=store)
    CircuitBreaker(3, store="memory://")  # local: no name needed
