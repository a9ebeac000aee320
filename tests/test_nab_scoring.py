"""Our NAB scorer (benchmarks/nab_scoring.py) follows the rules of research/anomaly.md 1.4."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

import nab_scoring as ns  # noqa: E402

DATA = ROOT.parent / "shared" / "data" / "nab"
SOME = [
    "realKnownCause/ec2_request_latency_system_failure.csv",  # three windows
    "artificialNoAnomaly/art_daily_no_noise.csv",  # no window at all
    "realAdExchange/exchange-2_cpc_results.csv",  # hourly, with gaps
]
STANDARD = ns.Profile("standard", 1.0, 1.0, 0.11)
LOW_FN = ns.Profile("reward_low_FN_rate", 1.0, 2.0, 0.11)


def _synthetic(windows: tuple[tuple[int, int], ...], rows: int = 200) -> ns.NabFile:
    stamps = np.arange(rows).astype("datetime64[m]").astype("datetime64[ns]")
    return ns.NabFile("cat/synthetic.csv", stamps, np.zeros(rows), windows)


def test_scaled_sigmoid_matches_the_published_shape():
    assert ns.scaled_sigmoid(-1.0) == pytest.approx(0.98661, abs=1e-5)
    assert ns.scaled_sigmoid(0.0) == 0.0
    assert ns.scaled_sigmoid(1.0) == pytest.approx(-0.98661, abs=1e-5)
    assert ns.scaled_sigmoid(3.5) == -1.0


def test_probation_is_15_percent_capped_at_750_rows():
    assert ns.probation_length(4032) == 604
    assert ns.probation_length(22695) == 750


def test_a_detection_at_the_left_edge_earns_a_tp_and_later_ones_less():
    file = _synthetic(((100, 119),))  # probation: 30 rows
    for row, expected in ((100, 1.0), (110, ns.scaled_sigmoid(-10 / 20) / ns.scaled_sigmoid(-1))):
        scores = np.zeros(200)
        scores[row] = 1.0
        result = ns.score_corpus([file], {file.name: scores}, [STANDARD]).profiles["standard"]
        assert result.raw == pytest.approx(expected)
        assert (result.tp, result.fn, result.fp) == (1, 0, 0)


def test_false_positives_cost_by_distance_from_the_previous_window():
    file = _synthetic(((100, 119),))
    scores = np.zeros(200)
    scores[[50, 100, 125, 180]] = 1.0  # before any window, a TP, just after, far after
    result = ns.score_corpus([file], {file.name: scores}, [STANDARD]).profiles["standard"]
    after = ns.scaled_sigmoid((125 - 119) / 19) + ns.scaled_sigmoid((180 - 119) / 19)
    assert ns.scaled_sigmoid((180 - 119) / 19) == -1.0  # more than three widths later
    assert result.raw == pytest.approx(1.0 - 0.11 + 0.11 * after)
    assert (result.tp, result.fp) == (1, 3)


def test_the_sweep_picks_the_threshold_that_maximises_the_score():
    file = _synthetic(((100, 119),))
    scores = np.zeros(200)
    scores[105] = 0.6  # true positive
    scores[40:50] = 0.8  # ten false positives scored above it, costing 1.1 in all
    result = ns.score_corpus([file], {file.name: scores}, [STANDARD]).profiles["standard"]
    tp_value = ns.scaled_sigmoid(-15 / 20) / ns.scaled_sigmoid(-1)
    # theta=0.8: -1 - 1.1; theta=inf: -1; theta=0.6: tp - 1.1 = -0.13, the best.
    assert result.threshold == 0.6
    assert result.raw == pytest.approx(tp_value - 1.1)


def test_extra_detections_in_a_window_are_free_and_misses_cost_fn():
    file = _synthetic(((100, 119), (150, 169)))
    scores = np.zeros(200)
    scores[100:120] = 1.0  # whole first window
    result = ns.score_corpus([file], {file.name: scores}, [LOW_FN]).profiles["reward_low_FN_rate"]
    assert result.raw == pytest.approx(1.0 - 2.0)
    assert result.normalised == pytest.approx(100 * (-1.0 + 4.0) / (2.0 + 4.0))


@pytest.mark.skipif(not DATA.is_dir(), reason="NAB data not found at ../shared/data/nab")
def test_null_scores_0_and_perfect_scores_100_on_real_files():
    files = ns.load_corpus(DATA, SOME)
    assert sum(len(f.windows) for f in files) == 4
    profiles = ns.load_profiles(DATA)
    null = ns.score_corpus(files, ns.null_scores(files), profiles)
    perfect = ns.score_corpus(files, ns.perfect_scores(files), profiles)
    for profile in profiles:
        assert null.profiles[profile.name].normalised == pytest.approx(0.0, abs=1e-9)
        assert perfect.profiles[profile.name].normalised == pytest.approx(100.0, abs=1e-9)
        assert math.isinf(null.profiles[profile.name].threshold)


def test_scores_outside_0_1_are_rejected():
    file = _synthetic(((100, 119),))
    scores = np.zeros(200)
    scores[3] = 1.5
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        ns.score_corpus([file], {file.name: scores}, [STANDARD])
