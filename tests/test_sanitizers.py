"""The compiled happy path's own tests again, under AddressSanitizer and UndefinedBehaviorSanitizer.

Why: ``otel_recovery._speedups`` counts references, walks argument vectors and drives the
await protocol by hand, inside every client call of the host application. A reference
released once too often, a read past a vector's end or an object used after it was freed
may pass every assertion of a normal run and crash a service weeks later. Built with
``-fsanitize=address,undefined``, the extension stops the process at the first such access,
with the line that made it.

The run (``tests/child_runs/sanitized.py``) copies the package next to its tests into a
temporary directory, builds the extension there with the sanitizers, and runs the tests that
exercise the compiled code (the runners, the async run, the layers, the instrumentors whose
calls take them, the decorators and the middleware) against it. ``tests/conftest.py``
starts it when collection selects this test, so it overlaps the rest of the suite.
"""

from __future__ import annotations

import os

import pytest
from child_runs import started
from child_runs.sanitized import SanitizedRun


@pytest.mark.slow
def test_the_compiled_paths_pass_their_tests_under_address_and_undefined_sanitizers(
    request, tmp_path
):
    reason = SanitizedRun.unavailable()
    if reason is not None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI promises gcc with AddressSanitizer (libasan): {reason}")
        pytest.skip(reason)
    run = started(request, SanitizedRun, tmp_path)
    failure = run.failure()
    assert failure is None, failure
    assert " passed" in run.summary
