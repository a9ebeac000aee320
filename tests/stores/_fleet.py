"""A fleet of real processes sharing a breaker and a budget (see ``_fleet_worker.py``)."""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

WORKER = Path(__file__).with_name("_fleet_worker.py")


class Fleet:
    """``size`` worker processes; ``all(...)`` sends one command to each, then reads each."""

    def __init__(self, url: str, name: str, config: dict[str, Any], size: int = 4) -> None:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
        env.pop("OTEL_RECOVERY_STORE_URL", None)
        self.procs = [
            subprocess.Popen(
                [sys.executable, str(WORKER), url, name, json.dumps(config)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
                env=env,
            )  # fmt: skip
            for _ in range(size)
        ]
        self.alive = list(range(size))
        for index in self.alive:
            assert self._line(index, 30.0) == "ready"

    def _line(self, index: int, timeout: float) -> str:
        proc = self.procs[index]
        assert proc.stdout is not None
        ready, _, _ = select.select([proc.stdout], [], [], timeout)
        if not ready:
            raise AssertionError(f"worker {index} did not answer within {timeout}s")
        line = proc.stdout.readline()
        if not line:
            raise AssertionError(f"worker {index} exited (code {proc.poll()})")
        return line.strip()

    def _write(self, index: int, command: dict[str, Any]) -> None:
        proc = self.procs[index]
        assert proc.stdin is not None
        proc.stdin.write(json.dumps(command) + "\n")
        proc.stdin.flush()

    def send(self, index: int, timeout: float = 30.0, **command: Any) -> dict[str, Any]:
        self._write(index, command)
        return dict(json.loads(self._line(index, timeout)))

    def all(self, timeout: float = 30.0, **command: Any) -> dict[int, dict[str, Any]]:
        """Every live worker gets the command before any answer is read: they act together."""
        for index in self.alive:
            self._write(index, command)
        return {index: json.loads(self._line(index, timeout)) for index in self.alive}

    def kill(self, index: int) -> None:
        """SIGKILL: the worker gets no chance to give anything back."""
        self.procs[index].send_signal(signal.SIGKILL)
        self.procs[index].wait(10)
        self.alive.remove(index)

    def close(self) -> None:
        for index in self.alive:
            try:
                self._write(index, {"op": "quit"})
            except OSError:
                pass
        for proc in self.procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
            for pipe in (proc.stdin, proc.stdout):
                if pipe is not None:
                    pipe.close()
