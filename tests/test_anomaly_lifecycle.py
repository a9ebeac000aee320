"""AnomalySpanProcessor over time: anomalies end without evidence, annotations stay bounded,
wall-clock steps do not blind a series, and AdaptiveThresholds relaxes without anyone sweeping."""

from __future__ import annotations

import math
import threading

import pytest

pytest.importorskip("statsmodels")

from opentelemetry.sdk.resources import Resource  # noqa: E402
from opentelemetry.sdk.trace import ReadableSpan  # noqa: E402
from opentelemetry.trace import SpanKind, Status, StatusCode  # noqa: E402

from otel_recovery.learning import AdaptiveThresholds, AnomalyEvent, SeriesKey  # noqa: E402
from otel_recovery.learning.anomaly import (  # noqa: E402
    SERIES_DETECTOR_CONFIG,
    AnomalyDetector,
    AnomalySpanProcessor,
    ErrorRateDetector,
)
from otel_recovery.policies import CircuitBreaker, RetryBudget  # noqa: E402
from otel_recovery.testing import FakeClock  # noqa: E402

RESOURCE = Resource.create({"service.name": "shop"})
START = 1_700_000_000.0


def key(host: str) -> SeriesKey:
    return SeriesKey("shop", host, "HTTP GET")


def span(end: float, host: str = "payments", error: bool = False) -> ReadableSpan:
    return ReadableSpan(
        name="GET",
        kind=SpanKind.CLIENT,
        resource=RESOURCE,
        attributes={"http.request.method": "GET", "server.address": host},
        status=Status(StatusCode.ERROR if error else StatusCode.UNSET),
        start_time=int((end - 0.02) * 1e9),
        end_time=int(end * 1e9),
    )


class SteppingClock(FakeClock):
    """A FakeClock whose wall clock can be stepped (NTP, VM resume); monotonic time cannot."""

    def step_wall(self, seconds: float) -> None:
        self._wall_offset += seconds


def feed(
    processor: AnomalySpanProcessor,
    clock: FakeClock,
    buckets: int,
    hosts: dict[str, int],
) -> None:
    """``buckets`` 10-s buckets; ``hosts`` maps each called host to "one error every N calls"
    (0: no errors), 40 calls per host per bucket."""
    for _ in range(buckets):
        now = clock.wall()
        for host, every in hosts.items():
            for i in range(40):
                processor.on_end(span(now + i * 0.2, host, every > 0 and i % every == 0))
        clock.advance(10)
        processor.process()


@pytest.fixture
def setup() -> tuple[AnomalySpanProcessor, FakeClock, list[AnomalyEvent]]:
    clock = FakeClock(start=0.0, wall_start=START)
    processor = AnomalySpanProcessor(clock=clock, start_worker=False)
    events: list[AnomalyEvent] = []
    processor.bus.subscribe(events.append)
    feed(processor, clock, 120, {"payments": 40, "inventory": 40})
    assert events == []
    return processor, clock, events


def error_events(events: list[AnomalyEvent], host: str = "payments") -> list[bool]:
    return [e.active for e in events if e.signal == "error_rate" and e.key == key(host)]


# -- anomalies end without evidence, and thresholds relax -----------------------------------------


def wire(processor: AnomalySpanProcessor, clock: FakeClock, max_tightened: float = 900.0):
    adaptive = AdaptiveThresholds(processor.bus, clock=clock, max_tightened=max_tightened)
    breaker = CircuitBreaker(10, 30.0, name="payments", clock=clock)
    budget = RetryBudget(ratio=0.2, name="payments", clock=clock)
    adaptive.register(
        AdaptiveThresholds.matching(server_address="payments"), breaker=breaker, budget=budget
    )
    return adaptive, breaker, budget


def test_a_dependency_that_stops_being_called_is_relaxed_after_reconfirm(setup) -> None:
    processor, clock, events = setup
    _, breaker, budget = wire(processor, clock)
    feed(processor, clock, 3, {"payments": 2, "inventory": 40})  # error burst
    assert error_events(events) == [True] and breaker.tuned and budget.tuned
    feed(processor, clock, 29, {"inventory": 40})  # 290 s without a call to payments
    assert breaker.tuned and budget.tuned
    feed(processor, clock, 2, {"inventory": 40})  # reconfirm (300 s) passed: no evidence
    assert error_events(events) == [True, False]
    ended = events[-1]
    assert ended.score == 0.0 and math.isnan(ended.value) and math.isnan(ended.expected)
    assert not breaker.tuned and breaker.failure_threshold == 10 and not budget.tuned
    assert processor.active() == []
    feed(processor, clock, 3, {"payments": 2, "inventory": 40})  # it can start again
    assert error_events(events) == [True, False, True] and breaker.tuned


def test_a_detector_that_stops_publishing_is_expired_on_the_bus_tick(setup) -> None:
    processor, clock, events = setup
    _, breaker, budget = wire(processor, clock, max_tightened=60.0)
    feed(processor, clock, 3, {"payments": 2, "inventory": 40})
    assert breaker.tuned and budget.tuned

    class Broken(ErrorRateDetector):
        def update(self, errors: float, calls: float, timestamp: object = None) -> float:
            raise RuntimeError("detector died")

    processor._series[("shop", "payments", "HTTP GET")].error_detector = Broken()
    feed(processor, clock, 4, {"payments": 2, "inventory": 40})  # still called, never published
    assert breaker.tuned and budget.tuned  # 50 s since the onset
    feed(processor, clock, 2, {"payments": 2, "inventory": 40})
    assert not breaker.tuned and not budget.tuned  # 70 s: expired, and nobody swept


def test_eviction_ends_the_anomalies_of_the_evicted_series() -> None:
    clock = FakeClock(start=0.0, wall_start=START)
    processor = AnomalySpanProcessor(
        clock=clock, start_worker=False, max_series=1, idle_buckets=2, reconfirm=3600
    )
    events: list[AnomalyEvent] = []
    processor.bus.subscribe(events.append)
    feed(processor, clock, 60, {"payments": 40})
    feed(processor, clock, 2, {"payments": 2})
    assert error_events(events) == [True] and processor._annotations
    feed(processor, clock, 3, {"inventory": 40})  # payments idle: evicted for inventory
    assert error_events(events) == [True, False]
    assert key("payments") not in processor._annotations
    assert processor.active() == []


def test_shutdown_ends_every_active_anomaly(setup) -> None:
    processor, clock, events = setup
    _, breaker, budget = wire(processor, clock)
    feed(processor, clock, 3, {"payments": 2, "inventory": 40})
    assert breaker.tuned
    processor.shutdown()
    assert error_events(events) == [True, False]
    assert not breaker.tuned and not budget.tuned and processor._annotations == {}


# -- pending span-event annotations are bounded ---------------------------------------------------


def test_annotations_of_hosts_that_come_and_go_stay_bounded() -> None:
    clock = FakeClock(start=0.0, wall_start=START)
    processor = AnomalySpanProcessor(clock=clock, start_worker=False, max_series=5, idle_buckets=1)
    onsets = 0
    for i in range(60):  # each host: one failing bucket, never called again
        now = clock.wall()
        for j in range(30):
            processor.on_end(span(now + j * 0.01, f"10.0.0.{i}", error=True))
        clock.advance(20)
        processor.process()
        onsets += sum(s.active for series in processor._series.values() for s in series.signals)
        assert len(processor._annotations) <= 5
    assert onsets > 0


def test_annotations_age_out_and_are_capped_per_series(setup) -> None:
    processor, clock, _ = setup
    for i in range(20):
        processor._verdicts._emit(
            AnomalyEvent(key("payments"), "calls", 0.9, 1.0, 0.0, clock.wall(), i % 2)
        )
    assert len(processor._annotations[key("payments")]) == 6
    clock.advance(299)
    processor.process()
    assert key("payments") in processor._annotations
    clock.advance(2)
    processor.process()  # older than reconfirm (300 s): nobody called it since
    assert processor._annotations == {}


# -- wall-clock steps -----------------------------------------------------------------------------


def test_a_span_stamped_in_the_future_does_not_blind_its_series(setup) -> None:
    processor, clock, events = setup
    processor.on_end(span(clock.wall() + 86_400.0))  # during a one-day wall-clock step
    feed(processor, clock, 3, {"payments": 40, "inventory": 40})
    feed(processor, clock, 3, {"payments": 2, "inventory": 40})
    assert error_events(events) == [True]
    calls, _ = processor.series()[key("payments")]
    assert calls == (120 + 6) * 40 + 1  # the odd span is counted, once
    assert processor.future_spans == 1


def test_a_wall_clock_stepping_back_does_not_blind_the_series() -> None:
    clock = SteppingClock(start=0.0, wall_start=START)
    processor = AnomalySpanProcessor(clock=clock, start_worker=False)
    events: list[AnomalyEvent] = []
    processor.bus.subscribe(events.append)
    feed(processor, clock, 120, {"payments": 40})
    clock.step_wall(-3600.0)
    feed(processor, clock, 3, {"payments": 40})
    feed(processor, clock, 3, {"payments": 2})
    assert error_events(events) == [True]
    assert processor.series()[key("payments")][0] == 126 * 40


def test_late_and_repeated_timestamps_are_still_counted_in_the_open_bucket(setup) -> None:
    processor, clock, events = setup
    late = clock.wall() - 600.0
    for _ in range(5):
        processor.on_end(span(late))  # same old timestamp, five times
    feed(processor, clock, 2, {"payments": 40, "inventory": 40})
    assert processor.series()[key("payments")][0] == 122 * 40 + 5
    assert events == []


# -- shutdown and force_flush ---------------------------------------------------------------------


def test_spans_that_end_after_shutdown_are_not_kept() -> None:
    processor = AnomalySpanProcessor(clock=FakeClock(wall_start=START), start_worker=False)
    processor.shutdown()
    for i in range(100):
        processor.on_end(span(START + i))
    assert len(processor._pending) == 0  # nothing would ever take them


class _Recorded(AnomalyDetector):
    """The series detector, noting the thread each update runs on; ``gate`` holds it."""

    threads: set[str] = set()
    gate = threading.Event()

    def update(self, value: float, timestamp: object = None) -> float:
        type(self).threads.add(threading.current_thread().name)
        type(self).gate.wait(10)
        return super().update(value, timestamp)


def test_force_flush_has_the_worker_score_and_waits_at_most_its_timeout() -> None:
    """Closing a bucket refits statsmodels models: force_flush ran that on the caller's thread
    (the SDK's, at the end of a request) and ignored its timeout."""
    clock = FakeClock(start=0.0, wall_start=START)
    _Recorded.threads, _Recorded.gate = set(), threading.Event()
    processor = AnomalySpanProcessor(
        clock=clock,
        flush_interval=3600,  # the worker only runs when asked
        detector_factory=lambda: _Recorded(SERIES_DETECTOR_CONFIG),
    )
    try:
        for i in range(20):
            processor.on_end(span(START + i * 0.1))
        clock.advance(60)  # the bucket is due
        assert processor.force_flush(timeout_millis=50) is False  # the worker is held
        assert _Recorded.threads == {"otel_recovery-anomaly"}
        _Recorded.gate.set()
        assert processor.force_flush(timeout_millis=10_000) is True
        assert processor._series  # the spans were aggregated by the worker
    finally:
        _Recorded.gate.set()
        processor.shutdown()


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ({"flush_interval": 0}, "flush_interval must be > 0 seconds"),
        ({"reconfirm": 0}, "reconfirm must be > 0 seconds"),
        ({"idle_buckets": 0}, "idle_buckets must be an int >= 1"),
        ({"idle_buckets": 2.5}, "idle_buckets must be an int >= 1"),
    ],
)
def test_settings_that_would_spin_or_end_every_anomaly_at_once_are_refused(setting, message):
    with pytest.raises(ValueError, match=message):
        AnomalySpanProcessor(start_worker=False, **setting)


def test_a_clock_that_is_not_a_clock_is_refused_where_it_is_passed() -> None:
    import time

    with pytest.raises(TypeError, match="clock must implement otel_recovery Clock"):
        AnomalySpanProcessor(clock=time.monotonic, start_worker=False)
