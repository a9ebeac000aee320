"""The anomaly processor leaves out the spans of probes made inside ``suppress_recovery()``.

A readiness check or redis-py's MultiDB health check calls a server whatever the
application does; counting its errors would make an anomaly (and tighten a breaker) of a
server no application call failed on.
"""

from __future__ import annotations

import asyncio
import socket

import pytest

pytest.importorskip("statsmodels")

from opentelemetry import context as otel_context  # noqa: E402
from opentelemetry.sdk.resources import Resource  # noqa: E402
from opentelemetry.sdk.trace import TracerProvider  # noqa: E402
from opentelemetry.trace import SpanKind, Status, StatusCode, Tracer  # noqa: E402

from otel_recovery.instrumentors import suppress_recovery  # noqa: E402
from otel_recovery.instrumentors._suppression import RECOVERY_OFF_KEY  # noqa: E402
from otel_recovery.learning import AnomalyEvent, SeriesKey  # noqa: E402
from otel_recovery.learning import _processor as processor_module  # noqa: E402
from otel_recovery.learning.anomaly import AnomalySpanProcessor  # noqa: E402
from otel_recovery.testing import FakeClock  # noqa: E402

HTTP = {"http.request.method": "GET", "server.address": "api.example"}
KEY = SeriesKey("shop", "api.example", "HTTP GET")
START = 1_700_000_000.0


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(wall_start=START)


@pytest.fixture
def processor(clock: FakeClock) -> AnomalySpanProcessor:
    return AnomalySpanProcessor(clock=clock, start_worker=False, service="shop")


@pytest.fixture
def tracer(processor: AnomalySpanProcessor) -> Tracer:
    provider = TracerProvider(resource=Resource.create({"service.name": "shop"}))
    provider.add_span_processor(processor)
    return provider.get_tracer("test")


def _call(tracer: Tracer, at: float, *, error: bool = False) -> None:
    """One client span ending at ``at`` (wall seconds), 20 ms long."""
    span = tracer.start_span(
        "GET", kind=SpanKind.CLIENT, attributes=HTTP, start_time=int((at - 0.02) * 1e9)
    )
    if error:
        span.set_status(Status(StatusCode.ERROR))
    span.end(end_time=int(at * 1e9))


def test_spans_started_inside_suppress_recovery_are_left_out(
    processor: AnomalySpanProcessor, tracer: Tracer, clock: FakeClock
) -> None:
    for _ in range(3):
        _call(tracer, clock.wall(), error=True)
    with suppress_recovery():
        for _ in range(5):
            _call(tracer, clock.wall(), error=True)
    processor.process()
    assert processor.series() == {KEY: (3, 3)}
    assert processor.suppressed_spans == 5


def test_what_counts_is_where_the_span_started(
    processor: AnomalySpanProcessor, tracer: Tracer, clock: FakeClock
) -> None:
    at = int(clock.wall() * 1e9)
    with suppress_recovery():
        probe = tracer.start_span("GET", kind=SpanKind.CLIENT, attributes=HTTP, start_time=at)
    call = tracer.start_span("GET", kind=SpanKind.CLIENT, attributes=HTTP, start_time=at)
    with suppress_recovery():
        call.end(end_time=at + 1)
    probe.end(end_time=at + 1)
    processor.process()
    assert processor.series() == {KEY: (1, 0)}
    assert processor.suppressed_spans == 1


def test_an_explicit_parent_context_inside_suppress_recovery_counts_as_a_probe(
    processor: AnomalySpanProcessor, tracer: Tracer, clock: FakeClock
) -> None:
    probing = otel_context.set_value(RECOVERY_OFF_KEY, True)
    span = tracer.start_span("GET", context=probing, kind=SpanKind.CLIENT, attributes=HTTP)
    span.end()
    processor.process()
    assert processor.series() == {} and processor.suppressed_spans == 1


def test_tasks_started_inside_the_block_keep_probing_after_it(
    processor: AnomalySpanProcessor, tracer: Tracer, clock: FakeClock
) -> None:
    async def main() -> None:
        go = asyncio.Event()

        async def probe() -> None:
            await go.wait()
            _call(tracer, clock.wall(), error=True)

        with suppress_recovery():
            task = asyncio.create_task(probe())
        go.set()
        await task
        _call(tracer, clock.wall(), error=True)

    asyncio.run(main())
    processor.process()
    assert processor.series() == {KEY: (1, 1)}
    assert processor.suppressed_spans == 1


def _traffic(tracer: Tracer, processor: AnomalySpanProcessor, clock: FakeClock) -> None:
    """One 10 s bucket of the application's calls: 100, one of them failing."""
    for i in range(100):
        _call(tracer, clock.wall() + i * 0.09, error=i == 0)


@pytest.mark.parametrize("probing", [True, False], ids=["probes", "calls"])
def test_failing_probes_raise_no_anomaly_where_the_same_failing_calls_would(
    processor: AnomalySpanProcessor, tracer: Tracer, clock: FakeClock, probing: bool
) -> None:
    events: list[AnomalyEvent] = []
    processor.bus.subscribe(events.append)
    for _ in range(120):  # 20 minutes of 1 % errors: the baseline
        _traffic(tracer, processor, clock)
        clock.advance(10)
        processor.process()
    for _ in range(4):  # the server fails; 100 failing health checks per bucket
        _traffic(tracer, processor, clock)
        with suppress_recovery() if probing else _no_block():
            for i in range(100):
                _call(tracer, clock.wall() + 0.05 + i * 0.09, error=True)
        clock.advance(10)
        processor.process()
    onsets = [e for e in events if e.signal == "error_rate" and e.active]
    if probing:
        assert onsets == [] and processor.suppressed_spans == 400
    else:  # the control: the same spans, made by the application, are an anomaly
        assert [e.key for e in onsets] == [KEY] and processor.suppressed_spans == 0


class _no_block:  # noqa: N801 - stands in for suppress_recovery() in a `with`
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def test_probe_spans_that_never_end_are_forgotten_beyond_a_bound(
    processor: AnomalySpanProcessor,
    tracer: Tracer,
    clock: FakeClock,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(processor_module, "_MAX_OPEN_PROBES", 3)
    at = int(clock.wall() * 1e9)
    with suppress_recovery():
        spans = [
            tracer.start_span("GET", kind=SpanKind.CLIENT, attributes=HTTP, start_time=at)
            for _ in range(5)
        ]
    for span in spans:
        span.end(end_time=at + 1)
    processor.process()
    # the two oldest were forgotten (as a leak would be) and counted as calls when they ended
    assert processor.series() == {KEY: (2, 0)} and processor.suppressed_spans == 3


def test_a_real_contrib_span_of_a_probe_is_left_out(
    processor: AnomalySpanProcessor, clock: FakeClock
) -> None:
    """contrib's Redis instrumentation, a refused connection, inside and outside the block."""
    redis = pytest.importorskip("redis")
    contrib = pytest.importorskip("opentelemetry.instrumentation.redis")
    provider = TracerProvider(resource=Resource.create({"service.name": "shop"}))
    provider.add_span_processor(processor)
    instrumentor = contrib.RedisInstrumentor()
    instrumentor.instrument(tracer_provider=provider)
    try:
        with socket.socket() as holder:
            holder.bind(("127.0.0.1", 0))  # a port nothing listens on
            port = holder.getsockname()[1]
        no_retry = redis.retry.Retry(redis.backoff.NoBackoff(), 0)
        client = redis.Redis(port=port, socket_connect_timeout=0.5, retry=no_retry)
        with suppress_recovery(), pytest.raises(redis.exceptions.ConnectionError):
            client.ping()
        with pytest.raises(redis.exceptions.ConnectionError):
            client.ping()
    finally:
        instrumentor.uninstrument()
    processor.process()
    assert processor.suppressed_spans == 1
    assert [counts for key, counts in processor.series().items() if key.server_address] == [(1, 1)]
