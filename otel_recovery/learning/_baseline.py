"""The O(1) per-point half of the anomaly baseline: a robust, damped-trend exponential smoother
with an optional daily profile, run with parameters that statsmodels fitted off the hot path.

Why hand-written: statsmodels' state-space ``extend()`` costs 0.4-1 ms a point and the classic
Holt-Winters results cannot be extended at all (research/anomaly.md section 3.2); the same
recursion in plain Python costs about a microsecond. statsmodels chooses the parameters
(:mod:`otel_recovery.learning.anomaly`); this module only runs them, so it imports nothing heavy.

Robustness (after Gelper, Fried & Croux, "Robust forecasting with exponential and Holt-Winters
smoothing", 2010): the state is updated with the residual clipped to a few scales, so one spike
does not drag the baseline and the next points are not scored against a corrupted forecast. A
real level shift would then be learned only slowly, so a run of large residuals on the same side
re-anchors the level on the new data (:meth:`Baseline.reanchor`).
"""

from __future__ import annotations

import math
from array import array
from dataclasses import dataclass
from datetime import datetime, timezone

__all__ = ["DAY", "Baseline", "Smoothing", "to_epoch"]

DAY = 86_400.0


@dataclass(frozen=True, slots=True)
class Smoothing:
    """Fitted parameters in innovations form (Hyndman et al., *Forecasting with Exponential
    Smoothing*): level += alpha*e, trend = phi*trend + beta*e, season[k] += gamma*e.

    ``kind`` is ``"ets"`` (level/trend) or ``"arima"`` (ARIMA(1,1,1): forecast = last +
    ar*(last - previous) + ma*last_error), the two recursion families the fitters produce.
    """

    alpha: float = 0.3
    beta: float = 0.0
    phi: float = 0.0
    gamma: float = 0.0
    kind: str = "ets"
    ar: float = 0.0
    ma: float = 0.0


def to_epoch(timestamp: object) -> float:
    """Seconds since the epoch from a datetime (naive ones are UTC, so DST never shifts the
    daily phase), a pandas/numpy timestamp, or a number of seconds."""
    if isinstance(timestamp, datetime):
        if timestamp.tzinfo is None:
            timestamp = timestamp.replace(tzinfo=timezone.utc)
        return timestamp.timestamp()
    if isinstance(timestamp, bool):
        raise TypeError("timestamp must be a datetime or epoch seconds, not bool")
    if isinstance(timestamp, (int, float)):
        return float(timestamp)
    to_datetime = getattr(timestamp, "to_pydatetime", None)  # pandas.Timestamp
    if to_datetime is not None:
        return to_epoch(to_datetime())
    dtype = getattr(timestamp, "dtype", None)  # numpy.datetime64 / numpy scalars
    if dtype is not None:
        if getattr(dtype, "kind", "") == "M":
            return float(timestamp.astype("datetime64[ns]").astype("int64")) / 1e9  # type: ignore[attr-defined]
        return float(timestamp)  # type: ignore[arg-type]
    raise TypeError(
        f"timestamp must be a datetime or epoch seconds, got {type(timestamp).__name__}"
    )


class Baseline:
    """Level, damped trend and daily profile of one series; every method is O(1).

    The profile is indexed by the timestamp's phase slot within the day (the detector computes
    it), so gaps, repeated and irregular timestamps never knock it out of step, as an
    index-based season would.
    """

    __slots__ = (
        "_last",
        "_last_error",
        "_prev",
        "level",
        "params",
        "season",
        "seasonal",
        "trend",
    )

    def __init__(self, params: Smoothing, level: float) -> None:
        self.params = params
        self.level = level
        self.trend = 0.0
        self.season: array[float] | None = None
        self.seasonal = False
        self._last = level
        self._prev = level
        self._last_error = 0.0

    def seasonal_term(self, phase: int) -> float:
        season = self.season
        return season[phase] if self.seasonal and season is not None else 0.0

    def forecast(self, phase: int, horizon: int = 1) -> float:
        """Prediction for a point ``horizon`` steps after the last one (gaps have horizon > 1)."""
        p = self.params
        if p.kind == "arima":
            drift = self._last - self._prev
            step = p.ar * drift * _geometric(p.ar, horizon) + p.ma * self._last_error
            return self._last + step + self.seasonal_term(phase)
        damp = p.phi * _geometric(p.phi, horizon)
        return self.level + damp * self.trend + self.seasonal_term(phase)

    def horizon_variance(self, horizon: int) -> float:
        """Forecast variance over ``horizon`` steps relative to a one-step one (ETS formula)."""
        if horizon <= 1:
            return 1.0
        return 1.0 + (horizon - 1) * self.params.alpha**2

    def update(
        self, forecast: float, error: float, phase: int, horizon: int = 1, season: bool = True
    ) -> None:
        """Fold in an observation whose (already clipped) residual against ``forecast`` is
        ``error``; ``horizon`` advances the trend over a gap; ``season=False`` leaves the
        profile alone (replays of data the profile was estimated from)."""
        p = self.params
        cleaned = forecast + error
        if p.kind == "arima":
            deseasoned = cleaned - self.seasonal_term(phase)
            self._prev = self._last if horizon == 1 else deseasoned
            self._last = deseasoned
            self._last_error = error
            self.level = deseasoned
        else:
            damp = p.phi * _geometric(p.phi, horizon)
            self.level = self.level + damp * self.trend + p.alpha * error
            self.trend = p.phi**horizon * self.trend + p.beta * error
        if season and self.seasonal and self.season is not None and p.gamma > 0.0:
            self.season[phase] += p.gamma * error

    def reanchor(self, deseasoned_level: float) -> None:
        """Jump to a new level (a level shift was confirmed) and forget the trend."""
        self.level = deseasoned_level
        self.trend = 0.0
        self._last = self._prev = deseasoned_level
        self._last_error = 0.0

    def adopt(
        self,
        params: Smoothing,
        season: list[float] | None,
        values: list[float],
        phases: list[int],
        bound: float,
    ) -> None:
        """Switch to freshly fitted parameters and profile, and bring the state in line with
        them by replaying ``values`` (oldest first, residuals clipped to ``bound``).

        Why replay: a level learned under the old parameters (or without the new profile) is
        not the level the new ones imply; with a small fitted alpha it would never catch up.
        Replaying a few hundred points costs about a millisecond, far less than the fit.
        """
        self.params = params
        if season is not None:
            self.season = array("d", season)
            self.seasonal = True
        else:
            self.seasonal = False
        if not values:
            return
        self.reanchor(values[0] - self.seasonal_term(phases[0]))
        for value, phase in zip(values, phases, strict=True):
            forecast = self.forecast(phase)
            self.update(forecast, clip(value - forecast, bound), phase, season=False)


def _geometric(ratio: float, horizon: int) -> float:
    """1 + r + ... + r^(h-1): how much of a damped trend accrues over ``horizon`` steps."""
    if horizon <= 1:
        return 1.0
    if abs(1.0 - ratio) < 1e-12:
        return float(horizon)
    return (1.0 - ratio**horizon) / (1.0 - ratio)


def clip(value: float, bound: float) -> float:
    return bound if value > bound else (-bound if value < -bound else value)


def normal_tail(z: float) -> float:
    """Upper tail probability of a standard normal."""
    return 0.5 * math.erfc(z / math.sqrt(2.0))
