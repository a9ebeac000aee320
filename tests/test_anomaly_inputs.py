"""Detector inputs at the edges: configuration, NaN and infinities, extreme magnitudes."""

from __future__ import annotations

import math

import pytest

pytest.importorskip("statsmodels")

import numpy as np  # noqa: E402

from otel_recovery.learning.anomaly import (  # noqa: E402
    AnomalyDetector,
    DetectorConfig,
    ErrorRateDetector,
)

FIRES = 0.55


@pytest.mark.parametrize(
    ("field", "value", "error"),
    [
        ("alpha_bounds", (0.9, 0.1), ValueError),
        ("alpha_bounds", (-0.1, 0.5), ValueError),
        ("alpha_bounds", (0.1,), TypeError),
        ("alpha_bounds", "0.1,0.5", TypeError),
        ("scale_memory", 0, ValueError),
        ("scale_memory", math.nan, ValueError),
        ("refractory", -1, ValueError),
        ("refractory", math.inf, ValueError),
        ("season_bins", 0, ValueError),
        ("season_bins", 96.0, TypeError),
        ("season_history_days", 1.0, ValueError),  # fewer than season_days: never seasonal
        ("clip", 0, ValueError),
        ("shift_run", 0, ValueError),
        ("warmup", -1, ValueError),
        ("window", 0, ValueError),
        ("tail_quantile", 1.0, ValueError),
        ("tail_rate", 0, ValueError),
        ("floor", -3, ValueError),
        ("zclip", math.nan, ValueError),
        ("seasonality", 1, TypeError),
        ("history", True, TypeError),
        ("first_fit", 2, ValueError),
        ("refit_every", 0, ValueError),
        ("model", None, TypeError),
    ],
)
def test_bad_configuration_names_the_field_and_what_it_accepts(
    field: str, value: object, error: type[Exception]
) -> None:
    with pytest.raises(error, match=field) as raised:
        AnomalyDetector(**{field: value})
    assert "must be" in str(raised.value)
    with pytest.raises(error, match=field):
        DetectorConfig(**{field: value})  # type: ignore[arg-type]


def test_good_configuration_is_normalised() -> None:
    config = DetectorConfig(alpha_bounds=[0, 1], scale_memory=500, refractory=0)  # type: ignore[arg-type]
    assert config.alpha_bounds == (0.0, 1.0)
    assert isinstance(config.scale_memory, float) and config.refractory == 0.0
    AnomalyDetector(season_bins=1, alpha_bounds=(0.3, 0.3), warmup=0)  # edges are allowed


@pytest.mark.parametrize("magnitude", [1e200, 1e-200, 1e300])
def test_any_finite_magnitude_keeps_a_finite_scale_and_still_flags(magnitude: float) -> None:
    rng = np.random.default_rng(0)
    values = magnitude * (1.0 + 0.01 * rng.standard_normal(600))
    detector = AnomalyDetector()
    scores = [detector.update(float(v), i * 60.0) for i, v in enumerate(values)]
    assert max(scores[50:]) < FIRES
    assert math.isfinite(detector.last.scale) and detector.last.scale > 0
    assert detector.last.lower < magnitude < detector.last.upper
    assert detector.fits > 0, "the history must hold these values for the refits"
    assert detector.update(magnitude * 1.2, 600 * 60.0) >= FIRES  # a 20-sigma spike


def test_ordinary_magnitudes_are_not_rescaled() -> None:
    detector = AnomalyDetector()
    for i in range(40):
        detector.update(1e15 + i % 3, i * 60.0)
    assert detector._unit == 1.0


def test_a_series_spanning_the_whole_float_range_stays_finite() -> None:
    detector = AnomalyDetector()
    scores = [detector.update(v, i * 60.0) for i, v in enumerate([0.0, 1e308] * 300)]
    assert all(0.0 <= s <= 1.0 for s in scores)
    assert math.isfinite(detector.last.scale) and math.isfinite(detector.last.expected)


def test_error_rate_ignores_nan_and_infinite_counts() -> None:
    detector = ErrorRateDetector()
    for _ in range(20):
        detector.update(1, 100)
    baseline, last = detector.baseline, detector.last
    for errors, calls in [(math.nan, 10), (1, math.nan), (1, math.inf), (math.inf, 10)]:
        assert detector.update(errors, calls) == 0.0
    assert detector.baseline == baseline and detector.last == last
    assert detector.update(-3, 10) == 0.0  # negative errors are none
    assert 0.0 < detector.update(20, 10) <= 1.0  # more errors than calls: all calls failed


@pytest.mark.parametrize(
    ("field", "value", "error"),
    [
        ("halflife", math.nan, ValueError),
        ("halflife", 0, ValueError),
        ("prior_rate", 1.0, ValueError),
        ("prior_calls", "20", TypeError),
        ("min_ratio", 0.5, ValueError),
        ("min_increase", -0.1, ValueError),
        ("significance", math.inf, ValueError),
        ("anomalous_weight", 2, ValueError),
    ],
)
def test_error_rate_configuration_names_the_field(
    field: str, value: object, error: type[Exception]
) -> None:
    with pytest.raises(error, match=f"{field} must be"):
        ErrorRateDetector(**{field: value})  # type: ignore[arg-type]


def test_warm_up_silences_the_unfiltered_score_too() -> None:
    """The span processor reads ``last.raw_score`` for latency and call counts: during warm-up
    it carried the unsettled estimates' surprise, and a new series' third bucket could open
    an anomaly that the filtered score would never have reported."""
    detector = AnomalyDetector(warmup=16)
    for minute, value in enumerate([1.0, 1.1, 0.9, 1.0, 1.2, 500.0]):
        assert detector.update(value, 1_700_000_000 + 60 * minute) == 0.0
        assert detector.last.raw_score == 0.0
    for minute in range(6, 40):
        detector.update(1.0 + 0.1 * (minute % 3), 1_700_000_000 + 60 * minute)
    detector.update(500.0, 1_700_000_000 + 60 * 40)
    assert detector.last.raw_score > 0.5  # warm: the same jump is news


def test_a_huge_glitch_does_not_blind_the_detector_to_the_next_one() -> None:
    """The scale's floor was a millionth of the latest value: after a 1e9 glitch on a series
    near 1 it was 1000, and a 400-sigma jump right after it scored 0.31."""
    rng = np.random.default_rng(3)
    detector = AnomalyDetector(refractory=0)
    start = 1_700_000_000
    for minute in range(200):
        detector.update(1.0 + rng.normal(0, 0.01), start + 60 * minute)
    assert detector.update(1e9, start + 60 * 200) > 0.99
    assert detector.update(5.0, start + 60 * 201) > 0.9
    assert detector.last.scale < 1.0
