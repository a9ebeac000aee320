"""Where otel-recovery keeps state that must outlive a call: one protocol, four back ends.

Choose by URL (``OTEL_RECOVERY_STORE_URL`` or a ``store=`` argument):

==============================  ================================================================
``memory://``                   this process only; gone on restart (tests, throwaway state)
``sqlite:///relative.db``       one file, shared by the processes of one host; the default,
``sqlite:////absolute.db``      at ``sqlite://`` = :func:`default_sqlite_path`
``redis://host:6379/0``         shared by a fleet (``rediss://`` for TLS, ``unix://`` sockets);
                                ``?prefix=app:`` namespaces the keys
``postgresql://user@host/db``   PostgreSQL with JSON states in ``jsonb``;
                                ``?table=name`` prefixes the tables
==============================  ================================================================

Every back end also takes ``?max_versions=N`` (versions kept per key, default 16). The Redis
and PostgreSQL client libraries are imported only when such a URL is opened, so
``import otel_recovery`` never loads them. Components that must survive an outage wrap their
store in :class:`ResilientStore`.
"""

from __future__ import annotations

from typing import Any

from otel_recovery._clock import Clock
from otel_recovery.stores._base import (
    CorruptRecordError,
    Record,
    Store,
    StoreConfigError,
    StoreError,
    StoreUnavailableError,
    VersionConflictError,
)
from otel_recovery.stores._url import (
    ENV_STORE_URL,
    default_sqlite_path,
    default_store_url,
    parse_store_url,
)
from otel_recovery.stores.memory import MemoryStore
from otel_recovery.stores.resilient import ResilientStore, ResyncConflict

__all__ = [
    "ENV_STORE_URL",
    "CorruptRecordError",
    "MemoryStore",
    "Record",
    "ResilientStore",
    "ResyncConflict",
    "Store",
    "StoreConfigError",
    "StoreError",
    "StoreUnavailableError",
    "VersionConflictError",
    "default_sqlite_path",
    "default_store_url",
    "open_store",
    "resolve_store",
]


def open_store(
    url: str | None = None, *, clock: Clock | None = None, setting: str | None = None
) -> Store:
    """The store for ``url`` (default: :func:`default_store_url`), not yet connected.

    Only parsing happens here, so a malformed URL fails at start-up with a
    :class:`StoreConfigError` naming ``setting`` and the accepted schemes, while an
    unreachable server does not stop anything from starting.
    """
    if url is None:
        url, setting = default_store_url(), setting or ENV_STORE_URL
    spec = parse_store_url(url, setting=setting or "store")
    max_versions = spec.int_option("max_versions", 16)
    if spec.kind == "memory":
        return MemoryStore(max_versions=max_versions, clock=clock)
    if spec.kind == "sqlite":
        from otel_recovery.stores.sqlite import SQLiteStore

        busy = spec.int_option("busy_timeout", 5, minimum=0)
        synchronous = spec.options.get("synchronous", "normal")
        if synchronous.lower() not in ("normal", "full", "extra"):
            raise StoreConfigError(
                f"store URL {spec.safe}: synchronous must be normal, full or extra, "
                f"got {synchronous!r}"
            )
        return SQLiteStore(
            spec.target,
            max_versions=max_versions,
            synchronous=synchronous,
            busy_timeout=busy,
            clock=clock,
        )
    if spec.kind == "redis":
        try:
            from otel_recovery.stores.redis import RedisStore
        except ImportError as missing:
            raise _missing("redis", "redis", spec.safe) from missing
        prefix = spec.options.get("prefix", "otel_recovery:")
        return RedisStore(spec.target, prefix=prefix, max_versions=max_versions, clock=clock)
    try:
        from otel_recovery.stores.postgres import PostgresStore
    except ImportError as missing:
        raise _missing("psycopg", "psycopg", spec.safe) from missing
    table = spec.options.get("table", "otel_recovery")
    try:
        return PostgresStore(spec.target, table=table, max_versions=max_versions, clock=clock)
    except ValueError as bad:
        raise StoreConfigError(f"store URL {spec.safe}: {bad}") from bad


def resolve_store(store: Store | str | None, *, clock: Clock | None = None) -> Store:
    """A store from what a component's ``store=`` argument accepts: a Store, a URL or None."""
    if store is None or isinstance(store, str):
        return open_store(store, clock=clock)
    if not isinstance(store, Store):
        raise TypeError(
            "store must be a Store (put/get/list/delete/incr/counters and their async forms) "
            f"or a store URL, got {store!r}"
        )
    return store


def _missing(package: str, extra: str, url: str) -> StoreConfigError:
    return StoreConfigError(
        f"store URL {url} needs the {package!r} package: pip install 'otel-recovery[{extra}]'"
    )


def __dir__() -> list[str]:  # pragma: no cover - tooling nicety
    return sorted(__all__)


def __getattr__(name: str) -> Any:
    """``SQLiteStore``, ``RedisStore``, ``PostgresStore`` and ``Counters`` load on first use."""
    modules = {
        "SQLiteStore": "sqlite",
        "RedisStore": "redis",
        "PostgresStore": "postgres",
        "Counters": "counters",
    }
    if name in modules:
        import importlib

        return getattr(importlib.import_module(f"{__name__}.{modules[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
