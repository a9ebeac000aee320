"""Which server a Sentinel-managed Redis client talks to, and noticing when the master moves.

A ``Sentinel(...).master_for("svc")`` client asks the sentinels for the master's address
when it connects, so the server behind it changes with every failover. Its breaker must
follow: one per master *address* (the dead master's circuit must not refuse the new master,
nor stay open after the failover), and a separate one for the service's replicas
(``slave_for``), which a dead master must not refuse either. Before the client has
connected, the master is named after the service.

An open circuit refuses before redis-py connects, so redis-py would never ask the sentinels
again, and the pool's ``master_address`` would keep naming the dead master for as long as
its circuit stays open. So a refused call asks the sentinels itself (:func:`master_moved`,
at most once a second per pool, on the refusal path only); if they name another master,
the call is planned again under the new master's breaker.
"""

from __future__ import annotations

import contextlib
import time
from typing import Any

import redis.asyncio.sentinel
import redis.sentinel

__all__ = ["SENTINEL_POOLS", "amaster_moved", "master_moved", "server_of"]

SENTINEL_POOLS = (
    redis.sentinel.SentinelConnectionPool,
    redis.asyncio.sentinel.SentinelConnectionPool,
)
_ASKED = "_otel_recovery_sentinels_asked"
"""Where a pool keeps when it last asked the sentinels on a refusal (``time.monotonic``)."""
_ASK_EVERY = 1.0
"""Seconds between two such questions from one pool."""


def server_of(pool: Any) -> tuple[str, int | None]:
    """``(host, port)`` of the master a master pool talks to (the service, ``"svc master"``,
    before it has connected), or ``("svc replicas", None)`` for a replica pool."""
    service = str(getattr(pool, "service_name", "redis"))
    if not getattr(pool, "is_master", True):
        return f"{service} replicas", None
    address = pool.master_address
    if isinstance(address, tuple) and len(address) == 2:
        return str(address[0]), int(address[1])
    return f"{service} master", None


def master_moved(client: Any) -> bool:
    """Whether the sentinels now name another master than the one ``client``'s (sync)
    master pool talks to; the pool then talks to the new one. False when it is not such a
    client, was asked less than a second ago, or the sentinels do not answer."""
    pool = _master_pool(client, redis.sentinel.SentinelConnectionPool)
    if pool is None:
        return False
    before = pool.master_address
    try:
        return bool(pool.get_master_address() != before)
    except Exception:  # no sentinel answers: the refusal stands
        return False


async def amaster_moved(client: Any) -> bool:
    """The asyncio twin of :func:`master_moved`."""
    pool = _master_pool(client, redis.asyncio.sentinel.SentinelConnectionPool)
    if pool is None:
        return False
    before = pool.master_address
    try:
        return bool(await pool.get_master_address() != before)
    except Exception:
        return False


def _master_pool(client: Any, kind: type) -> Any:
    pool: Any = getattr(client, "connection_pool", None)
    if not isinstance(pool, kind) or not getattr(pool, "is_master", False):
        return None
    now = time.monotonic()
    if now - getattr(pool, _ASKED, -_ASK_EVERY) < _ASK_EVERY:
        return None
    with contextlib.suppress(Exception):  # a pool with __slots__: ask every time
        setattr(pool, _ASKED, now)
    return pool
