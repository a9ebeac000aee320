"""A fleet-wide breaker's link to Redis lives no longer than its store and its members.

Breakers and budgets given a ``RedisStore`` object share one link per store (its own client
with the decision-bound timeouts, and a sync thread). The link lives while its store does:
closing the store (``close()`` / ``aclose()``) closes the link's idle connections only (its
members stay fleet-wide and reconnect on their next sync; with no member left the thread
stops too), and a store dropped with no member left takes its link along. Connections are
counted on the server (``CLIENT LIST``) by a client name unique to the test.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import threading
import weakref

import pytest
import redis
from servers import eventually

from otel_recovery import CircuitBreaker, CircuitState, RetryBudget
from otel_recovery.stores import _shared_link
from otel_recovery.stores.redis import RedisStore

from .conftest import REDIS_URL, cleanup, require, unique

THREAD = "otel-recovery-shared-state"


@pytest.fixture
def space():
    """(name, client name, admin client): a private key prefix and connection name."""
    require("redis")
    name = unique("otr_")
    admin = redis.Redis.from_url(REDIS_URL)
    yield name, f"otr-link-{name}", admin
    admin.close()
    gc.collect()
    cleanup("redis", name)


def _store(name: str, client_name: str) -> RedisStore:
    return RedisStore(REDIS_URL, prefix=f"otr-test:{name}:", client_name=client_name)


def _connections(admin: redis.Redis, client_name: str) -> int:
    return sum(1 for c in admin.client_list() if c.get("name") == client_name)


def _sync_threads() -> int:
    return sum(1 for t in threading.enumerate() if t.name == THREAD)


def _our_links(name: str) -> list[_shared_link.Link]:
    return [link for link in list(_shared_link._links.values()) if name in link.url]


def _settled(condition) -> bool:
    def check() -> bool:
        gc.collect()
        return bool(condition())

    return eventually(check, timeout=5.0)


def test_breakers_and_budgets_made_and_dropped_with_their_closed_store_leave_nothing(space):
    name, client_name, admin = space
    threads = _sync_threads()
    stores: list[weakref.ref[RedisStore]] = []
    for _ in range(20):
        store = _store(name, client_name)
        stores.append(weakref.ref(store))
        breaker = CircuitBreaker(name="payments", store=store, failure_threshold=5)
        breaker.record_failure()
        breaker.can_execute()
        breaker.record_success()
        budget = RetryBudget(name="payments", store=store)
        budget.try_spend()
        assert breaker.shared and budget.shared
        del breaker, budget
        store.close()
        del store
    assert _settled(lambda: not _our_links(name)), _our_links(name)
    assert _settled(lambda: all(ref() is None for ref in stores)), "stores still alive"
    assert _settled(lambda: _connections(admin, client_name) == 0), _connections(admin, client_name)
    assert _settled(lambda: _sync_threads() <= threads), (_sync_threads(), threads)


async def _request(store: RedisStore) -> None:
    """Async code's use of the store in one ``asyncio.run``, closing that loop's client."""
    await store.aclient().ping()
    await store.aclose()


@pytest.mark.parametrize("closing", ["aclose", "close"])
def test_a_breaker_whose_store_was_closed_still_follows_the_fleet(space, caplog, closing):
    """Closing the store (``await store.aclose()`` at the end of each ``asyncio.run``, or
    ``close()``, also through a ``ResilientStore``) closes the link's idle connections only:
    its breakers and budgets stay fleet-wide, and their next sync reconnects."""
    name, client_name, admin = space
    store = _store(name, client_name)
    breaker = CircuitBreaker(
        name="db", store=store, failure_threshold=2, timeout=30.0, sync_interval=60
    )
    budget = RetryBudget(name="db", store=store, sync_interval=60)
    assert breaker.sync() and budget.sync() and _connections(admin, client_name) >= 1
    (link,) = _our_links(name)
    with caplog.at_level(logging.INFO, logger="otel_recovery"):
        if closing == "aclose":
            asyncio.run(_request(store))
        else:
            store.close()
        assert breaker.shared and budget.shared
        # nothing syncs before 60 s: every connection of the store and the link is closed
        assert _settled(lambda: _connections(admin, client_name) == 0)
        # another process of the fleet trips the circuit
        other_store = _store(name, f"{client_name}-other")
        other = CircuitBreaker(name="db", store=other_store, failure_threshold=2, timeout=30.0)
        other.record_failure()
        other.record_failure()
        assert other.state is CircuitState.OPEN
        assert breaker.sync() and breaker.shared  # the next sync reconnects
        assert breaker.state is CircuitState.OPEN and not breaker.can_execute()
        assert budget.sync() and budget.shared
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.records
    assert _shared_link.link_for(store) is link and not link.closed  # the same link
    assert _connections(admin, client_name) >= 1
    store.close()
    other_store.close()


def test_the_sync_thread_reconnects_after_each_asyncio_run_closes_the_store(space):
    """The reviewer's case: an ``asyncio.run`` that uses the store and ``aclose()``s it, then
    another process trips the circuit; this process's breaker follows within its syncs."""
    name, client_name, _ = space
    store = _store(name, client_name)
    breaker = CircuitBreaker(name="payments", store=store, failure_threshold=3, timeout=30.0)
    assert breaker.sync()
    for _ in range(3):
        asyncio.run(_request(store))
        assert breaker.shared
    other_store = _store(name, f"{client_name}-other")
    other = CircuitBreaker(name="payments", store=other_store, failure_threshold=3, timeout=30)
    for _ in range(3):
        other.record_failure()
    assert other.state is CircuitState.OPEN
    assert eventually(lambda: breaker.state is CircuitState.OPEN, timeout=5.0)
    assert breaker.shared and not breaker.can_execute()
    store.close()
    other_store.close()


def test_closing_a_store_with_no_member_left_stops_the_thread_at_once(space):
    """No member left: ``close()`` closes the connections and the idle thread goes now, not
    after its 30 s; the store (still alive, usable again) starts both for its next member."""
    name, client_name, admin = space
    store = _store(name, client_name)
    breaker = CircuitBreaker(name="gone", store=store)
    assert breaker.sync()
    (link,) = _our_links(name)
    del breaker
    gc.collect()
    store.close()
    assert _settled(lambda: link._thread is None)
    assert _settled(lambda: _connections(admin, client_name) == 0)
    again = CircuitBreaker(name="gone", store=store)
    assert again.sync() and again.shared and _our_links(name) == [link]
    assert link._thread is not None and link._thread.is_alive()
    store.close()


def test_a_store_made_inline_lives_as_long_as_its_breaker(space):
    name, client_name, admin = space
    breaker = CircuitBreaker(name="inline", store=_store(name, client_name))
    gc.collect()
    assert breaker.sync() and breaker.shared
    assert len(_our_links(name)) == 1
    del breaker
    # Nobody holds the store now: it goes, and its link with it (not only after the idle
    # thread's 30 s: the link is dropped with its store).
    assert _settled(lambda: not _our_links(name))
    assert _settled(lambda: _connections(admin, client_name) == 0)


def test_an_idle_link_of_an_open_store_closes_its_connection(space, monkeypatch):
    name, client_name, admin = space
    monkeypatch.setattr(_shared_link, "_IDLE_EXIT", 0.2)
    store = _store(name, client_name)
    breaker = CircuitBreaker(name="idle", store=store)
    assert breaker.sync()
    (link,) = _our_links(name)
    del breaker
    assert _settled(lambda: link._thread is None)
    assert _settled(lambda: _connections(admin, client_name) == 0)
    # A new member on the same (open) store wakes the link again.
    budget = RetryBudget(name="idle", store=store)
    assert budget.sync() and _our_links(name) == [link]
    store.close()


def test_a_new_store_at_an_old_stores_id_gets_a_link_of_its_own(space):
    name, client_name, _ = space
    first, second = _store(name, client_name), _store(name, client_name)
    old = _shared_link.link_for(first)
    # as if `second` had been allocated where `first` was, and its entry were still there
    _shared_link._links[id(second)] = old
    try:
        assert _shared_link.link_for(second) is not old
    finally:
        first.close()
        second.close()
