"""A pooled Redis connection that reached a replica: reconnect before sending again.

Managed Redis services fail over by moving a DNS name (ElastiCache's primary endpoint,
Azure Cache, a Kubernetes service in front of a Redis operator): the old primary turns into
a replica and the name starts pointing at the new one. A client's pooled connections do not
follow. They stay open to the old primary, which answers every write with ``READONLY`` (and
every read from its copy) until the connection happens to drop. redis-py resends nothing on
an error reply, so without us every write fails until then; with a retry on the same pooled
connection, every resend meets the same replica.

So before a call that ``READONLY`` refused is sent again (``PolicyCore._before_resend``),
the client's idle pooled connections are closed, the one that just failed among them: the
resend opens a new connection, which resolves the name again and reaches the new primary.
Connections other threads or tasks are using are left alone (closing one under a command
would break it); each is closed in turn when a command on it meets ``READONLY``. At most one
closing per pool per second (:data:`CLOSE_EVERY`): while the name still points at the old
primary (DNS lags the failover by seconds), or when an application writes to a read
replica on purpose, every write meets ``READONLY`` on new connections too, and closing the
pool for each would only add a reconnect per write.

Only plain pools: a Sentinel master pool turns ``READONLY`` into a ``ConnectionError`` and
reconnects to the master the sentinels name (redis-py's own handling), a Sentinel replica
pool is meant to be read-only, and cluster clients follow the cluster's slot map.
A ``READONLY`` reply proves the command did not run, so even a command that may not be
repeated (``INCR``) is sent again after it (``never_ran`` of the Redis instrumentor).

The stores' own clients (``stores/redis.py``, the fleet-wide link) close theirs the same
way when a call is refused (:meth:`ReplicaReconnect.close_stale`) and send it once more on
a new connection; where that meets ``READONLY`` too (the name lags), the store reports
itself unavailable and the link degrades, and their next call, or the link's next probe,
reaches the new primary once the name has moved, instead of never.
"""

from __future__ import annotations

import contextlib
import inspect
from typing import Any

import redis.asyncio.connection
import redis.asyncio.sentinel
import redis.connection
import redis.sentinel
from redis.exceptions import ReadOnlyError

from otel_recovery._clock import Clock

__all__ = ["CLOSE_EVERY", "ReplicaReconnect"]

CLOSE_EVERY = 1.0
"""Seconds between two closings of one pool's idle connections."""
_CLOSED = "_otel_recovery_replica_closed"
"""Where a pool keeps when its idle connections were last closed (the clock's ``now``)."""
_PLAIN_POOLS = (redis.connection.ConnectionPool, redis.asyncio.connection.ConnectionPool)
_SENTINEL_POOLS = (
    redis.sentinel.SentinelConnectionPool,
    redis.asyncio.sentinel.SentinelConnectionPool,
)


class ReplicaReconnect:
    """``close_stale(error, client)`` / ``await aclose_stale(error, client)``: close
    ``client``'s idle pooled connections if ``error`` is ``READONLY``. ``mend`` and ``amend``
    are the same for an instrumentor's call (``args[0]`` is the client), before its resend."""

    __slots__ = ("_clock",)

    def __init__(self, clock: Clock) -> None:
        self._clock = clock

    def mend(self, error: BaseException, args: tuple[Any, ...]) -> None:
        self.close_stale(error, args[0] if args else None)

    async def amend(self, error: BaseException, args: tuple[Any, ...]) -> None:
        await self.aclose_stale(error, args[0] if args else None)

    def close_stale(self, error: BaseException, client: Any) -> bool:
        """Whether connections were closed (a call sent now would open a new one)."""
        pool, single = self._stale(error, client)
        if single is not None:
            single.disconnect()
        elif pool is not None and _closes_idle_only(type(pool)):
            pool.disconnect(inuse_connections=False)
        else:
            return False
        return True

    async def aclose_stale(self, error: BaseException, client: Any) -> bool:
        pool, single = self._stale(error, client)
        if single is not None:
            await single.disconnect()
        elif pool is not None:
            await pool.disconnect(inuse_connections=False)
        else:
            return False
        return True

    def _stale(self, error: BaseException, client: Any) -> tuple[Any, Any]:
        """The plain pool to close the idle connections of (or the client's own single
        connection, second), when ``error`` says they reached a replica and the pool was
        not closed less than :data:`CLOSE_EVERY` ago."""
        if not isinstance(error, ReadOnlyError) or client is None:
            return None, None
        pool = getattr(client, "connection_pool", None)
        if not isinstance(pool, _PLAIN_POOLS) or isinstance(pool, _SENTINEL_POOLS):
            return None, None
        now = self._clock.now()
        if now - getattr(pool, _CLOSED, -CLOSE_EVERY) < CLOSE_EVERY:
            return None, None
        with contextlib.suppress(Exception):  # a pool with __slots__: close every time
            setattr(pool, _CLOSED, now)
        # a client made with single_connection_client=True keeps one connection of its own
        return pool, getattr(client, "connection", None)


_IDLE_ONLY: dict[type, bool] = {}


def _closes_idle_only(kind: type) -> bool:
    """Whether a sync pool type can close its idle connections alone: before redis-py 5,
    ``BlockingConnectionPool.disconnect()`` closes every connection, those in use too."""
    known = _IDLE_ONLY.get(kind)
    if known is None:
        disconnect = getattr(kind, "disconnect", None)
        known = disconnect is not None and (
            "inuse_connections" in inspect.signature(disconnect).parameters
        )
        _IDLE_ONLY[kind] = known
    return known
