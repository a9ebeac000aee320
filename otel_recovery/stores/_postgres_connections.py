"""The PostgreSQL store's connections: one its threads take turns on, and one per event loop.

A ``psycopg.Connection`` runs one operation at a time, so a store's threads take turns on one
(under :attr:`Connections.lock`); an ``AsyncConnection`` belongs to the event loop it was
opened on, so each loop has its own, with an ``asyncio.Lock`` its tasks take turns with
(:class:`LoopConnection`). Either is opened by the first operation that needs it and kept
only once its schema check passed, under that operation's deadline; one whose check failed
is closed, so the next connection tries again.

A kept connection is used again only while it is idle and its server has said nothing since
the last reply (:func:`stale`: a session the server ended while it was idle is replaced
before anything is sent on it). One inherited across ``fork()`` is the parent's session, on
a socket the parent still uses: the child neither uses nor closes it, and opens its own.

A loop's connection is closed without its loop (which may already be closed) when the loop
is collected, when a new loop first uses the store and finds loops closed meanwhile, or by
:meth:`Connections.close`, which leaves alone only a connection an operation of a running
loop is using.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import os
import weakref
from typing import TYPE_CHECKING, Any

import psycopg
from psycopg.pq import ConnStatus, TransactionStatus

from otel_recovery._forksafe import new_lock
from otel_recovery.stores._postgres_errors import UNAVAILABLE, raise_failure, unavailable
from otel_recovery.stores._postgres_plans import drive_async, drive_sync
from otel_recovery.stores._socket_watchdog import WATCHDOG, readable

if TYPE_CHECKING:
    from otel_recovery.stores.postgres import PostgresStore

__all__ = ["Connections", "LoopConnection", "stale"]


def stale(conn: psycopg.Connection[Any] | psycopg.AsyncConnection[Any]) -> bool:
    """An idle connection that must not be used: closed, not idle, or the server said
    something unasked since the last reply (its termination notice, or end of file)."""
    pgconn = conn.pgconn
    if pgconn.status != ConnStatus.OK or pgconn.transaction_status != TransactionStatus.IDLE:
        return True
    try:
        return readable(pgconn.socket)
    except (OSError, psycopg.Error):
        return True


class LoopConnection:
    """The connection of one event loop, and the lock its operations take turns with."""

    __slots__ = ("conn", "lock", "pid", "release")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.lock = asyncio.Lock()
        self.conn: psycopg.AsyncConnection[Any] | None = None
        self.pid = os.getpid()
        # finish() when the loop is collected; calling it finishes now and forgets the loop
        # (the lock may refer to it: the registry must not keep it alive)
        self.release = weakref.finalize(loop, LoopConnection.finish, self)

    def finish(self) -> None:
        """Close the connection without its loop (it is closed, or not using it)."""
        conn, self.conn = self.conn, None
        if conn is not None and self.pid == os.getpid():  # never a parent's session
            with contextlib.suppress(Exception):  # closing what may already be gone
                conn.pgconn.finish()


class Connections:
    """The connections of one store: the sync one and each event loop's."""

    def __init__(self) -> None:
        self.lock = new_lock()
        """Held by a sync operation while it runs (the sync connection's turn)."""
        self.conn: psycopg.Connection[Any] | None = None
        self.pid = 0  # the process that opened conn (a forked child must not use it)
        self.loops: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, LoopConnection]
        self.loops = weakref.WeakKeyDictionary()
        self.loops_lock = new_lock()

    def sync(self, store: PostgresStore, deadline: float) -> tuple[psycopg.Connection[Any], bool]:
        """The connection to use (True: one used before), opened and checked if needed."""
        if self.conn is not None and self.pid != os.getpid():
            # Inherited across fork(): the parent's session, on a socket the parent
            # still uses. Never used or closed here (psycopg does not close it when
            # it is collected in another process); this process opens its own.
            self.conn = None
        if self.conn is not None:
            if not stale(self.conn):
                return self.conn, True
            self.drop_sync()  # ended by the server while idle: nothing was sent on it
        try:
            conn = psycopg.connect(
                store._target, autocommit=True, connect_timeout=int(store._timeout)
            )
        except UNAVAILABLE as exc:
            raise unavailable(store, exc) from exc
        token = WATCHDOG.arm(conn.pgconn.socket, deadline)
        try:
            if not drive_sync(conn, store._schema_ready(), False):
                drive_sync(conn, store._schema())
        except BaseException as exc:
            fired = WATCHDOG.disarm(token)
            conn.close()  # the next connection checks the schema again
            if not isinstance(exc, Exception):
                raise
            raise_failure(store, exc, fired)
        if WATCHDOG.disarm(token):
            conn.close()
            raise_failure(store, None, True)
        self.conn, self.pid = conn, os.getpid()
        return conn, False

    async def of_loop(
        self, store: PostgresStore, entry: LoopConnection, deadline: float
    ) -> tuple[psycopg.AsyncConnection[Any], bool]:
        """The connection of ``entry``'s loop, as :meth:`sync` (the caller holds its lock)."""
        if entry.pid != os.getpid():  # a forked child: never the parent's session
            entry.conn, entry.pid = None, os.getpid()
        if entry.conn is not None:
            if not stale(entry.conn):
                return entry.conn, True
            await self.drop_async(entry)
        try:
            conn = await psycopg.AsyncConnection.connect(
                store._target, autocommit=True, connect_timeout=int(store._timeout)
            )
        except UNAVAILABLE as exc:
            raise unavailable(store, exc) from exc
        token = WATCHDOG.arm(conn.pgconn.socket, deadline)
        try:
            if not await drive_async(conn, store._schema_ready(), False):
                await drive_async(conn, store._schema())
        except BaseException as exc:
            fired = WATCHDOG.disarm(token)
            conn.pgconn.finish()  # no await: this may be a cancellation
            if not isinstance(exc, Exception):
                raise
            raise_failure(store, exc, fired)
        if WATCHDOG.disarm(token):
            await conn.close()
            raise_failure(store, None, True)
        entry.conn = conn
        return conn, False

    def loop_entry(self, loop: asyncio.AbstractEventLoop) -> LoopConnection:
        with self.loops_lock:  # not self.lock, which a sync operation holds while it runs
            entry = self.loops.get(loop)
            if entry is not None:
                return entry
            # A new loop: connections of loops that have been closed meanwhile (each
            # asyncio.run makes one) will never be used again.
            for old_loop, old in builtins.list(self.loops.items()):
                if old_loop.is_closed():
                    del self.loops[old_loop]
                    old.release()
            entry = self.loops[loop] = LoopConnection(loop)
            return entry

    def drop_sync(self) -> None:
        if self.conn is not None:
            try:
                if self.pid == os.getpid():  # never the session a parent still uses
                    self.conn.close()
            finally:
                self.conn = None

    @staticmethod
    async def drop_async(entry: LoopConnection) -> None:
        conn, entry.conn = entry.conn, None
        if conn is not None and entry.pid == os.getpid():
            await conn.close()

    def close(self) -> None:
        """Close the sync connection, and every event loop's that no running operation uses
        (a loop that is closed, or one between operations)."""
        with self.lock:
            self.drop_sync()
        with self.loops_lock:
            for loop, entry in builtins.list(self.loops.items()):
                if loop.is_closed() or not entry.lock.locked():
                    del self.loops[loop]
                    entry.release()

    async def close_loop(self) -> None:
        """Close the running loop's connection, after the operation in progress, if any."""
        loop = asyncio.get_running_loop()
        with self.loops_lock:
            entry = self.loops.pop(loop, None)
        if entry is not None:
            async with entry.lock:  # after the operation in progress, if any
                await self.drop_async(entry)
            entry.release()
