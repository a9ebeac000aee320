"""examples/asgi_middleware.py runs and shows what its docstring promises."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_the_asgi_example_sheds_an_open_route_and_retries_a_safe_one():
    result = subprocess.run(
        [sys.executable, "examples/asgi_middleware.py"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[:5] == [f"GET /orders #{n}: 500, Retry-After -" for n in range(1, 6)]
    assert lines[5:7] == [f"GET /orders #{n}: 503, Retry-After 30" for n in (6, 7)]
    assert lines[7:] == ["GET /health: 200", "GET /stock: 200 after 2 attempts"]
