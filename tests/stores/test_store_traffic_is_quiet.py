"""Our own store traffic is never traced or retried by our (or contrib's) instrumentors."""

from __future__ import annotations

import uuid

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

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
