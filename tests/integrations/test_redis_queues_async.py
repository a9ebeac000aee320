"""redis.asyncio as a queue and coordination client, under real faults, with and without us.

The asyncio twin of ``test_redis_queues.py`` where redis-py has the feature (RQ is sync
only): blocking pops are never sent twice, XREAD BLOCK (a read) is, a flushed script runs
once, and ``transaction`` with a rival writer applies once. One thing is async-only: our
per-attempt limit (``OTEL_RECOVERY_ATTEMPT_TIMEOUT``) *cancels* an async attempt, where a
sync one is only told its deadline; a blocking command waits, by design, as long as its own
timeout says (such commands are exempt from the limit, as a cut BLPOP may have popped an
element that nobody receives).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from redis.exceptions import ConnectionError as RedisConnectionError
from servers import aclose

from integrations.redis_queues import (
    Stack,
    client_id_of,
    kill_when_blocked,
)

pytestmark = pytest.mark.server


Closing = Callable[[Any], Any]


@pytest.fixture
async def closing() -> AsyncIterator[Closing]:
    """``closing(client)``: the client, closed after the test however it ended."""
    opened: list[Any] = []

    def register(client: Any) -> Any:
        opened.append(client)
        return client

    yield register
    for client in reversed(opened):
        with contextlib.suppress(Exception):
            await aclose(client)
        with contextlib.suppress(Exception):  # a pool passed in is not closed with its client
            await client.connection_pool.disconnect()


@pytest.mark.parametrize("order", ["baseline", "contrib_first", "ours_only"])
@pytest.mark.parametrize("command", ["BLPOP", "BLMOVE", "BZPOPMIN"])
async def test_a_pop_killed_mid_block_is_not_sent_again(
    stacks: Any, closing: Closing, order: str, command: str
) -> None:
    stack = stacks(order)
    client = closing(stack.aconnect(timeout=5))
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


@pytest.mark.parametrize("order", ["baseline", "contrib_first", "ours_only"])
async def test_xread_block_killed_mid_block_is_retried_by_us(
    stacks: Any, closing: Closing, order: str
) -> None:
    stack = stacks(order)
    client = closing(stack.aconnect(timeout=5))
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


# The attempt limit of these tests bounds their healthy commands too (the PING, a MULTI/EXEC
# pipeline): 1 s, not 0.3 s, so that they beat it on a loaded machine as well (a few ms on an
# idle one). The waits that must outlast it are 1.5 s.


@pytest.mark.parametrize("attempt_timeout", [None, 1.0])
async def test_a_blocking_pop_waits_its_own_timeout(
    stacks: Any, closing: Closing, attempt_timeout: Any
) -> None:
    """BLPOP 3 waits up to 3 s by the caller's word; an element pushed at 1.5 s is its
    answer. With the default settings (no attempt limit) that is so; with
    OTEL_RECOVERY_ATTEMPT_TIMEOUT=1 the attempt is not cancelled at 1 s either: commands
    that wait on purpose are exempt from the limit (a cut BLPOP would be a builtin
    TimeoutError, a breaker failure, and maybe an element popped for nobody)."""
    stack = stacks("contrib_first", attempt_timeout=attempt_timeout)
    client = closing(stack.aconnect(timeout=5))
    await client.ping()
    admin = stack.server.admin()
    started = time.monotonic()
    stack.server.after(1.5, lambda: admin.rpush("l", "late"))
    assert await client.blpop(["l"], 3) == (b"l", b"late")  # only there at 1.5 s: not cut
    assert time.monotonic() - started > 1.4
    assert stack.failed_calls() == 0 and stack.sent["BLPOP"] == 1
    await asyncio.sleep(0.1)
    assert stack.peek("llen", "l") == 0


@pytest.mark.parametrize("transaction", [False, True])
async def test_a_blocking_pop_in_a_pipeline_is_not_cut_either(
    stacks: Any, closing: Closing, transaction: bool
) -> None:
    """A BLPOP queued in a pipeline waits inside the pipeline's round trip, so that pipeline
    is exempt too (found by review); inside MULTI/EXEC the server never blocks, so a
    transaction keeps the limit and answers at once."""
    stack = stacks("contrib_first", attempt_timeout=1.0)
    client = closing(stack.aconnect(timeout=5))
    await client.ping()
    admin = stack.server.admin()
    stack.server.after(1.5, lambda: admin.rpush("l", "late"))
    pipe = client.pipeline(transaction=transaction)
    pipe.blpop(["l"], 3)
    expected = [None] if transaction else [(b"l", b"late")]  # MULTI: an empty list, no wait
    assert [None if r is None else tuple(r) for r in await pipe.execute()] == expected
    assert stack.failed_calls() == 0


@pytest.mark.parametrize("attempt_timeout", [None, 1.0])
async def test_an_idle_xread_block_returns_empty(
    stacks: Any, closing: Closing, attempt_timeout: Any
) -> None:
    """XREAD BLOCK 1500 on a quiet stream answers [] after 1.5 s; it is not a failure."""
    stack = stacks("contrib_first", attempt_timeout=attempt_timeout)
    client = closing(stack.aconnect(timeout=5))
    await client.ping()
    stack.reset_counts()
    assert await client.xread({"s": "0-0"}, block=1500) == []
    assert stack.failed_calls() == 0 and stack.sent["XREAD"] == 1


BUMP = "redis.call('INCR', KEYS[1]) return redis.call('GET', KEYS[1])"


@pytest.mark.parametrize("order", ["baseline", "contrib_first", "ours_only"])
async def test_a_flushed_script_is_loaded_and_run_once(
    stacks: Any, closing: Closing, order: str
) -> None:
    stack = stacks(order)
    client = closing(stack.aconnect())
    bump = client.register_script(BUMP)
    assert await bump(keys=["n"]) == b"1"
    stack.server.admin().script_flush()
    stack.reset_counts()
    assert await bump(keys=["n"]) == b"2"
    assert stack.peek("get", "n") == b"2"
    assert stack.sent["EVALSHA"] == 2 and stack.sent["SCRIPT"] == 1
    assert stack.failed_calls() == 0


@pytest.mark.parametrize("order", ["baseline", "contrib_first", "ours_only"])
async def test_transaction_with_a_concurrent_writer_is_applied_once(
    stacks: Any, closing: Closing, order: str
) -> None:
    stack = stacks(order, breaker_window=4, breaker_minimum_calls=2)
    client, rival = closing(stack.aconnect()), closing(stack.aconnect())
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


SUBSCRIBER = "otelrec-subscriber"


@pytest.mark.parametrize("order", ["ours_only", "contrib_first"])
async def test_a_killed_subscriber_reconnects_as_without_us(
    stacks: Any, closing: Closing, order: str
) -> None:
    async def read_until(pubsub: Any, wanted: tuple[str, Any], seen: list[Any]) -> None:
        """Read (1 s each, at most 5) until ``wanted``; empty reads are not in the story."""
        for _ in range(5):
            try:
                message = await pubsub.get_message(timeout=1)
            except Exception as error:  # the app's view: which exception
                seen.append(type(error).__name__)
                continue
            if message is not None:
                seen.append((message["type"], message["data"]))
                if seen[-1] == wanted:
                    return
        seen.append(("never got", wanted))

    async def story(stack: Stack) -> list[Any]:
        client = closing(stack.aconnect(timeout=2, name=SUBSCRIBER))
        pubsub = client.pubsub()
        admin = stack.server.admin()
        seen: list[Any] = []
        try:
            await pubsub.subscribe("ch")
            await read_until(pubsub, ("subscribe", 1), seen)
            subscriber = await asyncio.to_thread(
                client_id_of,
                admin,
                lambda row: row.get("name") == SUBSCRIBER and "P" in row.get("flags", ""),
            )
            admin.execute_command("CLIENT", "KILL", "ID", subscriber)
            await read_until(pubsub, ("subscribe", 1), seen)  # redis-py's resubscription
            seen.append(("receivers", await client.publish("ch", "hello")))
            await read_until(pubsub, ("message", b"hello"), seen)
        finally:
            await pubsub.aclose()
            await aclose(client)
            admin.close()
        return seen

    expected = await story(stacks("baseline"))
    assert ("message", b"hello") in expected  # redis-py resubscribed by itself
    stack = stacks(order)
    assert await story(stack) == expected
    assert stack.failed_calls() == 0
