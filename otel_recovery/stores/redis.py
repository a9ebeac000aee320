"""``redis://`` (also ``rediss://``, ``unix://``): the store shared by a fleet.

Every write is one Lua script (see :mod:`._redis_lua`), so it is atomic on the server and a
client killed mid-call can never leave half a record. Keys live under a prefix
(``?prefix=myapp:``, default ``otel_recovery:``) so several applications, or test runs, can
share one Redis. TTLs are native Redis expiry.

redis-py's own retries are switched off for this client: a write whose reply was lost may or
may not have run, and retrying it blindly could count an increment twice. Failures surface as
:class:`StoreUnavailableError` and :class:`~otel_recovery.stores.ResilientStore` decides.

A pooled connection the server closed while it was idle (``CLIENT KILL``, the server's
``timeout``, a restart or failover) is never used for a command. The sync pool checks each
connection's socket before handing it out. The asyncio pool checks only what its event loop
has already read, so a connection whose end has not yet been read (the loop did not run
since) would carry the command to a closed session and fail with "Connection closed by
server". So before each asyncio call the store polls the sockets of the idle pooled
connections (zero wait, one system call): one with data or its end waiting, unasked, is
disconnected under the pool's lock, and the pool connects it again when it is handed out.
Nothing was sent on it, so nothing is sent twice; a command is still never sent again after
a failure.

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
import inspect
import select
import sys
import weakref
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Any, NoReturn, TypeVar

import redis
import redis.asyncio
from redis.backoff import NoBackoff
from redis.commands.core import AsyncScript, Script
from redis.retry import Retry

from otel_recovery._clock import Clock, Duration, clock_or_default
from otel_recovery._forksafe import new_lock
from otel_recovery._redact import redact
from otel_recovery._redis_replica import ReplicaReconnect, closable, refused_by_replica
from otel_recovery.stores import _redis_lua as lua
from otel_recovery.stores._base import (
    CorruptRecordError,
    Record,
    StoreUnavailableError,
    VersionConflictError,
    check_amounts,
    check_key,
    check_put,
    check_version,
)
from otel_recovery.stores._redis_loops import (
    LoopClient,
    LoopClients,
    close_clients_of_closed_loops,
)

__all__ = ["RedisStore"]

_T = TypeVar("_T")
_TOMBSTONE_MS = 7 * 86400 * 1000
_BATCH_TTL_S = 7 * 86400
_UNAVAILABLE = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OSError)
_UNAVAILABLE_REPLIES = (redis.exceptions.BusyLoadingError, redis.exceptions.ReadOnlyError)
_DEFAULTS: dict[str, Any] = {"socket_connect_timeout": 2.0, "socket_timeout": 5.0}


def _is_unavailable(error: BaseException) -> bool:
    """The server cannot take the call now: unreachable, loading, or a replica (also a
    write refused inside a script before Redis 7.0, a plain ``ResponseError``)."""
    return isinstance(error, (*_UNAVAILABLE, *_UNAVAILABLE_REPLIES)) or refused_by_replica(error)


class _PlainRedis(redis.Redis):
    """The store's client: its commands skip every wrapper on ``Redis.execute_command``.

    Store traffic must make no span and no retry of anyone's. Our instrumentors and contrib's
    redis instrumentation from 0.60b0 honour suppressed instrumentation; earlier contrib
    releases trace every command regardless. So the store binds redis-py's own method, as it
    was before anything wrapped it, on a class of its own.
    """

    execute_command = inspect.unwrap(redis.Redis.execute_command)


class _PlainAsyncRedis(redis.asyncio.Redis):
    """:class:`_PlainRedis` for asyncio."""

    execute_command = inspect.unwrap(redis.asyncio.Redis.execute_command)


class RedisStore:
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
                self._client = _PlainRedis.from_url(self._target, **self._options)
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
                client = _PlainAsyncRedis.from_url(self._target, **self._options)
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
            await _disconnect_ended(entry.client)
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

    def _put_args(
        self,
        key: str,
        data: bytes,
        expected_version: int | None,
        ttl: Duration | None,
        encoding: str,
    ) -> tuple[builtins.list[str], builtins.list[Any], float, float | None]:
        check_key(key)
        expected, seconds = check_put(expected_version, ttl, encoding)
        now = self.clock.wall()
        expires = None if seconds is None else now + seconds
        args: builtins.list[Any] = [
            self.key("v", key, ""),
            "" if expected is None else str(expected),
            repr(now),
            "" if expires is None else repr(expires),
            0 if seconds is None else max(1, round(seconds * 1000)),
            encoding,
            bytes(data),
            self.max_versions,
            _TOMBSTONE_MS,
        ]
        return [self.key("i", key)], args, now, expires

    def _put_result(
        self, key: str, reply: Any, expected: int | None, data: bytes, now: float,
        expires: float | None, encoding: str,
    ) -> Record:  # fmt: skip
        applied, number = int(reply[0]), int(reply[1])
        if not applied:
            raise VersionConflictError(key, expected or 0, number)
        return Record(key, number, bytes(data), now, expires, encoding)

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

    def _match(self, prefix: str) -> str:
        """A SCAN pattern for the index keys of ``prefix`` (glob characters escaped)."""
        literal = self.key("i", prefix)
        return "".join("\\" + c if c in "*?[]\\" else c for c in literal) + "*"

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
        keys, args = [self.key("i", key)], [self.key("v", key, ""), str(_TOMBSTONE_MS)]
        return int(self._guard(lambda: self.script(lua.DELETE)(keys=keys, args=args)))

    async def adelete(self, key: str) -> int:
        check_key(key)
        keys, args = [self.key("i", key)], [self.key("v", key, ""), str(_TOMBSTONE_MS)]
        return int(await self._aguard(lambda: self.ascript(lua.DELETE)(keys=keys, args=args)))

    # -- counters ---------------------------------------------------------------------------

    def _incr_args(
        self, namespace: str, amounts: Mapping[str, float], batch_id: str | None
    ) -> tuple[builtins.list[str], builtins.list[Any]]:
        checked = check_amounts(namespace, amounts)
        keys = [self.key("c", namespace)]
        if batch_id is not None:
            keys.append(self.key("b", check_key(batch_id, "batch_id")))
        args: builtins.list[Any] = [_BATCH_TTL_S]
        for counter, amount in checked.items():
            args += [counter, repr(amount)]
        return keys, args

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
        return _counters(raw, keys)

    async def acounters(
        self, namespace: str, keys: Iterable[str] | None = None
    ) -> dict[str, float]:
        check_key(namespace, "namespace")
        raw = await self._aguard(lambda: self.aclient().hgetall(self.key("c", namespace)))
        return _counters(raw, keys)

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


async def _disconnect_ended(client: redis.asyncio.Redis) -> None:
    """Disconnect ``client``'s idle pooled connections whose socket has data or its end
    waiting (see the module doc); never raises (a failure only skips the check)."""
    try:
        if not closable(client):
            return
        pool = client.connection_pool
        idle = getattr(pool, "_available_connections", None)
        lock = getattr(pool, "_lock", None)
        if not idle or lock is None:
            return
        ended = [connection for connection in idle if _ended(connection)]
        if not ended:
            return
        async with lock:  # get_connection hands none of them out meanwhile
            for connection in ended:
                if connection in idle:
                    await connection.disconnect()
    except Exception:  # the call goes on as without the check
        return


def _ended(connection: Any) -> bool:
    writer = getattr(connection, "_writer", None)
    if writer is None:
        return False  # not connected: the pool connects it when it hands it out
    sock = writer.transport.get_extra_info("socket")
    fd = -1 if sock is None else sock.fileno()
    if fd < 0:
        return False
    if hasattr(select, "poll"):
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        return bool(poller.poll(0))
    return bool(select.select([fd], [], [], 0)[0])  # pragma: no cover - Windows


def unpack(key: str, raw: bytes) -> Record:
    """Parse a packed version; anything else is a :class:`CorruptRecordError`."""
    parts = raw.split(b"\n", 5) if isinstance(raw, bytes) else []
    if len(parts) != 6 or parts[0] != lua.MAGIC:
        raise CorruptRecordError(key, "not an otel-recovery record (bad header)")
    try:
        version = int(parts[1])
        created = float(parts[2])
        expires = float(parts[3]) if parts[3] else None
        encoding = parts[4].decode("ascii")
    except (ValueError, UnicodeDecodeError) as exc:
        raise CorruptRecordError(key, f"unreadable header ({exc})") from exc
    return Record(key, version, parts[5], created, expires, encoding)


def _counters(raw: Mapping[Any, Any], keys: Iterable[str] | None) -> dict[str, float]:
    values = {
        (k.decode("utf-8", "replace") if isinstance(k, bytes) else str(k)): float(v)
        for k, v in raw.items()
    }
    if keys is None:
        return values
    return {k: values[k] for k in keys if k in values}
