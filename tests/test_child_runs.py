"""The hand-off of a child run's verdict from the xdist controller to a worker
(``tests/child_runs``): the run the controller started is the one the worker's test waits
for, its failure arrives whole, and a worker never waits for a run nobody started."""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from child_runs import VERDICTS, ChildRun, PublishedVerdict, started


class _Printing(ChildRun):
    """A run of one child process that prints a pytest-like summary and exits with
    ``CODE``."""

    TEST_ID = "tests/nowhere.py::test_printing"
    CODE = 0

    def _steps(self) -> str | None:
        script = f"import sys; print('3 passed in 0.10s'); sys.exit({self.CODE})"
        return self._pytest_verdict(self._run([sys.executable, "-c", script], 60))


class _Failing(_Printing):
    CODE = 1


def _worker_request(verdicts: Path) -> Any:
    """What ``started()`` reads of a worker's request: its stash and its ``workerinput``."""
    return SimpleNamespace(config=SimpleNamespace(stash={}, workerinput={VERDICTS: str(verdicts)}))


def test_a_worker_waits_for_the_controllers_run_and_reads_its_summary(tmp_path):
    verdicts = tmp_path / "verdicts"
    verdicts.mkdir()
    run = _Printing(tmp_path, verdicts=verdicts).start()

    seen = started(_worker_request(verdicts), _Printing, tmp_path)

    assert isinstance(seen, PublishedVerdict)  # the controller's run, not a second one
    assert seen.failure(timeout=60) is None
    assert seen.summary == run.summary == "3 passed in 0.10s"


def test_a_failed_run_reaches_the_worker_with_its_output(tmp_path):
    verdicts = tmp_path / "verdicts"
    verdicts.mkdir()
    _Failing(tmp_path, verdicts=verdicts).start()

    failure = started(_worker_request(verdicts), _Failing, tmp_path).failure(timeout=60)

    assert failure is not None
    assert failure.startswith("the tests failed:") and "3 passed in 0.10s" in failure


def test_a_worker_starts_the_run_itself_when_the_controller_did_not(tmp_path):
    verdicts = tmp_path / "verdicts"
    verdicts.mkdir()  # the controller's directory, with no run of this kind in it

    seen = started(_worker_request(verdicts), _Printing, tmp_path)

    assert isinstance(seen, _Printing)
    assert seen.failure(timeout=60) is None and seen.summary == "3 passed in 0.10s"


def test_a_verdict_that_never_comes_is_a_failure_not_a_hang(tmp_path):
    failure = PublishedVerdict(tmp_path / "_Printing.json").failure(timeout=0.1)

    assert failure is not None and "left no verdict" in failure
