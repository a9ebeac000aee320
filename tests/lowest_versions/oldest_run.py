"""The run behind ``tests/test_lowest_versions.py``, startable before the test is reached.

Its steps (a fresh virtual environment with this Python's pins, a copy of the project
installed into it, the check that every pin was kept, the library-facing tests there) take
about two minutes, almost all of it in child processes: a ``child_runs.ChildRun``, which
``tests/conftest.py`` starts as soon as collection selects that test.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

from child_runs import ChildRun

__all__ = ["CHECKED", "PINS", "UV", "OldestReleasesRun", "unavailable"]

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


class OldestReleasesRun(ChildRun):
    """The oldest releases' run in ``workdir`` (``child_runs.ChildRun``)."""

    TEST_ID = (
        "tests/test_lowest_versions.py::"
        "test_the_library_facing_tests_pass_on_the_oldest_supported_releases"
    )

    unavailable = staticmethod(unavailable)

    def _steps(self) -> str | None:
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
        env = {k: v for k, v in self.env.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
        tests = [python, "-m", "pytest", "-q", "-p", "no:cacheprovider", *CHECKED]
        return self._pytest_verdict(self._run(tests, 1200, cwd=source, env=env))


def _copy(into: Path) -> Path:
    """The project as a clean checkout has it (some tests read its other files), without any
    build of the extension or local caches."""
    skip = shutil.ignore_patterns(
        ".git", ".venv", "build", "*.so", "*.pyd", "__pycache__", "*.egg-info", ".*_cache",
        ".hypothesis", "results",
    )  # fmt: skip
    shutil.copytree(ROOT, into, ignore=skip)
    return into
