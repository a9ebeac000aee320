"""Fixtures the Redis queue tests share (``test_redis_queues.py`` and its async twin)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from servers import PrivateRedis, private_redis  # noqa: F401  (a fixture, used below)

from integrations.redis_queues import Stack


@pytest.fixture
def queue_redis(private_redis: PrivateRedis) -> Iterator[PrivateRedis]:  # noqa: F811
    """The test's own redis-server, healed (unpaused, resumed, flushed) afterwards."""
    yield private_redis
    private_redis.heal()


@pytest.fixture
def stacks(queue_redis: PrivateRedis) -> Iterator[Any]:
    """``stacks(order, **settings)``: a new :class:`Stack` on the test's own server; the
    previous one (a test's baseline run) is closed first, and the last when the test ends."""
    made: list[Stack] = []

    def make(order: str, **settings: Any) -> Stack:
        while made:
            made.pop().close()
        stack = Stack(queue_redis, order, **settings)
        made.append(stack)
        return stack

    yield make
    while made:
        made.pop().close()
