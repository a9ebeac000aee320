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
  runs can share one database. The schema is versioned in ``<table>_meta``. A new connection
  first only *reads* whether every table exists at this version (so a read-only server, a hot
  standby, serves reads); only what is missing is created, under an advisory lock (concurrent
  ``CREATE TABLE IF NOT EXISTS`` can race). A connection whose check or creation failed is
  closed, so the next connection tries again. A table dropped under a running store is
  created again (once per operation, with a warning) and the operation, which failed before
  it could change anything, runs once more.

Each operation is written once, as a plan that yields SQL and receives rows
(:mod:`._postgres_plans`); one driver runs plans on a sync ``psycopg.Connection``, the other
on an ``AsyncConnection`` per event loop (:mod:`._postgres_connections`), both under the
rules below (:mod:`._postgres_run`).

What counts as unavailable (:class:`StoreUnavailableError`, so that
:class:`~otel_recovery.stores.ResilientStore` degrades instead of the application failing):
every ``OperationalError`` (connection lost, ``57P01`` terminated, ``57014``
``statement_timeout``, ``53xxx`` out of resources, ...), ``InterfaceError``, ``OSError``, and
these refusals that say the server cannot take the call in its present state: ``25006``
read-only transaction (a hot standby, a demoted primary, ``default_transaction_read_only``),
``25P03``/``25P04`` session or transaction timeouts, ``42501`` insufficient privilege
(:mod:`._postgres_errors`). Such a failure closes the connection, so the next call connects
again (perhaps to the new primary).

**A connection the server ended while it was idle** (``pg_terminate_backend``, a failover or
restart, an idle-session timeout, a pooler restart) is replaced without sending anything on
it: before an operation reuses a connection, a zero-wait poll of its socket checks that the
server has said nothing since the last reply (the server's termination notice, or end of
file). Data waiting there unasked means the session is over; the connection is closed and a
new one opened. Nothing was sent, so nothing can have run.

The server can end the session in the microseconds between that check and the send. Then the
operation runs once more on a new connection only when what its **first round trip** carried
could not have changed anything, and the failure is the session's end (SQLSTATE ``57P01``
/``57P02``/``57P03``, or the connection found lost): a ``BEGIN`` (compare-and-set puts,
deletes and increments run in a transaction, which the server rolls back when the session
dies) or a read (get, list, counters). A plain put is one statement, sent in its first round
trip: if the session ends under it, it may or may not have committed, so it is never sent
again here; it fails with :class:`StoreUnavailableError`, as does every failure after the
first round trip, and the layer above decides (a ResilientStore journals it and replays it).
So nothing is ever done twice by this store.

**Every operation is bounded** by ``operation_timeout`` seconds (default 5, as the Redis
store's socket timeout; ``?operation_timeout=2.5`` in the URL). ``statement_timeout`` cannot
do this (a frozen backend never runs its timer) and neither can TCP keepalives (a partition
where the kernel still acknowledges). So one watchdog thread per process shuts down the
socket of an operation past its deadline; the blocked read returns at once, the operation
fails with :class:`StoreUnavailableError` and the connection is closed (and not run again:
a write cut off may have been applied). On the happy path this costs a few microseconds per
operation (an entry added and removed under a lock, a duplicate of the socket's descriptor);
the thread wakes about once per timeout while operations run, and not at all otherwise.
Waiting for the store's connection (another thread or task is using it) is bounded by the
same timeout. Connecting is bounded by ``connect_timeout`` (3 s).

**Expired records leave the table** even when their key is never written again (one id per
job, each with a TTL). A put deletes its own key's expired and surplus versions in the same
statement; besides, every 500 puts through a store, the put that completes the count first
deletes up to 500 expired rows of any key, in a transaction of its own before the put is sent
(:mod:`._postgres_sweep` says how it is bounded), so a put never pays for more than one
bounded batch and the sweep never fails the put. The rows are found through the partial
index ``<table>_records_expiry``, created with the tables; tables made by an older release
lack it, and the store then logs once how to create it. Only record rows go:
``<table>_heads`` keeps every key's last version, so versions never repeat.

An ``AsyncConnection`` belongs to one event loop. One whose loop has been closed (each
``asyncio.run`` makes a new loop) is closed when the next loop first uses the store, when
the loop is collected, or by :meth:`close` / :meth:`aclose`, which close every connection
not in use by a running loop.
"""

from __future__ import annotations

import asyncio
import builtins
import math
import re
from collections.abc import Callable, Iterable, Mapping
from functools import partial
from typing import Any
from urllib.parse import unquote, urlsplit

import psycopg

from otel_recovery._clock import Clock, Duration, clock_or_default
from otel_recovery._redact import redact
from otel_recovery.stores._base import (
    Record,
    check_amounts,
    check_key,
    check_put,
    check_version,
)
from otel_recovery.stores._postgres_connections import Connections, LoopConnection
from otel_recovery.stores._postgres_plans import SCHEMA_VERSION, Plan, Plans, jsonb_compatible
from otel_recovery.stores._postgres_run import arun, run
from otel_recovery.stores._postgres_sweep import ExpirySweep

__all__ = ["SCHEMA_VERSION", "PostgresStore"]

_TABLE = re.compile(r"^[a-z_][a-z0-9_]{0,40}$")
_OPTION = "operation_timeout"
DEFAULT_OPERATION_TIMEOUT = 5.0


def _seconds(raw: object, where: str) -> float:
    try:
        value = float(raw)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        value = math.nan
    if isinstance(raw, bool) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{where} must be a number of seconds > 0, got {raw!r}")
    return value


def _split_option(url: str) -> tuple[str, str | None]:
    """``url`` without ``?operation_timeout=...``, and that option's value. The other query
    items are kept byte for byte (libpq decodes ``%XX`` but not ``+``)."""
    parts = urlsplit(url)
    if not parts.query or "://" not in url:
        return url, None
    kept, found = [], None
    for item in parts.query.split("&"):
        name, _, value = item.partition("=")
        if unquote(name) == _OPTION:
            found = unquote(value)
        else:
            kept.append(item)
    if found is None:
        return url, None
    # Cut the query out of the text itself: urlunsplit drops the empty authority of
    # ``postgresql:///db?host=/socket`` (``postgresql:/db``), which libpq cannot read.
    base, _, rest = url.partition("?")
    fragment = rest.partition("#")[2]
    query = "&".join(kept)
    return base + (f"?{query}" if query else "") + (f"#{fragment}" if fragment else ""), found


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
        operation_timeout: float | None = None,
    ) -> None:
        if isinstance(max_versions, bool) or not isinstance(max_versions, int) or max_versions < 1:
            raise ValueError(f"max_versions must be an int >= 1, got {max_versions!r}")
        if not isinstance(table, str) or not _TABLE.match(table):
            raise ValueError(
                f"table must be a lower-case SQL identifier of at most 41 characters, got {table!r}"
            )
        target, from_url = _split_option(url)
        if operation_timeout is not None:
            timeout = _seconds(operation_timeout, "operation_timeout")
        elif from_url is not None:
            timeout = _seconds(from_url, f"option {_OPTION}")
        else:
            timeout = DEFAULT_OPERATION_TIMEOUT
        self.url = redact(f"{url}{'&' if '?' in url else '?'}table={table}")
        self.table = table
        self.max_versions = max_versions
        self.clock: Clock = clock_or_default(clock)
        self.operation_timeout = timeout
        self._target = target
        self._timeout = connect_timeout
        Plans.__init__(self, table)
        self._connections = Connections()
        self._sweeps = ExpirySweep()

    # -- the connections (a collaborator's), where the store and its tests look at them --------

    @property
    def _conn(self) -> psycopg.Connection[Any] | None:
        return self._connections.conn

    @property
    def _aconns(self) -> Mapping[asyncio.AbstractEventLoop, LoopConnection]:
        return self._connections.loops

    def _loop_entry(self, loop: asyncio.AbstractEventLoop) -> LoopConnection:
        return self._connections.loop_entry(loop)

    # -- the Store interface ------------------------------------------------------------------

    def _put_plan(
        self, key: str, data: bytes, expected_version: int | None, ttl: Duration | None,
        encoding: str, as_json: bool | None = None,
    ) -> Callable[[], Plan]:  # fmt: skip
        check_key(key)
        expected, seconds = check_put(expected_version, ttl, encoding)
        now = self.clock.wall()
        expires = None if seconds is None else now + seconds
        if as_json is None:
            as_json = jsonb_compatible(data, encoding)
        return partial(self._put, key, bytes(data), expected, expires, encoding, now, as_json)

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
        if self._sweeps.due() and self._conn is not None:
            self._sweeps.sweep(self)
        try:
            record: Record = run(self, plan, atomic=expected_version is not None)
        except psycopg.DataError:  # labelled JSON that jsonb refuses: keep the bytes instead
            plan = self._put_plan(key, data, expected_version, ttl, encoding, as_json=False)
            record = run(self, plan, atomic=expected_version is not None)
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
        if self._sweeps.due() and self._loop_entry(asyncio.get_running_loop()).conn is not None:
            await self._sweeps.asweep(self)
        try:
            record: Record = await arun(self, plan, atomic=expected_version is not None)
        except psycopg.DataError:
            plan = self._put_plan(key, data, expected_version, ttl, encoding, as_json=False)
            record = await arun(self, plan, atomic=expected_version is not None)
        return record

    def get(self, key: str, version: int | None = None) -> Record | None:
        check_key(key)
        plan = partial(self._get, key, check_version(version), self.clock.wall())
        found: Record | None = run(self, plan, atomic=False, repeatable=True)
        return found

    async def aget(self, key: str, version: int | None = None) -> Record | None:
        check_key(key)
        plan = partial(self._get, key, check_version(version), self.clock.wall())
        found: Record | None = await arun(self, plan, atomic=False, repeatable=True)
        return found

    def list(self, prefix: str = "") -> builtins.list[Record]:
        plan = partial(self._list, prefix, self.clock.wall())
        found: builtins.list[Record] = run(self, plan, atomic=False, repeatable=True)
        return found

    async def alist(self, prefix: str = "") -> builtins.list[Record]:
        plan = partial(self._list, prefix, self.clock.wall())
        found: builtins.list[Record] = await arun(self, plan, atomic=False, repeatable=True)
        return found

    def delete(self, key: str) -> int:
        check_key(key)
        return int(run(self, partial(self._delete, key, self.clock.wall())))

    async def adelete(self, key: str) -> int:
        check_key(key)
        return int(await arun(self, partial(self._delete, key, self.clock.wall())))

    def incr(
        self, namespace: str, amounts: Mapping[str, float], *, batch_id: str | None = None
    ) -> bool:
        checked = check_amounts(namespace, amounts)
        plan = partial(self._incr, namespace, checked, batch_id, self.clock.wall())
        return bool(run(self, plan))

    async def aincr(
        self, namespace: str, amounts: Mapping[str, float], *, batch_id: str | None = None
    ) -> bool:
        checked = check_amounts(namespace, amounts)
        plan = partial(self._incr, namespace, checked, batch_id, self.clock.wall())
        return bool(await arun(self, plan))

    def counters(self, namespace: str, keys: Iterable[str] | None = None) -> dict[str, float]:
        check_key(namespace, "namespace")
        wanted = None if keys is None else builtins.list(keys)  # an iterator is read once
        plan = partial(self._counters, namespace, wanted)
        found: dict[str, float] = run(self, plan, atomic=False, repeatable=True)
        return found

    async def acounters(
        self, namespace: str, keys: Iterable[str] | None = None
    ) -> dict[str, float]:
        check_key(namespace, "namespace")
        wanted = None if keys is None else builtins.list(keys)
        plan = partial(self._counters, namespace, wanted)
        found: dict[str, float] = await arun(self, plan, atomic=False, repeatable=True)
        return found

    def close(self) -> None:
        """Close the sync connection, and every event loop's that no running operation uses
        (a loop that is closed, or one between operations)."""
        self._connections.close()

    async def aclose(self) -> None:
        await self._connections.close_loop()
        self.close()

    def __repr__(self) -> str:
        return f"PostgresStore({self.url!r}, table={self.table!r})"
