"""The Redis store's asyncio clients, one per event loop, and closing those of closed loops.

A ``redis.asyncio`` client belongs to the event loop it first ran on, and each
``asyncio.run`` makes a new loop: a process that runs several (a CLI, a test suite, a sync
application calling ``asyncio.run`` now and then) leaves one client per closed loop, with an
open connection to the server each, until it is collected and warns ``ResourceWarning:
unclosed ...`` (for the connection, its stream writer, its transport and its socket).

redis-py closes a connection only with ``await``, which a closed loop can no longer run, and
``transport.close()`` itself hands the rest of the closing to the loop (which refuses). So
:func:`close_clients_of_closed_loops` does synchronously what the loop would have done:
``close()`` marks each transport closing (its hand-over fails on the closed loop), then the
transport's own ``_call_connection_lost`` closes the socket, and the connection forgets its
streams, so redis-py sees it disconnected and nothing is left to warn. Nothing is sent on the
connection: the server sees a client that went away. A forked child that shares the socket
only drops its own descriptor; the parent's session goes on.

Only clients of loops that are *closed* are touched: nothing can be running a command on
them, and a closed loop is never opened again, so a client is closed at most once. A client
of a loop still open (one that runs now, in this thread or another, or will run again) is
left alone: a command may be in flight on it.

Why not a ``weakref.finalize`` on the loop, as the PostgreSQL store has: an open asyncio
connection refers to its loop (the transport, the streams), so while it is open the loop is
never collected and such a finalizer never runs. The store instead closes these clients
when a new loop first uses it, in ``close()``, and when the store itself is collected.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import weakref
from typing import Any, TypeAlias

import redis.asyncio
from redis.commands.core import AsyncScript

__all__ = ["LoopClient", "LoopClients", "close_clients_of_closed_loops", "close_without_loop"]


class LoopClient:
    """The asyncio client of one event loop, and the Lua scripts registered on it."""

    __slots__ = ("client", "scripts")

    def __init__(self, client: redis.asyncio.Redis) -> None:
        self.client = client
        self.scripts: dict[str, AsyncScript] = {}


LoopClients: TypeAlias = "weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, LoopClient]"
"""A store's clients by loop (weak: a loop collected takes its client along)."""


def close_clients_of_closed_loops(clients: LoopClients) -> None:
    """Forget and close (without their loop) the clients whose loop has been closed.

    The caller holds the store's lock, or the store is gone (its finalizer); never raises."""
    for loop, entry in builtins.list(clients.items()):
        if loop.is_closed():
            del clients[loop]
            close_without_loop(entry.client)


def close_without_loop(client: Any) -> None:
    """Close every connection of ``client``, whose event loop has been closed, without it;
    never raises (a connection that cannot be closed so is left to the garbage collector)."""
    connections: dict[int, Any] = {}
    pool = getattr(client, "connection_pool", None)
    # the pool's idle and in-use connections (and a redis-py 4 BlockingConnectionPool's
    # list of all it made); the client's own, with single_connection_client=True
    for attribute in ("_available_connections", "_in_use_connections", "_connections"):
        with contextlib.suppress(Exception):
            connections.update((id(c), c) for c in builtins.list(getattr(pool, attribute, ())))
    own = getattr(client, "connection", None)
    if own is not None:
        connections[id(own)] = own
    for connection in connections.values():
        _disconnect(connection)
    if own is not None:
        with contextlib.suppress(Exception):
            client.connection = None  # else the client warns "Unclosed client session"


def _disconnect(connection: Any) -> None:
    """What ``await connection.disconnect()`` does, without awaiting."""
    writer = getattr(connection, "_writer", None)
    if writer is None:
        return  # never connected, or already closed
    with contextlib.suppress(Exception):
        _close_transport(writer.transport)
    with contextlib.suppress(Exception):
        connection._parser.on_disconnect()
    with contextlib.suppress(Exception):
        connection._reader = connection._writer = None


def _close_transport(transport: Any) -> None:
    """Close ``transport`` (and, under TLS, the socket's transport beneath it) now."""
    with contextlib.suppress(Exception):
        transport.close()  # marks it closing; the loop it hands the rest to refuses
    beneath = getattr(getattr(transport, "_ssl_protocol", None), "_transport", None)
    if beneath is not None:
        _close_transport(beneath)
    if getattr(transport, "_sock", None) is not None:
        # the callback close() schedules: tells the protocol, then closes the socket (in a
        # finally, so even when telling the protocol fails on the closed loop)
        with contextlib.suppress(Exception):
            transport._call_connection_lost(None)
