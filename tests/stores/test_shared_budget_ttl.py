"""One budget name, two ttls: the rings would corrupt each other, so the second keeps its own.

Redis counts a budget in ``ttl / 10`` buckets keyed by wall-clock bucket number; a process
configured with another ttl for the same name numbered its buckets differently and summed
the others' as its own (nothing checked it). The hash now records the width its buckets are
counted with: a process with another width changes nothing there, says so once, and keeps a
budget of its own, asking again every bucket width, and takes the name over once the other
width's buckets have all expired. A private ``redis-server`` (the link thread's rejoin is
real time).
"""

from __future__ import annotations

import logging

from otel_recovery import RetryBudget
from otel_recovery.testing import FakeClock

from .conftest import budget_counts, until


def test_a_budget_with_another_ttl_keeps_its_own_and_says_so_once(volatile_redis, caplog):
    url = f"{volatile_redis.url}?prefix=ttl:"
    options = {"ratio": 0.5, "min_per_second": 1, "name": "search", "store": url}
    fleet = RetryBudget(ttl=60, sync_interval=60, **options)
    for _ in range(20):
        fleet.record_call()
    assert fleet.sync()
    other = RetryBudget(ttl=30, sync_interval=60, **options)
    for _ in range(10):
        other.record_call()

    with caplog.at_level(logging.WARNING, logger="otel_recovery"):
        assert other.try_spend()  # the local floor: 1 x 30 s
        assert other.try_spend()
    assert not other.shared and "another ttl" in repr(other)
    assert [r.getMessage() for r in caplog.records] == [
        f"otel_recovery: retry budget 'search' is shared through {url} by processes whose ttl "
        "is 60 s, and its ttl here is 30 s: this process keeps a budget of its own until "
        "their counts expire. Give every process the same ttl for one budget name, or give "
        "this budget another name."
    ]
    assert budget_counts(volatile_redis.url, "ttl:rb:search") == (20, 0, "6.0")  # untouched
    assert fleet.try_spend() and fleet.shared
    assert budget_counts(volatile_redis.url, "ttl:rb:search") == (20, 1, "6.0")


def test_the_other_ttl_takes_the_name_once_the_first_ones_counts_expire(volatile_redis):
    url = f"{volatile_redis.url}?prefix=ttl:"
    options = {"ratio": 0.5, "min_per_second": 1, "name": "search", "store": url}
    first_clock, second_clock = FakeClock(), FakeClock()
    first = RetryBudget(ttl=20, sync_interval=60, clock=first_clock, **options)
    first.record_call()
    assert first.sync()
    second = RetryBudget(ttl=10, sync_interval=60, clock=second_clock, **options)
    second.record_call()
    assert not second.sync()  # apart: the first one's bucket is live
    assert budget_counts(volatile_redis.url, "ttl:rb:search") == (1, 0, "2.0")

    del first  # the first ttl's process is gone; its last bucket expires 20 s later
    second_clock.advance(25)
    for _ in range(7):  # calls made apart, within its window when it rejoins
        second.record_call()
    # asked again within a bucket width (1 s) of the link thread's time
    assert until(lambda: second.shared)
    assert budget_counts(volatile_redis.url, "ttl:rb:search") == (7, 0, "1.0")
