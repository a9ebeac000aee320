"""The tests that touch other libraries again, on the oldest releases ``pyproject.toml`` allows.

Why: the package promises ``redis>=4.5``, ``httpx>=0.23``, ``psycopg>=3.1``,
``opentelemetry-instrumentation>=0.49b0`` and more, and everything else here runs on the
newest releases. Installed beside a service that pins older ones, otel-recovery must still
import, instrument and recover; the first run of this check found ten places where it did
not (CHANGELOG.md, "Found by running on the oldest allowed releases").

The run (``tests/lowest_versions/oldest_run.py``) installs
``tests/lowest_versions/pins-py<X.Y>.txt`` (written by ``compile_pins.py`` in that folder:
every floor of ours at its lowest release with a wheel for this Python) into a new virtual
environment, installs a copy of the package into it, checks that uv kept every pin, and
runs the library-facing tests there against the real servers. ``tests/conftest.py`` starts
it in the background when collection selects this test (``tests/child_runs``); the test
waits for its verdict.
"""

from __future__ import annotations

import os

import pytest
from child_runs import started
from lowest_versions.oldest_run import OldestReleasesRun, unavailable


@pytest.mark.slow
@pytest.mark.server
def test_the_library_facing_tests_pass_on_the_oldest_supported_releases(request, tmp_path):
    reason = unavailable()
    if reason is not None:
        if os.environ.get("CI") == "true":
            pytest.fail(reason)
        pytest.skip(reason)
    run = started(request, OldestReleasesRun, tmp_path)
    failure = run.failure()
    assert failure is None, failure
    assert " passed" in run.summary
