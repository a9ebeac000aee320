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
(:func:`pool_exhausted`), and the application gets redis-py's error after the pool's own wait.
"""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Callable
from typing import Any, ClassVar, Literal

import redis.asyncio.client
import redis.asyncio.cluster
import redis.client
import redis.cluster
from redis.exceptions import (
    BusyLoadingError,
    ClusterDownError,
    MasterDownError,
    MaxConnectionsError,
    ReadOnlyError,
    RedisClusterException,
    TryAgainError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from otel_recovery._clock import Clock
from otel_recovery._compiled import SPEEDUPS
from otel_recovery._redis_replica import ReplicaReconnect, closable, refused_by_replica
from otel_recovery.instrumentors._base import RecoveryInstrumentor
from otel_recovery.instrumentors._db import (
    LEGACY_SUPPRESS_KEY,
    SUPPRESS_KEY,
    Plan,
    PlanCache,
    Site,
    SpanMode,
    compiled_layer,
    compiles,
    explain_no_retry,
    instrumentation_enabled,
    read_context,
    retire_table,
)
from otel_recovery.instrumentors._guarded import GuardedPolicy, raised_in
from otel_recovery.instrumentors._redis_commands import BLOCKING, READS, CommandRules, runs_code
from otel_recovery.instrumentors._redis_routing import cluster_wide, shard_primary
from otel_recovery.instrumentors._redis_sentinel import (
    SENTINEL_POOLS,
    amaster_moved,
    master_moved,
    server_of,
)
from otel_recovery.instrumentors._settings import RecoverySettings
from otel_recovery.instrumentors._targets import (
    AMend,
    Mend,
    NeverRan,
    TargetPolicies,
    TargetPolicy,
    hold_back,
    session_bound,
)
from otel_recovery.instrumentors._wrapping import PatchSet, report_internal_error
from otel_recovery.policies.circuit_breaker import CircuitOpenError

__all__ = ["RedisCircuitOpenError", "RedisRecoveryInstrumentor"]


Queued = list[tuple[tuple[Any, ...], dict[str, Any]]]


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


_TARGET = "_otel_recovery_target"
"""Where a connection pool keeps its :class:`Target`."""
_COMPILED_PLANS = "_otel_recovery_compiled_plans"
"""Where a connection pool keeps the ``PlanTable`` the compiled command layer reads."""
_TARGETS = "_otel_recovery_targets"
"""Where a cluster client's slot map keeps its :class:`Target` per shard, and a Sentinel pool
its :class:`Target` per server."""
_WIDE = "_otel_recovery_cluster_wide"
"""Where a cluster client's slot map keeps the name of its cluster-wide target."""
_REDIS_RETRIES = (RedisConnectionError, RedisTimeoutError, socket.timeout)
"""What a redis-py ``Retry`` repeats when not told otherwise."""
REFUSALS = (ReadOnlyError, BusyLoadingError, MasterDownError)
"""Error replies that refuse a command before it runs: a replica refusing writes, a server
loading its data set, a replica cut off from its primary."""
_TIMED_OUT_CONNECTING = "Timeout connecting to server"
"""redis-py's message (4.5 to 8) for a connect that timed out; a refused or unreachable
one reads ``Error 111 connecting to host:port. Connection refused.``"""


def never_ran(error: BaseException) -> bool:
    """Whether ``error`` proves the command never ran: the server refused it
    (:data:`REFUSALS`), or the connection it was to be sent on could not be made (redis-py
    connects before it writes, in the pool's ``get_connection`` or at the send).

    A command that may not be sent twice (``INCR``) is sent again after these, on a plain
    client of one server whose own ``Retry`` resends nothing. Not where redis-py may have
    resent it already (its ``Retry`` repeats any command after a dropped connection: the
    refusal, or the failed reconnect, may answer that repeat, after the first send ran),
    not on cluster clients (a command sent to every primary may have run on some), not on
    Sentinel pools (a replica pool refuses writes for good), not inside MULTI/EXEC or a
    pipeline (the commands before the refused one may have run)."""
    if isinstance(error, REFUSALS):
        return True
    if isinstance(error, CircuitOpenError):  # ours: never sent, but never resent either
        return False
    if isinstance(error, RedisTimeoutError):
        return str(error) == _TIMED_OUT_CONNECTING
    if isinstance(error, RedisConnectionError):
        text = str(error)
        return text.startswith("Error ") and " connecting to " in text
    return False


def never_connected(error: BaseException) -> bool:
    """:func:`never_ran` without the server's refusals: for commands that run the
    application's code (:func:`~._redis_commands.runs_code`), whose own error replies may
    read ``READONLY``, ``LOADING`` or ``MASTERDOWN`` after it wrote. Only a connection that
    could not be made proves such a command never ran."""
    return not isinstance(error, REFUSALS) and never_ran(error)


_POOL_MESSAGES = frozenset({"No connection available.", "Too many connections"})
"""What redis-py's own connection pools raise, as a plain ``ConnectionError``, when the
application's pool has no connection to give (4.5 to 8): a ``BlockingConnectionPool``
that waited its ``timeout`` in vain, a ``ConnectionPool`` at its ``max_connections`` (which
later releases raise as a ``MaxConnectionsError``, as cluster nodes do)."""
_POOL_MODULES = frozenset({"redis.connection", "redis.asyncio.connection"})


def pool_exhausted(error: BaseException) -> bool:
    """Whether ``error`` says the application's own connection pool had no connection to
    give: the client's doing, not the server's, so it is neither retried nor counted on the
    server's breaker (the pool's wait is over, and a retry would only wait again).

    By type (``MaxConnectionsError``) or, for the plain ``ConnectionError`` redis-py's
    pools raise, by its exact message *and* its origin: raised by the pool's own code in
    ``redis.connection`` / ``redis.asyncio.connection`` (the innermost frame of its
    traceback), never by a reply of the server's."""
    if isinstance(error, MaxConnectionsError):
        return True
    if type(error) is not RedisConnectionError or str(error) not in _POOL_MESSAGES:
        return False
    frame = raised_in(error)
    return frame is not None and frame.f_globals.get("__name__") in _POOL_MODULES


_CLUSTER_MISUSE = (
    "No way to dispatch this command to Redis Cluster",
    "Invalid args in command",
    "all keys must map to the same key slot",
    "is blocked when running redis in cluster mode",
    "is not implemented",
    "shard_hint is deprecated",
    "Cannot execute FT.CURSOR commands without FT.AGGREGATE",
)
"""What redis-py's cluster clients say, as a plain ``RedisClusterException``, of a call
they refuse before sending anything (a command with no key to route it by, keys in two
slots, a method cluster mode lacks). Its other messages are the cluster's state (no node
reachable, slots not covered), which are failures of the server's."""


def cluster_misuse(error: BaseException) -> bool:
    """Whether ``error`` is redis-py's cluster client refusing the application's call
    before sending it: the client's doing, so neither retried nor counted on the breaker
    (twenty calls with keys in two slots would otherwise open a healthy shard's circuit).
    ``CrossSlotTransactionError`` and ``InvalidPipelineStack`` say so by their type (and
    classify as invalid requests); the base class only by its message."""
    if type(error) is not RedisClusterException:
        return isinstance(error, RedisClusterException) and type(error).__name__ in (
            "CrossSlotTransactionError",
            "InvalidPipelineStack",
        )
    text = str(error)
    return any(part in text for part in _CLUSTER_MISUSE)


class _RedisPolicy(GuardedPolicy):
    """A Redis target's policy: an exhausted connection pool of the application's
    (:func:`pool_exhausted`), or a cluster client refusing a call it cannot route
    (:func:`cluster_misuse`), is not the server's failure."""

    __slots__ = ()

    def _clients_own(self, error: BaseException) -> bool:
        return pool_exhausted(error) or cluster_misuse(error) or super()._clients_own(error)


_ONLY_LISTED_ERRORS = hasattr(redis.client.Redis, "_disconnect_raise")
"""redis-py before 6.0: a client repeats a command only for the errors in its connection's
``retry_on_error`` list (``Redis._disconnect_raise`` re-raises every other one), whatever its
``Retry`` supports. From 6.0 the ``Retry``'s supported errors decide."""


_REDIS_PY = tuple(int(part) for part in redis.__version__.split(".")[:3] if part.isdigit())
_PIPELINES_REPEAT_ONLY_TIMEOUTS = _REDIS_PY < (5, 0, 2)
"""redis-py before 5.0.2: a pipeline's ``execute()`` repeats only a ``TimeoutError`` (4.x:
when ``retry_on_timeout`` is set; 5.0.0 and 5.0.1: when ``TimeoutError`` is in
``retry_on_error``), whatever else the connection's ``retry_on_error`` lists for commands."""


def _retry_count(retry: Any) -> int:
    """How many times a redis-py ``Retry`` repeats (``get_retries`` came with redis-py 5)."""
    count = retry.get_retries() if hasattr(retry, "get_retries") else retry._retries
    return int(count)


def _coverage(retry: Any, extra: list[Any]) -> tuple[tuple[type[BaseException], ...], int]:
    """What a connection's ``Retry`` repeats by itself, and how often, by
    ``AbstractConnection``'s rules: no ``retry`` and no ``retry_on_error`` means
    ``Retry(NoBackoff(), 0)``; ``retry_on_error`` alone means one repeat."""
    supported: tuple[type[BaseException], ...]
    if retry is None:
        if not extra:
            return (), 0
        retries, supported = 1, _REDIS_RETRIES
    else:
        retries = _retry_count(retry)
        supported = tuple(getattr(retry, "_supported_errors", _REDIS_RETRIES))
    if _ONLY_LISTED_ERRORS:
        supported = ()
    errors = tuple(dict.fromkeys(supported + tuple(extra)))
    return (errors, retries) if errors and retries else ((), 0)


def _pipeline_coverage(
    errors: tuple[type[BaseException], ...], retries: int, kwargs: dict[str, Any], extra: list[Any]
) -> tuple[type[BaseException], ...]:
    """What a pipeline's ``execute()`` repeats by itself, given what a command's does."""
    if not _PIPELINES_REPEAT_ONLY_TIMEOUTS:
        return errors
    if _REDIS_PY < (5, 0):
        timeouts = bool(kwargs.get("retry_on_timeout"))
    else:
        timeouts = RedisTimeoutError in extra
    return (RedisTimeoutError,) if timeouts and retries else ()


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
        # what a pipeline's execute() repeats, where it differs (_pipeline_coverage)
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
(``command`` None: to nodes the caller named, see :func:`_routing`)."""


def _standalone_target(instance: Any, command: tuple[Any, ...] | None = ()) -> Target:
    """Target of a ``Redis``/``Pipeline``, cached on its pool (until its ``retry`` changes);
    one server whatever the ``command``."""
    pool = instance.connection_pool
    kwargs = pool.connection_kwargs
    retry = kwargs.get("retry")
    if isinstance(pool, SENTINEL_POOLS):
        return _sentinel_target(pool, kwargs, retry)
    cached: Target | None = getattr(pool, _TARGET, None)
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
        target.never_ran = never_ran  # it answers the only send (_hold_back_unproven)
    with contextlib.suppress(Exception):  # a pool with __slots__: recompute next time
        setattr(pool, _TARGET, target)
    return target


def _sentinel_target(pool: Any, kwargs: dict[str, Any], retry: Any) -> Target:
    """A Sentinel-managed pool's target: the master it talks to now, or its service's
    replicas (see :mod:`._redis_sentinel`). Never left where the inline and compiled layers
    look (``_TARGET``): the server behind the pool changes with a failover."""
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
    errors, retries, extra = _own_coverage(kwargs, retry)
    pipeline_errors = _pipeline_coverage(errors, retries, kwargs, extra)
    return Target(host, port, errors, retries, retry, kwargs, pipeline_errors)


def _own_coverage(
    kwargs: dict[str, Any], retry: Any
) -> tuple[tuple[type[BaseException], ...], int, list[Any]]:
    """What a pool's connections repeat by themselves (errors, how often), and the errors
    its ``retry_on_error`` / ``retry_on_timeout`` add."""
    extra = list(kwargs.get("retry_on_error") or ())
    if kwargs.get("retry_on_timeout"):
        extra.append(RedisTimeoutError)
    errors, retries = _coverage(retry, extra)
    return errors, retries, extra


def _hold_back_unproven(error: BaseException, args: tuple[Any, ...]) -> None:
    """Where a failure that would prove a command never ran (:func:`never_ran`) proves
    nothing or a resend cannot help, keep the failed call from being resent (a mend, after
    each failed attempt). Checked again per failure, beyond the target's ``never_ran``: a
    ``Retry`` changed in place (``update_retries``) keeps its identity, and with it the
    target's cached facts."""
    if not never_ran(error):
        return
    client = args[0] if args else None
    pool = getattr(client, "connection_pool", None)
    kwargs = getattr(pool, "connection_kwargs", None)
    if not isinstance(kwargs, dict):
        hold_back(error)
        return
    errors, retries, _ = _own_coverage(kwargs, kwargs.get("retry"))
    # redis-py may have resent it (so it may have run), or a resend would meet the same
    # replica on the same connection (one we do not close)
    stale = refused_by_replica(error) and not closable(client)
    if (retries and errors) or stale or _idle_ones_resend(pool):
        hold_back(error)


def _keep_to_the_session(error: BaseException, args: tuple[Any, ...]) -> None:
    """A client with a connection of its own (``single_connection_client=True``,
    ``Redis.client()``) is one session, whose state the application may have set by hand:
    a ``MULTI`` (the command was queued, not run), a ``WATCH``, a ``SELECT``. A resend goes
    on a new connection, without that state: a queued ``SET`` would run at once, outside
    the transaction, and a read would see another database. Such a client's failed calls
    are not resent (``retry.disallowed=session``); its failures still count. Asked after a
    failure only."""
    client = args[0] if args else None
    if getattr(client, "connection", None) is not None:
        session_bound(error)


def _idle_ones_resend(pool: Any) -> bool:
    """Whether an idle connection of ``pool`` (the one just refused among them) repeats
    commands by itself: an asyncio pool's ``set_retry`` gives its connections a new
    ``Retry`` without changing the ``connection_kwargs`` new ones are made from."""
    for connection in list(getattr(pool, "_available_connections", None) or ()):
        extra = list(getattr(connection, "retry_on_error", None) or ())
        errors, retries = _coverage(getattr(connection, "retry", None), extra)
        if retries and errors:
            return True
    return False


def _cluster_target(instance: Any, command: tuple[Any, ...] | None = ()) -> Target:
    """The shard a cluster client's call goes to, named after its primary, or the cluster as
    a whole (see :mod:`._redis_routing`); ``command`` None: sent to nodes the caller named
    (:func:`_routing`). Cached per shard while its ``retry`` stays the same object. The
    cluster's own retry repeats ``ERRORS_ALLOW_RETRY``, but never a call to named nodes:
    after the slot-map refresh a failure triggers, they may no longer exist. Such a call's
    target says nothing is repeated, so a read sent that way is ours to retry."""
    client = getattr(instance, "cluster_client", None) or instance
    named = command is None
    if _is_cluster_pipeline(instance):
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
        errors, retries = _cluster_repeats(instance, client, retry, named=named)
        return Target(host, port, errors, retries, retry, rejection=CircuitOpenError)

    return _kept(holder, (host, port, "named") if named else (host, port), retry, make)


def _cluster_repeats(
    instance: Any, client: Any, retry: Any, *, named: bool
) -> tuple[tuple[type[BaseException], ...], int]:
    """What redis-py's cluster client repeats by itself, and how often.

    From redis-py 6 its ``retry`` repeats ``ERRORS_ALLOW_RETRY``, but never a call to nodes
    named by object (see :func:`_routing`). Before 6, ``cluster_error_retry_attempts`` did
    (3 by default), and ``retry=`` went to every node's connections instead, which repeat
    with it a connect that timed out (a refused one raises an ``OSError`` their ``Retry``
    does not catch): so a named node's call, or any call with that count at 0, counts its
    ``TimeoutError`` as repeated (one from a read is then taken as repeated although it
    was not: unsure here costs a retry, never a multiplication)."""
    own = _retry_count(retry) if retry is not None else 0
    if _REDIS_PY >= (6,):
        retries = 0 if named else own
    else:
        attempts: Any = 0
        if not named:
            attempts = getattr(instance, "cluster_error_retry_attempts", None)
            if attempts is None:  # a pipeline without it: its client's
                attempts = getattr(client, "cluster_error_retry_attempts", 0)
        retries = int(attempts or 0)
        if not retries:  # only the node connections' retry= repeats: connect timeouts
            return ((RedisTimeoutError,), own) if own else ((), 0)
    if not retries:
        return (), 0
    errors: Any = getattr(type(instance), "ERRORS_ALLOW_RETRY", None)
    errors = errors or getattr(type(client), "ERRORS_ALLOW_RETRY", _REDIS_RETRIES)
    return tuple(errors), retries


def _remember(holder: Any, attribute: str, value: Any) -> Any:
    """``value``, kept on ``holder`` where it allows attributes."""
    with contextlib.suppress(Exception):
        setattr(holder, attribute, value)
    return value


_CLUSTER_PIPELINES = (redis.cluster.ClusterPipeline, redis.asyncio.cluster.ClusterPipeline)


def _is_cluster_pipeline(instance: Any) -> bool:
    return isinstance(instance, _CLUSTER_PIPELINES)


def _pipeline_shard(client: Any, pipe: Any) -> Any:
    """The one shard every queued command goes to; None when they span shards (or are not
    routed by a key): the pipeline then counts on the cluster as a whole."""
    queued = _queued(pipe)
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


def _routing(options: dict[str, Any], command: tuple[Any, ...]) -> tuple[Any, ...] | None:
    """What :data:`Resolve` is told of a cluster call's nodes: its ``command`` (redis-py
    routes it by its key); ``()`` for a nodes flag (``target_nodes="primaries"``, or
    ``nodes_flag``): redis-py picks those nodes, again on its retries, and no key decides;
    None for nodes named by object (``target_nodes=node``), which redis-py does not retry
    (its ``_is_nodes_flag`` test)."""
    if not _chooses_nodes(options):
        return command
    named = options.get("target_nodes")
    return () if named is None or isinstance(named, str) else None


def _transactional(pipe: Any) -> bool:
    """MULTI/EXEC or WATCH: a retry would break the transaction's all-or-nothing promise."""
    if getattr(pipe, "watching", False) or getattr(pipe, "explicit_transaction", False):
        return True
    strategy = getattr(pipe, "_execution_strategy", None)
    if strategy is not None:  # cluster pipelines
        return "Transaction" in type(strategy).__name__
    flag = getattr(pipe, "is_transaction", None)  # asyncio; sync calls it ``transaction``
    if flag is None:
        flag = getattr(pipe, "transaction", None)
    return flag if isinstance(flag, bool) else True  # unknown layout: assume the worst


def _queued(pipe: Any) -> Queued | None:
    """The pipeline's commands as ``(args, options)``; None for an unknown layout."""
    strategy = getattr(pipe, "_execution_strategy", None)
    if strategy is None:
        stack = getattr(pipe, "command_stack", None)
        return None if stack is None else [(tuple(a), dict(o)) for a, o in stack]
    queue = getattr(strategy, "command_queue", None)
    if queue is None:
        queue = getattr(strategy, "_command_queue", None)
    if queue is None:
        return None
    return [
        (tuple(c.args), dict(getattr(c, "options", None) or getattr(c, "kwargs", None) or {}))
        for c in queue
    ]


def _share_plans(pool: Any, planner: _Planner, target: Target, seen: tuple[Any, Any]) -> None:
    """Leave the pool's remembered command plans where the compiled layer reads them.

    The table holds the very dict the planner fills, so one table serves every command; it
    is valid while the site's ``seen`` is the one it was made under (same wrapper chain,
    same instrumentation) and the pool's ``retry`` is the one the target was read from. A
    replaced table is retired: the compiled layer remembers the last table it read and
    serves from it until then.
    """
    if target.owner is not planner or isinstance(pool, SENTINEL_POOLS):
        return  # a Sentinel pool's server changes: its calls are planned afresh each time
    plans = target.current if seen[1] == "current" else target.own
    table = getattr(pool, _COMPILED_PLANS, None)
    if (
        table is not None
        and table.token is seen
        and table.plans is plans
        and table.guard_map is target.kwargs
        and table.guard_value is target.retry
    ):
        return
    replaced = table
    table = SPEEDUPS.PlanTable(seen, plans, target.kwargs, "retry", target.retry)  # type: ignore[union-attr]
    with contextlib.suppress(Exception):  # a pool with __slots__: the Python layer serves
        setattr(pool, _COMPILED_PLANS, table)
    retire_table(replaced)


class _Replay:
    """One pipeline attempt; from the second on, first puts back what ``execute`` cleared."""

    @staticmethod
    def wrapping(pipe: Any, saved: Queued) -> Callable[[Callable[..., Any]], _Replay]:
        return lambda execute: _Replay(execute, pipe, saved)

    __slots__ = ("_pipe", "_saved", "_started", "_wrapped")

    def __init__(self, wrapped: Callable[..., Any], pipe: Any, saved: Queued) -> None:
        self._wrapped = wrapped
        self._pipe = pipe
        self._saved = saved
        self._started = False

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self._started and not _queued(self._pipe):
            pipe = self._pipe
            if getattr(pipe, "_execution_strategy", None) is None:
                pipe.command_stack.extend(self._saved)
            else:
                stage = getattr(pipe, "pipeline_execute_command", None) or pipe.execute_command
                for command, options in self._saved:
                    stage(*command, **options)
        self._started = True
        return self._wrapped(*args, **kwargs)


class _Planner:
    """Chooses the plan (policy, span mode, retry rule) for each call."""

    def __init__(self, targets: TargetPolicies) -> None:
        self.settings: RecoverySettings = targets.settings
        self.plans = PlanCache(targets)
        self.rules = CommandRules(self.settings)
        self._per_target: dict[tuple[str, int | None], CommandRules] = {}

    def rules_for(self, host: str, port: int | None) -> CommandRules:
        if not self.settings.targets:
            return self.rules
        rules = self._per_target.get((host, port))
        if rules is None:
            rules = CommandRules(self.settings.for_target(host, port, None))
            if len(self._per_target) < 1024:
                self._per_target[host, port] = rules
        return rules

    def command(self, mode: SpanMode, target: Target, args: tuple[Any, ...]) -> Plan:
        """The plan for one command; remembered per client, command spelling and span mode
        unless the answer depends on the arguments (``SET ... NX``, ``CONFIG GET``)."""
        if target.owner is not self:  # filled by an earlier instrumentation: start over
            target.own, target.current, target.owner = {}, {}, self
        plans = target.current if mode == "current" else target.own
        plan = plans.get(args[0])
        if plan is not None:
            return plan
        host, port = target.host, target.port
        rules = self.rules_for(host, port)
        name = rules.name(args)
        timed = name not in BLOCKING
        if rules.allows(name, args):
            plan = self.plans.plan(
                host, port, name, mode, None, target.retried, target.retries, timed,
                target.rejection, reads=name in READS,
            )  # fmt: skip
        else:
            proof = target.never_ran if rules.refused and name not in rules.never else None
            if proof is not None and runs_code(name):
                proof = never_connected  # its code may have written, then answered READONLY
            plan = self.plans.plan(
                host, port, name, mode, "non_idempotent_command", timed=timed,
                rejection=target.rejection, never_ran=proof,
            )  # fmt: skip
        if rules.depends_on_arguments(args, name) or len(plans) >= 512:
            return plan
        plans[args[0]] = plan
        return plan

    def immediate(self, mode: SpanMode, target: Target, args: tuple[Any, ...]) -> Plan:
        host, port = target.host, target.port
        name = self.rules_for(host, port).name(args)
        return self.plans.plan(
            host, port, name, mode, "transaction", timed=name not in BLOCKING,
            rejection=target.rejection,
        )  # fmt: skip

    def pipeline(self, mode: SpanMode, target: Target, pipe: Any) -> tuple[Plan, Queued | None]:
        host, port, retried = target.host, target.port, target.pipeline_retried
        retries = target.retries if retried else 0
        if _transactional(pipe):
            plan = self.plans.plan(
                host, port, "MULTI", mode, "transaction", rejection=target.rejection
            )
            return plan, None
        queued = _queued(pipe)
        rules = self.rules_for(host, port)
        # a blocking command waits inside the pipeline's round trip (not inside MULTI/EXEC,
        # where the server never blocks): the attempt limit would cut it
        timed = queued is None or not any(rules.name(a) in BLOCKING for a, _ in queued)
        if queued is None or not all(rules.allows(rules.name(a), a) for a, _ in queued):
            plan = self.plans.plan(
                host, port, "PIPELINE", mode, "non_idempotent_command", timed=timed,
                rejection=target.rejection,
            )  # fmt: skip
            return plan, None
        plan = self.plans.plan(
            host, port, "PIPELINE", mode, None, retried, retries, timed, target.rejection
        )
        return plan, queued


def _malformed(args: tuple[Any, ...]) -> bool:
    """A call with no command, or one whose name is not a hashable value (a list): the
    application's mistake, which redis-py refuses in its own words. Planning fails on it
    too, but that is no internal error of ours to report."""
    if len(args) < 2:
        return True
    try:
        hash(args[1])
    except TypeError:
        return True
    return False


Kind = Literal["command", "immediate", "pipeline"]


class _SiteLayers:
    """Builds the layer of one patch site. The sync and async layers share the general way
    to find a call's plan (:meth:`plan`); a standalone client's command, the call that
    matters most, finds it inline in the sync layer."""

    def __init__(
        self,
        planner: _Planner,
        kind: Kind,
        site: Site,
        resolve: Resolve,
        patches: PatchSet,
        where: str,
    ) -> None:
        self.planner, self.kind, self.site, self.resolve = planner, kind, site, resolve
        self.patches, self.where = patches, where

    def plan(
        self, args: tuple[Any, ...], options: dict[str, Any]
    ) -> tuple[Plan, Callable[..., Any] | None]:
        """The plan for a call (``args[0]`` is the client or pipeline) and, for a retried
        pipeline, what wraps ``execute`` to refill it."""
        planner, instance = self.planner, args[0]
        target = self.resolve(instance, _routing(options, args[1:]))
        mode = self.site.span_mode()
        if self.kind == "pipeline":
            plan, saved = planner.pipeline(mode, target, instance)
            return plan, (None if saved is None else _Replay.wrapping(instance, saved))
        if self.kind == "immediate":
            return planner.immediate(mode, target, args[1:]), None
        return planner.command(mode, target, args[1:]), None

    def command_planner(self) -> Callable[[tuple[Any, ...]], tuple[Plan, Target, Any]]:
        """For a standalone client's command (``kind == "command"``): ``command_plan(args)``,
        its plan, remembered per pool, span mode and command spelling, with the target and
        the site's ``seen`` it was chosen under (what :func:`_share_plans` needs). The checks
        of ``Site.span_mode``, ``_standalone_target`` and ``_Planner.command``, written out
        over locals because this runs on every command (the sync layer has its own copy
        inline, see there)."""
        site, planner, resolve = self.site, self.planner, self.resolve
        namespace, attribute = site.namespace, site.attribute

        def command_plan(args: tuple[Any, ...]) -> tuple[Plan, Target, Any]:
            seen = site.seen
            if namespace[attribute] is not seen[0]:
                seen = site.refresh()
            target = getattr(args[0].connection_pool, _TARGET, None)
            if target is None or target.kwargs.get("retry") is not target.retry:
                target = resolve(args[0], ())
            plan = None
            if target.owner is planner:
                plans = target.current if seen[1] == "current" else target.own
                plan = plans.get(args[1])
            if plan is None:
                plan = planner.command(seen[1], target, args[1:])
            return plan, target, seen

        return command_plan

    def sync_layer(self, original: Callable[..., Any]) -> Callable[..., Any]:
        patches, planner, site, where = self.patches, self.planner, self.site, self.where
        namespace, attribute = site.namespace, site.attribute
        enabled, resolve, plan_slowly = instrumentation_enabled, self.resolve, self.plan
        inline = self.kind == "command" and self.resolve is _standalone_target
        compiled = inline and compiles()

        def layer(*args: Any, **options: Any) -> Any:
            # Every Python call costs here (the budget is 1 us per command), so
            # command_planner's lookup is written out once more, inline: calling it would
            # add some 850 instructions per command (benchmarks/layer_cost.py, Python column)
            # where no C compiler built the extension (python:*-slim images, say).
            if not patches.enabled:
                return original(*args, **options)
            context = read_context()  # instrumentation_enabled(), inline
            if (SUPPRESS_KEY in context or LEGACY_SUPPRESS_KEY in context) and not enabled():
                return original(*args, **options)
            fn = original
            plan: Plan | None = None
            try:
                if inline:
                    seen = site.seen
                    if namespace[attribute] is not seen[0]:
                        seen = site.refresh()
                    target = getattr(args[0].connection_pool, _TARGET, None)
                    if target is None or target.kwargs.get("retry") is not target.retry:
                        target = resolve(args[0], ())
                    plan = None
                    if target.owner is planner:
                        plans = target.current if seen[1] == "current" else target.own
                        plan = plans.get(args[1])
                    if plan is None:
                        plan = planner.command(seen[1], target, args[1:])
                    if compiled:
                        _share_plans(args[0].connection_pool, planner, target, seen)
                else:
                    plan, replay = plan_slowly(args, options)
                    if replay is not None:
                        fn = replay(original)
            except Exception as error:
                plan = None
                if not _malformed(args):
                    report_internal_error(where, error)
            if plan is None:  # called outside the handler: its errors carry no context of ours
                return original(*args, **options)
            try:
                return plan.run(fn, args, options)
            except Exception as error:
                explain_no_retry(plan, error)
                if not (isinstance(error, CircuitOpenError) and master_moved(args[0])):
                    raise
            # The sentinels named a new master while the old one's circuit refused: once
            # more, under the new master's breaker.
            plan, replay = plan_slowly(args, options)
            return plan.run(original if replay is None else replay(original), args, options)

        return self._compiled(layer, original) if compiled else layer

    def async_layer(self, original: Callable[..., Any]) -> Callable[..., Any]:
        patches, planner, where, plan_slowly = self.patches, self.planner, self.where, self.plan
        inline = self.kind == "command" and self.resolve is _standalone_target
        command_plan = self.command_planner() if inline else None
        compiled = inline and compiles()

        async def layer(*args: Any, **options: Any) -> Any:
            if not patches.enabled or not instrumentation_enabled():
                return await original(*args, **options)
            fn = original
            plan: Plan | None = None
            try:
                if command_plan is not None:
                    plan, target, seen = command_plan(args)
                    if compiled:
                        _share_plans(args[0].connection_pool, planner, target, seen)
                else:
                    plan, replay = plan_slowly(args, options)
                    if replay is not None:
                        fn = replay(original)
            except Exception as error:
                plan = None
                if not _malformed(args):
                    report_internal_error(where, error)
            if plan is None:  # see sync_layer
                return await original(*args, **options)
            try:
                return await plan.arun(fn, args, options)
            except Exception as error:
                explain_no_retry(plan, error)
                if not (isinstance(error, CircuitOpenError) and await amaster_moved(args[0])):
                    raise
            plan, replay = plan_slowly(args, options)  # see sync_layer
            return await plan.arun(original if replay is None else replay(original), args, options)

        return self._compiled(layer, original, awaits=True) if compiled else layer

    def _compiled(
        self, layer: Callable[..., Any], original: Callable[..., Any], *, awaits: bool = False
    ) -> Callable[..., Any]:
        """A standalone command's remembered happy path, compiled: the C layer reads the
        plans :func:`_share_plans` left on the pool and calls ``layer`` for everything else
        (otel_recovery/_speedups_src/). For an async site (``awaits``) it returns the
        awaitable the plan's async runner makes (``async_run.c``)."""
        return compiled_layer(
            layer,
            original,
            self.patches,
            site=self.site,
            token=None,
            holder_attr="connection_pool",
            table_attr=_COMPILED_PLANS,
            key_index=1,
            awaits=awaits,
        )


_SITES: tuple[tuple[Any, str, Kind, Resolve, bool], ...] = (
    (redis.client.Redis, "execute_command", "command", _standalone_target, False),
    (redis.client.Pipeline, "execute", "pipeline", _standalone_target, False),
    (redis.client.Pipeline, "immediate_execute_command", "immediate", _standalone_target, False),
    (redis.cluster.RedisCluster, "execute_command", "command", _cluster_target, False),
    (redis.cluster.ClusterPipeline, "execute", "pipeline", _cluster_target, False),
    (redis.asyncio.client.Redis, "execute_command", "command", _standalone_target, True),
    (redis.asyncio.client.Pipeline, "execute", "pipeline", _standalone_target, True),
    (
        redis.asyncio.client.Pipeline,
        "immediate_execute_command",
        "immediate",
        _standalone_target,
        True,
    ),
    (redis.asyncio.cluster.RedisCluster, "execute_command", "command", _cluster_target, True),
    (redis.asyncio.cluster.ClusterPipeline, "execute", "pipeline", _cluster_target, True),
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
    policy_class: ClassVar[type[TargetPolicy]] = _RedisPolicy

    def _mends(self, clock: Clock) -> tuple[Mend | None, AMend | None]:
        reconnect = ReplicaReconnect(clock)

        def mend(error: BaseException, args: tuple[Any, ...]) -> None:
            _keep_to_the_session(error, args)
            _hold_back_unproven(error, args)
            reconnect.mend(error, args)

        async def amend(error: BaseException, args: tuple[Any, ...]) -> None:
            _keep_to_the_session(error, args)
            _hold_back_unproven(error, args)
            await reconnect.amend(error, args)

        return mend, amend

    def _install(self, patches: PatchSet, targets: TargetPolicies, kwargs: dict[str, Any]) -> None:
        planner = _Planner(targets)
        for owner, attribute, kind, resolve, is_async in _SITES:
            site = Site(owner, attribute)
            library = "redis.asyncio" if is_async else "redis"
            where = f"{library} {owner.__name__}.{attribute}"
            layers = _SiteLayers(planner, kind, site, resolve, patches, where)
            build = layers.async_layer if is_async else layers.sync_layer
            site.proxy = patches.layer(owner, attribute, build, beneath_contrib=True)
