"""The Redis store's connections killed by the server while idle (``CLIENT KILL``, as the
server's idle ``timeout``, a restart or a failover does): the next call goes through, on a new
connection, and is applied once.

Each test kills only its own store's connection, by its client id, on the shared server.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest
import redis

from otel_recovery.stores import ResilientStore
from otel_recovery.stores.redis import RedisStore
from otel_recovery.testing import FakeClock

from .conftest import REDIS_URL, cleanup, require, unique

pytestmark = pytest.mark.server


@pytest.fixture
def name() -> Iterator[str]:
    require("redis")
    found = unique("otr_")
    yield found
    cleanup("redis", found)


def _store(name: str) -> RedisStore:
    return RedisStore(REDIS_URL, prefix=f"otr-test:{name}:", clock=FakeClock())


def _kill(client_id: int) -> None:
    admin = redis.Redis.from_url(REDIS_URL)
    try:
        assert admin.client_kill_filter(_id=client_id) == 1
    finally:
        admin.close()


async def _kill_ours(store: RedisStore) -> None:
    """Kill the idle pooled connection of this loop's client, without letting the loop run
    in between (as when the kill lands while the application is busy)."""
    client_id = await store.aclient().client_id()
    _kill(client_id)  # a blocking call: the loop does not read the connection's end


async def test_an_awaited_write_after_the_idle_connection_was_killed_goes_through_once(
    name: str,
) -> None:
    store = _store(name)
    assert (await store.aput("job", b"1")).version == 1
    await _kill_ours(store)
    assert (await store.aput("job", b"2")).version == 2
    await _kill_ours(store)
    assert (await store.aget("job")).data == b"2"  # type: ignore[union-attr]
    await _kill_ours(store)
    assert (await store.aput("job", b"3", expected_version=2)).version == 3
    await _kill_ours(store)
    assert await store.aincr("stats", {"calls": 1})  # no batch id: must not count twice
    await _kill_ours(store)
    assert await store.acounters("stats") == {"calls": 1.0}
    await _kill_ours(store)
    assert [r.version for r in await store.alist("")] == [3]
    await _kill_ours(store)
    assert await store.adelete("job") == 3  # the three versions, each written once
    assert store.get("job") is None
    assert store.client.get(store.key("v", "job", "4")) is None  # no version applied twice
    await store.aclose()


async def test_a_checkpoint_store_stays_healthy_across_the_killed_connection(name: str) -> None:
    resilient = ResilientStore(_store(name))
    await resilient.aput("job", b"1")
    await _kill_ours(resilient.store)  # type: ignore[arg-type]
    assert (await resilient.aput("job", b"2")).version == 2
    assert not resilient.degraded
    await resilient.aclose()


def test_a_sync_write_after_the_idle_connection_was_killed_goes_through_once(name: str) -> None:
    store = _store(name)
    assert store.put("job", b"1").version == 1
    _kill(store.client.client_id())
    assert store.put("job", b"2").version == 2
    assert store.incr("stats", {"calls": 1})
    _kill(store.client.client_id())
    assert store.counters("stats") == {"calls": 1.0}
    store.close()


async def test_the_check_leaves_live_idle_connections_alone(name: str) -> None:
    """Idle pooled connections the server did not close stay in use: none is replaced."""
    client_name = unique("otr-conn")
    store = RedisStore(
        REDIS_URL, prefix=f"otr-test:{name}:", clock=FakeClock(), client_name=client_name
    )
    client = store.aclient()
    await asyncio.gather(client.ping(), client.ping())  # two connections in the pool

    def ours() -> set[str]:
        admin = redis.Redis.from_url(REDIS_URL)
        try:
            return {c["id"] for c in admin.client_list() if c.get("name") == client_name}
        finally:
            admin.close()

    before = ours()
    assert len(before) == 2
    for _ in range(5):
        await store.aput("job", b"1")
        await store.aget("job")
    assert ours() == before
    await store.aclose()
