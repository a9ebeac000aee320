"""What a redis-py pipeline holds, read without running it, and refilling it for a retry.

A pipeline's call is planned from its contents: a transactional one (MULTI/EXEC, WATCH,
redis-py's default ``pipeline()``) is never retried (:func:`is_transaction`), a
non-transactional one only when every command it queued may be sent twice (:func:`queued_commands`).
redis-py empties a pipeline when ``execute()`` fails, so a retried one is refilled with the
same commands before each later attempt (:class:`Replay`).

The layouts differ: a pipeline keeps a ``command_stack``, a cluster pipeline of newer
redis-py releases a queue on its execution strategy. An unknown layout is read as the worst
case: a transaction, or contents unknown, so never retried.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import redis.asyncio.cluster
import redis.cluster

__all__ = ["Queued", "Replay", "is_cluster_pipeline", "queued_commands", "is_transaction"]


Queued = list[tuple[tuple[Any, ...], dict[str, Any]]]


_CLUSTER_PIPELINES = (redis.cluster.ClusterPipeline, redis.asyncio.cluster.ClusterPipeline)


def is_cluster_pipeline(instance: Any) -> bool:
    return isinstance(instance, _CLUSTER_PIPELINES)


def is_transaction(pipe: Any) -> bool:
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


def queued_commands(pipe: Any) -> Queued | None:
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


class Replay:
    """One pipeline attempt; from the second on, first puts back what ``execute`` cleared."""

    @staticmethod
    def wrapping(pipe: Any, saved: Queued) -> Callable[[Callable[..., Any]], Replay]:
        return lambda execute: Replay(execute, pipe, saved)

    __slots__ = ("_pipe", "_saved", "_started", "_wrapped")

    def __init__(self, wrapped: Callable[..., Any], pipe: Any, saved: Queued) -> None:
        self._wrapped = wrapped
        self._pipe = pipe
        self._saved = saved
        self._started = False

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self._started and not queued_commands(self._pipe):
            pipe = self._pipe
            if getattr(pipe, "_execution_strategy", None) is None:
                pipe.command_stack.extend(self._saved)
            else:
                stage = getattr(pipe, "pipeline_execute_command", None) or pipe.execute_command
                for command, options in self._saved:
                    stage(*command, **options)
        self._started = True
        return self._wrapped(*args, **kwargs)
