"""What redis-py's own retry repeats by itself, so that ours does not repeat it again.

Each redis-py connection carries a ``Retry`` that reconnects and resends a command after the
errors it supports, and a cluster client has one more around its routing. A failure that
layer already repeated is not repeated by ours: stacked, the attempts multiply (3 x 11
sends). What it never repeats is ours to retry. So each target records the errors its
client's retry covers and how often (:class:`~._redis_targets.Target`), read here from the
client's configuration by redis-py's own rules, which changed across releases: before 6.0
only the connection's ``retry_on_error`` list counts (:data:`_ONLY_LISTED_ERRORS`), before
5.0.2 a pipeline repeats only timeouts (:data:`_PIPELINES_REPEAT_ONLY_TIMEOUTS`), before 6 a
cluster counts its ``cluster_error_retry_attempts`` (:func:`cluster_repeats`).

The same rules tell the mends whether a failure that looks like proof the command never ran
may follow a resend of redis-py's (:mod:`._redis_mends`).
"""

from __future__ import annotations

import socket
from typing import Any

import redis.client
import redis.exceptions
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

__all__ = ["cluster_repeats", "idle_ones_resend", "own_coverage", "pipeline_coverage"]


_REDIS_RETRIES = (RedisConnectionError, RedisTimeoutError, socket.timeout)
_UNREACHABLE = getattr(redis.exceptions, "RedisClusterUnreachableError", None)
_GAVE_UP: tuple[type[BaseException], ...] = () if _UNREACHABLE is None else (_UNREACHABLE,)
"""What redis-py's cluster retry raises in place of the connection error it was repeating
(8.2: a slot-map refresh since reached no node): a failure it already retried."""
"""What a redis-py ``Retry`` repeats when not told otherwise."""


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


def pipeline_coverage(
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


def own_coverage(
    kwargs: dict[str, Any], retry: Any
) -> tuple[tuple[type[BaseException], ...], int, list[Any]]:
    """What a pool's connections repeat by themselves (errors, how often), and the errors
    its ``retry_on_error`` / ``retry_on_timeout`` add."""
    extra = list(kwargs.get("retry_on_error") or ())
    if kwargs.get("retry_on_timeout"):
        extra.append(RedisTimeoutError)
    errors, retries = _coverage(retry, extra)
    return errors, retries, extra


def idle_ones_resend(pool: Any) -> bool:
    """Whether an idle connection of ``pool`` (the one just refused among them) repeats
    commands by itself: an asyncio pool's ``set_retry`` gives its connections a new
    ``Retry`` without changing the ``connection_kwargs`` new ones are made from."""
    for connection in list(getattr(pool, "_available_connections", None) or ()):
        extra = list(getattr(connection, "retry_on_error", None) or ())
        errors, retries = _coverage(getattr(connection, "retry", None), extra)
        if retries and errors:
            return True
    return False


def cluster_repeats(
    instance: Any, client: Any, retry: Any, *, named: bool
) -> tuple[tuple[type[BaseException], ...], int]:
    """What redis-py's cluster client repeats by itself, and how often.

    From redis-py 6 its ``retry`` repeats ``ERRORS_ALLOW_RETRY``, but never a call to nodes
    named by object (see :func:`~._redis_targets.cluster_routing`). Before 6,
    ``cluster_error_retry_attempts`` did (3 by default), and ``retry=`` went to every node's
    connections instead, which repeat with it a connect that timed out (a refused one
    raises an ``OSError`` their ``Retry`` does not catch): so a named node's call, or any
    call with that count at 0, counts its ``TimeoutError`` as repeated (one from a read is
    then taken as repeated although it was not: unsure here costs a retry, never a
    multiplication). redis-py 8.2's ``RedisClusterUnreachableError`` counts as repeated too
    (:data:`_GAVE_UP`)."""
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
    return (*errors, *_GAVE_UP), retries
