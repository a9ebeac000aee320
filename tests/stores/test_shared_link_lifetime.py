"""A fleet-wide breaker's link to Redis lives no longer than its store and its members.

Breakers and budgets given a ``RedisStore`` object share one link per store (its own client
with the decision-bound timeouts, and a sync thread). The link goes with the store: closing
the store (``close()`` / ``aclose()``) closes the link's connections and stops its thread,
the members carry on with local state, and a store dropped with no member left takes its
link along. Connections are counted on the server (``CLIENT LIST``) by a client name unique
to the test.
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


def test_a_breaker_whose_store_was_closed_goes_on_locally_without_a_connection(space, caplog):
    name, client_name, admin = space
    store = _store(name, client_name)
    breaker = CircuitBreaker(name="db", store=store, failure_threshold=2, timeout=30.0)
    budget = RetryBudget(name="db", store=store, min_per_second=0.0, ratio=0.0)
    breaker.record_failure()
    assert breaker.shared and _connections(admin, client_name) >= 1
    with caplog.at_level(logging.INFO, logger="otel_recovery"):
        store.close()
        assert not breaker.shared and not budget.shared
        breaker.record_failure()  # the local breaker counts it: no exception, no Redis
        assert breaker.state is CircuitState.OPEN and not breaker.can_execute()
        assert not breaker.sync() and not budget.sync()
        assert budget.try_spend() is False  # the local budget, with nothing in it
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.records
    assert _settled(lambda: _connections(admin, client_name) == 0)
    assert not _our_links(name)
    # The store is usable again after close(): a new breaker on it shares again.
    again = CircuitBreaker(name="db", store=store, failure_threshold=2, timeout=30.0)
    assert again.sync() and again.shared and again.state is CircuitState.CLOSED
    assert len(_our_links(name)) == 1
    asyncio.run(store.aclose())
    assert not again.shared
    assert _settled(lambda: _connections(admin, client_name) == 0)
    assert not _our_links(name)


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
