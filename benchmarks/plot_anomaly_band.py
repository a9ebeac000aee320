"""Draw docs/anomaly-band.png: one NAB series, the detector's baseline and band, the labelled
anomaly windows and the detections.

    python benchmarks/plot_anomaly_band.py
    python benchmarks/plot_anomaly_band.py --file realAWSCloudwatch/ec2_cpu_utilization_fe7f93.csv

``--threshold`` defaults to the Standard-profile threshold printed by benchmarks/nab.py.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

DATA = HERE.parent.parent / "shared" / "data" / "nab"
OUT = HERE.parent / "docs" / "anomaly-band.png"


def main(argv: list[str] | None = None) -> int:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.dates as mdates
    import matplotlib.pyplot as plt
    import numpy as np
    import pandas as pd

    from otel_recovery.learning.anomaly import AnomalyDetector

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--file", default="realKnownCause/ec2_request_latency_system_failure.csv")
    parser.add_argument("--threshold", type=float, default=0.5196)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)

    frame = pd.read_csv(args.data / "data" / args.file, parse_dates=["timestamp"])
    windows = json.loads((args.data / "labels" / "combined_windows.json").read_text())[args.file]
    epochs = frame["timestamp"].to_numpy(dtype="datetime64[ns]").astype("int64") / 1e9
    detector = AnomalyDetector()
    rows = []
    for value, epoch in zip(frame["value"].tolist(), epochs.tolist(), strict=True):
        score = detector.update(value, epoch)
        last = detector.last
        rows.append((last.expected, last.lower, last.upper, score))
    expected, lower, upper, score = (np.array(c) for c in zip(*rows, strict=True))
    when = frame["timestamp"]
    values = frame["value"].to_numpy()
    probation = min(int(0.15 * len(frame)), 750)
    hits = np.flatnonzero(score >= args.threshold)

    fig, (top, bottom) = plt.subplots(
        2, 1, figsize=(11, 5.2), sharex=True, gridspec_kw={"height_ratios": [3, 1]}
    )
    for start, end in windows:
        for axis in (top, bottom):
            axis.axvspan(pd.Timestamp(start), pd.Timestamp(end), color="#f4a3a3", alpha=0.35, lw=0)
    top.fill_between(
        when[probation:],
        lower[probation:],
        upper[probation:],
        color="#7aa6d8",
        alpha=0.35,
        lw=0,
        label="band (expected ± 3 scales)",
    )
    top.plot(when, values, color="#333333", lw=0.6, label="value")
    top.plot(when[probation:], expected[probation:], color="#1f5fa8", lw=0.9, label="baseline")
    top.scatter(
        when.iloc[hits],
        values[hits],
        marker="v",
        s=60,
        color="#c0392b",
        zorder=5,
        label=f"detection (score ≥ {args.threshold:.2f})",
    )
    spread = np.nanmax(values) - np.nanmin(values)
    top.set_ylim(np.nanmin(values) - 0.05 * spread, np.nanmax(values) + 0.25 * spread)
    top.axvline(when.iloc[probation], color="#888888", lw=0.8, ls=":")
    top.text(
        when.iloc[probation],
        np.nanmax(values),
        "NAB probation (not scored) ",
        ha="right",
        va="top",
        fontsize=8,
    )
    top.set_ylabel("value")
    top.set_title(f"NAB {args.file}: baseline, band, labelled windows (red) and detections")
    top.legend(loc="upper left", fontsize=8, ncol=2, frameon=False)
    bottom.plot(when, score, color="#555555", lw=0.6)
    bottom.axhline(args.threshold, color="#c0392b", lw=0.8, ls="--")
    bottom.set_ylabel("score")
    bottom.set_ylim(0, 1)
    bottom.xaxis.set_major_formatter(mdates.DateFormatter("%b %d"))
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=90)
    print(f"wrote {args.out} ({args.out.stat().st_size / 1024:.0f} KB), {len(hits)} detections")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
