"""``benchmarks/_callgrind.py``, which the instruction and own-cost benchmarks read their
figures from: every event callgrind counted, and what toggled collection leaves out."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
from _callgrind import count_instructions

pytestmark = pytest.mark.skipif(
    shutil.which("valgrind") is None and os.environ.get("CI") != "true",
    reason="valgrind is not installed (CI's machine has it)",
)

PROGRAM = [sys.executable, "-S", "-c", "sum(range(100000))"]
CACHES = ["--cache-sim=yes", "--branch-sim=yes"]


def test_a_run_with_the_cache_simulation_reports_every_event():
    counted = count_instructions(PROGRAM, dict(os.environ), callgrind_args=CACHES)
    names = ("Ir", "Dr", "Dw", "I1mr", "D1mr", "D1mw", "ILmr", "DLmr", "DLmw", "Bc", "Bcm")
    assert set(names) <= set(counted.events)
    assert counted.instructions == counted.events["Ir"] > 100_000
    assert 0 < counted.events["I1mr"] < counted.events["Ir"]


def test_collection_toggled_on_a_function_never_called_counts_nothing():
    counted = count_instructions(
        PROGRAM,
        dict(os.environ),
        callgrind_args=["--collect-atstart=no", "--toggle-collect=no_such_function", *CACHES],
    )
    assert counted.instructions == 0
    assert all(value == 0 for value in counted.events.values())
