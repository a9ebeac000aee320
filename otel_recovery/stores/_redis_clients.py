"""The Redis store's own clients: redis-py's, beneath every wrapper, never on an ended connection.

Two things make the store's clients differ from the application's, both about the path a
store command takes to the server.

**Plain.** Store traffic must make no span and no retry of anyone's, so the store's clients
(:class:`PlainRedis`, :class:`PlainAsyncRedis`) bind redis-py's own ``execute_command``, as it
was before any instrumentation wrapped it.

**Never on an ended connection.** A pooled connection the server closed while it was idle
(``CLIENT KILL``, the server's ``timeout``, a restart or failover) must never carry a
command. The sync pool checks each connection's socket before handing it out. The asyncio
pool checks only what its event loop has already read, so a connection whose end has not yet
been read (the loop did not run since) would carry the command to a closed session and fail
with "Connection closed by server". So before each asyncio call the store has
:func:`disconnect_ended` poll the sockets of the idle pooled connections (zero wait, one
system call): one with data or its end waiting, unasked, is disconnected under the pool's
lock, and the pool connects it again when it is handed out. Nothing was sent on it, so
nothing is sent twice.
"""

from __future__ import annotations

import inspect
import select
from typing import Any

import redis
import redis.asyncio

from otel_recovery._redis_replica import closable

__all__ = ["PlainAsyncRedis", "PlainRedis", "connection_ended", "disconnect_ended"]


class PlainRedis(redis.Redis):
    """The store's client: its commands skip every wrapper on ``Redis.execute_command``.

    Store traffic must make no span and no retry of anyone's. Our instrumentors and contrib's
    redis instrumentation from 0.60b0 honour suppressed instrumentation; earlier contrib
    releases trace every command regardless. So the store binds redis-py's own method, as it
    was before anything wrapped it, on a class of its own.
    """

    execute_command = inspect.unwrap(redis.Redis.execute_command)


class PlainAsyncRedis(redis.asyncio.Redis):
    """:class:`PlainRedis` for asyncio."""

    execute_command = inspect.unwrap(redis.asyncio.Redis.execute_command)


async def disconnect_ended(client: redis.asyncio.Redis) -> None:
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
        ended = [connection for connection in idle if connection_ended(connection)]
        if not ended:
            return
        async with lock:  # get_connection hands none of them out meanwhile
            for connection in ended:
                if connection in idle:
                    await connection.disconnect()
    except Exception:  # the call goes on as without the check
        return


def connection_ended(connection: Any) -> bool:
    """Whether the socket of an asyncio ``connection`` has data or its end waiting, unread."""
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
