"""``redis://`` (also ``rediss://``, ``unix://``): the store shared by a fleet.

Every write is one Lua script (see :mod:`._redis_lua`), so it is atomic on the server and a
client killed mid-call can never leave half a record. Keys live under a prefix
(``?prefix=myapp:``, default ``otel_recovery:``) so several applications, or test runs, can
share one Redis. TTLs are native Redis expiry.

redis-py's own retries are switched off for this client: a write whose reply was lost may or
may not have run, and retrying it blindly could count an increment twice. Failures surface as
:class:`StoreUnavailableError` and :class:`~otel_recovery.stores.ResilientStore` decides.

A pooled connection the server closed while it was idle (``CLIENT KILL``, the server's
``timeout``, a restart or failover) is never used for a command: before each asyncio call the
store disconnects the idle ones whose end is waiting unread, and the pool connects them again
when it hands them out (see :mod:`._redis_clients`). Nothing was sent on them, so nothing is
sent twice; a command is still never sent again after a failure.

How records and counters are spelled for the scripts, and read back, is in
:mod:`._redis_records`.

Building blocks for atomic operations of other components (fleet-wide breakers, budgets):
:attr:`client` (a ``redis.Redis``), :meth:`aclient` (a ``redis.asyncio.Redis`` for the running
event loop), :meth:`key` (a prefixed key name) and :meth:`script` / :meth:`ascript` (a
registered Lua script, re-loaded automatically after a Redis restart).

An asyncio client belongs to one event loop. One whose loop has been closed (each
``asyncio.run`` makes a new loop) is closed, without its loop, when the next loop first uses
the store, by :meth:`~RedisStore.close` / :meth:`~RedisStore.aclose`, or when the store is
collected; a client of a loop still open is never touched (see :mod:`._redis_loops`).
"""

from __future__ import annotations

import asyncio
import builtins
import sys
import weakref
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Any, NoReturn, TypeVar

import redis
import redis.asyncio
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import NoBackoff
from redis.commands.core import AsyncScript, Script
from redis.retry import Retry

from otel_recovery._clock import Clock, Duration, clock_or_default
from otel_recovery._forksafe import new_lock
from otel_recovery._mixins import plain_self
from otel_recovery._redact import redact
from otel_recovery._redis_replica import ReplicaReconnect, refused_by_replica
from otel_recovery.stores import _redis_lua as lua
from otel_recovery.stores._base import (
    Record,
    StoreUnavailableError,
    check_key,
    check_version,
)
from otel_recovery.stores._redis_clients import PlainAsyncRedis, PlainRedis, disconnect_ended
from otel_recovery.stores._redis_loops import (
    LoopClient,
    LoopClients,
    close_clients_of_closed_loops,
)
from otel_recovery.stores._redis_records import (
    TOMBSTONE_MS,
    RecordCodec,
    unpack,
    unpack_counters,
)

__all__ = ["RedisStore"]

_T = TypeVar("_T")
_UNAVAILABLE = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OSError)
_UNAVAILABLE_REPLIES = (redis.exceptions.BusyLoadingError, redis.exceptions.ReadOnlyError)
_DEFAULTS: dict[str, Any] = {"socket_connect_timeout": 2.0, "socket_timeout": 5.0}


def _is_unavailable(error: BaseException) -> bool:
    """The server cannot take the call now: unreachable, loading, or a replica (also a
    write refused inside a script before Redis 7.0, a plain ``ResponseError``)."""
    return isinstance(error, (*_UNAVAILABLE, *_UNAVAILABLE_REPLIES)) or refused_by_replica(error)


class RedisStore(RecordCodec):
    """Versioned records and counters in Redis, shared across processes and hosts."""

    def __init__(
        self,
        url: str = "redis://127.0.0.1:6379/0",
        *,
        prefix: str = "otel_recovery:",
        max_versions: int = 16,
        clock: Clock | None = None,
        **client_options: Any,
    ) -> None:
        if isinstance(max_versions, bool) or not isinstance(max_versions, int) or max_versions < 1:
            raise ValueError(f"max_versions must be an int >= 1, got {max_versions!r}")
        if not isinstance(prefix, str):
            raise TypeError(f"prefix must be a string, got {prefix!r}")
        # The prefix is part of the identity: two prefixes are two stores.
        self.url = redact(f"{url}{'&' if '?' in url else '?'}prefix={prefix}")
        self.prefix = prefix
        self.max_versions = max_versions
        self.clock: Clock = clock_or_default(clock)
        self._target = url
        self._options = {**_DEFAULTS, **client_options, "retry": Retry(NoBackoff(), 0)}
        self._lock = new_lock()
        self._client: redis.Redis | None = None
        self._async: LoopClients = weakref.WeakKeyDictionary()
        self._scripts: dict[str, Script] = {}
        self._replica = ReplicaReconnect(self.clock)
        # A store dropped without close() (a script, a test) closes its closed loops' clients
        # then, not when the process exits; the finalizer refers to them, not to the store.
        weakref.finalize(self, close_clients_of_closed_loops, self._async)

    # -- building blocks ----------------------------------------------------------------------

    @property
    def client(self) -> redis.Redis:
        """The sync client (created on first use; thread-safe connection pool)."""
        with self._lock:
            if self._client is None:
                self._client = PlainRedis.from_url(self._target, **self._options)
            return self._client

    def aclient(self) -> redis.asyncio.Redis:
        """The asyncio client of the running event loop (asyncio clients are loop-bound)."""
        return self._loop_client().client

    def _loop_client(self) -> LoopClient:
        loop = asyncio.get_running_loop()
        with self._lock:
            found = self._async.get(loop)
            if found is None:
                # A new loop: the clients of loops closed meanwhile will never run again
                close_clients_of_closed_loops(self._async)
                # asyncio clients take asyncio's Retry (redis-py 5.1+ warns on a sync one)
                options = {**self._options, "retry": AsyncRetry(NoBackoff(), 0)}
                client = PlainAsyncRedis.from_url(self._target, **options)
                found = self._async[loop] = LoopClient(client)
            return found

    def key(self, *parts: str) -> str:
        """``prefix + ':'.join(parts)``: every key this store, or code built on it, touches."""
        return self.prefix + ":".join(parts)

    def script(self, source: str) -> Script:
        """A registered Lua script for :attr:`client`, cached by source."""
        with self._lock:
            found = self._scripts.get(source)
        if found is None:
            found = self.client.register_script(source)
            with self._lock:
                self._scripts[source] = found
        return found

    def ascript(self, source: str) -> AsyncScript:
        """A registered Lua script for the running loop's :meth:`aclient`."""
        entry = self._loop_client()
        with self._lock:
            found = entry.scripts.get(source)
            if found is None:
                found = entry.scripts[source] = entry.client.register_script(source)
            return found

    def _guard(self, call: Callable[[], _T]) -> _T:
        try:
            return call()
        except Exception as exc:
            # READONLY: the pooled connections reached a demoted primary (a failover moved
            # the address) and the call did not run: once more, on a new connection
            if not (_is_unavailable(exc) and self._replica.close_stale(exc, self._client)):
                self._raise(exc)
        try:
            return call()
        except Exception as exc:
            self._raise(exc)

    async def _aguard(self, call: Callable[[], Awaitable[_T]]) -> _T:
        entry = self._async.get(asyncio.get_running_loop())
        if entry is not None:
            await disconnect_ended(entry.client)
        try:
            return await call()
        except Exception as exc:
            entry = self._async.get(asyncio.get_running_loop())
            client = None if entry is None else entry.client
            if not (_is_unavailable(exc) and await self._replica.aclose_stale(exc, client)):
                self._raise(exc)
        try:
            return await call()
        except Exception as exc:
            self._raise(exc)

    def _raise(self, exc: Exception) -> NoReturn:
        """``exc`` as the caller sees it: a :class:`StoreUnavailableError` when the server
        cannot take the call now, else unchanged."""
        if _is_unavailable(exc):
            raise self._unavailable(exc) from exc
        raise exc

    def _unavailable(self, exc: BaseException) -> StoreUnavailableError:
        detail = redact(str(exc)) or type(exc).__name__
        return StoreUnavailableError(f"Redis store {self.url} is unavailable: {detail}")

    # -- records ----------------------------------------------------------------------------

    def put(
        self,
        key: str,
        data: bytes,
        *,
        expected_version: int | None = None,
        ttl: Duration | None = None,
        encoding: str = "json",
    ) -> Record:
        keys, args, now, expires = self._put_args(key, data, expected_version, ttl, encoding)
        reply = self._guard(lambda: self.script(lua.PUT)(keys=keys, args=args))
        return self._put_result(key, reply, expected_version, data, now, expires, encoding)

    async def aput(
        self,
        key: str,
        data: bytes,
        *,
        expected_version: int | None = None,
        ttl: Duration | None = None,
        encoding: str = "json",
    ) -> Record:
        keys, args, now, expires = self._put_args(key, data, expected_version, ttl, encoding)
        reply = await self._aguard(lambda: self.ascript(lua.PUT)(keys=keys, args=args))
        return self._put_result(key, reply, expected_version, data, now, expires, encoding)

    def get(self, key: str, version: int | None = None) -> Record | None:
        check_key(key)
        check_version(version)
        if version is None:
            raw = self._guard(
                lambda: self.script(lua.GET_LATEST)(
                    keys=[self.key("i", key)], args=[self.key("v", key, "")]
                )
            )
        else:
            raw = self._guard(lambda: self.client.get(self.key("v", key, str(version))))
        return None if raw is None else unpack(key, raw)

    async def aget(self, key: str, version: int | None = None) -> Record | None:
        check_key(key)
        check_version(version)
        if version is None:
            raw = await self._aguard(
                lambda: self.ascript(lua.GET_LATEST)(
                    keys=[self.key("i", key)], args=[self.key("v", key, "")]
                )
            )
        else:
            raw = await self._aguard(lambda: self.aclient().get(self.key("v", key, str(version))))
        return None if raw is None else unpack(key, raw)

    def list(self, prefix: str = "") -> builtins.list[Record]:
        index_keys = self._guard(
            lambda: sorted(set(self.client.scan_iter(match=self._match(prefix), count=1000)))
        )
        start = len(self.key("i", ""))
        names = [k[start:].decode("utf-8", "replace") for k in index_keys]
        found = [self.get(name) for name in names if name.startswith(prefix)]
        return sorted((r for r in found if r is not None), key=lambda r: r.key)

    async def alist(self, prefix: str = "") -> builtins.list[Record]:
        async def scan() -> builtins.list[bytes]:
            return [
                k async for k in self.aclient().scan_iter(match=self._match(prefix), count=1000)
            ]

        index_keys = sorted(set(await self._aguard(scan)))
        start = len(self.key("i", ""))
        names = [k[start:].decode("utf-8", "replace") for k in index_keys]
        found = [await self.aget(name) for name in names if name.startswith(prefix)]
        return sorted((r for r in found if r is not None), key=lambda r: r.key)

    def delete(self, key: str) -> int:
        check_key(key)
        keys, args = [self.key("i", key)], [self.key("v", key, ""), str(TOMBSTONE_MS)]
        return int(self._guard(lambda: self.script(lua.DELETE)(keys=keys, args=args)))

    async def adelete(self, key: str) -> int:
        check_key(key)
        keys, args = [self.key("i", key)], [self.key("v", key, ""), str(TOMBSTONE_MS)]
        return int(await self._aguard(lambda: self.ascript(lua.DELETE)(keys=keys, args=args)))

    # -- counters ---------------------------------------------------------------------------

    def incr(
        self, namespace: str, amounts: Mapping[str, float], *, batch_id: str | None = None
    ) -> bool:
        keys, args = self._incr_args(namespace, amounts, batch_id)
        return bool(self._guard(lambda: self.script(lua.INCR)(keys=keys, args=args)))

    async def aincr(
        self, namespace: str, amounts: Mapping[str, float], *, batch_id: str | None = None
    ) -> bool:
        keys, args = self._incr_args(namespace, amounts, batch_id)
        return bool(await self._aguard(lambda: self.ascript(lua.INCR)(keys=keys, args=args)))

    def counters(self, namespace: str, keys: Iterable[str] | None = None) -> dict[str, float]:
        check_key(namespace, "namespace")
        raw = self._guard(lambda: self.client.hgetall(self.key("c", namespace)))
        return unpack_counters(raw, keys)

    async def acounters(
        self, namespace: str, keys: Iterable[str] | None = None
    ) -> dict[str, float]:
        check_key(namespace, "namespace")
        raw = await self._aguard(lambda: self.aclient().hgetall(self.key("c", namespace)))
        return unpack_counters(raw, keys)

    def close(self) -> None:
        """Close the sync client, and the asyncio clients of event loops that have been
        closed (not those of loops still open: a command may be running on them).

        Fleet-wide breakers and budgets sharing state through this store close their idle
        connections too, and stay fleet-wide: their next sync reconnects (see "Lifetime" in
        :mod:`._shared_link`)."""
        with self._lock:
            client, self._client = self._client, None
            self._scripts.clear()
            close_clients_of_closed_loops(self._async)
        if client is not None:
            client.close()
        # loaded only once a breaker or budget shared state through a Redis store
        shared = sys.modules.get("otel_recovery.stores._shared_link")
        if shared is not None:
            shared.store_closed(self)

    async def aclose(self) -> None:
        """Close the running loop's asyncio client, then as :meth:`close`."""
        with self._lock:
            entry = self._async.pop(asyncio.get_running_loop(), None)
        if entry is not None:
            # redis-py 5.0.1 renamed the async client's close() to aclose()
            closing = getattr(entry.client, "aclose", None) or entry.client.close
            await closing()
            # before 5.0.1, a client made by from_url() did not close its pool
            await entry.client.connection_pool.disconnect()
        self.close()

    def __repr__(self) -> str:
        return f"RedisStore({self.url!r}, prefix={self.prefix!r})"


plain_self(RedisStore)
