"""Anomaly detection on dependency call series (the ``anomaly`` extra: statsmodels).

The only module of otel_recovery that imports statsmodels. Public names:

- :class:`AnomalyDetector`: streaming score in [0, 1] for one numeric series. Per point it
  runs an O(1) robust exponential-smoothing recursion (level, damped trend, daily profile by
  timestamp phase: :mod:`._baseline`), standardises the residual and judges it against the
  series' own tail of deviations (:mod:`._surprise`). Every ``refit_every`` points the
  statsmodels fits below re-choose the parameters and the daily profile from bounded history
  (:mod:`._history`). Details and time semantics: :mod:`._detector`.
- :class:`ErrorRateDetector`: errors out of calls, beta-binomial (:mod:`._error_rate`).
- :class:`AnomalySpanProcessor`: feeds both from finished spans and publishes on an
  :class:`~otel_recovery.learning.AnomalyBus` (:mod:`._processor`).

Why these fits: five baseline families were run over all of NAB with the same scoring layer
(``python benchmarks/nab.py --compare-models``; numbers in the README). Exponential smoothing
with a classical-decomposition daily profile (``ets``, the default) scored as well as STL plus
ETS at a sixth of the cost, and better than one statsmodels Holt-Winters fit for everything or
SARIMAX. The ``fixed`` control (same profile, alpha = 0.2, no dynamics fit) scored about three
points higher on NAB, within the benchmark's noise; it is not the default because a fixed alpha
is wrong for series whose dynamics differ from it: on AR(1) data it misses most injected spikes
that the fitted model finds (tests/test_anomaly.py). Every fitter gets the history rescaled to
median 0 and unit robust spread (research/anomaly.md 3.2: MLE fits on unscaled data are ten
times slower and warn).
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from otel_recovery.learning._baseline import Smoothing
from otel_recovery.learning._detector import (
    DetectorConfig,
    Estimate,
    FitInput,
    FitResult,
    StreamingDetector,
)
from otel_recovery.learning._error_rate import ErrorRateDetector, ErrorRateEstimate
from otel_recovery.learning._fit_warnings import quiet_fit
from otel_recovery.learning._processor import AnomalySpanProcessor, series_key
from otel_recovery.learning._series_detectors import SERIES_DETECTOR_CONFIG

__all__ = [
    "MODELS",
    "SERIES_DETECTOR_CONFIG",
    "AnomalyDetector",
    "AnomalySpanProcessor",
    "DetectorConfig",
    "ErrorRateDetector",
    "ErrorRateEstimate",
    "Estimate",
    "Model",
    "fit_baseline",
    "series_key",
]

Model = Literal["ets", "holt_winters", "stl", "sarimax", "fixed"]
MODELS: tuple[Model, ...] = ("ets", "holt_winters", "stl", "sarimax", "fixed")
FloatArray = npt.NDArray[np.float64]

_MIN_SEASONAL_GAIN = 0.2


def _decompose(gridded: FloatArray, bins: int, model: str) -> tuple[FloatArray, FloatArray]:
    """(seasonal, trend) components: STL for ``stl``, classical moving averages otherwise."""
    from statsmodels.tsa.seasonal import STL, seasonal_decompose  # type: ignore[import-untyped]

    with quiet_fit():
        if model == "stl":
            stl = STL(gridded, period=bins, robust=False).fit()
            return np.asarray(stl.seasonal), np.asarray(stl.trend)
        # extrapolate over one period less one point at each end: what 0.15 spells "period"
        # and 0.14 spells "freq" (deprecated in 0.15), given as the number both accept
        classical = seasonal_decompose(
            gridded, period=bins, two_sided=True, extrapolate_trend=bins - 1
        )
        return np.asarray(classical.seasonal), np.asarray(classical.trend)


def smooth_circular(profile: FloatArray, width: int) -> FloatArray:
    """Moving average over ``width`` neighbouring slots, wrapping around midnight."""
    if width <= 1:
        return profile
    pad = width // 2
    padded = np.concatenate([profile[-pad:], profile, profile[: width - 1 - pad]])
    out: FloatArray = np.convolve(padded, np.ones(width) / width, mode="valid")
    return out


def seasonal_gain(detrended: FloatArray, bins: int, width: int = 1) -> float:
    """Share of each day's variance that the other days' profile predicts (leave one day out).

    Why held out: an in-sample seasonal component fitted on 3 days of 288 bins explains a lot
    of pure noise (STL "finds" a season in white noise), and a fake profile adds its noise to
    every forecast. A real daily pattern predicts a day it has not seen. ``width`` smooths the
    other days' profile first, which is what lets a noisy but real daily cycle through.
    """
    days = len(detrended) // bins
    if days < 2:
        return 0.0
    matrix = detrended[len(detrended) - days * bins :].reshape(days, bins)
    total = matrix.sum(axis=0)
    explained = 0.0
    variance = 0.0
    for day in range(days):
        others = smooth_circular((total - matrix[day]) / (days - 1), width)
        explained += float(np.sum(matrix[day] ** 2) - np.sum((matrix[day] - others) ** 2))
        variance += float(np.sum(matrix[day] ** 2))
    return explained / variance if variance > 0 else 0.0


def _profile(seasonal: FloatArray, first_phase: int, bins: int, width: int) -> FloatArray:
    """Per-phase average of the last two days of a seasonal component, centred and smoothed."""
    n = len(seasonal)
    tail = seasonal[-2 * bins :]
    phases = (np.arange(n - len(tail), n) + first_phase) % bins
    profile = np.bincount(phases, weights=tail, minlength=bins) / np.maximum(
        np.bincount(phases, minlength=bins), 1
    )
    out: FloatArray = smooth_circular(profile - profile.mean(), width)
    return out


def _best_width(detrended: FloatArray, bins: int) -> int | None:
    """Profile smoothing that predicts held-out days best (raw or one hour), or None if neither
    explains at least ``_MIN_SEASONAL_GAIN`` of their variance."""
    best_gain, best = _MIN_SEASONAL_GAIN, None
    for width in sorted({1, max(1, bins // 24)}):
        gain = seasonal_gain(detrended, bins, width)
        if gain >= best_gain:
            best_gain, best = gain, width
    return best


def daily_profile(days: FloatArray, first_phase: int, bins: int, model: str) -> FloatArray | None:
    """The daily profile to forecast with, or None when the series is not clearly seasonal."""
    if len(days) < 2 * bins:
        return None
    seasonal, trend = _decompose(days, bins, model)
    width = _best_width(days - trend, bins)
    if width is None:
        return None
    return _profile(seasonal, first_phase, bins, width)


def _fit_holt_winters(days: FloatArray, first_phase: int, bins: int) -> FitResult | None:
    """Additive damped Holt-Winters: all parameters and the profile from one statsmodels fit.

    Fitted on the slot means (one value per phase slot), so with sampling finer than the
    profile its smoothing parameters are per slot, not per point: an approximation, and one
    reason it is not the default. None when the data is not seasonal.
    """
    from statsmodels.tsa.holtwinters import ExponentialSmoothing  # type: ignore[import-untyped]

    if len(days) < 2 * bins:
        return None
    _, trend = _decompose(days, bins, "ets")
    width = _best_width(days - trend, bins)
    if width is None:
        return None
    with quiet_fit():
        result = ExponentialSmoothing(
            days,
            trend="add",
            damped_trend=True,
            seasonal="add",
            seasonal_periods=bins,
            initialization_method="estimated",
        ).fit()
    season = _profile(np.asarray(result.season), first_phase, bins, width)
    p = result.params
    alpha = float(p["smoothing_level"])
    # statsmodels uses the component form; convert to innovations form.
    params = Smoothing(
        alpha=alpha,
        beta=alpha * float(p["smoothing_trend"]),
        phi=float(p["damping_trend"]),
        gamma=(1.0 - alpha) * float(p["smoothing_seasonal"]),
    )
    sigma = math.sqrt(float(result.sse) / max(len(days), 1))
    return FitResult(params, season, sigma)


def _fit_ets(values: FloatArray, alpha_bounds: tuple[float, float]) -> tuple[Smoothing, float]:
    """Simple vs damped-trend exponential smoothing, the lower AIC wins.

    The level's smoothing is kept within ``alpha_bounds``: maximum likelihood happily returns
    alpha = 0 on a stationary stretch (a level that never adapts again) or 1 on a spiky one
    (a baseline that chases every spike, so the anomaly becomes its own forecast).
    """
    from statsmodels.tsa.exponential_smoothing.ets import ETSModel  # type: ignore[import-untyped]

    best: tuple[float, Smoothing, float] | None = None
    with quiet_fit():
        for trend in (False, True):
            try:
                model = ETSModel(
                    values,
                    error="add",
                    trend="add" if trend else None,
                    damped_trend=trend,
                    bounds={"smoothing_level": alpha_bounds},
                )
                result = model.fit(disp=False, maxiter=200)
            except Exception:  # statsmodels raises many types on degenerate data
                continue
            p = dict(zip(model.param_names, np.asarray(result.params), strict=True))
            aic = float(result.aic)
            if not math.isfinite(aic):
                continue
            params = Smoothing(
                alpha=float(p["smoothing_level"]),
                beta=float(p.get("smoothing_trend", 0.0)),
                phi=float(p.get("damping_trend", 0.0)),
            )
            sigma = math.sqrt(max(float(result.mse), 0.0))
            if best is None or aic < best[0]:
                best = (aic, params, sigma)
    if best is None:
        raise ValueError("no exponential smoothing model could be fitted")
    return best[1], best[2]


def _fit_sarimax(values: FloatArray) -> tuple[Smoothing, float]:
    from statsmodels.tsa.statespace.sarimax import SARIMAX  # type: ignore[import-untyped]

    with quiet_fit():
        result = SARIMAX(values, order=(1, 1, 1)).fit(disp=False, maxiter=50)
    p = dict(zip(result.model.param_names, np.asarray(result.params), strict=True))
    ar = float(np.clip(p["ar.L1"], -0.99, 0.99))
    ma = float(np.clip(p["ma.L1"], -0.99, 0.99))
    # alpha only sets the forecast-variance growth over gaps: ARIMA(0,1,1) has alpha = 1 + ma.
    params = Smoothing(alpha=min(1.0, 1.0 + ma), kind="arima", ar=ar, ma=ma)
    return params, math.sqrt(max(float(p["sigma2"]), 0.0))


def fit_baseline(data: FitInput, config: DetectorConfig) -> FitResult:
    """Fit ``config.model`` to a detector's rescaled history.

    The daily profile (when the data has one, see :func:`seasonal_gain`) comes from a classical
    moving-average decomposition, or STL for ``stl``; the dynamics from exponential smoothing
    (``ets``, ``stl``), ARIMA(1,1,1) (``sarimax``) or nowhere (``fixed``: a control showing
    what fitting adds). ``holt_winters`` takes everything from one statsmodels Holt-Winters.
    """
    model = config.model
    season: FloatArray | None = None
    if data.days is not None and data.bins >= 4:
        if model == "holt_winters":
            fit = _fit_holt_winters(data.days, data.first_phase, data.bins)
            if fit is not None:
                return fit
        else:
            season = daily_profile(data.days, data.first_phase, data.bins, model)
    adjusted = data.points - season[data.phases] if season is not None else data.points
    if model == "fixed":
        params, sigma = Smoothing(alpha=0.2), float(np.std(np.diff(adjusted))) or 1.0
    elif model == "sarimax":
        params, sigma = _fit_sarimax(adjusted)
    else:
        params, sigma = _fit_ets(adjusted, config.alpha_bounds)
    if season is not None:
        # Keep learning the profile slowly: a day of data moves each slot by about 10 %.
        params = replace(params, gamma=0.1 / data.points_per_slot)
    return FitResult(params, season, sigma)


class AnomalyDetector(StreamingDetector):
    """Streaming anomaly score for one numeric series; ``update(value, timestamp) -> [0, 1]``.

    Constructible with no arguments; pass a :class:`DetectorConfig` or keyword overrides of its
    fields (``AnomalyDetector(model="stl", refractory=0)``). See :mod:`._detector` for the
    per-point algorithm and time semantics; this class supplies the statsmodels fits.
    """

    def __init__(self, config: DetectorConfig | None = None, **overrides: Any) -> None:
        super().__init__(fit_baseline, config, **overrides)
        if self.config.model not in MODELS:
            raise ValueError(f"model must be one of {', '.join(MODELS)}, got {self.config.model!r}")
