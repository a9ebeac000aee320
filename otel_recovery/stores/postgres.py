"""``postgresql://``: checkpoints (and counters) in PostgreSQL, with JSON states as ``jsonb``.

Why it looks like this:

- A put is one transaction that first upserts the key's row in ``<table>_heads``: that row
  lock serialises writers of one key (and only of that key), so checking ``expected_version``
  and inserting the next version cannot interleave with another writer. A client killed
  mid-transaction is rolled back by the server: no torn record is ever visible.
- JSON payloads go into a ``jsonb`` column, so checkpoints can be queried with SQL; anything
  ``jsonb`` cannot hold (other serializers, JSON with ``\\u0000``) goes into ``raw bytea``.
  ``jsonb`` does not keep key order or whitespace; the restored value is equal, not identical.
- ``?table=name`` (default ``otel_recovery``) prefixes the five tables, so applications or test
  runs can share one database. The schema is created under an advisory lock (concurrent
  ``CREATE TABLE IF NOT EXISTS`` can race) and versioned in ``<table>_meta``.

Each operation is written once, as a plan that yields SQL and receives rows; one driver runs
plans on a sync ``psycopg.Connection``, the other on an ``AsyncConnection`` per event loop.
"""

from __future__ import annotations

import asyncio
import builtins
import os
import re
import weakref
from collections.abc import Iterable, Mapping
from contextlib import nullcontext
from typing import Any

import psycopg

from otel_recovery._clock import SYSTEM_CLOCK, Clock, Duration
from otel_recovery._forksafe import new_lock
from otel_recovery._redact import redact
from otel_recovery.stores._base import (
    Record,
    StoreUnavailableError,
    check_amounts,
    check_key,
    check_put,
    check_version,
)
from otel_recovery.stores._postgres_plans import SCHEMA_VERSION, Plan, Plans, jsonb_compatible

__all__ = ["SCHEMA_VERSION", "PostgresStore"]

_TABLE = re.compile(r"^[a-z_][a-z0-9_]{0,40}$")
_UNAVAILABLE = (psycopg.OperationalError, psycopg.InterfaceError, OSError)


class PostgresStore(Plans):
    """Versioned records and counters in PostgreSQL tables named ``<table>_*``."""

    def __init__(
        self,
        url: str,
        *,
        table: str = "otel_recovery",
        max_versions: int = 16,
        clock: Clock | None = None,
        connect_timeout: float = 3.0,
    ) -> None:
        if isinstance(max_versions, bool) or not isinstance(max_versions, int) or max_versions < 1:
            raise ValueError(f"max_versions must be an int >= 1, got {max_versions!r}")
        if not isinstance(table, str) or not _TABLE.match(table):
            raise ValueError(
                f"table must be a lower-case SQL identifier of at most 41 characters, got {table!r}"
            )
        self.url = redact(f"{url}{'&' if '?' in url else '?'}table={table}")
        self.table = table
        self.max_versions = max_versions
        self.clock: Clock = clock or SYSTEM_CLOCK
        self._target = url
        self._timeout = connect_timeout
        Plans.__init__(self, table)
        self._lock = new_lock()
        self._conn: psycopg.Connection[Any] | None = None
        self._aconns: weakref.WeakKeyDictionary[
            asyncio.AbstractEventLoop, tuple[asyncio.Lock, list[psycopg.AsyncConnection[Any]]]
        ] = weakref.WeakKeyDictionary()
        self._conn_pid = 0  # the process that opened _conn (a forked child must not use it)

    # -- drivers ------------------------------------------------------------------------------

    def _run(self, plan: Plan, *, atomic: bool = True) -> Any:
        with self._lock:
            try:
                if self._conn is not None and self._conn_pid != os.getpid():
                    # Inherited across fork(): the parent's session, on a socket the parent
                    # still uses. Never used or closed here (psycopg does not close it when
                    # it is collected in another process); this process opens its own.
                    self._conn = None
                if self._conn is None or self._conn.closed:
                    self._conn = psycopg.connect(
                        self._target, autocommit=True, connect_timeout=int(self._timeout)
                    )
                    self._conn_pid = os.getpid()
                    self._drive_sync(self._conn, self._schema())
                return self._drive_sync(self._conn, plan, atomic)
            except _UNAVAILABLE as exc:
                self._drop_sync()
                raise self._unavailable(exc) from exc

    def _drive_sync(self, conn: psycopg.Connection[Any], plan: Plan, atomic: bool = True) -> Any:
        # A single-statement plan is atomic by itself: no BEGIN/COMMIT round trips for it.
        with conn.transaction() if atomic else nullcontext(), conn.cursor() as cur:
            try:
                statement, params = next(plan)
                while True:
                    cur.execute(statement, params)
                    statement, params = plan.send(cur.fetchall() if cur.description else [])
            except StopIteration as done:
                return done.value

    async def _arun(self, plan: Plan, *, atomic: bool = True) -> Any:
        loop = asyncio.get_running_loop()
        with self._lock:
            lock, holder = self._aconns.setdefault(loop, (asyncio.Lock(), []))
        async with lock:
            try:
                if not holder or holder[0].closed:
                    holder[:] = [
                        await psycopg.AsyncConnection.connect(
                            self._target, autocommit=True, connect_timeout=int(self._timeout)
                        )
                    ]
                    await self._drive_async(holder[0], self._schema())
                return await self._drive_async(holder[0], plan, atomic)
            except _UNAVAILABLE as exc:
                if holder:
                    await holder.pop().close()
                raise self._unavailable(exc) from exc

    async def _drive_async(
        self, conn: psycopg.AsyncConnection[Any], plan: Plan, atomic: bool = True
    ) -> Any:
        async with conn.transaction() if atomic else nullcontext(), conn.cursor() as cur:
            try:
                statement, params = next(plan)
                while True:
                    await cur.execute(statement, params)
                    rows = await cur.fetchall() if cur.description else []
                    statement, params = plan.send(rows)
            except StopIteration as done:
                return done.value

    def _drop_sync(self) -> None:
        if self._conn is not None:
            try:
                if self._conn_pid == os.getpid():  # never the session a parent still uses
                    self._conn.close()
            finally:
                self._conn = None

    def _unavailable(self, exc: BaseException) -> StoreUnavailableError:
        detail = redact(str(exc).strip()) or type(exc).__name__
        return StoreUnavailableError(f"PostgreSQL store {self.url} is unavailable: {detail}")

    # -- the Store interface ------------------------------------------------------------------

    def _put_plan(
        self, key: str, data: bytes, expected_version: int | None, ttl: Duration | None,
        encoding: str, as_json: bool | None = None,
    ) -> Plan:  # fmt: skip
        check_key(key)
        expected, seconds = check_put(expected_version, ttl, encoding)
        now = self.clock.wall()
        expires = None if seconds is None else now + seconds
        if as_json is None:
            as_json = jsonb_compatible(data, encoding)
        return self._put(key, bytes(data), expected, expires, encoding, now, as_json)

    def put(
        self,
        key: str,
        data: bytes,
        *,
        expected_version: int | None = None,
        ttl: Duration | None = None,
        encoding: str = "json",
    ) -> Record:
        plan = self._put_plan(key, data, expected_version, ttl, encoding)
        try:
            record: Record = self._run(plan, atomic=expected_version is not None)
        except psycopg.DataError:  # labelled JSON that jsonb refuses: keep the bytes instead
            plan = self._put_plan(key, data, expected_version, ttl, encoding, as_json=False)
            record = self._run(plan, atomic=expected_version is not None)
        return record

    async def aput(
        self,
        key: str,
        data: bytes,
        *,
        expected_version: int | None = None,
        ttl: Duration | None = None,
        encoding: str = "json",
    ) -> Record:
        plan = self._put_plan(key, data, expected_version, ttl, encoding)
        try:
            record: Record = await self._arun(plan, atomic=expected_version is not None)
        except psycopg.DataError:
            plan = self._put_plan(key, data, expected_version, ttl, encoding, as_json=False)
            record = await self._arun(plan, atomic=expected_version is not None)
        return record

    def get(self, key: str, version: int | None = None) -> Record | None:
        check_key(key)
        found: Record | None = self._run(
            self._get(key, check_version(version), self.clock.wall()), atomic=False
        )
        return found

    async def aget(self, key: str, version: int | None = None) -> Record | None:
        check_key(key)
        plan = self._get(key, check_version(version), self.clock.wall())
        found: Record | None = await self._arun(plan, atomic=False)
        return found

    def list(self, prefix: str = "") -> builtins.list[Record]:
        found: builtins.list[Record] = self._run(
            self._list(prefix, self.clock.wall()), atomic=False
        )
        return found

    async def alist(self, prefix: str = "") -> builtins.list[Record]:
        plan = self._list(prefix, self.clock.wall())
        found: builtins.list[Record] = await self._arun(plan, atomic=False)
        return found

    def delete(self, key: str) -> int:
        check_key(key)
        return int(self._run(self._delete(key, self.clock.wall())))

    async def adelete(self, key: str) -> int:
        check_key(key)
        return int(await self._arun(self._delete(key, self.clock.wall())))

    def incr(
        self, namespace: str, amounts: Mapping[str, float], *, batch_id: str | None = None
    ) -> bool:
        checked = check_amounts(namespace, amounts)
        return bool(self._run(self._incr(namespace, checked, batch_id, self.clock.wall())))

    async def aincr(
        self, namespace: str, amounts: Mapping[str, float], *, batch_id: str | None = None
    ) -> bool:
        checked = check_amounts(namespace, amounts)
        return bool(await self._arun(self._incr(namespace, checked, batch_id, self.clock.wall())))

    def counters(self, namespace: str, keys: Iterable[str] | None = None) -> dict[str, float]:
        check_key(namespace, "namespace")
        found: dict[str, float] = self._run(self._counters(namespace, keys), atomic=False)
        return found

    async def acounters(
        self, namespace: str, keys: Iterable[str] | None = None
    ) -> dict[str, float]:
        check_key(namespace, "namespace")
        found: dict[str, float] = await self._arun(self._counters(namespace, keys), atomic=False)
        return found

    def close(self) -> None:
        with self._lock:
            self._drop_sync()

    async def aclose(self) -> None:
        loop = asyncio.get_running_loop()
        with self._lock:
            entry = self._aconns.pop(loop, None)
        if entry is not None and entry[1]:
            await entry[1][0].close()
        self.close()

    def __repr__(self) -> str:
        return f"PostgresStore({self.url!r}, table={self.table!r})"
