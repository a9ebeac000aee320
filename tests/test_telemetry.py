"""What a recovery looks like in OpenTelemetry (issue 2 section 5)."""

from __future__ import annotations

import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.trace import SpanKind, StatusCode

from otel_recovery.policies import (
    CircuitBreaker,
    Fallback,
    FixedBackoff,
    Retry,
    RetryBudget,
)
from otel_recovery.recover import RecoveryPolicy
from otel_recovery.telemetry import Telemetry
from otel_recovery.telemetry import attributes as names


def failing(*errors):
    errors = list(errors)

    def fn():
        if errors:
            raise errors.pop(0)
        return "ok"

    return fn


def events(span):
    return [event.name for event in span.events]


def test_happy_path_creates_no_span_and_writes_no_metric(recovery_telemetry, fake_clock):
    policy = RecoveryPolicy(
        retry=Retry(3), breaker=CircuitBreaker(name="svc", clock=fake_clock), clock=fake_clock
    )
    for _ in range(100):
        assert policy.call(lambda: 1) == 1
    assert recovery_telemetry.spans() == []
    for metric in (
        names.METRIC_CALL_DURATION,
        names.METRIC_RETRY_ATTEMPTS,
        names.METRIC_FALLBACK_INVOCATIONS,
        names.METRIC_BREAKER_TRANSITIONS,
    ):
        assert recovery_telemetry.metric_points(metric) == []
    # The plain counters are read at collection time, not written per call.
    calls = dict(
        (attrs[names.BREAKER_OUTCOME], value)
        for attrs, value in recovery_telemetry.metric_points(names.METRIC_BREAKER_CALLS)
        if attrs[names.BREAKER_NAME] == "svc"
    )
    assert calls["successful"] == 100 and calls["failed"] == 0


def test_recovered_call_is_visible_and_not_an_error(recovery_telemetry, fake_clock):
    tracer = recovery_telemetry.tracer_provider.get_tracer("app")
    policy = RecoveryPolicy(
        retry=Retry(3, backoff=FixedBackoff(0.25)), name="inventory", clock=fake_clock
    )
    attempt_spans = []

    def fetch():
        with tracer.start_as_current_span("GET /items") as span:
            attempt_spans.append(span)
            if len(attempt_spans) < 3:
                raise ConnectionError("connection refused to 10.0.0.7:8080")
            return "items"

    with tracer.start_as_current_span("handler") as parent:
        start = fake_clock.wall()
        assert policy.call(fetch) == "items"

    span = recovery_telemetry.span("recover inventory")
    assert span.kind is SpanKind.INTERNAL
    assert span.parent.span_id == parent.get_span_context().span_id
    assert span.status.status_code is StatusCode.UNSET
    assert span.attributes[names.OUTCOME] == "success"
    assert span.attributes[names.ATTEMPTS] == 3
    assert span.attributes[names.ERROR_CATEGORY] == "transient"
    assert len(span.attributes[names.ERROR_FINGERPRINT]) == 16
    assert names.ERROR_TYPE not in span.attributes
    assert events(span) == [
        names.EVENT_ATTEMPT_FAILED,
        names.EVENT_RETRY,
        names.EVENT_ATTEMPT_FAILED,
        names.EVENT_RETRY,
    ]
    retry_event = span.events[1]
    assert retry_event.attributes[names.BACKOFF] == 0.25
    assert retry_event.attributes[names.ATTEMPT] == 2
    failed = span.events[0].attributes
    assert failed[names.ERROR_TYPE] == "ConnectionError"
    assert failed[names.ERROR_SEVERITY] in ("low", "medium", "high", "critical")
    # The span starts when the call started, before the first attempt.
    assert span.start_time == pytest.approx(start * 1e9, abs=1e3)
    assert span.end_time - span.start_time == pytest.approx(0.5e9, rel=1e-6)
    # Attempts after the first run inside the recovery span.
    first, second, third = (s.get_span_context().span_id for s in attempt_spans)
    by_id = {s.context.span_id: s for s in recovery_telemetry.spans()}
    assert by_id[first].parent.span_id == parent.get_span_context().span_id
    assert by_id[second].parent.span_id == span.context.span_id
    assert by_id[third].parent.span_id == span.context.span_id

    retries = recovery_telemetry.metric_points(names.METRIC_RETRY_ATTEMPTS)
    assert [(a[names.POLICY_NAME], a[names.ERROR_TYPE], v) for a, v in retries] == [
        ("inventory", "ConnectionError", 2)
    ]
    ((attrs, point),) = recovery_telemetry.metric_points(names.METRIC_CALL_DURATION)
    assert attrs == {names.POLICY_NAME: "inventory", names.OUTCOME: "success"}
    assert point.count == 1 and point.sum == pytest.approx(0.5)


def test_final_failure_is_an_error_with_error_type(recovery_telemetry, fake_clock):
    policy = RecoveryPolicy(retry=Retry(2, backoff=FixedBackoff(0)), name="db", clock=fake_clock)
    with pytest.raises(TimeoutError):
        policy.call(failing(TimeoutError("t1"), TimeoutError("t2")))
    span = recovery_telemetry.span("recover db")
    assert span.status.status_code is StatusCode.ERROR
    assert span.attributes[names.ERROR_TYPE] == "TimeoutError"
    assert span.attributes[names.OUTCOME] == "failure"
    assert span.attributes[names.STOP_REASON] == "attempts_exhausted"
    assert events(span)[-1] == names.EVENT_GIVE_UP
    ((attrs, _),) = recovery_telemetry.metric_points(names.METRIC_CALL_DURATION)
    assert attrs[names.ERROR_TYPE] == "TimeoutError"


def test_budget_refusal_is_its_own_event_and_metric(recovery_telemetry, fake_clock):
    budget = RetryBudget(ratio=0.0, min_per_second=0.0, ttl=10, name="payments", clock=fake_clock)
    policy = RecoveryPolicy(retry=Retry(3), budget=budget, name="pay", clock=fake_clock)
    with pytest.raises(ConnectionError):
        policy.call(failing(ConnectionError()))
    span = recovery_telemetry.span("recover pay")
    assert names.EVENT_BUDGET_EXHAUSTED in events(span)
    assert span.attributes[names.STOP_REASON] == "budget_exhausted"
    refusals = recovery_telemetry.metric_points(names.METRIC_BUDGET_REFUSALS)
    assert [(a[names.BUDGET_NAME], v) for a, v in refusals] == [("payments", 1)]


def test_breaker_transition_and_fallback_are_visible(recovery_telemetry, fake_clock):
    breaker = CircuitBreaker(failure_threshold=1, timeout=30, name="search", clock=fake_clock)
    policy = RecoveryPolicy(
        retry=Retry(1), breaker=breaker, fallback=Fallback("stale"), clock=fake_clock
    )
    assert policy.call(failing(ConnectionError())) == "stale"
    assert policy.call(failing()) == "stale"  # rejected while open

    first, second = recovery_telemetry.spans()
    assert names.EVENT_BREAKER_STATE_CHANGE in events(first)
    change = next(e for e in first.events if e.name == names.EVENT_BREAKER_STATE_CHANGE)
    assert (change.attributes[names.BREAKER_FROM], change.attributes[names.BREAKER_TO]) == (
        "closed",
        "open",
    )
    assert first.attributes[names.OUTCOME] == "fallback"
    assert first.status.status_code is StatusCode.UNSET
    assert events(second) == [names.EVENT_REJECTED, names.EVENT_FALLBACK]
    assert second.events[0].attributes[names.BREAKER_RETRY_AFTER] == pytest.approx(30)

    states = {
        a[names.BREAKER_STATE]: v
        for a, v in recovery_telemetry.metric_points(names.METRIC_BREAKER_STATE)
        if a[names.BREAKER_NAME] == "search"
    }
    assert states["open"] == 1 and states["closed"] == 0
    transitions = recovery_telemetry.metric_points(names.METRIC_BREAKER_TRANSITIONS)
    assert [(a[names.BREAKER_FROM], a[names.BREAKER_TO], v) for a, v in transitions] == [
        ("closed", "open", 1)
    ]
    fallbacks = recovery_telemetry.metric_points(names.METRIC_FALLBACK_INVOCATIONS)
    assert sum(v for _, v in fallbacks) == 2


def test_secrets_never_reach_span_events(recovery_telemetry, fake_clock):
    policy = RecoveryPolicy(retry=Retry(1), name="pg", clock=fake_clock)
    with pytest.raises(ConnectionError):
        policy.call(failing(ConnectionError("could not connect to postgresql://app:hunter2@db/x")))
    span = recovery_telemetry.span("recover pg")
    text = repr(span.to_json())
    assert "hunter2" not in text


def test_a_broken_tracer_never_breaks_the_call(fake_clock, monkeypatch):
    from otel_recovery import telemetry

    class Broken(telemetry.Telemetry):
        def start_call(self, *args, **kwargs):
            raise RuntimeError("exporter exploded")

    policy = RecoveryPolicy(
        retry=Retry(2, backoff=FixedBackoff(0)), telemetry=Broken(), clock=fake_clock
    )
    assert policy.call(failing(ConnectionError())) == "ok"


def test_every_telemetry_of_one_meter_provider_reports_its_breakers():
    """Each instrumentor given its own providers builds a Telemetry; the SDK keeps only the
    first observable instrument of a name, so the second's breakers vanished."""
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader

    from otel_recovery.policies import CircuitBreaker
    from otel_recovery.telemetry import Telemetry

    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    first, second = Telemetry(meter_provider=provider), Telemetry(meter_provider=provider)
    requests_breaker, redis_breaker = CircuitBreaker(name="requests"), CircuitBreaker(name="redis")
    first.watch_breaker(requests_breaker)
    second.watch_breaker(redis_breaker)
    data = reader.get_metrics_data()
    names_seen = {
        point.attributes[names.BREAKER_NAME]
        for resource in data.resource_metrics
        for scope in resource.scope_metrics
        for metric in scope.metrics
        if metric.name == names.METRIC_BREAKER_STATE
        for point in metric.data.data_points
    }
    assert names_seen == {"requests", "redis"}
    provider.shutdown()


def test_breakers_sharing_a_name_add_up_and_unnamed_ones_are_pointed_out(caplog):
    """Breakers are told apart by name only. Two unnamed breakers (two dependencies) merged
    silently into one "default" series, added up or not depending on the SDK release."""
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader

    from otel_recovery.policies import CircuitBreaker
    from otel_recovery.telemetry import Telemetry

    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    telemetry = Telemetry(meter_provider=provider)
    with caplog.at_level("WARNING", logger="otel_recovery.telemetry"):
        payments, search = CircuitBreaker(), CircuitBreaker()
        named_a, named_b = CircuitBreaker(name="cache"), CircuitBreaker(name="cache")
        for breaker in (payments, search, named_a, named_b):
            telemetry.watch_breaker(breaker)
        extra = CircuitBreaker()
        telemetry.watch_breaker(extra)
    told = [r.getMessage() for r in caplog.records if "no name" in r.getMessage()]
    assert len(told) == 1, told  # once, and not for breakers named alike on purpose
    assert "CircuitBreaker(name=...)" in told[0]
    payments.record_success()
    search.record_success()
    search.force_open()
    points: dict[tuple[str, str, str], int] = {}
    for resource in reader.get_metrics_data().resource_metrics:
        for scope in resource.scope_metrics:
            for metric in scope.metrics:
                for point in metric.data.data_points:
                    attrs = dict(point.attributes)
                    detail = attrs.get(names.BREAKER_STATE) or attrs.get(names.BREAKER_OUTCOME)
                    if detail is not None:
                        points[(metric.name, str(attrs[names.BREAKER_NAME]), str(detail))] = (
                            point.value
                        )
    assert points[(names.METRIC_BREAKER_STATE, "default", "closed")] == 2  # payments, extra
    assert points[(names.METRIC_BREAKER_STATE, "default", "forced_open")] == 1
    assert points[(names.METRIC_BREAKER_STATE, "cache", "closed")] == 2
    assert points[(names.METRIC_BREAKER_CALLS, "default", "successful")] == 2
    provider.shutdown()


def test_a_transition_delivered_by_another_thread_marks_its_own_calls_span():
    """Listeners are delivered by whichever thread holds the dispatch; a transition caused
    by thread B while thread A was still delivering (a slow alerting listener) landed on
    A's span, and B's span showed nothing."""
    import threading

    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from otel_recovery.policies import CircuitState
    from otel_recovery.telemetry import Telemetry
    from otel_recovery.testing import FakeClock

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = provider.get_tracer("app")
    clock = FakeClock()
    tripped, gate, delivered = threading.Event(), threading.Event(), threading.Event()

    def alerting(transition):  # slow on the first transition, as a synchronous alert is
        if transition.to_state is CircuitState.OPEN:
            tripped.set()
            assert gate.wait(5)

    def after_telemetry(transition):
        if transition.to_state is CircuitState.HALF_OPEN:
            delivered.set()

    breaker = CircuitBreaker(
        failure_threshold=1, timeout=5, name="payments", clock=clock, listeners=[alerting]
    )
    Telemetry(tracer_provider=provider).watch_breaker(breaker)
    breaker.add_listener(after_telemetry)

    def request_a():
        with tracer.start_as_current_span("request A"):
            breaker.record_failure()  # trips, and delivers (slowly)

    thread_a = threading.Thread(target=request_a)
    thread_a.start()
    clock.advance(5)
    with tracer.start_as_current_span("request B"):
        assert tripped.wait(5)
        assert breaker.can_execute()  # OPEN -> HALF_OPEN, queued behind A's delivery
        gate.set()
        assert delivered.wait(5)
    thread_a.join(5)
    marked = {
        span.name: [
            (event.attributes[names.BREAKER_FROM], event.attributes[names.BREAKER_TO])
            for event in span.events
            if event.name == names.EVENT_BREAKER_STATE_CHANGE
        ]
        for span in exporter.get_finished_spans()
    }
    assert marked == {"request A": [("closed", "open")], "request B": [("open", "half_open")]}
    provider.shutdown()


def test_a_recovery_inside_suppressed_instrumentation_records_nothing(
    recovery_telemetry, fake_clock
):
    """The SDK exports under ``suppress_instrumentation()``. A span exporter whose send was
    wrapped in ``@recover`` exported a recovery span per failed export, which failed and
    was recovered in turn: one app span kept the exporter busy until the collector came
    back (a hundred nested spans with a simple processor)."""
    from opentelemetry.instrumentation.utils import suppress_instrumentation

    from otel_recovery import recover

    sends = []

    @recover(
        retry=Retry(3, on=ConnectionError, backoff=FixedBackoff(0.1)),
        breaker=CircuitBreaker(name="collector", failure_threshold=1, clock=fake_clock),
        clock=fake_clock,
    )
    def send(batch: str) -> str:
        sends.append(batch)
        if len(sends) < 3:
            raise ConnectionError("collector down")
        return "exported"

    breaker = CircuitBreaker(name="collector-down", failure_threshold=1, clock=fake_clock)

    @recover(retry=Retry(2, on=ConnectionError), breaker=breaker, clock=fake_clock)
    def send_to_a_dead_collector(batch: str) -> str:
        raise ConnectionError("collector down")

    with suppress_instrumentation():
        assert send("spans") == "exported"  # recovered: the telemetry is what is left out
        with pytest.raises(ConnectionError):
            send_to_a_dead_collector("spans")
    assert len(sends) == 3
    assert breaker.state.value == "open"  # the breaker works; its transition is not recorded
    assert recovery_telemetry.spans() == []
    for metric in (
        names.METRIC_CALL_DURATION,
        names.METRIC_RETRY_ATTEMPTS,
        names.METRIC_BREAKER_TRANSITIONS,
    ):
        assert recovery_telemetry.metric_points(metric) == []


def test_the_duration_exemplar_points_to_the_recovery_span(fake_clock):
    """The duration was recorded after the recovery span was no longer current: its
    exemplar pointed to the caller's span, or with none to nothing."""
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from otel_recovery.telemetry import Telemetry

    exporter, reader = InMemorySpanExporter(), InMemoryMetricReader()
    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(SimpleSpanProcessor(exporter))
    meter_provider = MeterProvider(metric_readers=[reader])
    policy = RecoveryPolicy(
        retry=Retry(3, on=ConnectionError, backoff=FixedBackoff(0.1)),
        name="exemplar",
        clock=fake_clock,
        telemetry=Telemetry(tracer_provider, meter_provider),
    )
    assert policy.call(failing(ConnectionError("reset"))) == "ok"
    (recovery,) = [s for s in exporter.get_finished_spans() if s.name == "recover exemplar"]
    points = [
        point
        for resource in reader.get_metrics_data().resource_metrics
        for scope in resource.scope_metrics
        for metric in scope.metrics
        if metric.name == names.METRIC_CALL_DURATION
        for point in metric.data.data_points
    ]
    exemplars = [e for point in points for e in getattr(point, "exemplars", None) or ()]
    if not hasattr(points[0], "exemplars"):
        pytest.skip("this SDK has no exemplars")
    assert [e.span_id for e in exemplars] == [recovery.context.span_id]
    meter_provider.shutdown()
    tracer_provider.shutdown()


def test_a_breakers_call_counter_never_goes_down_when_it_is_made_again():
    """A breaker collected and made again under its name (a forgotten target met again, a
    configuration reload) started the monotonic ``.calls`` counter over: 100 then 5, a
    negative delta on a monotonic sum."""
    import gc

    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader

    from otel_recovery.telemetry import Telemetry

    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    telemetry = Telemetry(meter_provider=provider)

    def successful() -> int | None:
        data = reader.get_metrics_data()
        found = [
            point.value
            for resource in (data.resource_metrics if data is not None else ())
            for scope in resource.scope_metrics
            for metric in scope.metrics
            if metric.name == names.METRIC_BREAKER_CALLS
            for point in metric.data.data_points
            if point.attributes[names.BREAKER_NAME] == "payments"
            and point.attributes[names.BREAKER_OUTCOME] == "successful"
        ]
        return found[0] if found else None

    first = CircuitBreaker(name="payments")
    telemetry.watch_breaker(first)
    for _ in range(100):
        first.record_success()
    assert successful() == 100
    del first
    gc.collect()
    assert successful() is None  # no live breaker: the series goes stale, not on for good
    again = CircuitBreaker(name="payments")
    telemetry.watch_breaker(again)
    for _ in range(5):
        again.record_success()
    assert successful() == 105
    provider.shutdown()


def test_clear_starts_metrics_afresh_as_it_does_spans(recovery_telemetry, fake_clock):
    """``clear()`` forgot spans but kept every metric, so a test that cleared between two
    steps asserted on both steps' counts. Counters and histograms now count from the clear;
    the breaker's state (a gauge of now) is kept."""
    policy = RecoveryPolicy(
        retry=Retry(3, backoff=FixedBackoff(0.25)),
        breaker=CircuitBreaker(name="inv", clock=fake_clock),
        name="inventory",
        clock=fake_clock,
    )
    assert policy.call(failing(ConnectionError("reset"), ConnectionError("reset"))) == "ok"
    assert recovery_telemetry.metric_points(names.METRIC_RETRY_ATTEMPTS)[0][1] == 2

    recovery_telemetry.clear()
    assert recovery_telemetry.spans() == []
    assert recovery_telemetry.metric_points(names.METRIC_RETRY_ATTEMPTS) == []
    assert recovery_telemetry.metric_points(names.METRIC_CALL_DURATION) == []
    states = recovery_telemetry.metric_points(names.METRIC_BREAKER_STATE)
    assert {a[names.BREAKER_STATE]: v for a, v in states if v} == {"closed": 1}

    assert policy.call(failing(TimeoutError("slow"))) == "ok"
    retries = recovery_telemetry.metric_points(names.METRIC_RETRY_ATTEMPTS)
    assert [(a[names.ERROR_TYPE], v) for a, v in retries] == [("TimeoutError", 1)]
    ((attrs, point),) = recovery_telemetry.metric_points(names.METRIC_CALL_DURATION)
    assert attrs[names.OUTCOME] == "success"
    assert point.count == 1 and point.sum == pytest.approx(0.25)
    assert sum(point.bucket_counts) == 1
    calls = {
        a[names.BREAKER_OUTCOME]: v
        for a, v in recovery_telemetry.metric_points(names.METRIC_BREAKER_CALLS)
    }
    assert calls == {"successful": 1}  # the breaker counts calls: this one was recovered


def test_a_breaker_reached_through_two_policies_counts_each_transition_once(
    recovery_telemetry, fake_clock
):
    """One breaker, one policy pinned to the capture's telemetry, one following the
    process-wide telemetry (the same one here), one pinned to another telemetry on the
    same span: the transition was counted twice and marked on the span three times."""
    breaker = CircuitBreaker(name="dep", failure_threshold=1, clock=fake_clock)
    RecoveryPolicy(breaker=breaker, clock=fake_clock, telemetry=recovery_telemetry.telemetry)
    RecoveryPolicy(
        breaker=breaker,
        clock=fake_clock,
        telemetry=Telemetry(recovery_telemetry.tracer_provider, MeterProvider()),
    )
    policy = RecoveryPolicy(breaker=breaker, clock=fake_clock, name="dep")

    def down() -> None:
        raise ConnectionError("down")

    with pytest.raises(ConnectionError):
        policy.call(down)
    points = recovery_telemetry.metric_points(names.METRIC_BREAKER_TRANSITIONS)
    assert [(a[names.BREAKER_TO], v) for a, v in points] == [("open", 1)]
    span = recovery_telemetry.span("recover dep")
    assert events(span).count(names.EVENT_BREAKER_STATE_CHANGE) == 1
    fake_clock.advance(120)
    assert breaker.can_execute()  # half-open: the next transition counts once too
    points = recovery_telemetry.metric_points(names.METRIC_BREAKER_TRANSITIONS)
    assert sorted((a[names.BREAKER_TO], v) for a, v in points) == [("half_open", 1), ("open", 1)]
