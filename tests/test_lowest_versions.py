"""The tests that touch other libraries again, on the oldest releases ``pyproject.toml`` allows.

Why: the package promises ``redis>=4.5``, ``httpx>=0.23``, ``psycopg>=3.1``,
``opentelemetry-instrumentation>=0.49b0`` and more, and everything else here runs on the
newest releases. Installed beside a service that pins older ones, otel-recovery must still
import, instrument and recover; the first run of this check found ten places where it did
not (CHANGELOG.md, "Found by running on the oldest allowed releases").

The test installs ``tests/lowest_versions/pins-py<X.Y>.txt`` (written by ``compile_pins.py``
in that folder: every floor of ours at its lowest release with a wheel for this Python) into
a new virtual environment, installs a copy of the package into it, checks that uv kept
every pin, and runs the library-facing tests there against the real servers.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PINS = (
    ROOT / "tests" / "lowest_versions" / f"pins-py{sys.version_info[0]}.{sys.version_info[1]}.txt"
)
CHECKED = [
    "tests/instrumentors",
    "tests/middleware",
    "tests/stores",
    "tests/test_end_to_end.py",
    "tests/test_anomaly.py",
    "tests/test_telemetry.py",
    "tests/test_async_run.py",
    "tests/test_compiled_layer.py",
    "tests/test_seed_readme.py",
]
"""The tests whose code paths depend on the releases of OpenTelemetry, the clients,
statsmodels or aiohttp (the rest exercise our own logic with fakes)."""
UV = shutil.which("uv", path=str(Path(sys.executable).parent)) or shutil.which("uv")
"""The installer: uv (from the test extra) lays the pins down in seconds where pip took
80 s of the suite. The pins are a complete resolution, so nothing is resolved again
(``--no-deps``)."""

_KEPT_PINS = """
import importlib.metadata, json, sys
wanted = dict(line.strip().split("==") for line in open(sys.argv[1])
              if line.strip() and not line.startswith("#"))
found = {}
for name, version in wanted.items():
    try:
        found[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        found[name] = None
print(json.dumps({n: [v, found[n]] for n, v in wanted.items() if found[n] != v}))
"""


def _copy(into: Path) -> Path:
    """The project as a clean checkout has it (some tests read its other files), without any
    build of the extension or local caches."""
    skip = shutil.ignore_patterns(
        ".git", ".venv", "build", "*.so", "*.pyd", "__pycache__", "*.egg-info", ".*_cache",
        ".hypothesis", "results",
    )  # fmt: skip
    shutil.copytree(ROOT, into, ignore=skip)
    return into


def _run(
    command: list[str], cwd: Path, timeout: float, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )


@pytest.mark.slow
@pytest.mark.server
def test_the_library_facing_tests_pass_on_the_oldest_supported_releases(tmp_path):
    if not PINS.exists():
        message = f"no pins for Python {sys.version_info[0]}.{sys.version_info[1]}: run {PINS.parent}/compile_pins.py"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    if UV is None:
        message = "uv is not installed: pip install -e '.[test]'"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    venv = tmp_path / "venv"
    made = _run([UV, "venv", "-q", "--python", sys.executable, str(venv)], tmp_path, 120)
    assert made.returncode == 0, made.stderr[-3000:]
    python = str(venv / "bin" / "python")
    install = [UV, "pip", "install", "-q", "--python", python, "--no-deps"]
    installed = _run([*install, "--only-binary", ":all:", "-r", str(PINS)], tmp_path, 900)
    assert installed.returncode == 0, installed.stdout[-3000:] + installed.stderr[-3000:]
    source = _copy(tmp_path / "src")
    ours = _run([*install, "-e", str(source)], tmp_path, 600)
    assert ours.returncode == 0, ours.stdout[-3000:] + ours.stderr[-3000:]

    kept = _run([python, "-c", _KEPT_PINS, str(PINS)], tmp_path, 60)
    assert kept.returncode == 0, kept.stderr[-3000:]
    assert json.loads(kept.stdout) == {}, (
        f"the installer changed pins (name: [pinned, installed]): {kept.stdout}"
    )

    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
    result = _run(
        [python, "-m", "pytest", "-q", "-p", "no:cacheprovider", *CHECKED], source, 1200, env
    )
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
    assert " passed" in result.stdout.splitlines()[-1]
