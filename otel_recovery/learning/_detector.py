"""The streaming anomaly detector, minus the statsmodels fits (injected by ``anomaly.py``).

Per point, O(1): turn the timestamp into epoch seconds and a daily phase, forecast with the
current parameters, standardise the residual by a robust running scale, score it
(:mod:`._surprise`), and fold the point into the state with its residual clipped. Every
``refit_every`` points (after a doubling warm-up: 32, 64, 128, ...) the injected fitter
re-estimates the parameters from the last ``history`` points and the daily profile from the
last days of phase-slot means (with one extra refit as soon as ``season_days`` days have been
seen). Fits run inline, amortised: deterministic, and off the span-ending thread anyway, since
the span processor updates detectors from its worker. After a fit the state is replayed over
the point history with the new parameters, so level and profile agree with them.

Time semantics (real data repeats and reorders timestamps):

- a repeated or backward timestamp is scored against the current baseline and folded in as one
  more observation at the latest time seen; state never rewinds;
- a gap of ``h`` sampling steps advances the trend ``h`` steps and widens the expected band as
  an h-step forecast would, so the first point after an outage is not an automatic alarm;
- no timestamp means "one sampling step after the previous point" (1 s before the step is
  known); naive datetimes are UTC; a NaN or infinite timestamp is a ValueError (a point needs a
  time, or None).

Values: NaN and infinities are not data (gaps): they score 0 and change nothing. Any finite
magnitude works: a series far from 1 (all values around 1e200, or 1e-200) is handled in units of
a power of two fixed at its first non-zero value, an exact rescaling, so its scale never
overflows and the float32 history keeps it.

The knobs (:class:`DetectorConfig`) and what values they accept live in
:mod:`._detector_config`; the fitter's side of the contract (:class:`FitInput`,
:class:`FitResult`) is here, as it is what this detector hands over and takes back.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable
from dataclasses import replace
from typing import Any, NamedTuple

import numpy as np
import numpy.typing as npt

from otel_recovery._public_home import public_home
from otel_recovery.learning._baseline import DAY, Baseline, Smoothing, clip, to_epoch
from otel_recovery.learning._detector_config import DetectorConfig
from otel_recovery.learning._history import PointHistory, SlotHistory
from otel_recovery.learning._surprise import SurpriseCalibrator

__all__ = ["DetectorConfig", "Estimate", "FitInput", "FitResult", "Fitter", "StreamingDetector"]

public_home(__name__, DetectorConfig)  # its name before the configuration module existed

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]

_MAX = sys.float_info.max
_PLAIN_EXPONENTS = range(-64, 65)
"""Values whose binary exponent is in this range are used as they are (unit 1)."""


class FitInput(NamedTuple):
    """What a fitter sees, rescaled to median 0 and unit robust spread."""

    points: FloatArray
    """The last ``history`` values, oldest first."""
    phases: IntArray
    """Daily phase slot of each point."""
    days: FloatArray | None
    """Slot means over the last days (gaps interpolated), or None when seasonality is off or
    fewer than ``season_days`` days have been seen."""
    first_phase: int
    """Phase of ``days[0]``."""
    bins: int
    points_per_slot: float
    """Sampling points per phase slot (1 when sampling is as coarse as the profile)."""


class FitResult(NamedTuple):
    """A fitter's answer, in the rescaled units it was given."""

    params: Smoothing
    season: FloatArray | None
    sigma: float


Fitter = Callable[[FitInput, DetectorConfig], FitResult]


def _unit_for(y: float) -> float:
    """1 for ordinary magnitudes, else the power of two nearest below ``|y|``."""
    exponent = math.frexp(y)[1]
    return 1.0 if exponent in _PLAIN_EXPONENTS else math.ldexp(1.0, exponent - 1)


class Estimate(NamedTuple):
    """What the detector expected for the last point and its 3-scale band."""

    expected: float
    lower: float
    upper: float
    scale: float
    raw_score: float
    """The score before onset filtering (see ``refractory``); 0 during ``warmup``, like the
    filtered one."""


class StreamingDetector:
    """See the module docstring; ``AnomalyDetector`` supplies the statsmodels ``fitter``."""

    def __init__(self, fitter: Fitter, config: DetectorConfig | None = None, **overrides: Any):
        config = config or DetectorConfig()
        if overrides:
            config = replace(config, **overrides)
        self.config = config
        self._fitter = fitter
        self._points = PointHistory(config.history)
        self._days: SlotHistory | None = None
        self._baseline: Baseline | None = None
        self._calibrator = SurpriseCalibrator(
            config.window,
            config.tail_quantile,
            config.tail_rate,
            config.floor,
            config.zclip,
            config.refractory,
        )
        self._var = 0.0
        self._unit = 0.0  # values are divided by this; 0 until the first non-zero value
        self._rate = 1.0 / max(config.scale_memory, 1.0)
        self._floor = 0.0
        self._min_scale = config.min_scale  # in the units values are divided into (_unit)
        self._count = 0
        self._next_fit = config.first_fit
        self._last_epoch: float | None = None
        self._step = 0.0
        self._steps: list[float] | None = []
        self._width = DAY  # seconds per phase slot; one slot a day until bins are known
        self._season_due = False
        self._season_slots = 0
        self._bins = 1
        self._run = 0
        self._run_values: list[float] = []
        self.fits = 0
        self.last = Estimate(math.nan, math.nan, math.nan, math.nan, 0.0)

    # ---------------------------------------------------------------- public surface

    @property
    def count(self) -> int:
        """Points seen."""
        return self._count

    @property
    def step(self) -> float:
        """Estimated sampling interval in seconds (median of the first positive gaps)."""
        return self._step

    @property
    def seasonal(self) -> bool:
        """Whether forecasts currently include a daily profile."""
        return self._baseline is not None and self._baseline.seasonal

    @property
    def params(self) -> Smoothing | None:
        return self._baseline.params if self._baseline is not None else None

    def update(self, value: float, timestamp: object = None) -> float:
        """Score ``value`` observed at ``timestamp`` in [0, 1], then learn from it.

        NaN and infinities are not data: they score 0 and change nothing. A NaN or infinite
        timestamp raises ValueError.
        """
        y = float(value)
        if not math.isfinite(y):
            return 0.0
        epoch, horizon = self._advance(timestamp)
        unit = self._unit
        if unit != 1.0:
            if unit == 0.0 and y != 0.0:
                unit = self._unit = _unit_for(y)
                self._min_scale = self.config.min_scale / unit
            if unit > 0.0:
                y /= unit  # exact: a power of two; everything below runs in these units
        base = self._baseline
        if base is None:
            base = self._baseline = Baseline(Smoothing(alpha=0.5), y)
        slot = int(epoch // self._width)
        phase = slot % self._bins
        forecast = base.forecast(phase, horizon)
        if not math.isfinite(forecast):  # only a series spanning ~600 orders of magnitude
            base.reanchor(y - base.seasonal_term(phase))
            forecast = base.forecast(phase, horizon)
        error = clip(y - forecast, _MAX)
        scale = math.sqrt(self._var * base.horizon_variance(horizon))
        scale = max(min(scale, _MAX), self._floor, self._min_scale)
        z = error / scale if scale > 0.0 else 0.0
        score = self._calibrator.score(z, report=self._count >= self.config.warmup)
        shown = unit if unit > 0.0 else 1.0
        self.last = Estimate(
            forecast * shown,
            (forecast - 3.0 * scale) * shown,
            (forecast + 3.0 * scale) * shown,
            scale * shown,
            self._calibrator.raw,
        )
        self._learn(y, error, forecast, scale, phase, horizon)
        self._points.append(y, phase)
        days = self._days
        if days is not None:
            days.add(slot, y)
            if not self._season_due and days.span() >= self._season_slots:
                # Enough days for a daily profile for the first time: look for one now rather
                # than at the next scheduled refit, which may be hundreds of points away.
                self._season_due = True
                self._next_fit = self._count + 1
        self._count += 1
        if self._count >= self._next_fit:
            self._refit()
            twice = self._count * 2
            self._next_fit = (
                twice if twice < self.config.refit_every else self._count + self.config.refit_every
            )
        return score

    # ---------------------------------------------------------------- internals

    def _advance(self, timestamp: object) -> tuple[float, int]:
        last = self._last_epoch
        if timestamp is None:
            epoch = (last + (self._step or 1.0)) if last is not None else 0.0
        else:
            epoch = to_epoch(timestamp)
            if not math.isfinite(epoch):
                raise ValueError(f"timestamp is not finite: {timestamp!r}")
        if last is None:
            self._last_epoch = epoch
            return epoch, 1
        delta = epoch - last
        if delta <= 0.0:
            return last, 1  # repeat or step back: one more point "now"
        self._last_epoch = epoch
        steps = self._steps
        if steps is not None:
            steps.append(delta)
            self._step = sorted(steps)[len(steps) // 2]
            if len(steps) >= 31:
                self._steps = None  # settled; free the list
        horizon = round(delta / self._step) if self._step > 0 else 1
        return epoch, max(1, min(horizon, 100_000))

    def _learn(
        self, y: float, error: float, forecast: float, scale: float, phase: int, horizon: int
    ) -> None:
        base = self._baseline
        assert base is not None
        cfg = self.config
        bound = cfg.clip * scale
        clipped = clip(error, bound) if bound > 0 else error
        if bound > 0 and abs(error) > bound:
            side = 1 if error > 0 else -1
            if self._run * side < 0:
                self._run = 0
                self._run_values.clear()
            self._run += side
            self._run_values.append(y - base.seasonal_term(phase))
            if abs(self._run) >= cfg.shift_run:
                values = sorted(self._run_values)
                base.reanchor(values[len(values) // 2])
                self._run = 0
                self._run_values.clear()
                clipped = 0.0
        elif self._run:
            self._run = 0
            self._run_values.clear()
        base.update(forecast, clipped, phase, horizon)
        # Robust running scale: squared residuals, each capped at (clip * scale)^2 once warm.
        rate = max(self._rate, 1.0 / (self._count + 2))
        sq = min(error * error, _MAX)  # never inf: inf - inf would make the scale NaN
        cap = bound * bound
        if sq > cap and self._count >= cfg.warmup and self._var > 0.0:
            sq = cap
        self._var += rate * (sq - self._var)
        # Never divide by (almost) zero: a flat series gets a scale of a millionth of its level
        # (not of the latest value: after a 1e9 glitch that floor hid the next one).
        self._floor = 1e-6 * max(abs(base.level), 1e-3)

    def _refit(self) -> None:
        cfg = self.config
        base = self._baseline
        assert base is not None
        if self._days is None and self._step > 0 and cfg.seasonality:
            # The sampling step is known now: fix the profile resolution once.
            self._bins = max(1, min(cfg.season_bins, round(DAY / self._step)))
            self._width = DAY / self._bins
            capacity = max(2, math.ceil(cfg.season_history_days * self._bins))
            self._days = SlotHistory(capacity)
            self._season_slots = math.ceil(cfg.season_days * self._bins)
            current = int((self._last_epoch or 0.0) // self._width)
            self._points.rephase(current % self._bins)
        values, phases = self._points.ordered()
        center = float(np.median(values))
        spread = float(np.median(np.abs(values - center))) * 1.4826
        if not spread > 0:
            spread = float(np.std(values))
        if not spread > 0:
            return  # flat so far: nothing to fit, the running state is exact
        days: FloatArray | None = None
        first_phase = 0
        history = self._days.series() if self._days is not None else None
        if history is not None and len(history[0]) >= cfg.season_days * self._bins:
            days = (history[0] - center) / spread
            first_phase = history[1] % self._bins
        try:
            fit = self._fitter(
                FitInput(
                    (values - center) / spread,
                    phases,
                    days,
                    first_phase,
                    self._bins,
                    max(1.0, self._width / self._step) if self._step > 0 else 1.0,
                ),
                cfg,
            )
        except (ValueError, ArithmeticError, np.linalg.LinAlgError):
            return  # keep the previous parameters; a failed fit is not worth an error
        self.fits += 1
        season = [float(s) * spread for s in fit.season] if fit.season is not None else None
        sigma = fit.sigma * spread
        if sigma > 0 and self.fits == 1:
            self._var = sigma**2
        bound = self.config.clip * math.sqrt(self._var) if self._var > 0 else math.inf
        base.adopt(fit.params, season, values.tolist(), phases.tolist(), bound)
