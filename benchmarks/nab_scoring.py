"""Our own implementation of the Numenta Anomaly Benchmark scoring rules.

Written from the rules as described in ../shared/research/anomaly.md section 1.4 (no NAB code):

1. the first min(floor(0.15 n), 750) rows of each file are probationary and never scored;
2. a row is a detection when its score is >= the threshold;
3. a detection inside window [L, R] at row i is worth A_TP * sigma(-(R - i + 1) / (R - L + 1))
   / sigma(-1), only the best detection of a window counts, and an undetected window costs
   -A_FN; a detection outside every window is worth A_FP * sigma((i - R_prev) / (W_prev - 1))
   (negative), or -A_FP when no window precedes it; sigma(x) = 2 / (1 + e^(5x)) - 1, and -1
   beyond x > 3;
4. one threshold for the whole corpus, per profile, chosen by sweeping every distinct score;
5. normalised: 100 (S - S_null) / (S_perfect - S_null), S_perfect = windows * A_TP and
   S_null = -windows * A_FN.

Why our own: NAB's code is the reference, but the issue asks for an independent
implementation, and an independent one that reproduces the null and perfect detectors (see
``nab.py --check-scorer`` and tests/test_nab_scoring.py) is a check on both.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

__all__ = [
    "CorpusScore",
    "NabFile",
    "Profile",
    "ProfileScore",
    "load_corpus",
    "load_profiles",
    "probation_length",
    "score_corpus",
    "scaled_sigmoid",
]

FloatArray = npt.NDArray[np.float64]


@dataclass(frozen=True)
class Profile:
    name: str
    tp: float
    fn: float
    fp: float


@dataclass(frozen=True)
class NabFile:
    """One data file: its rows and its labelled windows as inclusive row-index ranges."""

    name: str
    timestamps: npt.NDArray[np.datetime64]
    values: FloatArray
    windows: tuple[tuple[int, int], ...]

    @property
    def probation(self) -> int:
        return probation_length(len(self.values))


@dataclass(frozen=True)
class ProfileScore:
    profile: str
    threshold: float
    raw: float
    null: float
    perfect: float
    tp: int
    fn: int
    fp: int

    @property
    def normalised(self) -> float:
        return 100.0 * (self.raw - self.null) / (self.perfect - self.null)


@dataclass(frozen=True)
class CorpusScore:
    profiles: dict[str, ProfileScore]


def probation_length(rows: int) -> int:
    """Rows at the start of a file that are never scored (NAB: 15 %, at most 750)."""
    return int(min(math.floor(0.15 * rows), 0.15 * 5000))


def scaled_sigmoid(x: float) -> float:
    """NAB's position weight: +0.987 at x=-1, 0 at x=0, -0.987 at x=+1, -1 beyond x=3."""
    if x > 3.0:
        return -1.0
    return 2.0 / (1.0 + math.exp(5.0 * x)) - 1.0


def load_profiles(root: Path) -> list[Profile]:
    raw = json.loads((root / "config" / "profiles.json").read_text())
    return [
        Profile(
            name,
            float(body["CostMatrix"]["tpWeight"]),
            float(body["CostMatrix"]["fnWeight"]),
            float(body["CostMatrix"]["fpWeight"]),
        )
        for name, body in raw.items()
    ]


def load_corpus(root: Path, names: Iterable[str] | None = None) -> list[NabFile]:
    """Read data files and windows; window edges are mapped to the nearest rows inside them."""
    import pandas as pd

    windows = json.loads((root / "labels" / "combined_windows.json").read_text())
    wanted = sorted(windows) if names is None else list(names)
    files = []
    for name in wanted:
        frame = pd.read_csv(root / "data" / name)
        stamps = pd.to_datetime(frame["timestamp"]).to_numpy(dtype="datetime64[ns]")
        ranges = []
        for start, end in windows[name]:
            lo = int(np.searchsorted(stamps, np.datetime64(pd.Timestamp(start)), "left"))
            hi = int(np.searchsorted(stamps, np.datetime64(pd.Timestamp(end)), "right")) - 1
            if hi >= lo:
                ranges.append((lo, hi))
        files.append(
            NabFile(name, stamps, frame["value"].to_numpy(dtype=np.float64), tuple(ranges))
        )
    return files


def _row_values(file: NabFile, profile: Profile) -> tuple[FloatArray, npt.NDArray[np.int64]]:
    """What a detection at each row would be worth, and which window (or -1) it falls in."""
    n = len(file.values)
    value = np.empty(n)
    window = np.full(n, -1, dtype=np.int64)
    tp_norm = scaled_sigmoid(-1.0)
    prev: tuple[int, int] | None = None
    spans = list(file.windows)
    w = 0
    for i in range(n):
        while w < len(spans) and i > spans[w][1]:
            prev = spans[w]
            w += 1
        if w < len(spans) and spans[w][0] <= i <= spans[w][1]:
            left, right = spans[w]
            width = right - left + 1
            value[i] = profile.tp * scaled_sigmoid(-(right - i + 1) / width) / tp_norm
            window[i] = w
        elif prev is None:
            value[i] = -profile.fp
        else:
            width = prev[1] - prev[0] + 1
            value[i] = profile.fp * scaled_sigmoid((i - prev[1]) / max(width - 1, 1))
    return value, window


def score_corpus(
    files: Sequence[NabFile],
    scores: Mapping[str, Sequence[float] | FloatArray],
    profiles: Sequence[Profile],
) -> CorpusScore:
    """Sweep one threshold per profile over the whole corpus and normalise the best score."""
    result: dict[str, ProfileScore] = {}
    for profile in profiles:
        all_scores: list[FloatArray] = []
        all_values: list[FloatArray] = []
        all_windows: list[npt.NDArray[np.int64]] = []
        offset = 0
        n_windows = 0
        for file in files:
            row_scores = np.asarray(scores[file.name], dtype=np.float64)
            if len(row_scores) != len(file.values):
                raise ValueError(f"{file.name}: {len(row_scores)} scores for {len(file.values)}")
            if np.any(~np.isfinite(row_scores)) or row_scores.min() < 0 or row_scores.max() > 1:
                raise ValueError(f"{file.name}: scores must be finite and in [0, 1]")
            value, window = _row_values(file, profile)
            start = file.probation
            # Windows that begin in the probation were dropped when the labels were built;
            # any that remain are still counted from their first scored row.
            counted = sorted({int(x) for x in window[start:] if x >= 0})
            remap = {w: offset + k for k, w in enumerate(counted)}
            glob = np.array([remap.get(int(x), -1) for x in window[start:]], dtype=np.int64)
            offset += len(counted)
            n_windows += len(counted)
            all_scores.append(row_scores[start:])
            all_values.append(value[start:])
            all_windows.append(glob)
        result[profile.name] = _sweep(
            profile,
            np.concatenate(all_scores),
            np.concatenate(all_values),
            np.concatenate(all_windows),
            n_windows,
        )
    return CorpusScore(result)


def _sweep(
    profile: Profile,
    scores: FloatArray,
    values: FloatArray,
    windows: npt.NDArray[np.int64],
    n_windows: int,
) -> ProfileScore:
    order = np.argsort(-scores, kind="stable")
    s_sorted = scores[order]
    v_sorted = values[order]
    w_sorted = windows[order]
    best = np.full(n_windows, -math.inf)
    total = -profile.fn * n_windows  # threshold above every score: nothing detected
    best_total, best_threshold = total, math.inf
    tp = fp = 0
    best_counts = (0, n_windows, 0)
    n = len(order)
    i = 0
    while i < n:
        theta = s_sorted[i]
        j = i
        while j < n and s_sorted[j] == theta:
            w = int(w_sorted[j])
            v = float(v_sorted[j])
            if w < 0:
                total += v
                fp += 1
            elif v > best[w]:
                total += v - (best[w] if best[w] > -math.inf else -profile.fn)
                if best[w] == -math.inf:
                    tp += 1
                best[w] = v
            j += 1
        if total > best_total + 1e-12:
            best_total, best_threshold = total, float(theta)
            best_counts = (tp, n_windows - tp, fp)
        i = j
    return ProfileScore(
        profile=profile.name,
        threshold=best_threshold,
        raw=best_total,
        null=-profile.fn * n_windows,
        perfect=profile.tp * n_windows,
        tp=best_counts[0],
        fn=best_counts[1],
        fp=best_counts[2],
    )


def null_scores(files: Sequence[NabFile]) -> dict[str, FloatArray]:
    """Never alarms."""
    return {f.name: np.zeros(len(f.values)) for f in files}


def perfect_scores(files: Sequence[NabFile]) -> dict[str, FloatArray]:
    """Alarms exactly on the first scored row of every window and nowhere else."""
    out = {}
    for f in files:
        s = np.zeros(len(f.values))
        for left, _right in f.windows:
            s[max(left, f.probation)] = 1.0
        out[f.name] = s
    return out
