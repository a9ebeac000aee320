"""Shared fixtures: the public test kit's fixtures, plus a guard that no test leaks switches."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

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
