"""Shared fixtures: the public test kit's fixtures, plus a guard that no test leaks switches."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from otel_recovery._config import SWITCHES

pytest_plugins = ["otel_recovery.testing"]


@pytest.fixture(autouse=True)
def _switches_are_restored() -> Iterator[None]:
    before = (SWITCHES.active, SWITCHES.testing, SWITCHES.max_attempts)
    yield
    after = (SWITCHES.active, SWITCHES.testing, SWITCHES.max_attempts)
    assert after == before, "a test changed the global switches without restoring them"
