"""Bounded memory of a series for the periodic refits: recent points, and recent days by phase.

Two buffers because the two halves of the model need different views. The dynamics (smoothing
parameters) are fitted on the last few hundred *points*; the daily profile needs *days* of data,
which at 10-second buckets would be 26,000 points a day, so days are kept as one mean per phase
slot (e.g. 288 five-minute slots a day). Both are float32 rings: their memory is fixed at
construction time, whatever the traffic.
"""

from __future__ import annotations

from array import array

import numpy as np
import numpy.typing as npt

__all__ = ["PointHistory", "SlotHistory"]

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]


class PointHistory:
    """The last ``capacity`` values and the daily phase slot of each."""

    __slots__ = ("_head", "_phases", "_values", "capacity")

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._values: array[float] = array("f")
        self._phases: array[int] = array("H")
        self._head = 0

    def __len__(self) -> int:
        return len(self._values)

    def append(self, value: float, phase: int) -> None:
        if len(self._values) < self.capacity:
            self._values.append(value)
            self._phases.append(phase)
        else:
            self._values[self._head] = value
            self._phases[self._head] = phase
            self._head = (self._head + 1) % self.capacity

    def rephase(self, phase: int) -> None:
        """Give every stored point the same phase (used once, when bins are first known)."""
        for i in range(len(self._phases)):
            self._phases[i] = phase

    def ordered(self) -> tuple[FloatArray, IntArray]:
        """Oldest first."""
        values = np.frombuffer(self._values, dtype=np.float32).astype(np.float64)
        phases = np.frombuffer(self._phases, dtype=np.uint16).astype(np.int64)
        if self._head:
            values = np.roll(values, -self._head)
            phases = np.roll(phases, -self._head)
        return values, phases


class SlotHistory:
    """Mean value per absolute phase slot over the last ``capacity`` slots (NaN = no data).

    Out-of-order points whose slot is already closed are added to the open slot: state never
    rewinds (the same rule as the detector's).
    """

    __slots__ = ("_count", "_first", "_open", "_ring", "_sum", "capacity")

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._ring: array[float] = array("f", [float("nan")]) * capacity
        self._open: int | None = None
        self._first = 0
        self._sum = 0.0
        self._count = 0

    def add(self, slot: int, value: float) -> None:
        current = self._open
        if current is None:
            self._open = slot
            self._first = slot
        elif slot > current:
            self._close()
            # Slots skipped by a gap hold no data.
            for missing in range(current + 1, min(slot, current + 1 + self.capacity)):
                self._ring[missing % self.capacity] = float("nan")
            self._open = slot
        self._sum += value
        self._count += 1

    def _close(self) -> None:
        if self._open is not None and self._count:
            self._ring[self._open % self.capacity] = self._sum / self._count
        self._sum = 0.0
        self._count = 0

    def span(self) -> int:
        """Closed slots covered, oldest to newest, within the capacity."""
        if self._open is None:
            return 0
        return min(self._open - self._first, self.capacity)

    def series(self) -> tuple[FloatArray, int] | None:
        """Closed slots oldest first, gaps interpolated, and the absolute slot of the first."""
        if self._open is None:
            return None
        length = self.span()
        if length < 2:
            return None
        first = self._open - length
        index = np.arange(first, self._open) % self.capacity
        values = np.frombuffer(self._ring, dtype=np.float32)[index].astype(np.float64)
        known = ~np.isnan(values)
        if known.sum() < 2:
            return None
        positions = np.arange(length)
        filled: FloatArray = np.interp(positions, positions[known], values[known])
        return filled, first
