"""From forecast residuals to an anomaly score in [0, 1]: is this deviation bigger than the
deviations *this* series usually has?

Why not a Gaussian tail of the residual z-score: real residuals are heavy-tailed and their tails
differ per series, so one threshold on raw z floods spiky series with alarms and misses
anomalies on quiet ones (the Windowed Gaussian detector scores 39.6 on NAB that way). Each
series is therefore judged against its own tail, in O(1) state:

1. two statistics per point: the point deviation ``|z|``, and the mean of the last ``window``
   residuals (each clipped to ``zclip``) times sqrt(window), which is also z-like when residuals
   are independent and catches moderate shifts that no single point reveals;
2. each is divided by a running estimate of its own 99.9th percentile (one per direction, since
   upward and downward tails differ: a count can spike up far more than it can drop), floored at
   ``floor`` (a deviation below 3 sigma is never news). The percentile is tracked in log space by
   stochastic approximation: it climbs ``rate`` per exceedance and sinks ``rate/1000``
   otherwise, so a series that spikes every day learns that spikes are normal within days,
   while a single monster outlier raises the bar only a little;
3. the larger ratio ``r`` becomes the score ``r / (1 + r)``: 0.5 means "as large as this series'
   usual one-in-a-thousand deviation", and the score never saturates, so stronger anomalies
   always rank higher;
4. an anomaly is an *onset*: after a score ``s``, lower scores are held back while ``s`` fades
   linearly over ``refractory`` points, so a sustained anomaly is reported once, loudly, at its
   start, rather than once per point (:attr:`SurpriseCalibrator.raw` keeps the unfiltered score).
"""

from __future__ import annotations

import math
from array import array

__all__ = ["SurpriseCalibrator"]


class _Tail:
    """Running estimate of a high quantile of a positive statistic, in log space."""

    __slots__ = ("log_level", "step_down", "step_up")

    def __init__(self, quantile: float, rate: float, start: float) -> None:
        self.log_level = math.log(start)
        self.step_up = rate * quantile
        self.step_down = rate * (1.0 - quantile)

    def learn(self, value: float) -> None:
        if value > 0.0 and math.log(value) > self.log_level:
            self.log_level += self.step_up
        else:
            self.log_level -= self.step_down


class SurpriseCalibrator:
    """O(1) per point; ``window`` floats of state plus four tail estimates."""

    __slots__ = (
        "_decay",
        "_hold",
        "_pos",
        "_ring",
        "_sqrt_window",
        "_sum",
        "_tails",
        "floor",
        "raw",
        "zclip",
    )

    def __init__(
        self,
        window: int = 12,
        quantile: float = 0.999,
        rate: float = 0.1,
        floor: float = 3.0,
        zclip: float = 6.0,
        refractory: float = 600.0,
    ) -> None:
        if not 0.0 < quantile < 1.0 or rate <= 0.0 or floor <= 0.0 or window < 1:
            raise ValueError("need 0 < quantile < 1, rate > 0, floor > 0 and window >= 1")
        self._ring = array("d", [0.0] * window)
        self._pos = 0
        self._sum = 0.0
        self._sqrt_window = math.sqrt(window)
        # point up, point down, window up, window down
        self._tails = tuple(_Tail(quantile, rate, floor) for _ in range(4))
        self.floor = floor
        self.zclip = zclip
        self._decay = 1.0 / refractory if refractory > 0 else 0.0
        self._hold = 0.0
        self.raw = 0.0

    def score(self, z: float, report: bool = True) -> float:
        """Score one standardised residual, then learn from it.

        ``report=False`` (warm-up) learns the tails but neither reports nor starts a
        refractory period: early scores reflect unsettled estimates, not the data.
        """
        if math.isnan(z):
            z = 0.0
        point = abs(z)
        clipped = max(-self.zclip, min(self.zclip, z))
        ring = self._ring
        self._sum += clipped - ring[self._pos]
        ring[self._pos] = clipped
        self._pos = (self._pos + 1) % len(ring)
        mean = self._sum / self._sqrt_window
        tails = self._tails
        point_tail = tails[0] if z >= 0.0 else tails[1]
        window_tail = tails[2] if mean >= 0.0 else tails[3]
        floor = self.floor
        # The ring starts as zeros, so early window means are conservative partial sums.
        ratio = max(
            point / max(math.exp(point_tail.log_level), floor),
            abs(mean) / max(math.exp(window_tail.log_level), floor),
        )
        raw = ratio / (1.0 + ratio)
        point_tail.learn(point)
        window_tail.learn(abs(mean))
        if not report:
            self.raw = 0.0  # the unfiltered score too: a new series' first points are not news
            return 0.0
        self.raw = raw
        if self._decay <= 0.0:
            return raw
        hold = self._hold
        self._hold = max(raw, hold - self._decay)
        return raw if raw > hold else 0.0
