"""Test runs made of child processes, started when collection ends so they overlap the suite.

Why: three tests run other pytest sessions (the oldest allowed releases, the sanitizer build
of the extension, the package without the extension): about four minutes of child processes
that wait for nothing in the main session. Run where their tests are reached, they add their
whole length to the suite; started by ``tests/conftest.py`` as soon as collection selects
them, one after the other on the machine's second core, they overlap the rest of the suite,
and each test only waits for its verdict. Run alone, a test starts its run itself.

They run one at a time (each waits for the one before): three at once beside the suite
would put three processes on two cores under the suite's timing-sensitive tests.

The environment is read when a run is made (at the end of collection), not when its steps
start minutes later: by then a test may have patched ``os.environ`` for itself.
"""

from __future__ import annotations

import os
import subprocess
import threading
from pathlib import Path
from typing import ClassVar

import pytest

__all__ = ["EARLY_RUNS", "ChildRun", "first_and_last", "started"]

EARLY_RUNS = pytest.StashKey[dict[str, "ChildRun"]]()
"""The runs ``tests/conftest.py`` started at the end of collection, by their test's node id."""


class _Stopped(Exception):
    """The session ended before the run did."""


class ChildRun:
    """One run in ``workdir``: ``start()`` begins its steps in a thread (after ``after``'s
    have ended), ``failure()`` waits for its verdict. Subclasses name their test and
    write ``_steps``."""

    TEST_ID: ClassVar[str]
    """The node id of the test that waits for this run."""

    def __init__(self, workdir: Path, after: ChildRun | None = None) -> None:
        self.workdir = workdir
        self.summary = ""
        self.env = dict(os.environ)
        self._after = after
        self._failure: str | None = None
        self._child: subprocess.Popen[str] | None = None
        self._stopped = False
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._body, name=type(self).__name__, daemon=True)

    @staticmethod
    def unavailable() -> str | None:
        """Why the run cannot happen on this machine, or None."""
        return None

    def start(self) -> ChildRun:
        self._thread.start()
        return self

    def failure(self, timeout: float = 1800) -> str | None:
        """None when every step passed, else what failed, with the end of its output."""
        self._thread.join(timeout)
        if self._thread.is_alive():
            self.stop()
            return f"the run did not finish within {timeout:.0f} s"
        return self._failure

    def stop(self) -> None:
        """End the step in progress and skip the rest (the session is over)."""
        with self._lock:
            self._stopped = True
            if self._child is not None and self._child.poll() is None:
                self._child.kill()

    def _steps(self) -> str | None:
        raise NotImplementedError

    def _body(self) -> None:
        try:
            if self._after is not None:
                self._after._thread.join()
            self._failure = self._steps()
        except _Stopped:
            self._failure = "stopped before it finished"
        except Exception as error:  # the test reports it instead of a silent thread death
            self._failure = f"{type(error).__name__}: {error}"

    def _run(
        self,
        command: list[str],
        timeout: float,
        cwd: Path | None = None,
        env: dict[str, str] | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """``command``'s outcome; ``stop()`` kills it and ends the run."""
        with self._lock:
            if self._stopped:
                raise _Stopped
            child = subprocess.Popen(
                command,
                cwd=cwd or self.workdir,
                env=self.env if env is None else env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            self._child = child
        try:
            stdout, stderr = child.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            child.kill()
            stdout, stderr = child.communicate()
            stderr += f"\n(killed after {timeout:.0f} s)"
        if self._stopped:
            raise _Stopped
        return subprocess.CompletedProcess(command, child.returncode, stdout, stderr)

    def _pytest_verdict(self, result: subprocess.CompletedProcess[str]) -> str | None:
        """A child pytest session's failure (None when it passed), and its summary line."""
        lines = result.stdout.splitlines()
        self.summary = lines[-1] if lines else ""
        if result.returncode or " passed" not in self.summary:
            return f"the tests failed:\n{first_and_last(result.stdout)}{result.stderr[-3000:]}"
        return None


def started(request: pytest.FixtureRequest, kind: type[ChildRun], workdir: Path) -> ChildRun:
    """The run of ``kind`` that collection started, else a new one in ``workdir``, started."""
    early = request.config.stash.get(EARLY_RUNS, {}).get(kind.TEST_ID)
    return early if early is not None else kind(workdir).start()


def first_and_last(output: str) -> str:
    """The start of pytest's short summary (the first failures, where a cascade begins)
    and the end of the output; a long run's tail alone shows only its last failures."""
    start = output.find("short test summary info")
    if start < 0 or len(output) - start <= 6000:
        return output[-6000:]
    return f"{output[start : start + 4000]}\n[...]\n{output[-2000:]}"
