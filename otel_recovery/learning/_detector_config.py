"""The streaming detector's knobs, each checked once at construction.

:class:`DetectorConfig` is what ``AnomalyDetector(...)`` and ``SERIES_DETECTOR_CONFIG`` are
made of: its defaults are what the NAB benchmark reports, and its ``__post_init__`` refuses
nonsense (a window of 0, a quantile of 1, a NaN clip) naming the field and what it accepts,
and turns every accepted number into a plain ``int`` or ``float`` so the per-point code of
:mod:`._detector` never meets a ``numpy.int64`` or a ``Fraction``. How the detector uses each
knob is said there; this module only says what a valid configuration is.

The class keeps :mod:`._detector` as its ``__module__`` (where it was defined before this
module existed), so reprs, ``help()`` and pickles name it as they did.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["DetectorConfig"]


@dataclass(frozen=True, slots=True)
class DetectorConfig:
    """Knobs of :class:`StreamingDetector`; the defaults are what the NAB benchmark reports."""

    model: str = "ets"
    """Baseline family: ets, stl, holt_winters, sarimax or fixed (see ``fit_baseline``)."""
    history: int = 1024
    """Points kept for refitting the dynamics (6 bytes each)."""
    first_fit: int = 32
    """Points before the first fit; fits then happen at 2x, 4x, ... until ``refit_every``."""
    refit_every: int = 512
    alpha_bounds: tuple[float, float] = (0.02, 0.5)
    """Range the fitted level smoothing may take (ets and stl models)."""
    seasonality: bool = True
    """Learn a daily profile once ``season_days`` days have been seen."""
    season_days: float = 2.0
    season_history_days: float = 4.0
    """Days of phase-slot means kept for the profile (4 bytes per slot)."""
    season_bins: int = 288
    """Profile slots per day (288: five minutes), capped by the sampling step."""
    clip: float = 3.0
    """Residuals beyond this many scales update the state only up to this bound."""
    shift_run: int = 6
    """This many consecutive clipped residuals on one side confirm a level shift."""
    scale_memory: float = 1000.0
    """Points of memory of the residual scale (exponential weights)."""
    window: int = 12
    """Points in the windowed-mean statistic that catches moderate sustained shifts."""
    tail_quantile: float = 0.999
    """Which quantile of its own deviations a series is judged against (score 0.5)."""
    tail_rate: float = 0.1
    """Log-space step of that quantile's estimate per exceedance."""
    floor: float = 3.0
    """Deviations below this many scales never score 0.5 or more."""
    zclip: float = 6.0
    """Residuals are clipped to this many scales inside the windowed mean."""
    refractory: float = 600.0
    """Points over which a reported score fades before lower scores are reported again."""
    warmup: int = 16
    """Points scored 0 while the first estimates settle."""
    min_scale: float = 0.0
    """The smallest residual scale, in the series' own units: a change of about this much
    is never surprising, however flat the series was. 0 (the default, what the NAB figures
    use) floors the scale at a millionth of the level only, so on a perfectly flat series
    any change scores high; a series of counts wants about 1 (one call more or less, a
    call ending just past a bucket boundary), a log latency about 0.01 (1 %)."""

    def __post_init__(self) -> None:
        """Reject nonsense at construction, naming the field and what it accepts."""
        if not isinstance(self.model, str):
            raise TypeError(f"model must be a string, got {self.model!r}")
        for name, minimum in (
            ("history", 8),
            ("first_fit", 4),
            ("refit_every", 1),
            ("season_bins", 1),
            ("shift_run", 1),
            ("window", 1),
            ("warmup", 0),
        ):
            _integer(self, name, minimum)
        if not isinstance(self.seasonality, bool):
            raise TypeError(f"seasonality must be True or False, got {self.seasonality!r}")
        positive = ("a number > 0", lambda v: v > 0)

        def at_least(v: float) -> bool:
            return v >= self.season_days

        for name, (accepted, ok) in (
            ("season_days", positive),
            ("season_history_days", (f"a number >= season_days ({self.season_days})", at_least)),
            ("clip", positive),
            ("scale_memory", ("a number of points >= 1", lambda v: v >= 1)),
            ("tail_quantile", ("a number in (0, 1)", lambda v: 0 < v < 1)),
            ("tail_rate", positive),
            ("floor", positive),
            ("zclip", positive),
            ("refractory", ("a number of points >= 0", lambda v: v >= 0)),
            ("min_scale", ("a number >= 0", lambda v: v >= 0)),
        ):
            _real(self, name, accepted, ok)
        bounds = self.alpha_bounds
        accepted = "a pair (low, high) with 0 <= low <= high <= 1"
        if (
            not isinstance(bounds, (tuple, list))
            or len(bounds) != 2
            or not all(_is_real(b) for b in bounds)
        ):
            raise TypeError(f"alpha_bounds must be {accepted}, got {bounds!r}")
        low, high = float(bounds[0]), float(bounds[1])
        if not 0.0 <= low <= high <= 1.0:
            raise ValueError(f"alpha_bounds must be {accepted}, got {bounds!r}")
        object.__setattr__(self, "alpha_bounds", (low, high))


def _is_real(value: object) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _integer(config: DetectorConfig, name: str, minimum: int) -> None:
    value = getattr(config, name)
    if not isinstance(value, numbers.Integral) or isinstance(value, bool):
        raise TypeError(f"{name} must be an integer >= {minimum}, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    object.__setattr__(config, name, int(value))


def _real(config: DetectorConfig, name: str, accepted: str, ok: Callable[[float], bool]) -> None:
    value = getattr(config, name)
    if not _is_real(value):
        raise TypeError(f"{name} must be {accepted}, got {value!r}")
    number = float(value)
    if not math.isfinite(number) or not ok(number):
        raise ValueError(f"{name} must be {accepted}, got {value!r}")
    object.__setattr__(config, name, number)
