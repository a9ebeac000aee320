"""The Redis store and the fleet-wide link behind an address a failover moves.

A managed Redis (ElastiCache's primary endpoint, say) fails over by moving a DNS name; the
store's pooled connections stay with the old primary, now a replica that refuses every
write with ``READONLY``. Before the fix the store reported itself unavailable, and the link
degraded to local state, for as long as those connections lived (for ever, while used):
PING still answered there, so the link's probe kept finding the store "back" and the
resync kept failing. Now the refused call closes the stale connections and runs once more
on a new one, which reaches the new primary. :class:`servers.MovingRedis` is a real
primary and replica behind a forwarding front whose target moves.
"""

from __future__ import annotations

import logging
import time

import pytest
from servers import MovingRedis, eventually, moving_redis  # noqa: F401

from otel_recovery.policies import CircuitBreaker
from otel_recovery.stores import StoreUnavailableError
from otel_recovery.stores.redis import RedisStore
from otel_recovery.testing import FakeClock


def test_a_write_after_the_failover_is_applied_once_on_the_new_primary(
    moving_redis: MovingRedis,  # noqa: F811
) -> None:
    store = RedisStore(f"redis://127.0.0.1:{moving_redis.port}/0")
    assert store.put("job", b"1").version == 1
    moving_redis.fail_over()
    assert store.put("job", b"2").version == 2
    assert store.get("job").data == b"2"  # type: ignore[union-attr]
    assert moving_redis.peek("get", "otel_recovery:v:job:2") is not None
    assert moving_redis.peek("get", "otel_recovery:v:job:3") is None  # not applied twice


async def test_an_awaited_write_after_the_failover_is_applied_once(
    moving_redis: MovingRedis,  # noqa: F811
) -> None:
    store = RedisStore(f"redis://127.0.0.1:{moving_redis.port}/0")
    assert (await store.aput("job", b"1")).version == 1
    moving_redis.fail_over()
    assert (await store.aput("job", b"2")).version == 2
    assert (await store.aget("job")).data == b"2"  # type: ignore[union-attr]
    await store.aclose()


def test_while_the_address_lags_the_store_is_unavailable_then_reaches_the_new_primary(
    moving_redis: MovingRedis,  # noqa: F811
) -> None:
    clock = FakeClock()
    store = RedisStore(f"redis://127.0.0.1:{moving_redis.port}/0", clock=clock)
    assert store.put("job", b"1").version == 1
    moving_redis.fail_over(move_address=False)
    with pytest.raises(StoreUnavailableError, match="read only replica"):
        store.put("job", b"2")
    moving_redis.move_address()
    clock.advance(1.0)  # connections are closed at most once a second
    assert store.put("job", b"2").version == 2


def test_the_fleet_wide_breaker_keeps_sharing_state_across_the_failover(
    moving_redis: MovingRedis,  # noqa: F811
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The link's sync meets ``READONLY`` on its old connection, closes it and runs again
    on a new one: it never degrades to local state (no warning), and shared state keeps
    flowing through the new primary."""
    url = f"redis://127.0.0.1:{moving_redis.port}/0"
    pair = [CircuitBreaker(name="dep", store=url, sync_interval=0.05) for _ in range(2)]
    assert type(pair[0]).__name__ == "SharedCircuitBreaker"
    assert moving_redis.front is not None
    front = moving_redis.front
    assert eventually(lambda: front.accepted >= 1)
    with caplog.at_level(logging.WARNING, logger="otel_recovery"):
        moving_redis.fail_over()
        time.sleep(0.3)  # several sync rounds (every 0.05 s) meet the demoted primary
    pair[0].force_open()  # a manual state goes to Redis at once, the other one reads it
    assert eventually(lambda: pair[1].state.value == "forced_open")
    assert not any(b._link.degraded for b in pair)  # type: ignore[attr-defined]
    assert not [r for r in caplog.records if "unreachable" in r.getMessage()]
    assert moving_redis.peek("exists", "otel_recovery:cb:dep") == 1
    pair[0].reset()
