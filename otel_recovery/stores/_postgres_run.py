"""Running one operation of the PostgreSQL store: bounded in time, never done twice.

Every operation of :class:`~otel_recovery.stores.postgres.PostgresStore` goes through
:func:`run` (or :func:`arun`, on the running event loop's connection), which holds it to the
store's promises. It is bounded: the wait for the connection and the operation itself end at
one deadline, which the watchdog (:mod:`._socket_watchdog`) enforces by cutting the socket; a
write cut off so is also ended on the server (:mod:`._postgres_cut`), so that what looks
afterwards sees its final state. It runs again only when the try before provably changed
nothing (:mod:`._postgres_errors`): once when the session ended on the first round trip of a
read or a ``BEGIN``, and once when a table was dropped under the store (created again
first). Any other failure closes the connection and reaches the caller as
:class:`StoreUnavailableError` when it means unavailable, as it is otherwise.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import psycopg

from otel_recovery._clock import within
from otel_recovery.stores._postgres_connections import LoopConnection
from otel_recovery.stores._postgres_cut import backend_of, end_cut_backend, end_cut_backend_async
from otel_recovery.stores._postgres_errors import (
    busy,
    failed,
    raise_failure,
    runs_again,
    table_missing,
)
from otel_recovery.stores._postgres_plans import Plan, Step, drive_async, drive_sync
from otel_recovery.stores._socket_watchdog import WATCHDOG

if TYPE_CHECKING:
    from otel_recovery.stores.postgres import PostgresStore

__all__ = ["arun", "run"]

_log = logging.getLogger("otel_recovery")


def run(
    store: PostgresStore,
    make: Callable[[], Plan],
    *,
    atomic: bool = True,
    repeatable: bool = False,
    timeout: float | None = None,
) -> Any:
    """Run the plan ``make()`` makes on the store's sync connection; ``repeatable``: it
    only reads (see the store's module doc for when an operation runs once more).
    ``timeout`` (default the operation timeout) bounds the wait for the connection and
    the operation."""
    connections = store._connections
    limit = store.operation_timeout if timeout is None else timeout
    if not connections.lock.acquire(timeout=limit):
        raise busy(store)
    try:
        deadline = time.monotonic() + limit
        again = recreated = False
        while True:
            conn, reused = connections.sync(store, deadline)
            step = Step()
            backend = None if repeatable else backend_of(conn)  # see _postgres_cut
            token = WATCHDOG.arm(conn.pgconn.socket, deadline)
            try:
                result = drive_sync(conn, make(), atomic, step)
            except BaseException as exc:
                fired = WATCHDOG.disarm(token)
                if not isinstance(exc, Exception):  # interrupted, cancelled
                    raise
                if fired:  # our socket is cut, its statement not: end it on the server
                    end_cut_backend(store._target, backend, store.url)
                if runs_again(exc, conn, reused, fired, step, atomic, repeatable, again):
                    again = True
                    connections.drop_sync()
                    continue
                if not recreated and table_missing(exc, fired):
                    recreated = True
                    _recreate_sync(store, conn, deadline)
                    continue
                converted = failed(store, exc, fired)
                if converted is None:
                    raise
                connections.drop_sync()
                raise converted from exc
            if WATCHDOG.disarm(token):  # answered just as the watchdog cut it off
                connections.drop_sync()
            return result
    finally:
        connections.lock.release()


def _recreate_sync(store: PostgresStore, conn: psycopg.Connection[Any], deadline: float) -> None:
    token = WATCHDOG.arm(conn.pgconn.socket, deadline)
    try:
        drive_sync(conn, store._schema())
    except BaseException as exc:
        fired = WATCHDOG.disarm(token)
        if not isinstance(exc, Exception):
            raise
        store._connections.drop_sync()
        raise_failure(store, exc, fired)
    if WATCHDOG.disarm(token):
        store._connections.drop_sync()
    _recreated(store)


async def arun(
    store: PostgresStore,
    make: Callable[[], Plan],
    *,
    atomic: bool = True,
    repeatable: bool = False,
    timeout: float | None = None,
) -> Any:
    """:func:`run` on the running event loop's connection."""
    connections = store._connections
    limit = store.operation_timeout if timeout is None else timeout
    entry = connections.loop_entry(asyncio.get_running_loop())
    lock = entry.lock
    if lock.locked():
        await _wait_turn(store, lock, limit)
    else:
        await lock.acquire()
    try:
        deadline = time.monotonic() + limit
        again = recreated = False
        while True:
            conn, reused = await connections.of_loop(store, entry, deadline)
            step = Step()
            backend = None if repeatable else backend_of(conn)  # see _postgres_cut
            token = WATCHDOG.arm(conn.pgconn.socket, deadline)
            try:
                result = await drive_async(conn, make(), atomic, step)
            except BaseException as exc:
                fired = WATCHDOG.disarm(token)
                if not isinstance(exc, Exception):  # interrupted, cancelled
                    raise
                if fired:  # our socket is cut, its statement not: end it on the server
                    await end_cut_backend_async(store._target, backend, store.url)
                if runs_again(exc, conn, reused, fired, step, atomic, repeatable, again):
                    again = True
                    await connections.drop_async(entry)
                    continue
                if not recreated and table_missing(exc, fired):
                    recreated = True
                    await _recreate_async(store, entry, conn, deadline)
                    continue
                converted = failed(store, exc, fired)
                if converted is None:
                    raise
                await connections.drop_async(entry)
                raise converted from exc
            if WATCHDOG.disarm(token):
                await connections.drop_async(entry)
            return result
    finally:
        lock.release()


async def _wait_turn(store: PostgresStore, lock: asyncio.Lock, limit: float) -> None:
    """Take the loop's connection lock within ``limit`` seconds, keeping a
    cancellation that lands as the lock comes (:func:`~otel_recovery._clock.within`): a
    task cancelled then must not run its write anyway."""
    try:
        await within(limit, lock.acquire())
    except asyncio.TimeoutError:
        raise busy(store) from None


async def _recreate_async(
    store: PostgresStore,
    entry: LoopConnection,
    conn: psycopg.AsyncConnection[Any],
    deadline: float,
) -> None:
    token = WATCHDOG.arm(conn.pgconn.socket, deadline)
    try:
        await drive_async(conn, store._schema())
    except BaseException as exc:
        fired = WATCHDOG.disarm(token)
        if not isinstance(exc, Exception):
            raise
        await store._connections.drop_async(entry)
        raise_failure(store, exc, fired)
    if WATCHDOG.disarm(token):
        await store._connections.drop_async(entry)
    _recreated(store)


def _recreated(store: PostgresStore) -> None:
    _log.warning(
        "otel_recovery: PostgreSQL store %s: a table was missing (dropped?); created the "
        "missing tables again",
        store.url,
    )
