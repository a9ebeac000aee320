"""Our own store traffic is never traced or retried by our (or contrib's) instrumentors."""

from __future__ import annotations

import asyncio
import uuid

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from servers import aclose

from otel_recovery.checkpoint import Checkpoints
from otel_recovery.stores import open_store

from .conftest import REDIS_URL, require


def test_checkpoints_in_redis_produce_no_client_spans():
    require("redis")
    redis_instrumentation = pytest.importorskip("opentelemetry.instrumentation.redis")
    from otel_recovery.instrumentors.redis import RedisRecoveryInstrumentor

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    contrib = redis_instrumentation.RedisInstrumentor()
    ours = RedisRecoveryInstrumentor()
    contrib.instrument(tracer_provider=provider)
    ours.instrument(tracer_provider=provider)
    store = open_store(f"{REDIS_URL}?prefix=quiet-{uuid.uuid4().hex[:8]}:")
    try:
        checkpoints = Checkpoints(store)
        version = checkpoints.save("job", {"cursor": 1})
        assert checkpoints.load("job").version == version
        assert exporter.get_finished_spans() == ()
    finally:
        checkpoints.delete("job")
        ours.uninstrument()
        contrib.uninstrument()


@pytest.mark.parametrize("flavour", ["sync", "async"])
def test_a_wrapper_that_ignores_suppression_sees_no_store_command(flavour):
    """As contrib's redis instrumentation before 0.60b0 does: it traces every command, even
    with instrumentation suppressed. The store's commands must not reach it; an ordinary
    client's command does (the wrapper is live)."""
    require("redis")
    import redis
    import redis.asyncio
    import wrapt

    seen: list[object] = []

    def count(wrapped, instance, args, kwargs):
        seen.append(args[0])
        return wrapped(*args, **kwargs)

    async def acount(wrapped, instance, args, kwargs):
        seen.append(args[0])
        return await wrapped(*args, **kwargs)

    owner = redis.Redis if flavour == "sync" else redis.asyncio.Redis
    original = owner.__dict__["execute_command"]
    wrapt.wrap_function_wrapper(owner, "execute_command", count if flavour == "sync" else acount)
    checkpoints = Checkpoints(open_store(f"{REDIS_URL}?prefix=quiet-{uuid.uuid4().hex[:8]}:"))
    try:
        if flavour == "sync":
            version = checkpoints.save("job", {"cursor": 1})
            assert checkpoints.load("job").version == version
            checkpoints.delete("job")
            assert seen == []
            with redis.Redis.from_url(REDIS_URL) as probe:
                probe.ping()
        else:

            async def go() -> None:
                version = await checkpoints.asave("job", {"cursor": 1})
                assert (await checkpoints.aload("job")).version == version
                await checkpoints.adelete("job")
                await checkpoints.aclose()
                assert seen == []
                probe = redis.asyncio.Redis.from_url(REDIS_URL)
                await probe.ping()
                await aclose(probe)

            asyncio.run(go())
        assert seen == ["PING"]
    finally:
        setattr(owner, "execute_command", original)
