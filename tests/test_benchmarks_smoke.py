"""The overhead benchmark still runs end to end (quick mode); its figures are not asserted."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PEERS = ("tenacity", "stamina", "backoff", "pybreaker", "circuitbreaker", "opentelemetry.sdk")


def test_overhead_quick_prints_the_table_and_a_verdict():
    missing = [name for name in PEERS if importlib.util.find_spec(name) is None]
    if missing:
        pytest.skip(f"bench extra not installed ({', '.join(missing)}): pip install -e '.[bench]'")
    result = subprocess.run(
        [sys.executable, "benchmarks/overhead.py", "--quick"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "| candidate | kind | what | ns/call best | ns/call median | ns added |" in out
    for row in ("| bare call |", "| otel-recovery |", "| otel-recovery async |", "| tenacity |"):
        assert row in out
    assert "Spans exported by the happy path: 0" in out
    assert "Verdict:" in out


def test_breaker_registry_benchmark_prints_both_registries():
    result = subprocess.run(
        [sys.executable, "benchmarks/breaker_registry.py", "--ids", "2000"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "| max_breakers=1024 (default) | 1,024 |" in result.stdout
    assert "| unbounded (before) | 2,000 |" in result.stdout
