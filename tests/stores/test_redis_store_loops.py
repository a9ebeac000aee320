"""The Redis store's asyncio clients, one per event loop, once their loop has been closed.

Each ``asyncio.run`` makes a new event loop, and a ``redis.asyncio`` client belongs to the
loop it first ran on. A client whose loop has been closed must not stay open (one more
server connection per ``asyncio.run``), nor warn ``ResourceWarning: unclosed ...`` when it is
collected; the client of a loop that is still open must never be touched.

Each test counts only its own store's connections on the shared server, by client name.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import sys
import threading
import warnings
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from servers import eventually

from otel_recovery.stores.redis import RedisStore
from otel_recovery.testing import FakeClock

from .conftest import REDIS_URL, cleanup, require, unique

pytestmark = pytest.mark.server

RUNS = 6


@pytest.fixture
def name() -> Iterator[str]:
    require("redis")
    found = unique("otr_")
    yield found
    cleanup("redis", found)


def _store(name: str) -> RedisStore:
    """A store whose connections name themselves ``name`` on the server."""
    return RedisStore(REDIS_URL, prefix=f"otr-test:{name}:", clock=FakeClock(), client_name=name)


def _ours(name: str) -> set[str]:
    """The ids of the server's connections named ``name`` (this test's store)."""
    admin = redis.Redis.from_url(REDIS_URL)
    try:
        return {c["id"] for c in admin.client_list() if c.get("name") == name}
    finally:
        admin.close()


@contextlib.contextmanager
def _resource_warnings() -> Iterator[list[str]]:
    """What ``gc.collect()`` at the end of the block makes warn with ``ResourceWarning``.

    A warning raised in ``__del__`` cannot propagate: with ``ResourceWarning`` as an error
    it reaches ``sys.unraisablehook``, which records it here."""
    seen: list[str] = []
    gc.collect()  # earlier tests' garbage warns now, not inside the block
    previous = sys.unraisablehook

    def record(unraisable: Any) -> None:
        seen.append(f"{unraisable.exc_type.__name__}: {unraisable.exc_value}")

    sys.unraisablehook = record
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", ResourceWarning)
            yield seen
            gc.collect()
    finally:
        sys.unraisablehook = previous


async def _use(store: RedisStore, value: bytes) -> None:
    """Every kind of asyncio call (scripts and plain commands) on this loop's client."""
    await store.aput("job", value)
    assert (await store.aget("job")).data == value  # type: ignore[union-attr]
    assert await store.aincr("stats", {"calls": 1})
    assert "calls" in await store.acounters("stats")
    assert [r.key for r in await store.alist("")] == ["job"]


def _cycles(store: RedisStore, runs: int = RUNS) -> None:
    for run in range(runs):
        asyncio.run(_use(store, str(run).encode()))


def test_clients_of_closed_loops_do_not_pile_up(name: str) -> None:
    """Each new loop closes the clients of the loops closed before it: however many
    ``asyncio.run`` cycles, the store holds the last loop's connection only."""
    store = _store(name)
    for run in range(RUNS):
        asyncio.run(_use(store, str(run).encode()))
        assert eventually(lambda: len(_ours(name)) <= 1), (run, _ours(name))
    assert len(_ours(name)) == 1
    store.close()
    assert eventually(lambda: not _ours(name)), _ours(name)


def test_the_asyncio_client_is_built_without_a_warning(name: str) -> None:
    """The asyncio client gets redis-py's asyncio ``Retry``: a sync one made redis-py (5.1 and
    later) warn ``UserWarning: A synchronous redis.retry.Retry was passed to an asyncio
    client`` on every store's first awaited call, and fail a suite that turns warnings into
    errors. The sync client keeps the sync one."""
    import redis.asyncio.retry

    async def use_and_look() -> object:
        await _use(store, b"quiet")
        client = store._async[asyncio.get_running_loop()].client
        return client.connection_pool.connection_kwargs["retry"]

    store = _store(name)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            retry = asyncio.run(use_and_look())
            assert store.get("job").data == b"quiet"  # type: ignore[union-attr]
        assert isinstance(retry, redis.asyncio.retry.Retry)
        assert store._client is not None
        assert not isinstance(store._client.connection_pool.connection_kwargs["retry"], type(retry))
    finally:
        store.close()


def test_closing_and_dropping_the_store_leaves_nothing_to_warn(name: str) -> None:
    """``close()`` closes every client whose loop has been closed, quietly: nothing is left
    for the garbage collector to find unclosed, and a second ``close()`` does nothing."""
    with _resource_warnings() as seen:
        store = _store(name)
        _cycles(store)
        store.close()
        store.close()
        del store
    assert seen == []
    assert eventually(lambda: not _ours(name)), _ours(name)


def test_a_store_dropped_without_close_leaves_nothing_to_warn(name: str) -> None:
    """A store collected without ``close()`` (a test, a short script) closes the clients of
    its closed loops then: no connection stays open, nothing warns."""
    with _resource_warnings() as seen:
        store = _store(name)
        _cycles(store)
        del store
    assert seen == []
    assert eventually(lambda: not _ours(name)), _ours(name)


def test_the_store_still_works_in_a_new_loop_and_in_the_sync_api(name: str) -> None:
    store = _store(name)
    _cycles(store)
    store.close()
    asyncio.run(_use(store, b"again"))
    assert store.get("job").data == b"again"  # type: ignore[union-attr]
    assert store.put("job", b"sync").version == RUNS + 2
    assert store.counters("stats") == {"calls": RUNS + 1.0}

    async def closing() -> None:
        await _use(store, b"last")
        await store.aclose()
        await store.aclose()  # nothing left to close: nothing is done twice

    with _resource_warnings() as seen:
        asyncio.run(closing())
    assert seen == []
    assert eventually(lambda: not _ours(name)), _ours(name)


async def test_the_client_of_a_loop_still_open_is_never_touched(name: str) -> None:
    """Loops that come and go in another thread, and ``close()`` called from this running
    loop, leave this loop's client and its pooled connection as they were."""
    store = _store(name)
    await store.aput("job", b"1")
    client = store.aclient()
    connection_id = await client.client_id()

    def other_loops() -> None:
        _cycles(store, 3)

    worker = threading.Thread(target=other_loops)
    worker.start()
    await asyncio.to_thread(worker.join)
    store.close()  # the sync client and closed loops' clients only
    assert store.aclient() is client
    assert await client.client_id() == connection_id  # the same connection, still open
    assert (await store.aget("job")).data == b"2"  # type: ignore[union-attr]
    await store.aclose()
    assert eventually(lambda: not _ours(name)), _ours(name)
