"""Shared fixtures: the public test kit's fixtures, plus a guard that no test leaks switches."""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from child_runs import EARLY_RUNS, VERDICTS, ChildRun
from child_runs.no_extension import NoExtensionRun
from child_runs.sanitized import SanitizedRun
from lowest_versions.oldest_run import OldestReleasesRun

from otel_recovery._config import SWITCHES

pytest_plugins = ["otel_recovery.testing"]

# Checkpoints default to a SQLite file under the user's state directory (they must outlive a
# restart); tests that do not choose a store get a fresh in-memory one instead.
os.environ.setdefault("OTEL_RECOVERY_STORE_URL", "memory://")


@pytest.fixture(autouse=True)
def _switches_are_restored() -> Iterator[None]:
    before = (SWITCHES.active, SWITCHES.testing, SWITCHES.max_attempts)
    yield
    after = (SWITCHES.active, SWITCHES.testing, SWITCHES.max_attempts)
    assert after == before, "a test changed the global switches without restoring them"


def _ours_instrumented() -> set[Any]:
    """Our instrumentors (``BaseInstrumentor`` singletons) that are instrumented now."""
    base = sys.modules.get("otel_recovery.instrumentors._base")
    if base is None:
        return set()
    found: set[Any] = set()
    pending = list(base.RecoveryInstrumentor.__subclasses__())
    while pending:
        cls = pending.pop()
        pending.extend(cls.__subclasses__())
        instance = cls.__dict__.get("_instance")
        if instance is not None and instance.is_instrumented_by_opentelemetry:
            found.add(instance)
    return found


@pytest.fixture(autouse=True)
def _no_instrumentor_is_left_on() -> Iterator[None]:
    """A test that leaves one of our instrumentors on (a harness whose teardown failed
    half-way) would turn every later ``instrument()`` into a no-op and fail them all: take
    it off here, and fail the test that left it."""
    before = _ours_instrumented()
    yield
    left = _ours_instrumented() - before
    for instrumentor in left:
        instrumentor.uninstrument()
    assert not left, f"the test left {sorted(type(i).__name__ for i in left)} instrumented"


EARLY = (OldestReleasesRun, SanitizedRun, NoExtensionRun)
"""The child-process runs (``tests/child_runs``) that start, all at once, when collection
selects their test."""


def pytest_collection_finish(session: pytest.Session) -> None:
    """Start the selected runs of ``EARLY`` now: minutes of child processes that then
    overlap the rest of the suite, while their tests wait for the verdicts. Under
    pytest-xdist the workers leave this to the controller
    (``pytest_xdist_node_collection_finished``): each worker collects the whole suite."""
    if session.config.option.collectonly or hasattr(session.config, "workerinput"):
        return
    _start_early_runs(session.config, {item.nodeid for item in session.items}, verdicts=None)


_VERDICT_DIRECTORY = pytest.StashKey[Path]()
_EARLY_RUNS_STARTED = pytest.StashKey[bool]()


@pytest.hookimpl(optionalhook=True)
def pytest_configure_node(node: Any) -> None:
    """The xdist controller tells each worker where the early runs' verdicts will be."""
    config = node.config
    if _VERDICT_DIRECTORY not in config.stash:
        directory = Path(tempfile.mkdtemp(prefix="otel-recovery-verdicts-"))
        config.stash[_VERDICT_DIRECTORY] = directory
        config.add_cleanup(lambda: shutil.rmtree(directory, ignore_errors=True))
    node.workerinput[VERDICTS] = str(config.stash[_VERDICT_DIRECTORY])


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_node_collection_finished(node: Any, ids: list[str]) -> None:
    """The xdist controller starts the early runs once, from the first worker's collection
    (every worker collects the same tests; none has been given one yet)."""
    config = node.config
    if config.stash.get(_EARLY_RUNS_STARTED, False) or config.option.collectonly:
        return
    config.stash[_EARLY_RUNS_STARTED] = True
    _start_early_runs(config, set(ids), verdicts=config.stash[_VERDICT_DIRECTORY])


def _start_early_runs(config: pytest.Config, selected: set[str], verdicts: Path | None) -> None:
    runs: dict[str, ChildRun] = {}
    workdirs: list[Path] = []
    for kind in EARLY:
        if kind.TEST_ID not in selected or kind.unavailable() is not None:
            continue
        workdirs.append(Path(tempfile.mkdtemp(prefix=f"otel-recovery-{kind.__name__}-")))
        runs[kind.TEST_ID] = kind(workdirs[-1], verdicts=verdicts).start()
    if not runs:
        return
    config.stash[EARLY_RUNS] = runs

    def end() -> None:
        for run in runs.values():
            run.stop()
        for run in runs.values():
            run.failure(timeout=60)
        for workdir in workdirs:
            shutil.rmtree(workdir, ignore_errors=True)

    config.add_cleanup(end)
