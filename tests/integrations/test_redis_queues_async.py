"""redis.asyncio as a queue and coordination client, under real faults, with and without us.

The asyncio twin of ``test_redis_queues.py`` where redis-py has the feature (RQ is sync
only): blocking pops are never sent twice, XREAD BLOCK (a read) is, a flushed script runs
once, and ``transaction`` with a rival writer applies once. One thing is async-only: our
per-attempt limit (``OTEL_RECOVERY_ATTEMPT_TIMEOUT``) *cancels* an async attempt, where a
sync one is only told its deadline; a blocking command waits, by design, as long as its own
timeout says, and a cut BLPOP may have popped an element that nobody receives.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from typing import Any

import pytest
from redis.exceptions import ConnectionError as RedisConnectionError
from servers import PrivateRedis, aclose, private_redis  # noqa: F401

from integrations.redis_queues import Stack, kill_when_blocked

pytestmark = pytest.mark.server


@pytest.fixture
def server(private_redis: PrivateRedis) -> Iterator[PrivateRedis]:  # noqa: F811
    yield private_redis
    private_redis.heal()


@pytest.fixture
def stacks(server: PrivateRedis) -> Iterator[Any]:
    made: list[Stack] = []

    def make(order: str, **settings: Any) -> Stack:
        while made:
            made.pop().close()
        stack = Stack(server, order, **settings)
        made.append(stack)
        return stack

    yield make
    while made:
        made.pop().close()


@pytest.mark.parametrize("order", ["baseline", "contrib_first", "ours_only"])
@pytest.mark.parametrize("command", ["BLPOP", "BLMOVE", "BZPOPMIN"])
async def test_a_pop_killed_mid_block_is_not_sent_again(
    stacks: Any, order: str, command: str
) -> None:
    stack = stacks(order)
    client = stack.aconnect(timeout=5)
    await client.ping()
    admin = stack.server.admin()

    def seed() -> None:
        if command == "BZPOPMIN":
            admin.zadd("z", {"a": 1})
        else:
            admin.rpush("l", "a")

    stack.reset_counts()
    killer = kill_when_blocked(stack.server, command, then=seed)
    with pytest.raises(RedisConnectionError):
        if command == "BLPOP":
            await client.blpop(["l"], 3)
        elif command == "BLMOVE":
            await client.blmove("l", "dest", 3, "LEFT", "RIGHT")
        else:
            await client.bzpopmin(["z"], 3)
    await asyncio.to_thread(killer.join)
    assert stack.sent[command] == 1
    left = stack.peek("zcard", "z") if command == "BZPOPMIN" else stack.peek("llen", "l")
    assert left == 1 and stack.peek("llen", "dest") == 0
    if stack.instrumented:
        assert stack.attempts["execute_command"] == 1
        attrs = stack.span_attributes(command)
        assert attrs["otel_recovery.retry.disallowed"] == "non_idempotent_command"
    await aclose(client)


@pytest.mark.parametrize("order", ["baseline", "contrib_first", "ours_only"])
async def test_xread_block_killed_mid_block_is_retried_by_us(stacks: Any, order: str) -> None:
    stack = stacks(order)
    client = stack.aconnect(timeout=5)
    await client.ping()
    admin = stack.server.admin()
    stack.reset_counts()
    killer = kill_when_blocked(stack.server, "XREAD", then=lambda: admin.xadd("s", {"f": "v"}))
    if not stack.instrumented:
        with pytest.raises(RedisConnectionError):
            await client.xread({"s": "0-0"}, block=3000)
    else:
        ((stream, entries),) = await client.xread({"s": "0-0"}, block=3000)
        assert stream == b"s" and entries[0][1] == {b"f": b"v"}
        attrs = stack.span_attributes("XREAD")
        assert (attrs["otel_recovery.outcome"], attrs["otel_recovery.retry.attempts"]) == (
            "success",
            2,
        )
    await asyncio.to_thread(killer.join)
    assert stack.sent["XREAD"] == (2 if stack.instrumented else 1)
    await aclose(client)


@pytest.mark.parametrize("attempt_timeout", [None, 0.3])
async def test_a_blocking_pop_waits_its_own_timeout(stacks: Any, attempt_timeout: Any) -> None:
    """BLPOP 1 waits up to 1 s by the caller's word; an element pushed at 0.5 s is its
    answer. With the default settings (no attempt limit) that is so; with
    OTEL_RECOVERY_ATTEMPT_TIMEOUT=0.3 the attempt must not be cancelled at 0.3 s either
    (today it is: builtin TimeoutError, a breaker failure, see the report)."""
    stack = stacks("contrib_first", attempt_timeout=attempt_timeout)
    client = stack.aconnect(timeout=5)
    await client.ping()
    admin = stack.server.admin()
    loop = asyncio.get_running_loop()
    loop.call_later(0.5, lambda: admin.rpush("l", "late"))
    started = time.monotonic()
    assert await client.blpop(["l"], 1) == (b"l", b"late")
    assert 0.4 < time.monotonic() - started < 0.9
    assert stack.failed_calls() == 0 and stack.sent["BLPOP"] == 1
    await asyncio.sleep(0.1)
    assert stack.peek("llen", "l") == 0
    await aclose(client)


@pytest.mark.parametrize("attempt_timeout", [None, 0.3])
async def test_an_idle_xread_block_returns_empty(stacks: Any, attempt_timeout: Any) -> None:
    """XREAD BLOCK 800 on a quiet stream answers [] after 0.8 s; it is not a failure."""
    stack = stacks("contrib_first", attempt_timeout=attempt_timeout)
    client = stack.aconnect(timeout=5)
    await client.ping()
    stack.reset_counts()
    assert await client.xread({"s": "0-0"}, block=800) == []
    assert stack.failed_calls() == 0 and stack.sent["XREAD"] == 1
    await aclose(client)


BUMP = "redis.call('INCR', KEYS[1]) return redis.call('GET', KEYS[1])"


@pytest.mark.parametrize("order", ["baseline", "contrib_first", "ours_only"])
async def test_a_flushed_script_is_loaded_and_run_once(stacks: Any, order: str) -> None:
    stack = stacks(order)
    client = stack.aconnect()
    bump = client.register_script(BUMP)
    assert await bump(keys=["n"]) == b"1"
    stack.server.admin().script_flush()
    stack.reset_counts()
    assert await bump(keys=["n"]) == b"2"
    assert stack.peek("get", "n") == b"2"
    assert stack.sent["EVALSHA"] == 2 and stack.sent["SCRIPT"] == 1
    assert stack.failed_calls() == 0
    await aclose(client)


@pytest.mark.parametrize("order", ["baseline", "contrib_first", "ours_only"])
async def test_transaction_with_a_concurrent_writer_is_applied_once(
    stacks: Any, order: str
) -> None:
    stack = stacks(order, breaker_window=4, breaker_minimum_calls=2)
    client, rival = stack.aconnect(), stack.aconnect()
    await client.set("balance", 100)
    runs: list[int] = []

    async def deposit(pipe: Any) -> None:
        balance = int(await pipe.get("balance"))
        runs.append(balance)
        if len(runs) <= 2:
            await rival.incr("balance")
        pipe.multi()
        pipe.set("balance", balance + 10)

    assert await client.transaction(deposit, "balance") == [True]
    assert runs == [100, 101, 102]
    assert stack.peek("get", "balance") == b"112"
    assert stack.sent["EXEC"] == 3
    assert stack.failed_calls() == 0
    await aclose(client)
    await aclose(rival)


@pytest.mark.parametrize("order", ["ours_only", "contrib_first"])
async def test_a_killed_subscriber_reconnects_as_without_us(stacks: Any, order: str) -> None:
    async def story(stack: Stack) -> list[Any]:
        client = stack.aconnect(timeout=2)
        pubsub = client.pubsub()
        await pubsub.subscribe("ch")
        seen: list[Any] = []
        first = await pubsub.get_message(timeout=1)
        seen.append(first and first["type"])
        admin = stack.server.admin()
        listing = admin.execute_command("CLIENT", "LIST", "TYPE", "pubsub").decode()
        admin.execute_command("CLIENT", "KILL", "ID", int(listing.split("id=")[1].split()[0]))
        for _ in range(3):
            try:
                message = await pubsub.get_message(timeout=0.1)
                seen.append(message and (message["type"], message["data"]))
            except Exception as error:
                seen.append(type(error).__name__)
        seen.append(await client.publish("ch", "hello"))
        for _ in range(3):
            try:
                message = await pubsub.get_message(timeout=0.1)
                seen.append(message and (message["type"], message["data"]))
            except Exception as error:
                seen.append(type(error).__name__)
        await pubsub.aclose()
        await aclose(client)
        return seen

    expected = await story(stacks("baseline"))
    stack = stacks(order)
    assert await story(stack) == expected
    assert stack.failed_calls() == 0
