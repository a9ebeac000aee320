"""Anomaly detection: the streaming detector, the error-rate detector and the span processor."""

from __future__ import annotations

import math
import threading
import warnings
from collections import Counter
from datetime import datetime, timedelta, timezone

import pytest

pytest.importorskip("statsmodels")

import numpy as np  # noqa: E402
from opentelemetry.sdk.metrics import MeterProvider  # noqa: E402
from opentelemetry.sdk.metrics.export import InMemoryMetricReader  # noqa: E402
from opentelemetry.sdk.resources import Resource  # noqa: E402
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider  # noqa: E402
from opentelemetry.trace import SpanKind, Status, StatusCode  # noqa: E402

from otel_recovery.learning import AnomalyEvent, SeriesKey  # noqa: E402
from otel_recovery.learning._error_rate import log10_betabinom_sf  # noqa: E402
from otel_recovery.learning.anomaly import (  # noqa: E402
    AnomalyDetector,
    AnomalySpanProcessor,
    ErrorRateDetector,
    series_key,
)
from otel_recovery.testing import FakeClock  # noqa: E402

HOUR = 3600.0
FIRES = 0.55
ONSET = 300  # hourly points: 12.5 days of history before every injected anomaly
WARM = 48  # two days: the daily profile and the tails have settled


def _series(kind: str, seed: int, n: int = 400) -> tuple[np.ndarray, np.ndarray]:
    """Hourly data with a daily cycle, unit noise, and one injected anomaly at ONSET."""
    rng = np.random.default_rng(seed)
    t = 1_700_000_000.0 + np.arange(n) * HOUR
    y = 50 + 10 * np.sin(2 * np.pi * t / 86400) + rng.normal(0, 1, n)
    if kind == "spike":
        y[ONSET] += 12
    elif kind == "level_shift":
        y[ONSET:] += 10
    elif kind == "variance":
        y[ONSET:] += rng.normal(0, 6, n - ONSET)
    elif kind == "seasonal_break":  # one day with the daily cycle upside down
        day = slice(ONSET, ONSET + 24)
        y[day] = 50 - 10 * np.sin(2 * np.pi * t[day] / 86400) + rng.normal(0, 1, 24)
    return t, y


def _scores(t: np.ndarray, y: np.ndarray, **config: object) -> np.ndarray:
    detector = AnomalyDetector(**config)  # type: ignore[arg-type]
    return np.array([detector.update(float(v), float(s)) for v, s in zip(y, t, strict=True)])


# ----------------------------------------------------------------------------- detector


@pytest.mark.parametrize("seed", [1, 2, 3])
@pytest.mark.parametrize("kind", ["spike", "level_shift", "variance", "seasonal_break"])
def test_fires_near_each_kind_of_anomaly_and_not_before(kind: str, seed: int) -> None:
    t, y = _series(kind, seed)
    scores = _scores(t, y)
    assert scores[WARM:ONSET].max() < FIRES, "false alarm before the anomaly"
    assert scores[ONSET : ONSET + 24].max() >= FIRES, "missed the anomaly"
    assert 0.0 <= scores.min() and scores.max() <= 1.0


@pytest.mark.parametrize("seed", [1, 2, 3, 4])
def test_stays_quiet_on_a_clean_seasonal_series(seed: int) -> None:
    t, y = _series("clean", seed)
    detector = AnomalyDetector()
    scores = [detector.update(float(v), float(s)) for v, s in zip(y, t, strict=True)]
    assert max(scores[WARM:]) < FIRES
    assert detector.seasonal, "a 10-unit daily cycle over unit noise is seasonal"
    assert detector.fits >= 4


def test_level_shift_is_learned_not_reported_forever() -> None:
    t, y = _series("level_shift", 1)
    detector = AnomalyDetector()
    raw_after = []
    for i, (v, s) in enumerate(zip(y, t, strict=True)):
        detector.update(float(v), float(s))
        if i > ONSET + 48:
            raw_after.append(detector.last.raw_score)
            assert detector.last.lower < v < detector.last.upper
    assert max(raw_after) < FIRES  # the new level is normal, even before onset filtering


def test_gaps_widen_the_band_instead_of_alarming() -> None:
    rng = np.random.default_rng(5)
    detector = AnomalyDetector(seasonality=False)
    t = 0.0
    for _ in range(200):
        t += 60.0
        detector.update(100 + rng.normal(), t)
    band = detector.last.upper - detector.last.lower
    t += 60.0 * 500  # an outage of 500 steps
    assert detector.update(100 + rng.normal(), t) < FIRES
    assert detector.last.upper - detector.last.lower > band


def test_repeated_backward_and_missing_timestamps_are_handled() -> None:
    detector = AnomalyDetector()
    t = 1_700_000_000.0
    for i in range(100):
        t += 300.0
        stamp = t - 600.0 if i % 10 == 3 else t  # a step back every 10 points
        for _ in range(2 if i % 7 == 0 else 1):  # and some repeats
            score = detector.update(10.0 + (i % 3), stamp)
            assert 0.0 <= score <= 1.0
    assert detector.step == pytest.approx(300.0)
    for _ in range(5):
        assert 0.0 <= detector.update(11.0) <= 1.0  # no timestamp: one step later each
    assert detector.count == 100 + 15 + 5


def test_datetimes_and_epoch_seconds_give_the_same_scores() -> None:
    t, y = _series("spike", 1, n=340)
    naive = AnomalyDetector()
    aware = AnomalyDetector()
    epoch = AnomalyDetector()
    for v, s in zip(y, t, strict=True):
        when = datetime(1970, 1, 1) + timedelta(seconds=float(s))
        a = naive.update(float(v), when)
        b = aware.update(float(v), when.replace(tzinfo=timezone.utc))
        c = epoch.update(float(v), float(s))
        assert a == b == c


def test_numpy_and_pandas_timestamps_are_accepted_and_strings_are_not() -> None:
    pd = pytest.importorskip("pandas")
    detector = AnomalyDetector()
    detector.update(1.0, np.datetime64("2024-01-01T00:00:00"))
    detector.update(1.0, pd.Timestamp("2024-01-01 00:05:00"))
    assert detector.step == 300.0
    with pytest.raises(TypeError, match="timestamp"):
        detector.update(1.0, "2024-01-01")


def test_flat_and_zero_series_are_quiet_until_they_move() -> None:
    for level in (45.0, 0.0):
        detector = AnomalyDetector()
        scores = [detector.update(level, i * 300.0) for i in range(300)]
        assert max(scores) == 0.0
        assert detector.update(level + 1.0, 300 * 300.0) >= FIRES


def test_nan_is_not_data() -> None:
    detector = AnomalyDetector()
    for i in range(50):
        detector.update(5.0 + i % 2, i * 60.0)
    assert detector.update(math.nan, 50 * 60.0) == 0.0
    assert detector.update(math.inf, 51 * 60.0) == 0.0
    assert detector.count == 50


def test_bad_configuration_fails_at_construction() -> None:
    with pytest.raises(ValueError, match="model"):
        AnomalyDetector(model="prophet")
    with pytest.raises(ValueError, match="history"):
        AnomalyDetector(history=2)


@pytest.mark.parametrize("model", ["stl", "holt_winters", "sarimax", "fixed"])
def test_every_baseline_family_detects_a_spike(model: str) -> None:
    t, y = _series("spike", 2)
    y[ONSET] += 13  # 25 sigma: the families differ in sensitivity, not in whether they work
    scores = _scores(t, y, model=model)
    assert scores[ONSET : ONSET + 3].max() >= FIRES


def test_fits_on_a_worker_thread_leave_the_hosts_warnings_alone() -> None:
    """Fits run on the span processor's thread. They ran inside ``warnings.catch_warnings``
    with every warning ignored, which swaps the process-wide filter list: the host's own
    warnings went unshown for as long as a fit lasted. Their own warnings are silenced on
    their thread only. (statsmodels still swaps the list for a moment around its optimizer,
    ignoring only its own messages: a filter the host adds in that moment can be lost; see
    the README.)"""
    t, y = _series("spike", 1)
    done = threading.Event()
    inside = threading.Event()  # set while the worker is inside a fit
    fits_started = [0]
    host_warnings_during_a_fit = [0]

    def fit() -> None:
        # score the series again until ten host warnings have each fallen inside one scoring
        # run (its fits included): how many runs that takes depends on how the machine
        # shares its cores, not on the behaviour under test
        try:
            for _ in range(100):
                fits_started[0] += 1
                inside.set()
                _scores(t, y)
                inside.clear()
                if host_warnings_during_a_fit[0] >= 10:
                    return
        finally:
            inside.clear()
            done.set()

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        worker = threading.Thread(target=fit)
        worker.start()
        warned = 0
        while not done.wait(0.001):
            fit_number, fitting = fits_started[0], inside.is_set()
            warnings.warn("host warning", UserWarning, stacklevel=1)
            warned += 1
            if fitting and inside.is_set() and fits_started[0] == fit_number:
                host_warnings_during_a_fit[0] += 1
        worker.join()
        # the host's own statsmodels warnings are still shown after the fits
        warnings.warn_explicit(
            "host model did not converge", UserWarning, "model.py", 1, "statsmodels.base.model"
        )
    assert host_warnings_during_a_fit[0] >= 10  # the host warned throughout the fits
    assert sum(str(w.message) == "host warning" for w in seen) == warned
    assert "host model did not converge" in [str(w.message) for w in seen]
    assert all(w.filename.endswith(("test_anomaly.py", "model.py")) for w in seen)  # fits: none


def test_fitted_dynamics_beat_a_fixed_smoothing_on_autocorrelated_data() -> None:
    """Why the statsmodels fit earns its keep: NAB barely rewards it (README), but on an AR(1)
    series a fixed alpha forecasts badly, and the spikes drown in its residuals."""
    found = {"ets": 0, "fixed": 0}
    for seed in (0, 1):
        rng = np.random.default_rng(seed)
        y = np.zeros(2000)
        for i in range(1, len(y)):
            y[i] = 0.95 * y[i - 1] + rng.normal()
        spikes = rng.choice(np.arange(600, len(y)), 10, replace=False)
        y[spikes] += rng.choice([-1, 1], 10) * 6
        for model in found:
            detector = AnomalyDetector(model=model, refractory=0, seasonality=False)
            scores = [detector.update(float(v), i * 60.0) for i, v in enumerate(y)]
            found[model] += sum(scores[i] >= FIRES for i in spikes)
    assert found["ets"] >= found["fixed"] + 4, found


# ----------------------------------------------------------------------------- error rates


def test_error_rate_ignores_one_in_two_but_flags_fifty_in_a_hundred() -> None:
    detector = ErrorRateDetector()
    for _ in range(200):
        assert detector.update(1, 100) < 0.5
    assert detector.baseline == pytest.approx(0.01, rel=0.05)
    assert detector.update(1, 2) < 0.3
    assert detector.update(50, 100) > 0.85
    assert detector.update(0, 0) == 0.0  # no calls, no evidence


def test_error_rate_learns_little_from_an_outage() -> None:
    detector = ErrorRateDetector()
    for _ in range(200):
        detector.update(1, 100)
    for _ in range(30):  # five minutes of 10 s buckets at 60 % errors
        detector.update(60, 100)
    assert detector.baseline < 0.05
    assert detector.update(60, 100) > 0.85


def test_beta_binomial_tail_matches_a_direct_sum() -> None:
    from math import comb, exp, lgamma, log10

    def direct(k: int, n: int, a: float, b: float) -> float:
        def lbeta(x: float, y: float) -> float:
            return lgamma(x) + lgamma(y) - lgamma(x + y)

        return log10(
            sum(comb(n, x) * exp(lbeta(x + a, n - x + b) - lbeta(a, b)) for x in range(k, n + 1))
        )

    for k, n, a, b in [(1, 2, 1.0, 99.0), (3, 10, 2.0, 98.0), (30, 1000, 10.0, 990.0)]:
        assert log10_betabinom_sf(k, n, a, b) == pytest.approx(direct(k, n, a, b), abs=1e-9)
    assert log10_betabinom_sf(50, 100, 5.0, 495.0) < -35  # far past where doubles underflow


# ----------------------------------------------------------------------------- span processor

RESOURCE = Resource.create({"service.name": "shop"})
HTTP = {"http.request.method": "GET", "server.address": "api.example"}
KEY = SeriesKey("shop", "api.example", "HTTP GET")


def _span(
    end: float,
    error: bool = False,
    attrs: dict[str, object] | None = None,
    duration: float = 0.02,
) -> ReadableSpan:
    return ReadableSpan(
        name="GET",
        kind=SpanKind.CLIENT,
        resource=RESOURCE,
        attributes=attrs if attrs is not None else HTTP,
        status=Status(StatusCode.ERROR if error else StatusCode.UNSET),
        start_time=int((end - duration) * 1e9),
        end_time=int(end * 1e9),
    )


def test_series_keys_group_operations_by_kind() -> None:
    assert series_key("GET", HTTP, "s") == SeriesKey("s", "api.example", "HTTP GET")
    db = {"db.system": "postgresql", "db.operation": "SELECT", "net.peer.name": "db1"}
    assert series_key("SELECT shop", db, "s") == SeriesKey("s", "db1", "postgresql SELECT")
    redis = {"db.system.name": "redis", "server.address": "cache"}
    assert series_key("GET", redis, "s") == SeriesKey("s", "cache", "redis GET")
    rpc = {"rpc.service": "Cart", "rpc.method": "Add"}
    assert series_key("x", rpc, "s") == SeriesKey("s", "", "Cart/Add")
    assert series_key("recover pay", {}, "s") == SeriesKey("s", "", "recover pay")


def test_concurrent_span_ends_are_counted_exactly() -> None:
    clock = FakeClock(wall_start=1_700_000_000.0)
    processor = AnomalySpanProcessor(clock=clock, start_worker=False)
    now = clock.wall()
    per_thread = 3000
    hosts = ["a", "b", "c"]
    spans = [
        [
            _span(
                now + i * 0.001, error=i % 10 == 0, attrs={**HTTP, "server.address": hosts[i % 3]}
            )
            for i in range(per_thread)
        ]
        for _ in range(8)
    ]
    barrier = threading.Barrier(8)

    def end_all(batch: list[ReadableSpan]) -> None:
        barrier.wait()
        for span in batch:
            processor.on_end(span)

    threads = [threading.Thread(target=end_all, args=(batch,)) for batch in spans]
    drainer_stop = threading.Event()

    def drain() -> None:  # the worker's job, racing with the producers
        while not drainer_stop.is_set():
            processor.process()

    drainer = threading.Thread(target=drain)
    drainer.start()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    drainer_stop.set()
    drainer.join()
    processor.force_flush()
    counts = processor.series()
    assert sum(calls for calls, _ in counts.values()) == 8 * per_thread
    assert sum(errors for _, errors in counts.values()) == 8 * per_thread // 10
    for host in hosts:
        calls, _ = counts[SeriesKey("shop", host, "HTTP GET")]
        assert calls == 8 * per_thread // 3
    assert processor.dropped == 0


def test_the_number_of_series_is_bounded_and_nothing_is_lost() -> None:
    clock = FakeClock(wall_start=1_700_000_000.0)
    processor = AnomalySpanProcessor(clock=clock, max_series=5, start_worker=False)
    for i in range(40):
        processor.on_end(_span(clock.wall(), attrs={**HTTP, "server.address": f"h{i % 20}"}))
    processor.process()
    counts = processor.series()
    assert len(counts) == 6  # five series and the overflow
    assert counts[SeriesKey("shop", "_overflow", "_overflow")][0] == 30
    assert sum(calls for calls, _ in counts.values()) == 40
    assert processor.overflow_spans == 30


def test_idle_series_make_room_for_new_ones() -> None:
    clock = FakeClock(wall_start=1_700_000_000.0)
    processor = AnomalySpanProcessor(clock=clock, max_series=2, idle_buckets=3, start_worker=False)
    processor.on_end(_span(clock.wall(), attrs={**HTTP, "server.address": "old"}))
    processor.on_end(_span(clock.wall(), attrs={**HTTP, "server.address": "busy"}))
    processor.process()
    clock.advance(60)
    processor.on_end(_span(clock.wall(), attrs={**HTTP, "server.address": "new"}))
    processor.process()
    keys = {key.server_address for key in processor.series()}
    assert keys == {"busy", "new"}


def _feed(
    processor: AnomalySpanProcessor, clock: FakeClock, buckets: int, error_every: int
) -> None:
    for _ in range(buckets):
        for i in range(100):
            failed = error_every > 0 and i % error_every == 0
            processor.on_end(_span(clock.wall() + i * 0.09, error=failed))
        clock.advance(10)
        processor.process()


def test_an_error_burst_is_published_recorded_and_then_cleared(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = FakeClock(wall_start=1_700_000_000.0)
    reader = InMemoryMetricReader()
    processor = AnomalySpanProcessor(
        clock=clock, start_worker=False, meter_provider=MeterProvider(metric_readers=[reader])
    )
    events: list[AnomalyEvent] = []
    processor.bus.subscribe(events.append)
    _feed(processor, clock, 120, error_every=100)  # 1 % errors: normal
    assert [e for e in events if e.signal == "error_rate"] == []
    with caplog.at_level("WARNING", logger="otel_recovery"):
        _feed(processor, clock, 4, error_every=2)  # 50 % errors
    onsets = [e for e in events if e.signal == "error_rate" and e.active]
    assert len(onsets) == 1 and onsets[0].key == KEY and onsets[0].value == pytest.approx(0.5)
    assert (KEY, "error_rate") in processor.active()
    assert (
        sum("anomaly: shop -> api.example HTTP GET: error_rate" in m for m in caplog.messages) == 1
    )
    points = [
        point
        for metric in reader.get_metrics_data().resource_metrics[0].scope_metrics[0].metrics
        if metric.name == "otel_recovery.anomalies"
        for point in metric.data.data_points
    ]
    assert [(p.value, p.attributes["otel_recovery.anomaly.signal"]) for p in points] == [
        (1, "error_rate")
    ]
    _feed(processor, clock, 10, error_every=100)  # back to normal
    ends = [e for e in events if e.signal == "error_rate" and not e.active]
    assert len(ends) == 1 and ends[0].at > onsets[0].at
    assert (KEY, "error_rate") not in processor.active()


def test_the_next_call_of_an_anomalous_series_carries_a_span_event() -> None:
    clock = FakeClock(wall_start=1_700_000_000.0)
    processor = AnomalySpanProcessor(clock=clock, start_worker=False, service="shop")
    provider = TracerProvider(resource=RESOURCE)
    provider.add_span_processor(processor)
    tracer = provider.get_tracer("test")
    _feed(processor, clock, 120, error_every=100)
    _feed(processor, clock, 2, error_every=2)
    with tracer.start_as_current_span("other", kind=SpanKind.CLIENT, attributes={}) as other:
        pass
    with tracer.start_as_current_span("GET", kind=SpanKind.CLIENT, attributes=HTTP) as first:
        pass
    with tracer.start_as_current_span("GET", kind=SpanKind.CLIENT, attributes=HTTP) as second:
        pass
    assert [e.name for e in other.events] == []  # type: ignore[attr-defined]
    events = first.events  # type: ignore[attr-defined]
    assert [e.name for e in events] == ["otel_recovery.anomaly"]
    assert events[0].attributes["otel_recovery.anomaly.signal"] == "error_rate"
    assert events[0].attributes["otel_recovery.anomaly.active"] is True
    assert list(second.events) == []  # type: ignore[attr-defined]
    provider.shutdown()


def test_a_long_anomaly_is_reconfirmed_on_the_bus() -> None:
    clock = FakeClock(wall_start=1_700_000_000.0)
    processor = AnomalySpanProcessor(clock=clock, start_worker=False, reconfirm=60)
    events: list[AnomalyEvent] = []
    processor.bus.subscribe(events.append)
    _feed(processor, clock, 120, error_every=100)
    _feed(processor, clock, 20, error_every=2)  # 200 s of 50 % errors
    actives = [e for e in events if e.signal == "error_rate" and e.active]
    assert len(actives) >= 3
    assert all(b.at - a.at >= 60 for a, b in zip(actives, actives[1:], strict=False))


def test_on_end_never_waits_for_the_worker() -> None:
    clock = FakeClock(wall_start=1_700_000_000.0)
    processor = AnomalySpanProcessor(clock=clock, start_worker=False, max_pending=10)
    done = threading.Event()

    def end_spans() -> None:
        for _ in range(20):
            processor.on_end(_span(clock.wall()))
        done.set()

    with processor._process_lock:  # the worker is busy (say, refitting) for as long as we like
        thread = threading.Thread(target=end_spans)
        thread.start()
        assert done.wait(timeout=5.0), "on_end blocked while the worker held its lock"
    thread.join()
    assert processor.dropped == 10  # beyond max_pending, spans are counted as dropped
    processor.process()
    assert sum(calls for calls, _ in processor.series().values()) == 10


def test_the_background_worker_drains_on_its_own() -> None:
    processor = AnomalySpanProcessor(flush_interval=0.01)
    try:
        processor.on_end(_span(1_700_000_000.0))
        for _ in range(200):  # the worker's own timing is what is tested: bounded wait
            if processor.series():
                break
            threading.Event().wait(0.01)
        assert processor.series() == {KEY: (1, 0)}
    finally:
        processor.shutdown()


def test_server_spans_are_not_dependency_calls() -> None:
    clock = FakeClock(wall_start=1_700_000_000.0)
    processor = AnomalySpanProcessor(clock=clock, start_worker=False)
    span = ReadableSpan(
        name="GET /",
        kind=SpanKind.SERVER,
        resource=RESOURCE,
        attributes=HTTP,
        start_time=1,
        end_time=2,
    )
    processor.on_end(span)
    processor.process()
    assert processor.series() == {}


def test_a_failing_detector_is_logged_once_and_counting_goes_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    class Broken(AnomalyDetector):
        def update(self, value: float, timestamp: object = None) -> float:
            raise RuntimeError("boom")

    clock = FakeClock(wall_start=1_700_000_000.0)
    processor = AnomalySpanProcessor(clock=clock, start_worker=False, detector_factory=Broken)
    with caplog.at_level("ERROR", logger="otel_recovery"):
        _feed(processor, clock, 5, error_every=0)
    assert processor.series() == {KEY: (500, 0)}
    assert sum("detector failed" in m for m in caplog.messages) == 1


def _feed_latency(
    processor: AnomalySpanProcessor, clock: FakeClock, buckets: int, latency: float, seed: int
) -> None:
    rng = np.random.default_rng(seed)
    for _ in range(buckets):
        for i in range(20):
            jitter = float(np.exp(rng.normal(0, 0.1)))
            processor.on_end(_span(clock.wall() + i * 0.4, duration=latency * jitter))
        clock.advance(10)
        processor.process()


@pytest.mark.parametrize(("latency", "expected"), [(0.5, ["latency"]), (0.002, [])])
def test_slower_calls_are_a_latency_anomaly_and_faster_ones_are_not(
    latency: float, expected: list[str]
) -> None:
    clock = FakeClock(wall_start=1_700_000_000.0)
    processor = AnomalySpanProcessor(clock=clock, start_worker=False)
    events: list[AnomalyEvent] = []
    processor.bus.subscribe(events.append)
    _feed_latency(processor, clock, 150, 0.02, seed=1)
    assert events == []
    _feed_latency(processor, clock, 4, latency, seed=2)
    assert [e.signal for e in events if e.active] == expected
    if expected:
        assert events[0].value > 10 * events[0].expected


@pytest.mark.parametrize(
    ("setting", "value", "message"),
    [
        ("max_series", float("nan"), "max_series must be an int >= 1"),
        ("max_series", "1000", "max_series must be an int >= 1"),
        ("confirm", 1.5, "confirm must be an int >= 1"),
        ("confirm", True, "confirm must be an int >= 1"),
        ("threshold", "0.6", "threshold must be a number in"),
        ("release", float("nan"), "need 0 <= release <= threshold <= 1"),
    ],
)
def test_processor_settings_of_the_wrong_kind_are_refused_naming_them(setting, value, message):
    """``max_series=nan`` left the number of series unbounded; a string failed with a
    comparison error that named nothing."""
    with pytest.raises((TypeError, ValueError), match=message):
        AnomalySpanProcessor(start_worker=False, **{setting: value})


def test_series_made_together_refit_at_different_times(monkeypatch):
    """Detectors made together and fed every bucket came due for their refits in the same
    bucket (32, 64, 128, 256, then every 360 points), so one processing pass ran every
    series' fit: seconds of stall for a hundred series, spans dropped meanwhile."""
    from otel_recovery.learning import _detector

    fitted_at: Counter[int] = Counter()
    refit = _detector.StreamingDetector._refit

    def counting(self):  # type: ignore[no-untyped-def]
        fitted_at[self._count] += 1
        refit(self)

    monkeypatch.setattr(_detector.StreamingDetector, "_refit", counting)
    processor = AnomalySpanProcessor(start_worker=False)
    detectors = [processor._detector_factory() for _ in range(16)]
    for step in range(300):  # every series called in every bucket, from the same start
        for detector in detectors:
            detector.update(10.0 + (step % 3), 1_700_000_000.0 + 10 * step)
    assert sum(fitted_at.values()) >= 16 * 3
    assert max(fitted_at.values()) <= 2  # at most two series fit in any one bucket


def test_a_flat_series_takes_a_call_more_or_a_tiny_latency_change_in_its_stride():
    """Until a series varied, its expected spread was a millionth of its level: one call
    ending just past a bucket boundary (11 where 10 always came) read as an anomaly, and
    so did a 0.01 % latency change, which tightened breakers and budgets. Real changes
    still stand out."""
    processor = AnomalySpanProcessor(start_worker=False)
    at = 1_700_000_000.0

    def scores(make, flat: float, then: list[float]) -> list[float]:
        detector = make()
        for step in range(400):
            detector.update(flat, at + 10 * step)
        return [detector.update(value, at + 10 * (400 + i)) for i, value in enumerate(then)]

    calls = scores(processor._calls_factory, 10.0, [11.0, 10.0, 9.0, 10.0])
    assert max(calls) < 0.5, calls
    assert scores(processor._calls_factory, 10.0, [40.0])[0] >= 0.6
    latency = scores(processor._detector_factory, math.log(0.02), [math.log(0.020002)])
    assert latency[0] < 0.5, latency
    assert scores(processor._detector_factory, math.log(0.02), [math.log(0.2)])[0] >= 0.6


@pytest.mark.parametrize("calls", [1, 2, 3, 4])
def test_an_outage_of_a_quiet_dependency_is_an_anomaly(calls):
    """At four calls per 10 s bucket or fewer, one bucket is never evidence enough (3 of 3
    failing against a 1 % baseline is p ~ 1e-5), and each anomalous bucket still taught
    the baseline a little: ten minutes at 100 % errors scored lower and lower, and nothing
    was ever reported. Consecutive failing buckets are judged together now."""
    detector = ErrorRateDetector()
    for _ in range(360):  # an hour of healthy buckets
        detector.update(0, calls)
    scores = [detector.update(calls, calls) for _ in range(60)]
    assert sum(score >= 0.6 for score in scores) >= 50
    assert scores[-1] >= 0.6  # still anomalous at the end of the outage
    assert detector.update(0, calls) < 0.5  # a healthy bucket ends the run


def test_scattered_errors_of_a_quiet_dependency_are_not_pooled_into_an_anomaly():
    detector = ErrorRateDetector()
    for _ in range(360):
        detector.update(0, 3)
    scores = []
    for _ in range(30):  # one failure now and then, never two buckets in a row
        scores.append(detector.update(1, 3))
        scores += [detector.update(0, 3) for _ in range(5)]
    assert max(scores) < 0.5
    assert round(ErrorRateDetector().update(1, 2), 2) == 0.19  # the README's figure
