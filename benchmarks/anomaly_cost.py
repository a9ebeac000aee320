"""What anomaly detection costs: per span, per series bucket, per refit, per series in memory.

    python benchmarks/anomaly_cost.py            # about two minutes, one core
    python benchmarks/anomaly_cost.py --quick    # smoke run

Measured (best of ``--repeats`` rounds; the machine is shared, so minimums are the estimate
least disturbed by other processes):

1. ``on_end`` per span on the application thread: the processor alone, the processor while
   its worker drains concurrently (GIL contention included), and a no-op processor for
   reference; plus a whole SDK span (start + end) with and without the processor.
2. Worker CPU per span: draining spans into series (grouping, bucketing).
3. Detector cost per closed bucket of one series (error rate + latency + calls), without refits
   and with refits amortised: refit times are measured on real histories (warm-up and steady
   state, non-seasonal and seasonal) and spread over ``refit_every`` buckets. From that, the
   share of one core that 10,000 series at 10 s buckets need.
4. Memory per series (tracemalloc), warm and with a daily profile.
"""

from __future__ import annotations

import argparse
import gc
import logging
import math
import os
import statistics
import sys
import time
import tracemalloc
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
from opentelemetry.sdk.resources import Resource  # noqa: E402
from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor, TracerProvider  # noqa: E402
from opentelemetry.trace import SpanKind, Status, StatusCode  # noqa: E402

from otel_recovery.learning import anomaly  # noqa: E402
from otel_recovery.learning._detector import FitInput, FitResult  # noqa: E402
from otel_recovery.learning.anomaly import (  # noqa: E402
    SERIES_DETECTOR_CONFIG,
    AnomalySpanProcessor,
    DetectorConfig,
)
from otel_recovery.testing import FakeClock  # noqa: E402

RESOURCE = Resource.create({"service.name": "bench"})
BUCKET = 10.0
SERIES_TARGET = 10_000


def _spans(count: int, hosts: int = 50, start: float = 1_700_000_000.0) -> list[ReadableSpan]:
    return [
        ReadableSpan(
            name="GET",
            kind=SpanKind.CLIENT,
            resource=RESOURCE,
            attributes={"http.request.method": "GET", "server.address": f"h{i % hosts}"},
            status=Status(StatusCode.ERROR if i % 50 == 0 else StatusCode.UNSET),
            start_time=int((start + i * 1e-4) * 1e9),
            end_time=int((start + i * 1e-4 + 0.01) * 1e9),
        )
        for i in range(count)
    ]


def _best(repeats: int, run: Callable[[], float]) -> tuple[float, float]:
    times = []
    for _ in range(repeats):
        gc.collect()
        gc.disable()
        try:
            times.append(run())
        finally:
            gc.enable()
    return min(times), statistics.median(times)


class _Noop(SpanProcessor):
    def on_end(self, span: ReadableSpan) -> None:
        pass


class _Keep(SpanProcessor):
    """Holds finished spans until cleared, as a BatchSpanProcessor (or our queue) does.

    Keeping spans alive costs the SDK about a microsecond per span in allocation and cache
    misses; comparing against this isolates what our processor itself adds.
    """

    def __init__(self) -> None:
        self._pending: deque[ReadableSpan] = deque()

    def on_end(self, span: ReadableSpan) -> None:
        self._pending.append(span)


def on_end_costs(n: int, repeats: int) -> list[tuple[str, float, float]]:
    spans = _spans(n)
    rows = []

    def loop(processor: SpanProcessor) -> Callable[[], float]:
        def run() -> float:
            on_end = processor.on_end
            started = time.perf_counter()
            for span in spans:
                on_end(span)
            return (time.perf_counter() - started) / n * 1e9

        return run

    noop = _Noop()
    rows.append(("no-op SpanProcessor.on_end", *_best(repeats, loop(noop))))

    quiet = AnomalySpanProcessor(clock=FakeClock(), start_worker=False, max_pending=10 * n)

    def alone() -> float:
        result = loop(quiet)()
        quiet._pending.clear()
        return result

    rows.append(("AnomalySpanProcessor.on_end, worker idle", *_best(repeats, alone)))

    busy = AnomalySpanProcessor(clock=FakeClock(), flush_interval=0.001, max_pending=10 * n)
    try:
        rows.append(("AnomalySpanProcessor.on_end, worker draining", *_best(repeats, loop(busy))))
    finally:
        busy.shutdown()

    drainer = AnomalySpanProcessor(clock=FakeClock(), start_worker=False, max_pending=10 * n)

    def drain() -> float:
        for span in spans:
            drainer.on_end(span)
        started = time.perf_counter()
        drainer.process()
        return (time.perf_counter() - started) / n * 1e9

    rows.append(("worker CPU per span (group + bucket)", *_best(repeats, drain)))

    # Whole SDK spans, round-robin so noise hits every variant alike. The fair baseline for
    # "what our processor adds" is a provider with a no-op processor: the SDK builds the
    # ReadableSpan snapshot and loops over processors either way.
    attrs = {"http.request.method": "GET", "server.address": "h1"}
    m = max(1000, n // 10)
    variants: list[tuple[str, TracerProvider, Any]] = []
    for label, kind in (
        ("SDK span start+end, no processor", None),
        ("SDK span start+end, no-op processor", "noop"),
        ("SDK span start+end, no-op processor keeping the spans", "keep"),
        ("SDK span start+end, AnomalySpanProcessor", "ours"),
    ):
        provider = TracerProvider(resource=RESOURCE)
        ours: Any = None
        if kind == "noop":
            provider.add_span_processor(_Noop())
        elif kind == "keep":
            ours = _Keep()
            provider.add_span_processor(ours)
        elif kind == "ours":
            ours = AnomalySpanProcessor(clock=FakeClock(), start_worker=False, max_pending=10 * n)
            provider.add_span_processor(ours)
        variants.append((label, provider, ours))
    timings: dict[str, list[float]] = {label: [] for label, _, _ in variants}
    for _ in range(repeats):
        for label, provider, ours in variants:
            tracer = provider.get_tracer("bench")
            gc.collect()
            gc.disable()
            started = time.perf_counter()
            for _ in range(m):
                tracer.start_span("GET", kind=SpanKind.CLIENT, attributes=attrs).end()
            timings[label].append((time.perf_counter() - started) / m * 1e9)
            gc.enable()
            if ours is not None:
                ours._pending.clear()
    for label, provider, _ in variants:
        rows.append((label, min(timings[label]), statistics.median(timings[label])))
        provider.shutdown()
    return rows


class _TimedFits:
    """Wraps the statsmodels fitter to time every refit."""

    def __init__(self) -> None:
        self.times: list[tuple[bool, float]] = []

    def __call__(self, data: FitInput, config: DetectorConfig) -> FitResult:
        started = time.perf_counter()
        try:
            return anomaly.fit_baseline(data, config)
        finally:
            self.times.append((data.days is not None, time.perf_counter() - started))


def _traffic(
    rng: np.random.Generator, buckets: int, start: float
) -> list[tuple[float, int, int, float]]:
    """(timestamp, calls, errors, mean latency) per 10 s bucket with a daily cycle."""
    out = []
    for b in range(buckets):
        at = start + b * BUCKET
        day = math.sin(2 * math.pi * (at % 86400) / 86400)
        calls = max(1, int(rng.poisson(40 + 25 * day)))
        errors = int(rng.binomial(calls, 0.01))
        latency = 0.05 * math.exp(0.2 * day + rng.normal(0, 0.1))
        out.append((at, calls, errors, latency))
    return out


def detector_costs(series: int, buckets: int, seasonal_series: int) -> dict[str, float]:
    rng = np.random.default_rng(1)
    start = 1_700_000_000.0
    fits = _TimedFits()
    update_ns: list[float] = []
    for _ in range(series):
        error = anomaly.ErrorRateDetector()
        latency = anomaly.StreamingDetector(fits, SERIES_DETECTOR_CONFIG)
        calls = anomaly.StreamingDetector(fits, SERIES_DETECTOR_CONFIG)
        traffic = _traffic(rng, buckets, start)
        before = len(fits.times)
        fit_seconds = 0.0
        started = time.perf_counter()
        for at, n, k, mean in traffic:
            error.update(k, n, at)
            latency.update(math.log(mean), at)
            calls.update(float(n), at)
        elapsed = time.perf_counter() - started
        fit_seconds = sum(t for _, t in fits.times[before:])
        update_ns.append((elapsed - fit_seconds) / buckets * 1e9)
    warmup = [t for _, t in fits.times]
    # Steady-state refits, with and without a daily profile: three days of 10 s buckets.
    steady_plain: list[float] = []
    steady_seasonal: list[float] = []
    for _ in range(seasonal_series):
        days = _TimedFits()
        detector = anomaly.StreamingDetector(days, SERIES_DETECTOR_CONFIG)
        for at, n, _k, _m in _traffic(rng, 3 * 8640, start):
            detector.update(float(n), at)
        for seasonal, seconds in days.times[5:]:
            (steady_seasonal if seasonal else steady_plain).append(seconds)
    refit = statistics.median(steady_seasonal or steady_plain)
    every = SERIES_DETECTOR_CONFIG.refit_every
    update = min(update_ns)
    per_bucket = update + 2 * refit * 1e9 / every  # two refitting detectors per series
    return {
        "update_ns": update,
        "warmup_fit_ms": 1e3 * statistics.median(warmup),
        "plain_fit_ms": 1e3 * statistics.median(steady_plain) if steady_plain else math.nan,
        "seasonal_fit_ms": 1e3 * statistics.median(steady_seasonal)
        if steady_seasonal
        else math.nan,
        "per_bucket_ns": per_bucket,
        "core_share": SERIES_TARGET / BUCKET * per_bucket / 1e9,
        "capacity": 1e9 / per_bucket * BUCKET,
        "seasonal_seen": float(bool(steady_seasonal)),
    }


def _run_series(
    processor: AnomalySpanProcessor, name: str, traffic: list[tuple[float, int, int, float]]
) -> None:
    series = processor._lookup(("bench", name, "HTTP GET"))
    for at, n, k, mean in traffic:
        series.bucket = int(at // BUCKET)
        series.calls, series.errors, series.latency = n, k, n * mean
        processor._close(series)


def memory_per_series(count: int, buckets: int, seasonal_count: int) -> list[tuple[float, float]]:
    """(state bytes, all bytes) per series after ``buckets`` buckets and after three days.

    "State" counts allocations made by otel_recovery's own code (the series' buffers and
    objects); "all" also counts what numpy/scipy/statsmodels kept during the fits (internal
    caches, shared by every series, so the figure falls as the series count grows). One
    series runs through three days first, unmeasured, so first-use imports are not charged.
    """
    rng = np.random.default_rng(2)
    start = 1_700_000_000.0
    short = _traffic(rng, buckets, start)
    long = _traffic(rng, 3 * 8640, start)
    _run_series(AnomalySpanProcessor(clock=FakeClock(), start_worker=False), "warm-up", long)
    ours = [tracemalloc.Filter(True, "*otel_recovery*")]
    results = []
    for traffic, n in ((short, count), (long, seasonal_count)):
        processor = AnomalySpanProcessor(clock=FakeClock(), start_worker=False, max_series=n + 1)
        gc.collect()
        tracemalloc.start()
        before = tracemalloc.take_snapshot()
        for i in range(n):
            _run_series(processor, f"h{i}", traffic)
        gc.collect()
        after = tracemalloc.take_snapshot()
        tracemalloc.stop()
        total = sum(d.size_diff for d in after.compare_to(before, "filename"))
        state = sum(
            d.size_diff
            for d in after.filter_traces(ours).compare_to(before.filter_traces(ours), "filename")
        )
        results.append((state / n, total / n))
        assert len(processor.series()) == n
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args(argv)
    quick = args.quick
    logging.getLogger("otel_recovery").setLevel(logging.ERROR)  # benchmark traffic trips alarms
    repeats = 3 if quick else args.repeats
    n = 20_000 if quick else 100_000

    print(f"## Per span (ns, best and median of {repeats} rounds of {n:,} spans)\n")
    print("| what | best ns/span | median ns/span |")
    print("|---|---:|---:|")
    for label, best, median in on_end_costs(n, repeats):
        print(f"| {label} | {best:.0f} | {median:.0f} |")

    costs = detector_costs(
        series=3 if quick else 10, buckets=400 if quick else 1500, seasonal_series=1
    )
    print("\n## Per series bucket (error rate + latency + calls detectors)\n")
    print("| what | value |")
    print("|---|---:|")
    print(f"| detector updates per closed bucket, no refit | {costs['update_ns'] / 1e3:.1f} µs |")
    print(f"| refit, warm-up (median) | {costs['warmup_fit_ms']:.1f} ms |")
    print(f"| refit, steady state, no daily profile | {costs['plain_fit_ms']:.1f} ms |")
    print(f"| refit, steady state, with daily profile | {costs['seasonal_fit_ms']:.1f} ms |")
    print(
        f"| per closed bucket, refits amortised (every {SERIES_DETECTOR_CONFIG.refit_every}) "
        f"| {costs['per_bucket_ns'] / 1e3:.1f} µs |"
    )
    print(
        f"| {SERIES_TARGET:,} series at {BUCKET:.0f} s buckets | "
        f"{100 * costs['core_share']:.0f} % of one core |"
    )
    print(f"| series one core can serve at {BUCKET:.0f} s buckets | {costs['capacity']:,.0f} |")

    (warm, warm_all), (days, days_all) = memory_per_series(
        20 if quick else 60, 400, 2 if quick else 3
    )
    print("\n## Memory per series (tracemalloc)\n")
    print("| what | otel_recovery state | incl. numpy/scipy caches |")
    print("|---|---:|---:|")
    print(
        f"| after 400 buckets (history full, no daily profile yet) | {warm:,.0f} B | {warm_all:,.0f} B |"
    )
    print(
        f"| after three days (daily profile on, day buffers full) | {days:,.0f} B | {days_all:,.0f} B |"
    )
    print(
        f"| {SERIES_TARGET:,} series, three days in | {SERIES_TARGET * days / 2**20:,.0f} MiB | |"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
