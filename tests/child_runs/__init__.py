"""Test runs made of child processes, started when collection ends so they overlap the suite.

Why: three tests run other pytest sessions (the oldest allowed releases, the sanitizer build
of the extension, the package without the extension): about seven minutes of child
processes, one after the other, that wait for nothing in the main session. Run where their
tests are reached, they add their whole length to the suite; started by
``tests/conftest.py`` as soon as collection selects them, all three at once, they overlap
the rest of the suite, and each test only waits for its verdict. Run alone, a test starts
its run itself.

All three at once, not one after the other: like the suite, they spend most of their time
waiting for the servers (the whole suite with its two xdist workers and these three runs
used 1.4 of the two cores on average, 2026-12-03), and one after the other they took seven
minutes, longer than the rest of the suite.

Under pytest-xdist (``-n``, as ``.ci/run`` runs the suite) the controller starts them, once,
when the first worker has collected, and each run leaves its verdict in a file of a
directory the workers are told of (``VERDICTS`` in their ``workerinput``): the worker that
reaches a run's test waits for that file (:class:`PublishedVerdict`) instead of starting
the run again.

The environment is read when a run is made (at the end of collection), not when its steps
start minutes later: by then a test may have patched ``os.environ`` for itself.
"""

from __future__ import annotations

import json
import os
import subprocess
import threading
import time
from pathlib import Path
from typing import ClassVar

import pytest

__all__ = [
    "EARLY_RUNS",
    "VERDICTS",
    "ChildRun",
    "PublishedVerdict",
    "first_and_last",
    "started",
]

EARLY_RUNS = pytest.StashKey[dict[str, "ChildRun"]]()
"""The runs ``tests/conftest.py`` started at the end of collection, by their test's node id."""
VERDICTS = "otel_recovery_child_run_verdicts"
"""The key of an xdist worker's ``workerinput`` that names the directory where the
controller's runs leave their verdicts."""


class _Stopped(Exception):
    """The session ended before the run did."""


class ChildRun:
    """One run in ``workdir``: ``start()`` begins its steps in a thread, ``failure()`` waits
    for its verdict; with ``verdicts`` (the xdist controller's runs), the verdict is also
    left in that directory for the workers. Subclasses name their test and write
    ``_steps``."""

    TEST_ID: ClassVar[str]
    """The node id of the test that waits for this run."""

    def __init__(self, workdir: Path, verdicts: Path | None = None) -> None:
        self.workdir = workdir
        self.summary = ""
        self.env = dict(os.environ)
        self._verdicts = verdicts
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
        if self._verdicts is not None:  # tells the workers to wait for this run's verdict
            _verdict_file(self._verdicts, type(self)).with_suffix(".started").touch()
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
            self._failure = self._steps()
        except _Stopped:
            self._failure = "stopped before it finished"
        except Exception as error:  # the test reports it instead of a silent thread death
            self._failure = f"{type(error).__name__}: {error}"
        if self._verdicts is not None:
            verdict = json.dumps({"failure": self._failure, "summary": self.summary})
            final = _verdict_file(self._verdicts, type(self))
            written = final.with_suffix(".partial")
            written.write_text(verdict)
            written.replace(final)  # a waiting worker never reads half a verdict

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


class PublishedVerdict:
    """A run the xdist controller started, seen from a worker: ``failure()`` waits for the
    verdict the run leaves in ``path``; ``summary`` is filled in from it."""

    def __init__(self, path: Path) -> None:
        self.summary = ""
        self._path = path

    def failure(self, timeout: float = 1800) -> str | None:
        deadline = time.monotonic() + timeout
        while not self._path.exists():
            if time.monotonic() > deadline:
                return (
                    f"the controller's run left no verdict in {self._path} within {timeout:.0f} s"
                )
            time.sleep(0.5)
        verdict = json.loads(self._path.read_text())
        self.summary = verdict["summary"]
        failure: str | None = verdict["failure"]
        return failure


def started(
    request: pytest.FixtureRequest, kind: type[ChildRun], workdir: Path
) -> ChildRun | PublishedVerdict:
    """The run of ``kind`` that collection started (in this process, or in the xdist
    controller), else a new one in ``workdir``, started."""
    early = request.config.stash.get(EARLY_RUNS, {}).get(kind.TEST_ID)
    if early is not None:
        return early
    verdicts = getattr(request.config, "workerinput", {}).get(VERDICTS)
    if verdicts is not None:
        path = _verdict_file(Path(verdicts), kind)
        if path.with_suffix(".started").exists():
            return PublishedVerdict(path)
    return kind(workdir).start()


def _verdict_file(directory: Path, kind: type[ChildRun]) -> Path:
    return directory / f"{kind.__name__}.json"


def first_and_last(output: str) -> str:
    """The start of pytest's short summary (the first failures, where a cascade begins)
    and the end of the output; a long run's tail alone shows only its last failures."""
    start = output.find("short test summary info")
    if start < 0 or len(output) - start <= 6000:
        return output[-6000:]
    return f"{output[start : start + 4000]}\n[...]\n{output[-2000:]}"
