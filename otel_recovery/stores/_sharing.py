"""Which breakers and budgets share state fleet-wide, and through which Redis store.

``CircuitBreaker(..., store=...)`` and ``RetryBudget(..., store=...)`` share state when
``store`` is a ``redis://`` / ``rediss://`` / ``unix://`` URL, a
:class:`~otel_recovery.stores.RedisStore`, or a :class:`~otel_recovery.stores.ResilientStore`
around one. ``memory://`` (or a :class:`MemoryStore`) means "this process only": the plain
local component. SQLite and PostgreSQL are refused with :class:`StoreConfigError` at start-up,
because fleet-wide decisions need atomic server-side scripts and per-call latency that only
Redis offers. Without ``store=`` a component is local unless ``OTEL_RECOVERY_STORE_URL`` names
a Redis server *and* the component has an explicit ``name`` (two unnamed breakers for two
different dependencies must never merge into one fleet-wide ``"default"``); any other URL
there (the SQLite default for checkpoints, say) leaves breakers and budgets local. With
``store=`` naming Redis, an unnamed component is refused (:class:`StoreConfigError` asking
for ``name=``), for the same reason. A malformed URL in the variable fails construction
with a message naming it.

One :class:`~otel_recovery.stores.RedisStore` is kept per URL, so every component configured
with the same URL (or by the environment) shares one connection pool and one sync thread.
This module is imported only when a component is built with ``store=`` or with the variable
set: a plain ``CircuitBreaker()`` never loads the store package.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from otel_recovery._forksafe import new_lock
from otel_recovery._redact import redact
from otel_recovery.stores._base import Store, StoreConfigError
from otel_recovery.stores._url import ENV_STORE_URL, parse_store_url

if TYPE_CHECKING:
    from otel_recovery.policies.budget import RetryBudget
    from otel_recovery.policies.circuit_breaker import CircuitBreaker
    from otel_recovery.stores.redis import RedisStore

__all__ = ["breaker_class", "budget_class", "shared_store"]


def breaker_class(store: object, name: object) -> type[CircuitBreaker]:
    """The class ``CircuitBreaker(..., store=store, name=name)`` must build."""
    from otel_recovery.policies.circuit_breaker import CircuitBreaker

    if shared_store(store, name if isinstance(name, str) else "default") is None:
        return CircuitBreaker
    from otel_recovery.stores._shared_breaker import SharedCircuitBreaker

    return SharedCircuitBreaker


def budget_class(store: object, name: object) -> type[RetryBudget]:
    """The class ``RetryBudget(..., store=store, name=name)`` must build."""
    from otel_recovery.policies.budget import RetryBudget

    if shared_store(store, name if isinstance(name, str) else "default") is None:
        return RetryBudget
    from otel_recovery.stores._shared_budget import SharedRetryBudget

    return SharedRetryBudget


def _require_a_name(name: str, where: str) -> None:
    """A fleet-wide component needs a name of its own: unnamed breakers for two different
    dependencies, both given ``store=``, shared one ``"default"`` circuit, and one
    dependency's failures opened the other's (the environment's store already keeps unnamed
    ones local)."""
    if name == "default":
        raise StoreConfigError(
            f"store={where!r} shares this breaker or budget fleet-wide by its name, and it has "
            "none: unnamed ones for different dependencies would share one 'default' state. "
            "Pass name='payments' (the dependency it guards), or store='memory://' to keep "
            "it local"
        )


_stores: dict[str, RedisStore] = {}
_stores_lock = new_lock()


def shared_store(store: object, name: str) -> RedisStore | None:
    """The Redis store a component named ``name`` shares state through, or None (local).

    Raises :class:`StoreConfigError` for a store that cannot share, and ``TypeError`` for
    something that is not a store at all; see the module doc for the rules.
    """
    if store is None:
        url = os.environ.get(ENV_STORE_URL, "").strip()
        if not url:
            return None
        spec = parse_store_url(url, setting=ENV_STORE_URL)
        if spec.kind != "redis" or name == "default":
            return None
        return _store_for(url, ENV_STORE_URL)
    if isinstance(store, str):
        spec = parse_store_url(store, setting="store")
        if spec.kind == "memory":
            return None
        if spec.kind != "redis":
            raise StoreConfigError(
                f"store={spec.safe!r}: circuit breakers and retry budgets share state only "
                "through Redis (redis://, rediss://, unix://); memory:// keeps them local"
            )
        _require_a_name(name, spec.safe)
        return _store_for(store, "store")
    if not isinstance(store, Store):
        raise TypeError(f"store must be a store URL or a Store, got {store!r}")
    from otel_recovery.stores.memory import MemoryStore
    from otel_recovery.stores.resilient import ResilientStore

    inner = store.store if isinstance(store, ResilientStore) else store
    if isinstance(inner, MemoryStore):
        return None
    try:
        from otel_recovery.stores.redis import RedisStore
    except ImportError:  # pragma: no cover - without redis-py no RedisStore can exist
        RedisStore = None  # type: ignore[assignment,misc]  # noqa: N806
    if RedisStore is not None and isinstance(inner, RedisStore):
        _require_a_name(name, redact(inner.url))
        return inner
    raise StoreConfigError(
        f"store {redact(inner.url)}: circuit breakers and retry budgets share state only "
        "through a Redis store; pass a redis:// URL or a RedisStore"
    )


def _store_for(url: str, setting: str) -> RedisStore:
    """One RedisStore per URL, so every component configured by the same URL shares a link."""
    from otel_recovery.stores import open_store
    from otel_recovery.stores.redis import RedisStore

    with _stores_lock:
        found = _stores.get(url)
        if found is None:
            opened = open_store(url, setting=setting)
            assert isinstance(opened, RedisStore)  # parse_store_url said redis
            found = _stores[url] = opened
        return found
