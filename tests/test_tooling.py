"""Lint, format and strict typing are part of the suite, so CI enforces them."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def run(tool: str, *args: str) -> subprocess.CompletedProcess[str]:
    exe = BIN / tool
    if not exe.exists():
        found = shutil.which(tool)
        if found is None:
            pytest.skip(f"{tool} is not installed (pip install -e '.[test]')")
        exe = Path(found)
    return subprocess.run([str(exe), *args], cwd=ROOT, capture_output=True, text=True)


def test_ruff_lint_is_clean():
    result = run("ruff", "check", "otel_recovery", "tests", "benchmarks", "examples")
    assert result.returncode == 0, result.stdout + result.stderr


def test_ruff_format_is_clean():
    result = run("ruff", "format", "--check", "otel_recovery", "tests", "benchmarks", "examples")
    assert result.returncode == 0, result.stdout + result.stderr


def test_mypy_strict_on_the_package():
    result = run("mypy")
    assert result.returncode == 0, result.stdout + result.stderr


FORK_HANDLED = ("_forksafe.py", "_demo/")
"""Where a plain ``threading`` lock is fine: the fork-safe lock factory itself, and the
demo."""
PLAIN_LOCKS = {
    ("threading", "Lock"),
    ("threading", "RLock"),
    ("threading", "Semaphore"),
    ("threading", "BoundedSemaphore"),
    ("_thread", "allocate_lock"),
}


def _makes_a_plain_lock(node: ast.AST) -> bool:
    """``threading.Lock()`` and its kin, a ``threading.Condition()`` over a lock of its own,
    or such a name imported from ``threading`` / ``_thread``."""
    if isinstance(node, ast.ImportFrom) and node.module in ("threading", "_thread"):
        names = {alias.name for alias in node.names}
        return bool(names & ({name for _, name in PLAIN_LOCKS} | {"Condition"}))
    if not (
        isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and isinstance(node.func.value, ast.Name)
    ):
        return False
    called = (node.func.value.id, node.func.attr)
    return called in PLAIN_LOCKS or (called == ("threading", "Condition") and not node.args)


def test_every_lock_of_the_package_is_fork_safe():
    """A lock another thread held at ``fork()`` stays held in the child (gunicorn
    ``--preload``, multiprocessing): locks come from ``otel_recovery._forksafe``."""
    package = ROOT / "otel_recovery"
    plain = []
    for path in sorted(package.rglob("*.py")):
        where = path.relative_to(package).as_posix()
        if where.startswith(FORK_HANDLED):
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if _makes_a_plain_lock(node):
                plain.append(f"{where}:{node.lineno}")
    assert not plain, f"use otel_recovery._forksafe.new_lock()/new_rlock() at {plain}"
