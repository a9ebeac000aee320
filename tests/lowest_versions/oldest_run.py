"""The run behind ``tests/test_lowest_versions.py``, startable before the test is reached.

Its steps (a fresh virtual environment with this Python's pins, a copy of the project
installed into it, the check that every pin was kept, the library-facing tests there) take
about two minutes, almost all of it in child processes. ``tests/conftest.py`` starts them
in a background thread as soon as collection selects that test, so they run on the
machine's second core while the rest of the suite runs on the first; the test then waits
for the outcome. Run alone, the test starts them itself.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest

__all__ = ["CHECKED", "EARLY_RUN", "PINS", "UV", "OldestReleasesRun", "unavailable"]

ROOT = Path(__file__).resolve().parent.parent.parent
PINS = Path(__file__).resolve().parent / f"pins-py{sys.version_info[0]}.{sys.version_info[1]}.txt"
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

EARLY_RUN = pytest.StashKey["OldestReleasesRun"]()
"""Where ``tests/conftest.py`` leaves the run it started at the end of collection."""
TEST_ID = "tests/test_lowest_versions.py::"

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


def unavailable() -> str | None:
    """Why the run cannot happen on this machine (no pins for this Python, no uv), or None."""
    if not PINS.exists():
        version = f"{sys.version_info[0]}.{sys.version_info[1]}"
        return f"no pins for Python {version}: run {PINS.parent}/compile_pins.py"
    if UV is None:
        return "uv is not installed: pip install -e '.[test]'"
    return None


class _Stopped(Exception):
    """The session ended before the run did."""


class OldestReleasesRun:
    """One run in ``workdir``; ``start()`` begins it, ``failure()`` waits for its verdict."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.summary = ""
        self._failure: str | None = None
        self._child: subprocess.Popen[str] | None = None
        self._stopped = False
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._steps, name="oldest-releases", daemon=True)

    def start(self) -> OldestReleasesRun:
        self._thread.start()
        return self

    def failure(self, timeout: float = 1800) -> str | None:
        """None when every step passed, else what failed, with the end of its output."""
        self._thread.join(timeout)
        if self._thread.is_alive():
            self.stop()
            return f"the run did not finish within {timeout:.0f} s"
        return self._failure

    def stop(self) -> None:
        """End the step in progress and skip the rest (the session is over)."""
        with self._lock:
            self._stopped = True
            if self._child is not None and self._child.poll() is None:
                self._child.kill()

    def _steps(self) -> None:
        try:
            self._failure = self._run_steps()
        except _Stopped:
            self._failure = "stopped before it finished"
        except Exception as error:  # the test reports it instead of a silent thread death
            self._failure = f"{type(error).__name__}: {error}"

    def _run_steps(self) -> str | None:
        venv = self.workdir / "venv"
        made = self._run([UV, "venv", "-q", "--python", sys.executable, str(venv)], 120)
        if made.returncode:
            return f"uv venv failed:\n{made.stderr[-3000:]}"
        python = str(venv / "bin" / "python")
        install = [UV, "pip", "install", "-q", "--python", python, "--no-deps"]
        pins = self._run([*install, "--only-binary", ":all:", "-r", str(PINS)], 900)
        if pins.returncode:
            return f"installing the pins failed:\n{pins.stdout[-3000:]}{pins.stderr[-3000:]}"
        source = _copy(self.workdir / "src")
        ours = self._run([*install, "-e", str(source)], 600)
        if ours.returncode:
            return f"installing the project failed:\n{ours.stdout[-3000:]}{ours.stderr[-3000:]}"
        kept = self._run([python, "-c", _KEPT_PINS, str(PINS)], 60)
        if kept.returncode or json.loads(kept.stdout) != {}:
            changed = kept.stdout or kept.stderr[-3000:]
            return f"the installer changed pins (name: [pinned, installed]): {changed}"
        env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
        tests = [python, "-m", "pytest", "-q", "-p", "no:cacheprovider", *CHECKED]
        result = self._run(tests, 1200, cwd=source, env=env)
        lines = result.stdout.splitlines()
        self.summary = lines[-1] if lines else ""
        if result.returncode or " passed" not in self.summary:
            return f"the tests failed:\n{_first_and_last(result.stdout)}{result.stderr[-3000:]}"
        return None

    def _run(
        self,
        command: list[str],
        timeout: float,
        cwd: Path | None = None,
        env: dict[str, str] | None = None,
    ) -> subprocess.CompletedProcess[str]:
        with self._lock:
            if self._stopped:
                raise _Stopped
            child = subprocess.Popen(
                command,
                cwd=cwd or self.workdir,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            self._child = child
        try:
            stdout, stderr = child.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            child.kill()
            stdout, stderr = child.communicate()
            stderr += f"\n(killed after {timeout:.0f} s)"
        if self._stopped:
            raise _Stopped
        return subprocess.CompletedProcess(command, child.returncode, stdout, stderr)


def _copy(into: Path) -> Path:
    """The project as a clean checkout has it (some tests read its other files), without any
    build of the extension or local caches."""
    skip = shutil.ignore_patterns(
        ".git", ".venv", "build", "*.so", "*.pyd", "__pycache__", "*.egg-info", ".*_cache",
        ".hypothesis", "results",
    )  # fmt: skip
    shutil.copytree(ROOT, into, ignore=skip)
    return into


def _first_and_last(output: str) -> str:
    """The start of pytest's short summary (the first failures, where a cascade begins)
    and the end of the output; a long run's tail alone shows only its last failures."""
    start = output.find("short test summary info")
    if start < 0 or len(output) - start <= 6000:
        return output[-6000:]
    return f"{output[start : start + 4000]}\n[...]\n{output[-2000:]}"
