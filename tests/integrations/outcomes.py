"""What the application gets from a call, and the stacks a test builds: shared by the Redis
Cluster and Sentinel tests, which compare redis-py alone with the instrumented stacks."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator
from typing import Any


def outcome(call: Any) -> Any:
    """The call's result, or the type of what it raised."""
    try:
        return call()
    except Exception as error:  # the test compares what the application gets
        return type(error)


async def aoutcome(call: Any) -> Any:
    """:func:`outcome` of an awaited call."""
    try:
        return await call()
    except Exception as error:
        return type(error)


async def aoutcome_of(call: Any) -> Any:
    """:func:`outcome` of a sync call, :func:`aoutcome` of an asyncio one."""
    try:
        result = call()
        return await result if inspect.isawaitable(result) else result
    except Exception as error:
        return type(error)


def healed_stacks(
    build: Callable[..., Any], heal: Callable[[], None]
) -> Iterator[Callable[..., Any]]:
    """The body of a ``stacks`` fixture: ``stacks(order, **settings)`` is ``build``'s new
    stack; all of them are closed and ``heal()`` runs when the test ends, whatever
    happened."""
    made: list[Any] = []

    def make(order: str, **settings: Any) -> Any:
        stack = build(order, **settings)
        made.append(stack)
        return stack

    try:
        yield make
    finally:
        try:
            while made:
                made.pop().close()
        finally:
            heal()
