"""What a Redis failure proves: that the command never ran, or that it was the client's doing.

Two questions the Redis instrumentor asks of an error, answered from the error alone.

Whether the command provably never ran (:func:`never_ran`): the server refused it before
running it (:data:`REFUSALS`: ``READONLY``, ``LOADING``, ``MASTERDOWN``), or the connection
it was to be sent on could not be made. Only such a failure lets a command that may not be
sent twice (``INCR``) go out again, and only where nothing else may have resent it already
(:mod:`._redis_mends` holds it back elsewhere).

Whether the failure is the application's or its client's, not the server's
(:func:`pool_exhausted`, :func:`cluster_misuse`): such a failure is neither retried nor
counted on the server's breaker (:class:`RedisPolicy`), so a pool sized too small, or
calls with keys in two cluster slots, cannot open a healthy server's circuit.

redis-py says most of this only in its messages, so the predicates match the exact words of
redis-py 4.5 to 8, and where a server's reply could read the same (a pool's ``Too many
connections``), also where the error was raised.
"""

from __future__ import annotations

from redis.exceptions import (
    BusyLoadingError,
    MasterDownError,
    MaxConnectionsError,
    ReadOnlyError,
    RedisClusterException,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from otel_recovery.instrumentors._guarded import GuardedPolicy, raised_in
from otel_recovery.policies.circuit_breaker import CircuitOpenError

__all__ = [
    "REFUSALS",
    "RedisPolicy",
    "cluster_misuse",
    "never_connected",
    "never_ran",
    "pool_exhausted",
]


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


class RedisPolicy(GuardedPolicy):
    """A Redis target's policy: an exhausted connection pool of the application's
    (:func:`pool_exhausted`), or a cluster client refusing a call it cannot route
    (:func:`cluster_misuse`), is not the server's failure."""

    __slots__ = ()

    def _clients_own(self, error: BaseException) -> bool:
        return pool_exhausted(error) or cluster_misuse(error) or super()._clients_own(error)
