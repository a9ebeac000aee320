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

Each operation is written once, as a plan that yields SQL and receives rows; one driver runs
plans on a sync ``psycopg.Connection``, the other on an ``AsyncConnection`` per event loop.

What counts as unavailable (:class:`StoreUnavailableError`, so that
:class:`~otel_recovery.stores.ResilientStore` degrades instead of the application failing):
every ``OperationalError`` (connection lost, ``57P01`` terminated, ``57014``
``statement_timeout``, ``53xxx`` out of resources, ...), ``InterfaceError``, ``OSError``, and
these refusals that say the server cannot take the call in its present state: ``25006``
read-only transaction (a hot standby, a demoted primary, ``default_transaction_read_only``),
``25P03``/``25P04`` session or transaction timeouts, ``42501`` insufficient privilege. Such a
failure closes the connection, so the next call connects again (perhaps to the new primary).

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
statement; besides, every ``_SWEEP_EVERY`` (500) puts through a store, the put that completes
the count first deletes up to ``_SWEEP_BATCH`` (500) expired rows of any key, in a transaction
of its own before the put is sent (sync or async, counted together), so a put never pays for
more than one bounded batch, the sweep never fails the put, and a cancellation landing in
the sweep stops a put that was not made yet.
The rows are found through the partial index ``<table>_records_expiry`` (created with the
tables; tables made by an older release lack it, and the store then logs once how to create
it, since the sweep has to scan the table), rows locked by another session are skipped (``FOR
UPDATE SKIP LOCKED``) rather than waited for, and ``lock_timeout`` (0.1 s) and
``statement_timeout`` (1 s, or half the operation timeout if that is shorter) end a sweep
that would wait behind a lock on the whole table or run long; the watchdog bounds it at 2 s.
A full batch means a backlog (older releases never swept): the next sweep then comes after
``_SWEEP_AGAIN`` (50) puts, until a batch comes back short. A sweep runs only on the
connection the put will use (it never connects by itself); its failure is logged (a warning
the first time, debug after that) and leaves the rows for a later sweep. Only record rows go:
``<table>_heads`` keeps every key's last version, so versions never repeat.

An ``AsyncConnection`` belongs to one event loop. One whose loop has been closed (each
``asyncio.run`` makes a new loop) is closed when the next loop first uses the store, when
the loop is collected, or by :meth:`close` / :meth:`aclose`, which close every connection
not in use by a running loop.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import logging
import math
import os
import re
import time
import weakref
from collections.abc import Callable, Iterable, Mapping
from functools import partial
from typing import Any, NoReturn
from urllib.parse import unquote, urlsplit

import psycopg
from psycopg.pq import ConnStatus, TransactionStatus

from otel_recovery._clock import Clock, Duration, clock_or_default, within
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
from otel_recovery.stores._postgres_cut import (
    backend_of,
    end_cut_backend,
    end_cut_backend_async,
)
from otel_recovery.stores._postgres_plans import SCHEMA_VERSION, Plan, Plans, jsonb_compatible
from otel_recovery.stores._socket_watchdog import WATCHDOG as _WATCHDOG
from otel_recovery.stores._socket_watchdog import readable

__all__ = ["SCHEMA_VERSION", "PostgresStore"]

_log = logging.getLogger("otel_recovery")
_TABLE = re.compile(r"^[a-z_][a-z0-9_]{0,40}$")
_UNAVAILABLE = (psycopg.OperationalError, psycopg.InterfaceError, OSError)
_REFUSED_NOW = frozenset({"25006", "25P03", "25P04", "42501"})
"""SQLSTATEs (outside ``OperationalError``) of a server that cannot take the call now."""
_SESSION_ENDED = frozenset({"57P01", "57P02", "57P03"})
_OPTION = "operation_timeout"
DEFAULT_OPERATION_TIMEOUT = 5.0
_SWEEP_EVERY = 500
"""Puts between two sweeps of expired records (see the module doc)."""
_SWEEP_AGAIN = 50
"""Puts before the next sweep when the last one deleted a full batch (a backlog)."""
_SWEEP_BATCH = 500
"""Most expired rows one sweep deletes."""
_SWEEP_TIMEOUT = 2.0
"""Bound of a whole sweep (the watchdog's); never more than the operation timeout."""
_SWEEP_LOCK_TIMEOUT = 0.1
"""The sweep's ``lock_timeout``: it gives up rather than wait behind a table lock."""


def _is_unavailable(error: BaseException) -> bool:
    return isinstance(error, _UNAVAILABLE) or getattr(error, "sqlstate", None) in _REFUSED_NOW


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


def _stale(conn: psycopg.Connection[Any] | psycopg.AsyncConnection[Any]) -> bool:
    """An idle connection that must not be used: closed, not idle, or the server said
    something unasked since the last reply (its termination notice, or end of file)."""
    pgconn = conn.pgconn
    if pgconn.status != ConnStatus.OK or pgconn.transaction_status != TransactionStatus.IDLE:
        return True
    try:
        return readable(pgconn.socket)
    except (OSError, psycopg.Error):
        return True


class _Step:
    """How far an attempt got: is its first round trip still unanswered?"""

    __slots__ = ("first",)

    def __init__(self) -> None:
        self.first = True


class _LoopConnection:
    """The connection of one event loop, and the lock its operations take turns with."""

    __slots__ = ("conn", "lock", "pid", "release")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.lock = asyncio.Lock()
        self.conn: psycopg.AsyncConnection[Any] | None = None
        self.pid = os.getpid()
        # finish() when the loop is collected; calling it finishes now and forgets the loop
        # (the lock may refer to it: the registry must not keep it alive)
        self.release = weakref.finalize(loop, _LoopConnection.finish, self)

    def finish(self) -> None:
        """Close the connection without its loop (it is closed, or not using it)."""
        conn, self.conn = self.conn, None
        if conn is not None and self.pid == os.getpid():  # never a parent's session
            with contextlib.suppress(Exception):  # closing what may already be gone
                conn.pgconn.finish()


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
        self._lock = new_lock()
        self._conn: psycopg.Connection[Any] | None = None
        self._aconns: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _LoopConnection]
        self._aconns = weakref.WeakKeyDictionary()
        self._loops_lock = new_lock()
        self._conn_pid = 0  # the process that opened _conn (a forked child must not use it)
        self._since_sweep = 0  # puts since the last sweep of expired records
        self._sweep_backlog = False  # the last sweep deleted a full batch
        self._sweep_failed_before = False
        self._index_reported = False

    # -- drivers ------------------------------------------------------------------------------

    def _run(
        self,
        make: Callable[[], Plan],
        *,
        atomic: bool = True,
        repeatable: bool = False,
        timeout: float | None = None,
    ) -> Any:
        """Run the plan ``make()`` makes; ``repeatable``: it only reads (see the module doc
        for when an operation runs once more). ``timeout`` (default the operation timeout)
        bounds the wait for the connection and the operation."""
        limit = self.operation_timeout if timeout is None else timeout
        if not self._lock.acquire(timeout=limit):
            raise self._busy()
        try:
            deadline = time.monotonic() + limit
            again = recreated = False
            while True:
                conn, reused = self._sync_connection(deadline)
                step = _Step()
                backend = None if repeatable else backend_of(conn)  # see _postgres_cut
                token = _WATCHDOG.arm(conn.pgconn.socket, deadline)
                try:
                    result = self._drive_sync(conn, make(), atomic, step)
                except BaseException as exc:
                    fired = _WATCHDOG.disarm(token)
                    if not isinstance(exc, Exception):  # interrupted, cancelled
                        raise
                    if fired:  # our socket is cut, its statement not: end it on the server
                        end_cut_backend(self._target, backend, self.url)
                    if self._runs_again(exc, conn, reused, fired, step, atomic, repeatable, again):
                        again = True
                        self._drop_sync()
                        continue
                    if not recreated and self._table_missing(exc, fired):
                        recreated = True
                        self._recreate_sync(conn, deadline)
                        continue
                    converted = self._failed(exc, fired)
                    if converted is None:
                        raise
                    self._drop_sync()
                    raise converted from exc
                if _WATCHDOG.disarm(token):  # answered just as the watchdog cut it off
                    self._drop_sync()
                return result
        finally:
            self._lock.release()

    def _sync_connection(self, deadline: float) -> tuple[psycopg.Connection[Any], bool]:
        """The connection to use (True: one used before), opened and checked if needed."""
        if self._conn is not None and self._conn_pid != os.getpid():
            # Inherited across fork(): the parent's session, on a socket the parent
            # still uses. Never used or closed here (psycopg does not close it when
            # it is collected in another process); this process opens its own.
            self._conn = None
        if self._conn is not None:
            if not _stale(self._conn):
                return self._conn, True
            self._drop_sync()  # ended by the server while idle: nothing was sent on it
        try:
            conn = psycopg.connect(
                self._target, autocommit=True, connect_timeout=int(self._timeout)
            )
        except _UNAVAILABLE as exc:
            raise self._unavailable(exc) from exc
        token = _WATCHDOG.arm(conn.pgconn.socket, deadline)
        try:
            if not self._drive_sync(conn, self._schema_ready(), False):
                self._drive_sync(conn, self._schema())
        except BaseException as exc:
            fired = _WATCHDOG.disarm(token)
            conn.close()  # the next connection checks the schema again
            if not isinstance(exc, Exception):
                raise
            self._raise(exc, fired)
        if _WATCHDOG.disarm(token):
            conn.close()
            self._raise(None, True)
        self._conn, self._conn_pid = conn, os.getpid()
        return conn, False

    def _recreate_sync(self, conn: psycopg.Connection[Any], deadline: float) -> None:
        token = _WATCHDOG.arm(conn.pgconn.socket, deadline)
        try:
            self._drive_sync(conn, self._schema())
        except BaseException as exc:
            fired = _WATCHDOG.disarm(token)
            if not isinstance(exc, Exception):
                raise
            self._drop_sync()
            self._raise(exc, fired)
        if _WATCHDOG.disarm(token):
            self._drop_sync()
        self._recreated()

    def _drive_sync(
        self,
        conn: psycopg.Connection[Any],
        plan: Plan,
        atomic: bool = True,
        step: _Step | None = None,
    ) -> Any:
        # A single-statement plan is atomic by itself: no BEGIN/COMMIT round trips for it.
        step = step or _Step()
        with conn.transaction() if atomic else contextlib.nullcontext(), conn.cursor() as cur:
            step.first = not atomic  # BEGIN was answered
            try:
                statement, params = next(plan)
                while True:
                    cur.execute(statement, params)
                    step.first = False
                    statement, params = plan.send(cur.fetchall() if cur.description else [])
            except StopIteration as done:
                return done.value

    async def _arun(
        self,
        make: Callable[[], Plan],
        *,
        atomic: bool = True,
        repeatable: bool = False,
        timeout: float | None = None,
    ) -> Any:
        limit = self.operation_timeout if timeout is None else timeout
        entry = self._loop_entry(asyncio.get_running_loop())
        lock = entry.lock
        if lock.locked():
            await self._wait_turn(lock, limit)
        else:
            await lock.acquire()
        try:
            deadline = time.monotonic() + limit
            again = recreated = False
            while True:
                conn, reused = await self._async_connection(entry, deadline)
                step = _Step()
                backend = None if repeatable else backend_of(conn)  # see _postgres_cut
                token = _WATCHDOG.arm(conn.pgconn.socket, deadline)
                try:
                    result = await self._drive_async(conn, make(), atomic, step)
                except BaseException as exc:
                    fired = _WATCHDOG.disarm(token)
                    if not isinstance(exc, Exception):  # interrupted, cancelled
                        raise
                    if fired:  # our socket is cut, its statement not: end it on the server
                        await end_cut_backend_async(self._target, backend, self.url)
                    if self._runs_again(exc, conn, reused, fired, step, atomic, repeatable, again):
                        again = True
                        await self._drop_async(entry)
                        continue
                    if not recreated and self._table_missing(exc, fired):
                        recreated = True
                        await self._recreate_async(entry, conn, deadline)
                        continue
                    converted = self._failed(exc, fired)
                    if converted is None:
                        raise
                    await self._drop_async(entry)
                    raise converted from exc
                if _WATCHDOG.disarm(token):
                    await self._drop_async(entry)
                return result
        finally:
            lock.release()

    async def _wait_turn(self, lock: asyncio.Lock, limit: float) -> None:
        """Take the loop's connection lock within ``limit`` seconds, keeping a
        cancellation that lands as the lock comes (:func:`~otel_recovery._clock.within`): a
        task cancelled then must not run its write anyway."""
        try:
            await within(limit, lock.acquire())
        except asyncio.TimeoutError:
            raise self._busy() from None

    async def _async_connection(
        self, entry: _LoopConnection, deadline: float
    ) -> tuple[psycopg.AsyncConnection[Any], bool]:
        if entry.pid != os.getpid():  # a forked child: never the parent's session
            entry.conn, entry.pid = None, os.getpid()
        if entry.conn is not None:
            if not _stale(entry.conn):
                return entry.conn, True
            await self._drop_async(entry)
        try:
            conn = await psycopg.AsyncConnection.connect(
                self._target, autocommit=True, connect_timeout=int(self._timeout)
            )
        except _UNAVAILABLE as exc:
            raise self._unavailable(exc) from exc
        token = _WATCHDOG.arm(conn.pgconn.socket, deadline)
        try:
            if not await self._drive_async(conn, self._schema_ready(), False):
                await self._drive_async(conn, self._schema())
        except BaseException as exc:
            fired = _WATCHDOG.disarm(token)
            conn.pgconn.finish()  # no await: this may be a cancellation
            if not isinstance(exc, Exception):
                raise
            self._raise(exc, fired)
        if _WATCHDOG.disarm(token):
            await conn.close()
            self._raise(None, True)
        entry.conn = conn
        return conn, False

    async def _recreate_async(
        self, entry: _LoopConnection, conn: psycopg.AsyncConnection[Any], deadline: float
    ) -> None:
        token = _WATCHDOG.arm(conn.pgconn.socket, deadline)
        try:
            await self._drive_async(conn, self._schema())
        except BaseException as exc:
            fired = _WATCHDOG.disarm(token)
            if not isinstance(exc, Exception):
                raise
            await self._drop_async(entry)
            self._raise(exc, fired)
        if _WATCHDOG.disarm(token):
            await self._drop_async(entry)
        self._recreated()

    async def _drive_async(
        self,
        conn: psycopg.AsyncConnection[Any],
        plan: Plan,
        atomic: bool = True,
        step: _Step | None = None,
    ) -> Any:
        step = step or _Step()
        async with conn.transaction() if atomic else contextlib.nullcontext(), conn.cursor() as cur:
            step.first = not atomic
            try:
                statement, params = next(plan)
                while True:
                    await cur.execute(statement, params)
                    step.first = False
                    rows = await cur.fetchall() if cur.description else []
                    statement, params = plan.send(rows)
            except StopIteration as done:
                return done.value

    def _loop_entry(self, loop: asyncio.AbstractEventLoop) -> _LoopConnection:
        with self._loops_lock:  # not self._lock, which a sync operation holds while it runs
            entry = self._aconns.get(loop)
            if entry is not None:
                return entry
            # A new loop: connections of loops that have been closed meanwhile (each
            # asyncio.run makes one) will never be used again.
            for old_loop, old in builtins.list(self._aconns.items()):
                if old_loop.is_closed():
                    del self._aconns[old_loop]
                    old.release()
            entry = self._aconns[loop] = _LoopConnection(loop)
            return entry

    @staticmethod
    def _runs_again(
        exc: Exception,
        conn: psycopg.Connection[Any] | psycopg.AsyncConnection[Any],
        reused: bool,
        fired: bool,
        step: _Step,
        atomic: bool,
        repeatable: bool,
        again: bool,
    ) -> bool:
        """The module doc's rule: the session (reused, idle before) ended on the first
        round trip of an attempt, and that round trip could have changed nothing."""
        if again or fired or not reused or not step.first or not (atomic or repeatable):
            return False
        ended = getattr(exc, "sqlstate", None) in _SESSION_ENDED
        return ended or (isinstance(exc, psycopg.OperationalError) and conn.closed)

    @staticmethod
    def _table_missing(exc: Exception, fired: bool) -> bool:
        # The statement failed before it could change anything (a transaction is rolled
        # back whole): create what is missing, then run the operation once more.
        return not fired and isinstance(exc, psycopg.errors.UndefinedTable)

    def _recreated(self) -> None:
        _log.warning(
            "otel_recovery: PostgreSQL store %s: a table was missing (dropped?); created the "
            "missing tables again",
            self.url,
        )

    def _drop_sync(self) -> None:
        if self._conn is not None:
            try:
                if self._conn_pid == os.getpid():  # never the session a parent still uses
                    self._conn.close()
            finally:
                self._conn = None

    @staticmethod
    async def _drop_async(entry: _LoopConnection) -> None:
        conn, entry.conn = entry.conn, None
        if conn is not None and entry.pid == os.getpid():
            await conn.close()

    def _failed(self, exc: BaseException | None, fired: bool) -> StoreUnavailableError | None:
        """The :class:`StoreUnavailableError` the caller gets for ``exc`` (None: the watchdog
        cut a success short), or None when ``exc`` goes to the caller as it is."""
        if fired:
            return StoreUnavailableError(
                f"PostgreSQL store {self.url} is unavailable: no reply within "
                f"{self.operation_timeout:g} s ({_OPTION}); the connection was closed"
            )
        assert exc is not None
        if isinstance(exc, psycopg.errors.UndefinedTable):
            return StoreUnavailableError(
                f"PostgreSQL store {self.url} is unavailable: {redact(str(exc).strip())} "
                f"(its tables {self.table}_* were dropped and could not be created again; "
                "create them, or let the store's role create them)"
            )
        return self._unavailable(exc) if _is_unavailable(exc) else None

    def _raise(self, exc: BaseException | None, fired: bool) -> NoReturn:
        converted = self._failed(exc, fired)
        if converted is None:
            assert exc is not None
            raise exc
        raise converted from exc

    def _busy(self) -> StoreUnavailableError:
        return StoreUnavailableError(
            f"PostgreSQL store {self.url} is unavailable: its connection has been busy for "
            f"{self.operation_timeout:g} s ({_OPTION}) with another operation"
        )

    def _unavailable(self, exc: BaseException) -> StoreUnavailableError:
        detail = redact(str(exc).strip()) or type(exc).__name__
        return StoreUnavailableError(f"PostgreSQL store {self.url} is unavailable: {detail}")

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
        if self._sweep_due() and self._conn is not None:
            self._sweep_sync()
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
        if self._sweep_due() and self._loop_entry(asyncio.get_running_loop()).conn is not None:
            await self._sweep_async()
        try:
            record: Record = await self._arun(plan, atomic=expected_version is not None)
        except psycopg.DataError:
            plan = self._put_plan(key, data, expected_version, ttl, encoding, as_json=False)
            record = await self._arun(plan, atomic=expected_version is not None)
        return record

    # -- the sweep of expired records (module doc) ----------------------------------------------

    def _sweep_due(self) -> bool:
        """Count a put; whether the sweep is due before it is sent. Before, not after: a
        cancellation landing in the sweep then stops a put not yet made (after, the caller
        would see a put that was made fail, and might make it again). Threads and loops that
        race here at most sweep twice, or once a put late: both harmless."""
        self._since_sweep += 1
        return self._since_sweep >= (_SWEEP_AGAIN if self._sweep_backlog else _SWEEP_EVERY)

    def _sweep_args(self) -> tuple[Callable[[], Plan], float]:
        """The sweep's plan and its bound; counting restarts here."""
        self._since_sweep = 0
        limit = min(self.operation_timeout, _SWEEP_TIMEOUT)
        statement_ms = max(1, int(min(1.0, limit / 2) * 1000))
        lock_ms = max(1, min(int(_SWEEP_LOCK_TIMEOUT * 1000), statement_ms))
        plan = partial(self._sweep, self.clock.wall(), _SWEEP_BATCH, lock_ms, statement_ms)
        return plan, limit

    def _sweep_sync(self) -> None:
        plan, limit = self._sweep_args()
        try:
            outcome = self._run(plan, timeout=limit)
        except Exception as exc:  # the put goes ahead: nothing here may fail it
            self._sweep_failed(exc)
        else:
            self._swept(*outcome)

    async def _sweep_async(self) -> None:
        # A cancellation landing here propagates like any other: the put has not been sent.
        plan, limit = self._sweep_args()
        try:
            outcome = await self._arun(plan, timeout=limit)
        except Exception as exc:
            self._sweep_failed(exc)
        else:
            self._swept(*outcome)

    def _swept(self, deleted: int, indexed: bool) -> None:
        self._sweep_backlog = deleted >= _SWEEP_BATCH
        if not indexed and not self._index_reported:
            self._index_reported = True
            _log.warning(
                "otel_recovery: PostgreSQL store %s: the index %s_records_expiry is missing "
                "(tables created by an older release), so each sweep of expired records scans "
                "the table; create it with: CREATE INDEX CONCURRENTLY IF NOT EXISTS "
                "%s_records_expiry ON %s_records (expires_at) WHERE expires_at IS NOT NULL",
                self.url,
                self.table,
                self.table,
                self.table,
            )

    def _sweep_failed(self, exc: Exception) -> None:
        self._sweep_backlog = False
        detail = redact(str(exc).strip()) or type(exc).__name__
        level = logging.DEBUG if self._sweep_failed_before else logging.WARNING
        self._sweep_failed_before = True
        _log.log(
            level,
            "otel_recovery: PostgreSQL store %s: a sweep of expired records failed (%s); the "
            "put goes ahead, and the records are left for a later sweep%s",
            self.url,
            detail,
            "" if level == logging.DEBUG else " (further failures are logged at debug level)",
        )

    def get(self, key: str, version: int | None = None) -> Record | None:
        check_key(key)
        plan = partial(self._get, key, check_version(version), self.clock.wall())
        found: Record | None = self._run(plan, atomic=False, repeatable=True)
        return found

    async def aget(self, key: str, version: int | None = None) -> Record | None:
        check_key(key)
        plan = partial(self._get, key, check_version(version), self.clock.wall())
        found: Record | None = await self._arun(plan, atomic=False, repeatable=True)
        return found

    def list(self, prefix: str = "") -> builtins.list[Record]:
        plan = partial(self._list, prefix, self.clock.wall())
        found: builtins.list[Record] = self._run(plan, atomic=False, repeatable=True)
        return found

    async def alist(self, prefix: str = "") -> builtins.list[Record]:
        plan = partial(self._list, prefix, self.clock.wall())
        found: builtins.list[Record] = await self._arun(plan, atomic=False, repeatable=True)
        return found

    def delete(self, key: str) -> int:
        check_key(key)
        return int(self._run(partial(self._delete, key, self.clock.wall())))

    async def adelete(self, key: str) -> int:
        check_key(key)
        return int(await self._arun(partial(self._delete, key, self.clock.wall())))

    def incr(
        self, namespace: str, amounts: Mapping[str, float], *, batch_id: str | None = None
    ) -> bool:
        checked = check_amounts(namespace, amounts)
        plan = partial(self._incr, namespace, checked, batch_id, self.clock.wall())
        return bool(self._run(plan))

    async def aincr(
        self, namespace: str, amounts: Mapping[str, float], *, batch_id: str | None = None
    ) -> bool:
        checked = check_amounts(namespace, amounts)
        plan = partial(self._incr, namespace, checked, batch_id, self.clock.wall())
        return bool(await self._arun(plan))

    def counters(self, namespace: str, keys: Iterable[str] | None = None) -> dict[str, float]:
        check_key(namespace, "namespace")
        wanted = None if keys is None else builtins.list(keys)  # an iterator is read once
        plan = partial(self._counters, namespace, wanted)
        found: dict[str, float] = self._run(plan, atomic=False, repeatable=True)
        return found

    async def acounters(
        self, namespace: str, keys: Iterable[str] | None = None
    ) -> dict[str, float]:
        check_key(namespace, "namespace")
        wanted = None if keys is None else builtins.list(keys)
        plan = partial(self._counters, namespace, wanted)
        found: dict[str, float] = await self._arun(plan, atomic=False, repeatable=True)
        return found

    def close(self) -> None:
        """Close the sync connection, and every event loop's that no running operation uses
        (a loop that is closed, or one between operations)."""
        with self._lock:
            self._drop_sync()
        with self._loops_lock:
            for loop, entry in builtins.list(self._aconns.items()):
                if loop.is_closed() or not entry.lock.locked():
                    del self._aconns[loop]
                    entry.release()

    async def aclose(self) -> None:
        loop = asyncio.get_running_loop()
        with self._loops_lock:
            entry = self._aconns.pop(loop, None)
        if entry is not None:
            async with entry.lock:  # after the operation in progress, if any
                await self._drop_async(entry)
            entry.release()
        self.close()

    def __repr__(self) -> str:
        return f"PostgresStore({self.url!r}, table={self.table!r})"
