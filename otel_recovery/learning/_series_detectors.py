"""The detectors a span series gets unless the application brings its own.

Each series of :class:`~otel_recovery.learning.anomaly.AnomalySpanProcessor` has three
detectors: error rate (:class:`~._error_rate.ErrorRateDetector`), log mean latency and calls
per bucket. Built without ``detector_factory``, the processor makes the latter two with
:func:`default_factories`: statsmodels-backed ``AnomalyDetector`` instances with
:data:`SERIES_DETECTOR_CONFIG` (sized for 10 s buckets), the change a flat series may show
without surprise set per signal (:data:`MIN_SCALES`), and first fits staggered across the
series, so that series made together do not all refit in the same bucket. The ``anomaly``
module is imported only then, when a processor is built without ``detector_factory``.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable
from dataclasses import replace

from otel_recovery.learning._detector import DetectorConfig, StreamingDetector

__all__ = ["MIN_SCALES", "SERIES_DETECTOR_CONFIG", "default_factories"]

SERIES_DETECTOR_CONFIG = DetectorConfig(
    history=256,
    refit_every=360,
    season_bins=96,
    season_history_days=3.0,
    refractory=0.0,
)
"""Detector settings for span series: 10 s buckets, an hour between refits, 15-minute daily
profile slots, and about 4 KB of history per signal."""

MIN_SCALES = {"latency": 0.01, "calls": 1.0}
"""Per signal, the change a flat series may show without surprise (``min_scale``): 1 %
of a log latency, one call per bucket (a call ending just past a boundary)."""


def default_factories() -> tuple[Callable[[], StreamingDetector], Callable[[], StreamingDetector]]:
    """The latency and the calls detector factory of one processor, in that order; they
    share one count of the detectors made, which staggers their first fits."""
    from otel_recovery.learning.anomaly import AnomalyDetector

    made = itertools.count()

    def made_for(signal: str) -> StreamingDetector:
        # Staggered: series made together (one service's dependencies at start-up,
        # all called every bucket) would otherwise refit in the same bucket, every
        # fit in one process() pass; a first fit 32 to 63 points in keeps each
        # detector's schedule (doubling, then every refit_every) apart.
        first = SERIES_DETECTOR_CONFIG.first_fit + (next(made) * 7) % 32
        config = replace(
            SERIES_DETECTOR_CONFIG,
            first_fit=first,
            min_scale=MIN_SCALES.get(signal, 0.0),
        )
        return AnomalyDetector(config)

    return functools.partial(made_for, "latency"), functools.partial(made_for, "calls")
