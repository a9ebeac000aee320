"""Which server a Sentinel-managed Redis client talks to, and noticing when the master moves.

A ``Sentinel(...).master_for("svc")`` client asks the sentinels for the master's address
when it connects, so the server behind it changes with every failover. Its breaker must
follow: one per master *address* (the dead master's circuit must not refuse the new master,
nor stay open after the failover), and a separate one for the service's replicas
(``slave_for``), which a dead master must not refuse either. Before the client has
connected, the master is named after the service.

A service name is not unique: every deployment may call its master ``mymaster`` (Redis's own
example, and what most use), so the names of the replicas and of the master not yet
connected carry the deployment too, its sentinels' addresses sorted
(``mymaster replicas@10.0.0.1:26379,10.0.0.2:26379``): another deployment's dead replicas
must not refuse this one's. All the clients of one deployment (every ``Sentinel`` given the
same sentinels) share the one breaker of its replicas. The names are worked out once per
pool (the sentinels a ``Sentinel`` was given do not change) and bounded
(:data:`_MOST_CHARACTERS`); addresses hold no password.

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

__all__ = ["SENTINEL_POOLS", "amaster_moved", "deployment_of", "master_moved", "server_of"]

SENTINEL_POOLS = (
    redis.sentinel.SentinelConnectionPool,
    redis.asyncio.sentinel.SentinelConnectionPool,
)
_ASKED = "_otel_recovery_sentinels_asked"
"""Where a pool keeps when it last asked the sentinels on a refusal (``time.monotonic``)."""
_ASK_EVERY = 1.0
"""Seconds between two such questions from one pool."""
_NAMES = "_otel_recovery_sentinel_names"
"""Where a pool keeps its names: ``(replicas, master not yet connected)``."""
_MOST_CHARACTERS = 200
"""Sentinel addresses past this length in a name are only counted (``,+2 more``)."""


def server_of(pool: Any) -> tuple[str, int | None]:
    """``(host, port)`` of the master a master pool talks to (the service and its
    deployment, ``"svc master@sentinels"``, before it has connected), or
    ``("svc replicas@sentinels", None)`` for a replica pool."""
    names: tuple[str, str] | None = getattr(pool, _NAMES, None)
    if names is None:
        names = _names(pool)
        with contextlib.suppress(Exception):  # a pool with __slots__: work them out each time
            setattr(pool, _NAMES, names)
    if not getattr(pool, "is_master", True):
        return names[0], None
    address = pool.master_address
    if isinstance(address, tuple) and len(address) == 2:
        return str(address[0]), int(address[1])
    return names[1], None


def _names(pool: Any) -> tuple[str, str]:
    """The names of a pool's replicas and of its master before it has connected."""
    service = str(getattr(pool, "service_name", "redis"))
    deployment = deployment_of(pool)
    where = f"@{deployment}" if deployment else ""
    return f"{service} replicas{where}", f"{service} master{where}"


def deployment_of(pool: Any) -> str:
    """The sentinels a Sentinel pool asks, as ``host:port`` sorted and comma-separated (an
    IPv6 host in brackets), at most :data:`_MOST_CHARACTERS` of them and then how many more;
    ``""`` when they cannot be read."""
    try:
        sentinels = list(pool.sentinel_manager.sentinels)
    except Exception:
        return ""
    addresses = sorted({address for s in sentinels if (address := _address_of(s))})
    shown: list[str] = []
    length = 0
    for address in addresses:
        if shown and length + len(address) + 1 > _MOST_CHARACTERS:
            break
        shown.append(address)
        length += len(address) + 1
    left = len(addresses) - len(shown)
    return ",".join(shown) + (f",+{left} more" if left else "")


def _address_of(sentinel: Any) -> str | None:
    try:
        kwargs = sentinel.connection_pool.connection_kwargs
        host, port = kwargs.get("host"), kwargs.get("port")
    except Exception:
        return None
    if not host:
        return None
    host = str(host)[:_MOST_CHARACTERS]
    host = f"[{host}]" if ":" in host else host
    return f"{host}:{port}" if port is not None else host


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
