"""Pooled Redis connections that reached a demoted primary: close them, so calls reconnect.

Managed Redis services fail over by moving a DNS name (ElastiCache's primary endpoint,
Azure Cache, a Kubernetes service in front of a Redis operator): the old primary turns into
a replica and the name starts pointing at the new one. A client's pooled connections do not
follow. They stay open to the old primary, which answers every write with ``READONLY`` (and
every read from its copy) until the connection happens to drop. redis-py resends nothing on
an error reply, so without us every write fails until then; with a retry on the same pooled
connection, every resend meets the same replica.

So after an attempt that ``READONLY`` refused (``PolicyCore._after_failure``), the pool's
idle connections are closed, the one that was just refused among them: the resend, or the
next call, opens a new connection, which resolves the name again and reaches the new
primary. Connections other threads or tasks are using are never closed (closing one under a
command would break it, or worse, lose the reply of a write that was applied); each is
closed in turn when a command on it meets ``READONLY``. At most one closing per pool per
second (:data:`CLOSE_EVERY`): while the name still points at the old primary (DNS lags the
failover by seconds), or when an application writes to a read replica on purpose, every
write meets ``READONLY`` on new connections too, and closing the pool for each would only
add a reconnect per write.

Which pools, and why only those:

- A sync ``ConnectionPool`` closes its idle connections under the lock its
  ``get_connection`` takes (``disconnect(inuse_connections=False)``).
- An asyncio ``ConnectionPool`` does not (redis-py 8 closes them in tasks that start after
  others may have taken one), so we close them ourselves while holding the pool's own
  lock, the one its ``get_connection`` takes.
- Not ``BlockingConnectionPool``s: theirs hand connections out under another lock (or
  none), and before redis-py 5 their ``disconnect`` closes connections in use too.
- Not a client made with ``single_connection_client=True``: its one connection carries
  session state the application may have set (a ``MULTI`` sent by hand, ``CLIENT
  TRACKING``), which a silent reconnect would drop.
- Not Sentinel pools (a master pool turns ``READONLY`` into a ``ConnectionError`` and asks
  the sentinels, redis-py's own handling; a replica pool is meant to be read-only), nor
  cluster clients, which follow the cluster's slot map.

The stores' own clients (``stores/redis.py``, the fleet-wide link) close theirs the same
way when a call is refused (:meth:`ReplicaReconnect.close_stale`) and send it once more on
a new connection; where that meets ``READONLY`` too (the name lags), the store reports
itself unavailable and the link degrades, and their next call, or the link's next probe,
reaches the new primary once the name has moved, instead of never.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

import redis.asyncio.connection
import redis.asyncio.sentinel
import redis.connection
import redis.sentinel
from redis.exceptions import ReadOnlyError, ResponseError

from otel_recovery._clock import Clock

__all__ = ["CLOSE_EVERY", "ReplicaReconnect", "closable", "refused_by_replica"]

_log = logging.getLogger("otel_recovery")
CLOSE_EVERY = 1.0
"""Seconds between two closings of one pool's idle connections."""
_CLOSED = "_otel_recovery_replica_closed"
"""Where a pool keeps when its idle connections were last closed (the clock's ``now``)."""
_PLAIN = (redis.connection.ConnectionPool, redis.asyncio.connection.ConnectionPool)
_NOT_CLOSED = (
    redis.connection.BlockingConnectionPool,
    redis.asyncio.connection.BlockingConnectionPool,
    redis.sentinel.SentinelConnectionPool,
    redis.asyncio.sentinel.SentinelConnectionPool,
)


def refused_by_replica(error: BaseException) -> bool:
    """Whether ``error`` is a replica refusing a write: ``READONLY``, or before Redis 7.0,
    where a write refused inside a Lua script comes back as ``ERR Error running script ...
    -READONLY ...`` (a plain ``ResponseError``)."""
    if isinstance(error, ReadOnlyError):
        return True
    return isinstance(error, ResponseError) and "-READONLY " in str(error)


def closable(client: Any) -> bool:
    """Whether ``client``'s connections are of the kind this module closes (a plain pool,
    no connection of its own; see the module doc)."""
    if client is None or getattr(client, "connection", None) is not None:
        return False
    pool = getattr(client, "connection_pool", None)
    return isinstance(pool, _PLAIN) and not isinstance(pool, _NOT_CLOSED)


class ReplicaReconnect:
    """``close_stale(error, client)`` / ``await aclose_stale(error, client)``: close
    ``client``'s idle pooled connections if ``error`` is ``READONLY``. ``mend`` and ``amend``
    are the same for an instrumentor's failed attempt (``args[0]`` is the client)."""

    __slots__ = ("_clock",)

    def __init__(self, clock: Clock) -> None:
        self._clock = clock

    def mend(self, error: BaseException, args: tuple[Any, ...]) -> None:
        self.close_stale(error, args[0] if args else None)

    async def amend(self, error: BaseException, args: tuple[Any, ...]) -> None:
        await self.aclose_stale(error, args[0] if args else None)

    def close_stale(self, error: BaseException, client: Any) -> bool:
        """Whether connections were closed (a call sent now would open a new one); never
        raises (a failure of its own is logged once)."""
        try:
            pool = self._due(error, client, redis.connection.ConnectionPool)
            if pool is None:
                return False
            pool.disconnect(inuse_connections=False)
            return True
        except Exception as problem:
            _failed(problem)
            return False

    async def aclose_stale(self, error: BaseException, client: Any) -> bool:
        """The asyncio twin of :meth:`close_stale`."""
        try:
            pool = self._due(error, client, redis.asyncio.connection.ConnectionPool)
            lock = getattr(pool, "_lock", None)
            idle = getattr(pool, "_available_connections", None)
            if lock is None or not isinstance(idle, list):
                return False
            async with lock:  # get_connection hands out none of them meanwhile
                closing = [connection.disconnect() for connection in idle]
                outcomes = await asyncio.gather(*closing, return_exceptions=True)
            for outcome in outcomes:  # every one was tried; report the first that failed
                if isinstance(outcome, Exception):
                    _failed(outcome)
                    break
            return True
        except Exception as problem:
            _failed(problem)
            return False

    def _due(self, error: BaseException, client: Any, kind: type) -> Any:
        """``client``'s pool, if ``error`` says its connections reached a replica, it is a
        pool of ``kind`` whose idle connections can be closed alone (see the module doc),
        and they were not closed less than :data:`CLOSE_EVERY` ago; else None."""
        if not refused_by_replica(error) or not closable(client):
            return None
        pool = client.connection_pool
        if not isinstance(pool, kind):
            return None
        now = self._clock.now()
        if now - getattr(pool, _CLOSED, -CLOSE_EVERY) < CLOSE_EVERY:
            return None
        with contextlib.suppress(Exception):  # a pool with __slots__: close every time
            setattr(pool, _CLOSED, now)
        return pool


_reported: list[bool] = []


def _failed(problem: Exception) -> None:
    if not _reported:
        _reported.append(True)
        _log.error(
            "otel_recovery: closing Redis connections that reached a replica failed; they "
            "stay open (reported once)",
            exc_info=(type(problem), problem, problem.__traceback__),
        )
