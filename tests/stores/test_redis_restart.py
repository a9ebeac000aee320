"""A real Redis restart during a run: degrade to local state, then resynchronise.

Uses a private ``redis-server`` (append-only file, fsync always) on a free port, never the
shared one. The run checkpoints and counts before, during and after the outage; afterwards a
fresh client must see every write exactly once, with versions continuing where they were.
"""

from __future__ import annotations

import logging
import time

from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from otel_recovery.checkpoint import Checkpoints
from otel_recovery.stores import ResilientStore, open_store
from otel_recovery.telemetry import attributes as names


def test_a_redis_restart_degrades_to_local_state_and_resyncs(private_redis, caplog):
    url = f"{private_redis.url}?prefix=run:"
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = provider.get_tracer("test")
    shared = ResilientStore(open_store(url), retry_interval=0.2)
    checkpoints = Checkpoints(shared)

    with caplog.at_level(logging.INFO, logger="otel_recovery"), tracer.start_as_current_span("run"):
        assert checkpoints.save("job", {"step": 1}) == 1
        assert checkpoints.save("job", {"step": 2}) == 2
        assert checkpoints.save("cas", {"owner": "me"}) == 1
        shared.incr("learned", {"retry:ok": 3})
        assert shared.counters("learned") == {"retry:ok": 3.0}

        private_redis.stop()
        # Degraded: nothing raises, state stays readable and writable.
        assert checkpoints.save("job", {"step": 3}) == 3
        assert checkpoints.load("job").state == {"step": 3}
        assert checkpoints.save("job", {"step": 4}, expected_version=3) == 4
        assert checkpoints.save("fresh", {"new": True}) == 1
        shared.incr("learned", {"retry:ok": 2, "retry:fail": 1})
        shared.incr("learned", {"retry:ok": 1})
        assert shared.counters("learned") == {"retry:ok": 6.0, "retry:fail": 1.0}
        assert shared.degraded

        private_redis.start()  # same port, same append-only file: the old data is back
        other = open_store(url)
        other.put("cas", b'{"owner":"someone else"}')  # a writer elsewhere moves "cas" on
        time.sleep(0.25)
        assert checkpoints.save("cas", {"owner": "me, later"}, expected_version=2) == 3
        assert not shared.degraded

    # What a fresh client sees: every write once, versions continuing, counters summed once.
    assert other.get("job").version == 4
    assert [other.get("job", n).data for n in (3, 4)] == [b'{"step":3}', b'{"step":4}']
    assert other.get("fresh").data == b'{"new":true}'
    assert other.counters("learned") == {"retry:ok": 6.0, "retry:fail": 1.0}
    assert other.get("cas", 3).data == b'{"owner":"me, later"}'
    assert shared.conflicts == []

    degraded = [r for r in caplog.records if "is unreachable" in r.getMessage()]
    resynced = [r for r in caplog.records if "is reachable again" in r.getMessage()]
    assert len(degraded) == 1 and len(resynced) == 1
    assert "replayed 4 local change(s), 0 conflict(s)" in resynced[0].getMessage()
    (span,) = exporter.get_finished_spans()
    events = {e.name: e for e in span.events}
    assert events[names.EVENT_STORE_DEGRADED].attributes[names.STORE_URL] == url
    assert events[names.EVENT_STORE_RESYNCED].attributes[names.STORE_REPLAYED] == 4
    other.close()
    shared.close()
