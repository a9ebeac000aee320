"""Ending, on the server, a write the watchdog cut off on the client.

The watchdog (:mod:`._socket_watchdog`) bounds an operation by shutting its socket down;
that ends the wait of our thread, not the statement. A plain put is one autocommit
statement: blocked on the key's row lock (another writer's long transaction), it goes on
waiting on the server after the caller was told it failed, and commits when the lock comes
free. The caller's layer treats the failure as "maybe applied, look before writing again"
(a :class:`~otel_recovery.stores.ResilientStore` replays it after looking), but a statement
still waiting when the replay looks lands after it: written twice.

So once a write has been cut off, its backend is ended from a new session:
``pg_terminate_backend(pid, timeout)`` (PostgreSQL 14+) returns when the backend has exited,
so by then the statement either committed or never will, and whatever looks afterwards sees
the final state; before 14 there is no wait, and the signal is sent. Terminating, not
cancelling: our side of that session is gone anyway. A role may end its own role's
backends, so no privilege beyond the store's own is needed.

This runs only on the failure path, and is itself bounded: the new session's connect by
``connect_timeout``, its statement by the watchdog. When it cannot reach the server either
(the server is partitioned off or frozen), the statement's fate is unknown, as it was
before; a warning says so.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import psycopg

from otel_recovery._redact import redact
from otel_recovery.stores._socket_watchdog import WATCHDOG

__all__ = ["STOP_WAIT", "Backend", "backend_of", "end_cut_backend", "end_cut_backend_async"]

_log = logging.getLogger("otel_recovery")

STOP_WAIT = 2.0
"""Seconds at most for the new session to connect, and again for the backend to exit."""

Backend = tuple[int, int]
"""A session's backend pid and the server's version number (``150004`` for 15.4)."""

_WAITS_FOR_EXIT = 140000
"""The server version from which ``pg_terminate_backend`` takes a timeout and waits."""


def _statement(pid: int, server_version: int) -> tuple[str, tuple[int, ...]]:
    if server_version >= _WAITS_FOR_EXIT:
        return "SELECT pg_terminate_backend(%s, %s)", (pid, int(STOP_WAIT * 1000))
    return "SELECT pg_terminate_backend(%s)", (pid,)


def backend_of(conn: psycopg.Connection[Any] | psycopg.AsyncConnection[Any]) -> Backend | None:
    """The backend pid and server version of ``conn``, read before a write is sent: once
    the watchdog has cut the socket, libpq no longer knows them."""
    try:
        pid, version = int(conn.info.backend_pid), int(conn.info.server_version)
    except Exception:  # a connection libpq has already let go of
        return None
    return (pid, version) if pid > 0 else None


def end_cut_backend(target: str, backend: Backend | None, url: str) -> None:
    """End ``backend``, whose write the watchdog cut off (see the module doc)."""
    if backend is None:
        return
    statement, params = _statement(*backend)
    try:
        with psycopg.connect(target, autocommit=True, connect_timeout=int(STOP_WAIT)) as admin:
            token = WATCHDOG.arm(admin.pgconn.socket, time.monotonic() + 2 * STOP_WAIT)
            try:
                admin.execute(statement, params)
            finally:
                WATCHDOG.disarm(token)
    except Exception as error:
        _warn(url, backend[0], error)


async def end_cut_backend_async(target: str, backend: Backend | None, url: str) -> None:
    """The async twin of :func:`end_cut_backend`."""
    if backend is None:
        return
    statement, params = _statement(*backend)
    try:
        admin = await psycopg.AsyncConnection.connect(
            target, autocommit=True, connect_timeout=int(STOP_WAIT)
        )
        async with admin:
            token = WATCHDOG.arm(admin.pgconn.socket, time.monotonic() + 2 * STOP_WAIT)
            try:
                await admin.execute(statement, params)
            finally:
                WATCHDOG.disarm(token)
    except Exception as error:
        _warn(url, backend[0], error)


def _warn(url: str, pid: int, error: Exception) -> None:
    _log.warning(
        "otel_recovery: PostgreSQL store %s: a write was cut off at its timeout and its "
        "server session (pid %d) could not be ended (%s); the write may still be applied "
        "when the server gets to it",
        url, pid, redact(str(error).strip()) or type(error).__name__,
    )  # fmt: skip
