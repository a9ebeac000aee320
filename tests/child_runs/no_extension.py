"""The run behind ``tests/test_speedups.py::test_the_package_behaves_the_same_without_the_extension``:
the policy and instrumentor tests again, with the extension switched off
(``OTEL_RECOVERY_NO_EXTENSIONS=true``), as on a machine where it could not be built."""

from __future__ import annotations

import sys
from pathlib import Path

from child_runs import ChildRun

__all__ = ["CHECKED", "NoExtensionRun"]

ROOT = Path(__file__).resolve().parent.parent.parent
CHECKED = [
    "tests/test_circuit_breaker_model.py",
    "tests/test_budget.py",
    "tests/test_recover.py",
    "tests/test_recover_edge_cases.py",
    "tests/instrumentors/test_base.py",
    "tests/instrumentors/test_redis.py",
    "tests/instrumentors/test_psycopg.py",
    "tests/instrumentors/test_asyncpg.py",
    "tests/instrumentors/test_requests.py",
]


class NoExtensionRun(ChildRun):
    """The run without the extension (``child_runs.ChildRun``); ``workdir`` goes unused:
    the tests run in the project itself."""

    TEST_ID = "tests/test_speedups.py::test_the_package_behaves_the_same_without_the_extension"

    def _steps(self) -> str | None:
        env = {**self.env, "OTEL_RECOVERY_NO_EXTENSIONS": "true"}
        check = "from otel_recovery._compiled import SPEEDUPS; assert SPEEDUPS is None"
        switched = self._run([sys.executable, "-c", check], 120, cwd=ROOT, env=env)
        if switched.returncode:
            return f"the switch did not turn the extension off:\n{switched.stderr[-3000:]}"
        command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *CHECKED]
        return self._pytest_verdict(self._run(command, 600, cwd=ROOT, env=env))
