"""``RedisRecoveryInstrumentor``: redis-py commands and pipelines recover inline, safely.

Patch points are the contrib instrumentor's own (research/otel-conventions.md section 2.3):
``Redis.execute_command``, ``Pipeline.execute`` and ``Pipeline.immediate_execute_command``,
``RedisCluster.execute_command`` and ``ClusterPipeline.execute``, each sync and asyncio. Our
wrapper is spliced *beneath* contrib's whichever instruments first, so contrib's single
``GET``/``SET`` CLIENT span covers every attempt and carries our events, as the database
conventions ask. Without contrib, a call that needs recovery opens its own
``recover redis <host>:<port>`` span.

What is retried (:mod:`._redis_commands` has the list): read commands and idempotent writes;
never ``INCR``/``LPUSH``/``EVAL``-like commands, never a transactional pipeline (MULTI/EXEC,
redis-py's default ``pipeline()``), never a command issued while WATCHing, and never a
non-transactional pipeline holding any command off the list. redis-py empties a pipeline when
``execute()`` fails, so a retried pipeline is refilled with the same commands first. (A
cluster pipeline re-sends its failed commands one by one through
``RedisCluster.execute_command`` by itself; there the per-command rules apply.)

redis-py retries too: each connection has a ``Retry`` (redis 8: 10 retries with jittered
backoff by default) that reconnects and resends *any* command, ``INCR`` included, on
``ConnectionError``/``TimeoutError``. Our retry is one level up, per logical command, and
counts attempts as calls into redis-py. Stacking both would multiply attempts (3 x 11 sends),
so a failure that redis-py's ``Retry`` already repeated is not repeated again: it is
classified, counted on the breaker and marked ``otel_recovery.retry.disallowed=client_retried``
with ``otel_recovery.redis.client_retries`` on the span. We still retry what redis-py's
connection retry never does (``LOADING``, ``TRYAGAIN``, ``MASTERDOWN``, ``READONLY``...) and,
on a client built with ``retry=Retry(NoBackoff(), 0)``, connection failures too. That client
setting is the way to make otel-recovery the only retry layer, and the only one that never
resends a non-idempotent command. Cluster clients are treated alike, with the cluster's own
``retry`` and ``ERRORS_ALLOW_RETRY``.

An application's own connection pool with nothing to give (a ``BlockingConnectionPool`` past
its ``timeout``, a pool at its ``max_connections``) is not the server's failure: the command
never left the client, so it is neither retried nor counted on the server's breaker
(:func:`~._redis_errors.pool_exhausted`), and the application gets redis-py's error after
the pool's own wait.

redis-py's MultiDB client (``MultiDBClient``, sync and asyncio) is a failure detector of its
own: its health checks run under ``suppress_recovery()``, so they see each server as it is,
while the application's commands through it still recover here (:mod:`._redis_multidb`).
When it sends those commands to a database again (a failover, a fail-back), our open circuit
for the database's servers lets the next command through as its probe instead of refusing
it (:mod:`._redis_multidb_routing`).
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import redis.asyncio.client
import redis.asyncio.cluster
import redis.client
import redis.cluster
from redis.exceptions import (
    BusyLoadingError,
    ClusterDownError,
    MasterDownError,
    ReadOnlyError,
    TryAgainError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from otel_recovery._clock import Clock
from otel_recovery._redis_replica import ReplicaReconnect
from otel_recovery.instrumentors._base import RecoveryInstrumentor
from otel_recovery.instrumentors._redis_errors import RedisPolicy
from otel_recovery.instrumentors._redis_layers import Kind, SiteLayers
from otel_recovery.instrumentors._redis_mends import hold_back_unproven, keep_to_the_session
from otel_recovery.instrumentors._redis_multidb import MULTIDB_HEALTH_CHECKS
from otel_recovery.instrumentors._redis_multidb_routing import MULTIDB_ROUTING
from otel_recovery.instrumentors._redis_plans import Planner
from otel_recovery.instrumentors._redis_targets import Resolve, cluster_target, standalone_target
from otel_recovery.instrumentors._span_mode import Site
from otel_recovery.instrumentors._target_policy import AMend, Mend, TargetPolicy
from otel_recovery.instrumentors._targets import TargetPolicies
from otel_recovery.instrumentors._wrapping import PatchSet
from otel_recovery.policies.circuit_breaker import CircuitOpenError

__all__ = ["RedisCircuitOpenError", "RedisRecoveryInstrumentor"]


class RedisCircuitOpenError(CircuitOpenError, RedisConnectionError):
    """The server's circuit is open, so the command was not sent.

    Also a ``redis.ConnectionError``, what redis-py raises when it cannot reach the server:
    ``except redis.RedisError`` catches it, and so do the frameworks that recover from a lost
    connection by reconnecting (kombu and Celery's worker, RQ's worker), which a plain
    ``CircuitOpenError`` stopped for good. Redis Cluster clients keep the plain
    ``CircuitOpenError``: redis-py's cluster pipeline resends its whole stack, non-idempotent
    commands included, on a ``ConnectionError`` raised inside it, and its resend of a MOVED
    command runs through our ``RedisCluster.execute_command`` layer, so a half-open or newly
    opened circuit would have INCRs applied up to ten times.
    """


_SITES: tuple[tuple[Any, str, Kind, Resolve, bool], ...] = (
    (redis.client.Redis, "execute_command", "command", standalone_target, False),
    (redis.client.Pipeline, "execute", "pipeline", standalone_target, False),
    (redis.client.Pipeline, "immediate_execute_command", "immediate", standalone_target, False),
    (redis.cluster.RedisCluster, "execute_command", "command", cluster_target, False),
    (redis.cluster.ClusterPipeline, "execute", "pipeline", cluster_target, False),
    (redis.asyncio.client.Redis, "execute_command", "command", standalone_target, True),
    (redis.asyncio.client.Pipeline, "execute", "pipeline", standalone_target, True),
    (
        redis.asyncio.client.Pipeline,
        "immediate_execute_command",
        "immediate",
        standalone_target,
        True,
    ),
    (redis.asyncio.cluster.RedisCluster, "execute_command", "command", cluster_target, True),
    (redis.asyncio.cluster.ClusterPipeline, "execute", "pipeline", cluster_target, True),
)


class RedisRecoveryInstrumentor(RecoveryInstrumentor):
    """Inline recovery for redis-py (sync and asyncio, standalone and cluster).

    ``RedisRecoveryInstrumentor().instrument()`` (or ``opentelemetry-instrument``, entry
    point ``otel_recovery_redis``) takes the usual settings; see the module docstring for
    what is retried and how this composes with redis-py's own retry.
    """

    library: ClassVar[str] = "redis"
    instruments: ClassVar[tuple[str, ...]] = ("redis >= 4.5",)
    span_mode: ClassVar[Literal["own", "current"]] = "current"
    rejection: ClassVar[type[CircuitOpenError]] = RedisCircuitOpenError
    """Except on cluster clients (see :class:`RedisCircuitOpenError`)."""
    fallback_on: ClassVar[tuple[type[BaseException], ...]] = (
        RedisConnectionError,
        RedisTimeoutError,
        BusyLoadingError,
        TryAgainError,
        ClusterDownError,
        MasterDownError,
        ReadOnlyError,
        CircuitOpenError,
    )
    """A configured ``fallback_value`` stands in when the server is unreachable, loading,
    failing over or rejected by the breaker; never for a command error (``WRONGTYPE``)."""
    policy_class: ClassVar[type[TargetPolicy]] = RedisPolicy

    def _mends(self, clock: Clock) -> tuple[Mend | None, AMend | None]:
        reconnect = ReplicaReconnect(clock)

        def mend(error: BaseException, args: tuple[Any, ...]) -> None:
            keep_to_the_session(error, args)
            hold_back_unproven(error, args)
            reconnect.mend(error, args)

        async def amend(error: BaseException, args: tuple[Any, ...]) -> None:
            keep_to_the_session(error, args)
            hold_back_unproven(error, args)
            await reconnect.amend(error, args)

        return mend, amend

    def _install(self, patches: PatchSet, targets: TargetPolicies, kwargs: dict[str, Any]) -> None:
        planner = Planner(targets)
        for owner, attribute, kind, resolve, is_async in _SITES:
            site = Site(owner, attribute)
            library = "redis.asyncio" if is_async else "redis"
            where = f"{library} {owner.__name__}.{attribute}"
            layers = SiteLayers(planner, kind, site, resolve, patches, where)
            build = layers.async_layer if is_async else layers.sync_layer
            site.proxy = patches.layer(owner, attribute, build, beneath_contrib=True)
        MULTIDB_HEALTH_CHECKS.install(patches)
        MULTIDB_ROUTING.install(patches, targets)

    def _uninstrument(self, **kwargs: Any) -> None:
        MULTIDB_HEALTH_CHECKS.remove()  # first: a MultiDB module imported from now on stays as is
        MULTIDB_ROUTING.remove()
        super()._uninstrument(**kwargs)
