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
from lowest_versions.oldest_run import EARLY_RUN, TEST_ID, OldestReleasesRun, unavailable

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


def pytest_collection_finish(session: pytest.Session) -> None:
    """Start the oldest-releases run (``tests/test_lowest_versions.py``) now, if selected:
    two minutes of child processes that then overlap the rest of the suite."""
    if (
        session.config.option.collectonly
        or unavailable() is not None
        or not any(item.nodeid.startswith(TEST_ID) for item in session.items)
    ):
        return
    workdir = Path(tempfile.mkdtemp(prefix="otel-recovery-oldest-"))
    run = OldestReleasesRun(workdir).start()
    session.config.stash[EARLY_RUN] = run

    def end() -> None:
        run.stop()
        run.failure(timeout=60)
        shutil.rmtree(workdir, ignore_errors=True)

    session.config.add_cleanup(end)
