"""The public test kit: virtual time, testing mode, an off switch and in-memory telemetry.

- :class:`FakeClock`: pass ``clock=FakeClock()`` to any policy; sleeps advance virtual time
  and are recorded in ``clock.sleeps``.
- :func:`testing_mode`: no backoff waits and at most ``attempts`` attempts per call, for
  every policy in the process; restores the previous state on exit.
- :func:`recovery_disabled`: wrapped callables run exactly once, as if undecorated.
- :func:`capture_telemetry`: routes otel_recovery's spans and metrics to in-memory
  exporters (needs ``opentelemetry-sdk``, the ``sdk`` extra) and restores the previous
  routing on exit.

pytest users get the same as fixtures with ``pytest_plugins = ["otel_recovery.testing"]``:
``fake_clock``, ``recovery_telemetry`` and ``recovery_testing_mode``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from otel_recovery import telemetry as _telemetry
from otel_recovery._config import set_active, set_testing
from otel_recovery._fake_clock import FakeClock

if TYPE_CHECKING:
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader
    from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

__all__ = [
    "CapturedTelemetry",
    "FakeClock",
    "capture_telemetry",
    "recovery_disabled",
    "testing_mode",
]


@contextmanager
def testing_mode(attempts: int = 1) -> Iterator[None]:
    """No backoff sleeps and at most ``attempts`` attempts per call, inside the block."""
    with set_testing(True, attempts=attempts):
        yield


@contextmanager
def recovery_disabled() -> Iterator[None]:
    """Inside the block every recovered callable is called exactly once, untouched."""
    with set_active(False):
        yield


class CapturedTelemetry:
    """Spans and metric points otel_recovery produced while capturing."""

    def __init__(
        self,
        exporter: InMemorySpanExporter,
        reader: InMemoryMetricReader,
        tracer_provider: TracerProvider,
        telemetry: _telemetry.Telemetry,
    ) -> None:
        self.exporter = exporter
        self.reader = reader
        self.tracer_provider = tracer_provider
        self.telemetry = telemetry
        self._baseline: dict[tuple[str, Any], Any] = {}

    def spans(self) -> list[ReadableSpan]:
        """Finished spans, oldest first."""
        return list(self.exporter.get_finished_spans())

    def span(self, name: str) -> ReadableSpan:
        """The single finished span called ``name``; fails loudly if there are 0 or 2+."""
        found = [span for span in self.spans() if span.name == name]
        if len(found) != 1:
            names = [span.name for span in self.spans()]
            raise AssertionError(f"expected one span named {name!r}, found {len(found)}: {names}")
        return found[0]

    def metric_points(self, name: str) -> list[tuple[dict[str, Any], Any]]:
        """``(attributes, value)`` of every point of metric ``name`` (sum, gauge or histogram).

        For histograms the value is the data point itself (``.count``, ``.sum``...). After
        :meth:`clear`, counters and histograms hold only what came after it (a point with
        nothing new is left out; a histogram's min and max stay over the whole capture);
        gauges and up-down counters keep their current value.
        """
        points: list[tuple[dict[str, Any], Any]] = []
        for key, point, counts in self._read():
            if key[0] != name:
                continue
            shown = _since(point, self._baseline.get(key)) if counts else point
            if shown is not None:
                points.append((dict(shown.attributes or {}), getattr(shown, "value", shown)))
        return points

    def clear(self) -> None:
        """Forget the spans so far and start counting again: a test can act, clear, and
        assert on what its next step alone produced, in spans and in metrics alike.
        Cumulative metrics cannot be reset in the SDK, so what was counted up to now is
        remembered here and taken off what :meth:`metric_points` reads."""
        self.exporter.clear()
        self._baseline = {key: point for key, point, counts in self._read() if counts}

    def _read(self) -> Iterator[tuple[tuple[str, Any], Any, bool]]:
        """``((metric name, attribute key), point, counts)`` of every point collected now;
        ``counts``: a monotonic sum or a histogram, which only grow."""
        from opentelemetry.sdk.metrics.export import Histogram

        data = self.reader.get_metrics_data()
        if data is None:
            return
        for resource_metrics in data.resource_metrics:
            for scope_metrics in resource_metrics.scope_metrics:
                for metric in scope_metrics.metrics:
                    counts = isinstance(metric.data, Histogram) or bool(
                        getattr(metric.data, "is_monotonic", False)
                    )
                    for point in metric.data.data_points:
                        yield (metric.name, _key(point)), point, counts


def _key(point: Any) -> tuple[tuple[str, Any], ...]:
    return tuple(sorted((point.attributes or {}).items()))


def _since(point: Any, before: Any) -> Any:
    """``point`` less what ``before`` (the same series at :meth:`CapturedTelemetry.clear`)
    had counted; None when nothing was added since."""
    if before is None:
        return point
    if hasattr(point, "bucket_counts"):
        if point.count == before.count:
            return None
        buckets = [
            now - then for now, then in zip(point.bucket_counts, before.bucket_counts, strict=True)
        ]
        return dataclasses.replace(
            point,
            count=point.count - before.count,
            sum=point.sum - before.sum,
            bucket_counts=buckets,
        )
    if point.value == before.value:
        return None
    return dataclasses.replace(point, value=point.value - before.value)


@contextmanager
def capture_telemetry() -> Iterator[CapturedTelemetry]:
    """Send otel_recovery's telemetry to in-memory exporters for the duration of the block."""
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exporter = InMemorySpanExporter()
    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(SimpleSpanProcessor(exporter))
    reader = InMemoryMetricReader()
    meter_provider = MeterProvider(metric_readers=[reader])
    telemetry = _telemetry.Telemetry(tracer_provider, meter_provider)
    previous = _telemetry._default
    _telemetry.set_telemetry(telemetry)
    try:
        yield CapturedTelemetry(exporter, reader, tracer_provider, telemetry)
    finally:
        _telemetry.set_telemetry(previous)
        meter_provider.shutdown()
        tracer_provider.shutdown()


try:  # pytest fixtures, for ``pytest_plugins = ["otel_recovery.testing"]``
    import pytest
except ImportError:  # pragma: no cover - pytest is optional
    pass
else:

    @pytest.fixture
    def fake_clock() -> FakeClock:
        """A fresh :class:`FakeClock` per test."""
        return FakeClock()

    @pytest.fixture
    def recovery_telemetry() -> Iterator[CapturedTelemetry]:
        """otel_recovery's spans and metrics of this test, in memory."""
        with capture_telemetry() as captured:
            yield captured

    @pytest.fixture
    def recovery_testing_mode() -> Iterator[None]:
        """Testing mode (no waits, one attempt) for this test."""
        with testing_mode():
            yield
