"""The run behind ``tests/test_sanitizers.py``: the compiled paths' tests against a build of
the extension with AddressSanitizer and UndefinedBehaviorSanitizer (that file says why).

The package (without any build of the extension), its tests and the examples they run are
copied into the run's directory, the extension is built there with the sanitizers, and the
tests that exercise the compiled code run against it. Object memory goes through ``malloc``
(``PYTHONMALLOC=malloc``), so that AddressSanitizer sees every Python object the extension
touches, not only its own buffers. Leak detection is off: CPython keeps much of its memory
until exit by design, and the suite's tracemalloc tests cover leaks of ours. Reports go to
files: pytest's output capture in the child would swallow them.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

from child_runs import ChildRun

__all__ = ["CHECKED", "SanitizedRun"]

ROOT = Path(__file__).resolve().parent.parent.parent
SOURCES = ROOT / "otel_recovery" / "_speedups_src"
CHECKED = [
    "tests/test_speedups.py",
    "tests/test_async_run.py",
    "tests/test_compiled_layer.py",
    "tests/instrumentors/test_redis.py",
    "tests/instrumentors/test_psycopg.py",
    "tests/instrumentors/test_asyncpg.py",
    "tests/instrumentors/test_requests.py",
    # the async HTTP layers, the decorators and the middleware run the compiled runners
    "tests/instrumentors/test_httpx.py",
    "tests/instrumentors/test_aiohttp_client.py",
    "tests/test_recover.py",
    "tests/test_recover_edge_cases.py",
    "tests/middleware",
]
"""The tests whose calls run compiled code (the rest reach it only through these paths)."""
NOT_UNDER_SANITIZERS = [
    # its own run is without the extension, so nothing of ours to check there
    "tests/test_speedups.py::test_the_package_behaves_the_same_without_the_extension",
    # AddressSanitizer keeps freed memory in quarantine, so a new object never lands on a
    # dead one's address: the test would prove nothing and says so by failing.
    "tests/test_compiled_layer.py::test_a_new_holder_at_a_dead_ones_address_does_not_inherit_its_table",
]
FLAGS = [
    "-shared",
    "-fPIC",
    "-O1",
    "-g",
    "-fno-omit-frame-pointer",
    "-fsanitize=address,undefined",
    "-fno-sanitize-recover=all",
]


def _compiler() -> str | None:
    return shutil.which(os.environ.get("CC", "gcc"))


def _runtime(compiler: str) -> str | None:
    """The AddressSanitizer runtime the compiler links against; it must be loaded first."""
    done = subprocess.run(
        [compiler, "-print-file-name=libasan.so"], capture_output=True, text=True, check=False
    )
    path = done.stdout.strip()
    return path if done.returncode == 0 and os.path.isabs(path) and os.path.exists(path) else None


class SanitizedRun(ChildRun):
    """The sanitized build's run in ``workdir`` (``child_runs.ChildRun``)."""

    TEST_ID = (
        "tests/test_sanitizers.py::"
        "test_the_compiled_paths_pass_their_tests_under_address_and_undefined_sanitizers"
    )

    @staticmethod
    def unavailable() -> str | None:
        compiler = _compiler()
        if compiler is None or _runtime(compiler) is None:
            return "no C compiler with AddressSanitizer's runtime (libasan) here"
        return None

    def _steps(self) -> str | None:
        compiler = _compiler()
        runtime = _runtime(compiler) if compiler else None
        if compiler is None or runtime is None:
            return "no C compiler with AddressSanitizer's runtime (libasan) here"
        copy = _copy(self.workdir / "sanitized")
        built = _build(copy, compiler)
        reports = self.workdir / "reports"
        reports.mkdir()
        env = {
            **self.env,
            "LD_PRELOAD": runtime,
            "ASAN_OPTIONS": f"detect_leaks=0:halt_on_error=1:log_path={reports / 'asan'}",
            "UBSAN_OPTIONS": f"print_stacktrace=1:halt_on_error=1:log_path={reports / 'ubsan'}",
            "PYTHONMALLOC": "malloc",
        }
        env.pop("OTEL_RECOVERY_NO_EXTENSIONS", None)
        # the copy, not the installed package, and its sanitized build is what the tests load
        check = "from otel_recovery._compiled import SPEEDUPS; print(SPEEDUPS.__file__)"
        loaded = self._run([sys.executable, "-c", check], 120, cwd=copy, env=env)
        if loaded.returncode or Path(loaded.stdout.strip()) != built:
            return f"the copy did not load its sanitized build {built}: {loaded}"
        deselected = [arg for test in NOT_UNDER_SANITIZERS for arg in ("--deselect", test)]
        command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"]
        result = self._run([*command, *deselected, *CHECKED], 900, cwd=copy, env=env)
        found = "\n".join(r.read_text(errors="replace") for r in sorted(reports.iterdir()))
        if found:
            return f"the sanitizers reported:\n{found[:8000]}"
        return self._pytest_verdict(result)


def _build(copy: Path, compiler: str) -> Path:
    """The extension, built with the sanitizers into the copied package."""
    target = copy / "otel_recovery" / f"_speedups{sysconfig.get_config_var('EXT_SUFFIX')}"
    include = sysconfig.get_paths()["include"]
    command = [compiler, *FLAGS, f"-I{include}", *map(str, sorted(SOURCES.glob("*.c")))]
    subprocess.run([*command, "-o", str(target)], check=True, capture_output=True, text=True)
    return target


def _copy(into: Path) -> Path:
    """The package (without any build of the extension), its tests, the examples they run and
    the pytest settings."""
    skip = shutil.ignore_patterns("*.so", "*.pyd", "__pycache__", "*.egg-info")
    shutil.copytree(ROOT / "otel_recovery", into / "otel_recovery", ignore=skip)
    shutil.copytree(ROOT / "tests", into / "tests", ignore=skip)
    shutil.copytree(ROOT / "examples", into / "examples", ignore=skip)  # the middleware's
    shutil.copy2(ROOT / "pyproject.toml", into / "pyproject.toml")
    return into
