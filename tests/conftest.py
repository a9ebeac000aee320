"""Shared fixtures: the public test kit's fixtures, plus a guard that no test leaks switches."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

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
