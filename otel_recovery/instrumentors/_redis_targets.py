"""The server a Redis call counts on (its :class:`Target`), found for each kind of client.

A target is what one breaker and one budget stand for (a server, a cluster shard, the
cluster as a whole, a Sentinel master or a service's replicas), with what redis-py's own
retry repeats for it (:mod:`._redis_own_retry`) and the plans already chosen for its
commands. Finding it runs on every call, so it is kept on the client's own objects and
trusted while the client's ``retry`` is the object it was read from: a plain pool keeps its
one target (:data:`TARGET_ATTRIBUTE`, where the inline layer looks too), a Sentinel pool one per
server it has talked to (the master moves, :mod:`._redis_sentinel`), a cluster client's slot
map one per shard and one for the cluster as a whole (:mod:`._redis_routing`), a bounded map
of each (:func:`_kept`).

:data:`Resolve` is what the patch sites call: :func:`standalone_target` for ``Redis`` and
its pipelines, :func:`cluster_target` for ``RedisCluster`` and its pipelines, told by
:func:`cluster_routing` which nodes the call names.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

from otel_recovery.instrumentors._db_plans import Plan
from otel_recovery.instrumentors._redis_errors import never_ran
from otel_recovery.instrumentors._redis_own_retry import (
    cluster_repeats,
    own_coverage,
    pipeline_coverage,
)
from otel_recovery.instrumentors._redis_pipelines import is_cluster_pipeline, queued_commands
from otel_recovery.instrumentors._redis_routing import cluster_wide, shard_primary
from otel_recovery.instrumentors._redis_sentinel import SENTINEL_POOLS, server_of
from otel_recovery.instrumentors._target_retries import NeverRan
from otel_recovery.policies.circuit_breaker import CircuitOpenError

__all__ = [
    "Resolve",
    "Target",
    "TARGET_ATTRIBUTE",
    "cluster_target",
    "cluster_routing",
    "servers_of",
    "standalone_target",
]


TARGET_ATTRIBUTE = "_otel_recovery_target"
"""Where a connection pool keeps its :class:`Target`."""
_TARGETS = "_otel_recovery_targets"
"""Where a cluster client's slot map keeps its :class:`Target` per shard, and a Sentinel pool
its :class:`Target` per server."""
_WIDE = "_otel_recovery_cluster_wide"
"""Where a cluster client's slot map keeps the name of its cluster-wide target."""


class Target:
    """The server a client talks to, what redis-py's own retry repeats for it (and how
    often), and the plans already chosen for its commands, per span mode."""

    __slots__ = (
        "current",
        "host",
        "kwargs",
        "never_ran",
        "own",
        "owner",
        "pipeline_retried",
        "port",
        "rejection",
        "retried",
        "retries",
        "retry",
    )

    def __init__(
        self,
        host: str,
        port: int | None,
        retried: tuple[type[BaseException], ...],
        retries: int,
        retry: Any = None,
        kwargs: dict[str, Any] | None = None,
        pipeline_retried: tuple[type[BaseException], ...] | None = None,
        rejection: type[CircuitOpenError] | None = None,
    ) -> None:
        self.host, self.port, self.retried, self.retries = host, port, retried, retries
        self.rejection = rejection  # None: the instrumentor's (RedisCircuitOpenError)
        # what a pipeline's execute() repeats, where it differs (pipeline_coverage)
        self.pipeline_retried = retried if pipeline_retried is None else pipeline_retried
        self.retry = retry  # the redis-py Retry these facts were read from...
        # ...and the pool's connection kwargs it was read from: ``set_retry`` updates this
        # very dict, so one ``get`` tells whether the facts still hold.
        self.kwargs: dict[str, Any] = kwargs if kwargs is not None else {"retry": retry}
        self.owner: object = None  # the planner that filled the plans
        self.own: dict[Any, Plan] = {}  # by the command's first argument, no contrib above
        self.current: dict[Any, Plan] = {}  # the same, under contrib's span
        # failures after which a command that may not be repeated is sent again all the same
        self.never_ran: NeverRan | None = None


Resolve = Callable[[Any, tuple[Any, ...] | None], Target]
"""``resolve(instance, command)``: the target a client's (or pipeline's) call goes to
(``command`` None: to nodes the caller named, see :func:`cluster_routing`)."""


def standalone_target(instance: Any, command: tuple[Any, ...] | None = ()) -> Target:
    """Target of a ``Redis``/``Pipeline``, cached on its pool (until its ``retry`` changes);
    one server whatever the ``command``."""
    pool = instance.connection_pool
    kwargs = pool.connection_kwargs
    retry = kwargs.get("retry")
    if isinstance(pool, SENTINEL_POOLS):
        return _sentinel_target(pool, kwargs, retry)
    cached: Target | None = getattr(pool, TARGET_ATTRIBUTE, None)
    if cached is not None and cached.retry is retry:
        return cached
    path = kwargs.get("path")
    host: str
    port: int | None
    if path:
        host, port = str(path), None
    else:
        host = str(kwargs.get("host") or "localhost")
        port = int(kwargs.get("port") or 6379)
    target = _new_target(host, port, kwargs, retry)
    if target.retries == 0 or not target.retried:  # redis-py resends nothing by itself:
        target.never_ran = never_ran  # it answers the only send (hold_back_unproven)
    with contextlib.suppress(Exception):  # a pool with __slots__: recompute next time
        setattr(pool, TARGET_ATTRIBUTE, target)
    return target


def _sentinel_target(pool: Any, kwargs: dict[str, Any], retry: Any) -> Target:
    """A Sentinel-managed pool's target: the master it talks to now, or its service's
    replicas (see :mod:`._redis_sentinel`). Never left where the inline and compiled layers
    look (``TARGET_ATTRIBUTE``): the server behind the pool changes with a failover."""
    host, port = server_of(pool)
    return _kept(pool, (host, port), retry, lambda: _new_target(host, port, kwargs, retry))


def _kept(holder: Any, key: tuple[Any, ...], retry: Any, make: Callable[[], Target]) -> Target:
    """The target ``key`` names (a server's ``(host, port)``) kept on ``holder`` (a Sentinel
    pool, a cluster's slot map), while it was read from the same ``retry``; else
    ``make()``'s, kept from now on."""
    targets: dict[tuple[Any, ...], Target] | None = getattr(holder, _TARGETS, None)
    cached = targets.get(key) if targets is not None else None
    if cached is not None and cached.retry is retry:
        return cached
    target = make()
    if targets is None or len(targets) >= 256:
        targets = _remember(holder, _TARGETS, {})
    targets[key] = target
    return target


def _new_target(host: str, port: int | None, kwargs: dict[str, Any], retry: Any) -> Target:
    """A server's target, with what its connections' ``retry`` repeats by itself."""
    errors, retries, extra = own_coverage(kwargs, retry)
    pipeline_errors = pipeline_coverage(errors, retries, kwargs, extra)
    return Target(host, port, errors, retries, retry, kwargs, pipeline_errors)


def cluster_target(instance: Any, command: tuple[Any, ...] | None = ()) -> Target:
    """The shard a cluster client's call goes to, named after its primary, or the cluster as
    a whole (see :mod:`._redis_routing`); ``command`` None: sent to nodes the caller named
    (:func:`cluster_routing`). Cached per shard while its ``retry`` stays the same object. The
    cluster's own retry repeats ``ERRORS_ALLOW_RETRY``, but never a call to named nodes:
    after the slot-map refresh a failure triggers, they may no longer exist. Such a call's
    target says nothing is repeated, so a read sent that way is ours to retry."""
    client = getattr(instance, "cluster_client", None) or instance
    named = command is None
    if is_cluster_pipeline(instance):
        node, named = _pipeline_shard(client, instance), False
    else:
        node = None if named else shard_primary(client, command or ())
    # Kept on the client's slot map, which its pipelines share (a sync pipeline has no link
    # to its client); the cluster-wide name is chosen once: redis-py may pick another
    # default node after a failure.
    holder = getattr(client, "nodes_manager", None) or client
    if node is not None:
        host, port = str(node.host), node.port
    else:
        host, port = getattr(holder, _WIDE, None) or _remember(holder, _WIDE, cluster_wide(client))
    retry = getattr(instance, "retry", None) or getattr(client, "retry", None)

    def make() -> Target:
        errors, retries = cluster_repeats(instance, client, retry, named=named)
        return Target(host, port, errors, retries, retry, rejection=CircuitOpenError)

    return _kept(holder, (host, port, "named") if named else (host, port), retry, make)


def servers_of(client: Any) -> list[tuple[str, int | None]]:
    """The ``(host, port)`` of every target a client's calls may count on: a ``Redis``'s
    one server (a Sentinel pool's master now), a ``RedisCluster``'s nodes as it knows them
    (each shard is named after its primary) and the cluster as a whole, once named."""
    manager = getattr(client, "nodes_manager", None)
    if manager is None:
        target = standalone_target(client)
        return [(target.host, target.port)]
    servers: list[tuple[str, int | None]] = [
        (str(node.host), node.port) for node in list(manager.nodes_cache.values())
    ]
    wide = getattr(manager, _WIDE, None)
    if wide is not None:
        servers.append(wide)
    return servers


def _remember(holder: Any, attribute: str, value: Any) -> Any:
    """``value``, kept on ``holder`` where it allows attributes."""
    with contextlib.suppress(Exception):
        setattr(holder, attribute, value)
    return value


def _pipeline_shard(client: Any, pipe: Any) -> Any:
    """The one shard every queued command goes to; None when they span shards (or are not
    routed by a key): the pipeline then counts on the cluster as a whole."""
    queued = queued_commands(pipe)
    shard = None
    for args, options in queued or ():
        node = None if _chooses_nodes(options) else shard_primary(client, args)
        if node is None or (shard is not None and node.name != shard.name):
            return None
        shard = node
    return shard


def _chooses_nodes(options: dict[str, Any]) -> bool:
    """``target_nodes=`` (or redis-py's ``nodes_flag``): the caller picked the nodes."""
    return "target_nodes" in options or "nodes_flag" in options


def cluster_routing(options: dict[str, Any], command: tuple[Any, ...]) -> tuple[Any, ...] | None:
    """What :data:`Resolve` is told of a cluster call's nodes: its ``command`` (redis-py
    routes it by its key); ``()`` for a nodes flag (``target_nodes="primaries"``, or
    ``nodes_flag``): redis-py picks those nodes, again on its retries, and no key decides;
    None for nodes named by object (``target_nodes=node``), which redis-py does not retry
    (its ``_is_nodes_flag`` test)."""
    if not _chooses_nodes(options):
        return command
    named = options.get("target_nodes")
    return () if named is None or isinstance(named, str) else None
