"""Run otel_recovery's AnomalyDetector over the Numenta Anomaly Benchmark and score it.

    python benchmarks/nab.py                     # all 58 files, 2 processes, prints the table
    python benchmarks/nab.py --check-scorer      # null detector 0, perfect detector 100
    python benchmarks/nab.py --set model=stl     # any DetectorConfig field, repeatable
    python benchmarks/nab.py --compare-models    # the baseline-family comparison of the README

Per-row scores go to benchmarks/results/nab/<detector>/<category>/<detector>_<file>.csv in NAB's
result format (timestamp,value,anomaly_score,label); scoring is our own implementation of the
NAB rules (benchmarks/nab_scoring.py). Data: ../shared/data/nab (NAB v1.1 data and labels, MIT).

The detector sees each file as a stream, one row at a time, with no knowledge of the labels or
the file's length; NAB then picks one threshold per profile for the whole corpus (in-sample, as
for every scoreboard entry).
"""

from __future__ import annotations

import argparse
import multiprocessing
import os

# One BLAS thread per process, set before numpy loads: BLAS threads only fight the pool.
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import sys  # noqa: E402
import time  # noqa: E402
from dataclasses import fields  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import nab_scoring  # noqa: E402

DEFAULT_DATA = HERE.parent.parent / "shared" / "data" / "nab"
RESULTS = HERE / "results" / "nab"

PUBLISHED = [
    ("Perfect", 100.0, 100.0, 100.0),
    ("ARTime", 74.9, 65.1, 80.4),
    ("Numenta HTM (NuPIC 1.0)", 70.5, 62.6, 75.2),
    ("CAD OSE", 69.9, 67.0, 73.2),
    ("earthgecko Skyline", 58.2, 46.2, 63.9),
    ("KNN CAD", 58.0, 43.4, 64.8),
    ("Relative Entropy", 54.6, 47.6, 58.8),
    ("Random Cut Forest", 51.7, 38.4, 59.7),
    ("Twitter ADVec v1.0.0", 47.1, 33.6, 53.5),
    ("Windowed Gaussian", 39.6, 20.9, 47.4),
    ("Etsy Skyline", 35.7, 27.1, 44.5),
    ("Bayesian Changepoint", 17.7, 3.2, 32.2),
    ("EXPoSE", 16.4, 3.2, 26.9),
    ("Random", 11.0, 1.2, 19.5),
    ("Null", 0.0, 0.0, 0.0),
]
PROFILES = ("standard", "reward_low_FP_rate", "reward_low_FN_rate")
MODELS = ("ets", "stl", "holt_winters", "sarimax", "fixed")
SWEEP: dict[str, tuple[Any, ...]] = {
    # One knob at a time around the defaults: the whole of the tuning done against the labels.
    "tail_quantile": (0.995, 0.9995),
    "tail_rate": (0.05, 0.2),
    "window": (1, 6, 24),
    "refractory": (0, 300, 1200),
    "scale_memory": (288, 3000),
    "clip": (2.5, 4.0),
    "shift_run": (4, 10),
    "alpha_bounds": ((0.0001, 0.9999), (0.05, 0.3), (0.01, 0.7)),
}


def _parse_value(text: str) -> Any:
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    if text in ("true", "false", "True", "False"):
        return text.lower() == "true"
    if "," in text:
        return tuple(_parse_value(part) for part in text.split(","))
    return text


def run_file(job: tuple[str, str, dict[str, Any]]) -> tuple[str, np.ndarray, float, int]:
    """Stream one file through a fresh detector; returns (name, scores, seconds, fits)."""
    import pandas as pd

    from otel_recovery.learning.anomaly import AnomalyDetector

    root, name, overrides = job
    frame = pd.read_csv(Path(root) / "data" / name)
    stamps = pd.to_datetime(frame["timestamp"]).to_numpy(dtype="datetime64[ns]")
    epochs = (stamps.astype("int64") / 1e9).tolist()
    values = frame["value"].astype(float).tolist()
    detector = AnomalyDetector(**overrides)
    started = time.process_time()
    scores = np.fromiter(
        (detector.update(v, t) for v, t in zip(values, epochs, strict=True)),
        dtype=np.float64,
        count=len(values),
    )
    return name, scores, time.process_time() - started, detector.fits


def run_corpus(
    root: Path, names: list[str], overrides: dict[str, Any], jobs: int
) -> tuple[dict[str, np.ndarray], float, int]:
    work = [(str(root), name, overrides) for name in names]
    # Biggest files first so the two workers finish together.
    sizes = {name: (root / "data" / name).stat().st_size for name in names}
    work.sort(key=lambda job: -sizes[job[1]])
    if jobs > 1:
        with multiprocessing.get_context("fork").Pool(jobs) as pool:
            out = pool.map(run_file, work, chunksize=1)
    else:
        out = [run_file(job) for job in work]
    return (
        {name: scores for name, scores, _, _ in out},
        sum(cpu for _, _, cpu, _ in out),
        sum(fits for _, _, _, fits in out),
    )


def write_results(
    detector: str, files: list[nab_scoring.NabFile], scores: dict[str, np.ndarray]
) -> None:
    import pandas as pd

    for f in files:
        category, base = f.name.split("/")
        folder = RESULTS / detector / category
        folder.mkdir(parents=True, exist_ok=True)
        label = np.zeros(len(f.values), dtype=int)
        for left, right in f.windows:
            label[left : right + 1] = 1
        pd.DataFrame(
            {
                "timestamp": pd.to_datetime(f.timestamps).strftime("%Y-%m-%d %H:%M:%S"),
                "value": f.values,
                "anomaly_score": np.round(scores[f.name], 6),
                "label": label,
            }
        ).to_csv(folder / f"{detector}_{base}", index=False)


def split(names: list[str], part: str) -> list[str]:
    """Half 'a' / 'b': alternate files within each category, for a held-out check."""
    if part == "all":
        return names
    out = []
    by_category: dict[str, list[str]] = {}
    for name in names:
        by_category.setdefault(name.split("/")[0], []).append(name)
    for members in by_category.values():
        out += members[0 if part == "a" else 1 :: 2]
    return sorted(out)


def table(rows: list[tuple[str, float, float, float]], ours: set[str]) -> str:
    lines = [
        "| Detector | Standard | Reward low FP | Reward low FN |",
        "|---|---:|---:|---:|",
    ]
    ordered = sorted(rows, key=lambda r: -r[1])
    for name, std, low_fp, low_fn in ordered:
        shown = f"**{name}**" if name in ours else name
        lines.append(f"| {shown} | {std:.1f} | {low_fp:.1f} | {low_fn:.1f} |")
    return "\n".join(lines)


def check_scorer(files: list[nab_scoring.NabFile], profiles: list[nab_scoring.Profile]) -> bool:
    ok = True
    for label, make, want in (
        ("null", nab_scoring.null_scores, 0.0),
        ("perfect", nab_scoring.perfect_scores, 100.0),
    ):
        result = nab_scoring.score_corpus(files, make(files), profiles)
        got = {name: score.normalised for name, score in result.profiles.items()}
        good = all(abs(v - want) < 1e-9 for v in got.values())
        ok &= good
        shown = ", ".join(f"{k} {v:.2f}" for k, v in got.items())
        print(f"{label:8s} detector: {shown}  ({'ok' if good else 'WRONG'}, expected {want:.0f})")
    return ok


def sweep(
    root: Path,
    files: list[nab_scoring.NabFile],
    profiles: list[nab_scoring.Profile],
    overrides: dict[str, Any],
    jobs: int,
) -> int:
    """Score the defaults and each SWEEP variant on the corpus and on its two halves."""
    halves = {part: set(split([f.name for f in files], part)) for part in ("a", "b")}
    print("| setting | Standard | Low FP | Low FN | Standard, half a | Standard, half b |")
    print("|---|---:|---:|---:|---:|---:|")
    variants: list[tuple[str, dict[str, Any]]] = [("defaults", {})]
    variants += [(f"{k}={v}", {k: v}) for k, values in SWEEP.items() for v in values]
    for label, change in variants:
        scores, _, _ = run_corpus(root, [f.name for f in files], {**overrides, **change}, jobs)
        whole = nab_scoring.score_corpus(files, scores, profiles).profiles
        parts = [
            nab_scoring.score_corpus([f for f in files if f.name in halves[part]], scores, profiles)
            .profiles["standard"]
            .normalised
            for part in ("a", "b")
        ]
        cells = " | ".join(f"{whole[p].normalised:.1f}" for p in PROFILES)
        print(f"| {label} | {cells} | {parts[0]:.1f} | {parts[1]:.1f} |", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE")
    parser.add_argument("--name", default="otel_recovery", help="detector name for the results")
    parser.add_argument("--split", choices=("all", "a", "b"), default="all")
    parser.add_argument("--files", default="", help="only files whose name contains this")
    parser.add_argument("--check-scorer", action="store_true")
    parser.add_argument("--compare-models", action="store_true")
    parser.add_argument(
        "--sweep", action="store_true", help="one-at-a-time parameter sweep (SWEEP), with halves"
    )
    parser.add_argument("--no-write", action="store_true", help="do not write per-row CSVs")
    args = parser.parse_args(argv)

    profiles = nab_scoring.load_profiles(args.data)
    all_files = nab_scoring.load_corpus(args.data)
    names = split([f.name for f in all_files], args.split)
    names = [n for n in names if args.files in n]
    files = [f for f in all_files if f.name in set(names)]
    print(
        f"NAB: {len(files)} files, {sum(len(f.values) for f in files):,} rows, "
        f"{sum(len(f.windows) for f in files)} windows ({args.data})"
    )
    if args.check_scorer:
        return 0 if check_scorer(files, profiles) else 1

    from otel_recovery.learning.anomaly import DetectorConfig

    known = {f.name for f in fields(DetectorConfig)}
    overrides: dict[str, Any] = {}
    for item in args.set:
        key, _, value = item.partition("=")
        if key not in known:
            parser.error(f"--set {key}: not a DetectorConfig field ({', '.join(sorted(known))})")
        overrides[key] = _parse_value(value)

    if args.sweep:
        return sweep(args.data, files, profiles, overrides, args.jobs)
    variants = (
        [(f"{args.name}_{m}", {**overrides, "model": m}) for m in MODELS]
        if args.compare_models
        else [(args.name, overrides)]
    )
    rows = []
    for label, config in variants:
        started = time.perf_counter()
        scores, cpu, fits = run_corpus(args.data, names, config, args.jobs)
        wall = time.perf_counter() - started
        if not args.no_write:
            write_results(label, files, scores)
        result = nab_scoring.score_corpus(files, scores, profiles)
        got = [result.profiles[p].normalised for p in PROFILES]
        rows.append((label, *got))
        detail = ", ".join(
            f"{p}: θ={result.profiles[p].threshold:.4f} tp={result.profiles[p].tp} "
            f"fp={result.profiles[p].fp}"
            for p in PROFILES
        )
        print(
            f"{label}: {got[0]:.2f} / {got[1]:.2f} / {got[2]:.2f}  "
            f"({wall:.0f} s wall, {cpu:.0f} s CPU, {fits} fits, "
            f"{1e6 * cpu / sum(len(f.values) for f in files):.0f} µs/row; {detail})",
            flush=True,
        )
    print()
    print(table(rows + list(PUBLISHED), {r[0] for r in rows}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
