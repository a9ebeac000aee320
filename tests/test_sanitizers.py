"""The compiled happy path's own tests again, under AddressSanitizer and UndefinedBehaviorSanitizer.

Why: ``otel_recovery._speedups`` counts references, walks argument vectors and drives the
await protocol by hand, inside every client call of the host application. A reference
released once too often, a read past a vector's end or an object used after it was freed
may pass every assertion of a normal run and crash a service weeks later. Built with
``-fsanitize=address,undefined``, the extension stops the process at the first such access,
with the line that made it.

The test copies the package next to its tests into a temporary directory, builds the
extension there with the sanitizers, and runs the tests that exercise the compiled code
(the runners, the async run, the layers, the instrumentors whose calls take them, the
decorators and the middleware) against it. Object memory goes through ``malloc``
(``PYTHONMALLOC=malloc``), so that AddressSanitizer sees every Python object the extension
touches, not only its own buffers.
Leak detection is off: CPython keeps much of its memory until exit by design, and the
suite's tracemalloc tests cover leaks of ours.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
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


@pytest.mark.slow
def test_the_compiled_paths_pass_their_tests_under_address_and_undefined_sanitizers(tmp_path):
    compiler = _compiler()
    runtime = _runtime(compiler) if compiler else None
    if runtime is None:
        if os.environ.get("CI") == "true":
            pytest.fail("CI promises gcc with AddressSanitizer (libasan): the C checks need it")
        pytest.skip("no C compiler with AddressSanitizer's runtime (libasan) here")
    assert compiler is not None
    copy = _copy(tmp_path / "sanitized")
    built = _build(copy, compiler)
    reports = tmp_path / "reports"
    reports.mkdir()
    # reports go to files: pytest's output capture in the child would swallow them
    env = {
        **os.environ,
        "LD_PRELOAD": runtime,
        "ASAN_OPTIONS": f"detect_leaks=0:halt_on_error=1:log_path={reports / 'asan'}",
        "UBSAN_OPTIONS": f"print_stacktrace=1:halt_on_error=1:log_path={reports / 'ubsan'}",
        "PYTHONMALLOC": "malloc",
    }
    env.pop("OTEL_RECOVERY_NO_EXTENSIONS", None)
    # the copy, not the installed package, and its sanitized build is what the tests load
    loaded = subprocess.run(
        [
            sys.executable,
            "-c",
            "from otel_recovery._compiled import SPEEDUPS; print(SPEEDUPS.__file__)",
        ],
        cwd=copy,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    assert Path(loaded.stdout.strip()) == built
    deselected = [arg for test in NOT_UNDER_SANITIZERS for arg in ("--deselect", test)]
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"] + deselected + CHECKED,
        cwd=copy,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    found = "\n".join(report.read_text(errors="replace") for report in sorted(reports.iterdir()))
    assert not found, found[:8000]
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert " passed" in result.stdout.splitlines()[-1]
