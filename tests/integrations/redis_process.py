"""A ``redis-server`` process of a test's own, and the faults a test puts it through.

Shared by the private Redis Cluster (:mod:`integrations.redis_cluster`) and the private
Sentinel setup (:mod:`integrations.redis_sentinel`); each says how its servers start
(:meth:`RedisProcess.command_line`).
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import signal
import subprocess
from collections.abc import Callable, Iterator
from typing import Any

import redis
from opentelemetry.instrumentation.utils import suppress_instrumentation
from redis.backoff import NoBackoff
from redis.retry import Retry
from servers import answers_as_itself, redis_process_id

from integrations.redis_queues import until_stopped

_PLUMBING: contextvars.ContextVar[bool] = contextvars.ContextVar("plumbing", default=False)


@contextlib.contextmanager
def plumbing() -> Iterator[None]:
    """The harness's own commands: not counted as the test's sends."""
    token = _PLUMBING.set(True)
    try:
        yield
    finally:
        _PLUMBING.reset(token)


def is_plumbing() -> bool:
    """Whether the harness is sending (see :func:`plumbing`)."""
    return _PLUMBING.get()


class RedisProcess:
    """One ``redis-server`` on ``port``, its files in its own dir under ``root``."""

    def __init__(self, binary: str, root: str, pick_port: Callable[[], int]) -> None:
        self.binary = binary
        self._root = root
        self._pick_port = pick_port
        self.port = pick_port()
        self.dir = os.path.join(root, str(self.port))
        os.makedirs(self.dir)
        self.process: subprocess.Popen[bytes] | None = None

    def launch(self, start: Callable[[], None], timeout: float = 20.0) -> None:
        """Start the server for the first time (``start`` spawns it) and wait until it
        answers as itself. Another process (the other xdist worker) may take the free port
        before the server binds it: the server then exits at once, and it is started again
        on a new port, in a new dir (``start`` reads both)."""
        for _ in range(3):
            start()
            assert self.process is not None, "start() must spawn the server"
            if answers_as_itself(self.process, self.port, timeout):
                return
            if self.alive:
                raise AssertionError(f"{self.name} did not answer within {timeout} s")
            self.port = self._pick_port()
            self.dir = os.path.join(self._root, str(self.port))
            os.makedirs(self.dir, exist_ok=True)
        raise AssertionError(f"no free port kept for a redis-server of {self._root}")

    @property
    def name(self) -> str:
        return f"127.0.0.1:{self.port}"

    def command_line(self) -> list[str]:
        """The command that starts this server."""
        raise NotImplementedError

    def spawn(self, *extra: str) -> None:
        self.process = subprocess.Popen(
            self.command_line() + list(extra), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def answers(self) -> bool:
        """Whether this server, not whichever took its port, answers there."""
        if self.process is None or self.process.poll() is not None:
            return False
        return redis_process_id("127.0.0.1", self.port, timeout=0.2) == self.process.pid

    def admin(self, timeout: float = 5) -> redis.Redis:
        """A plain client of this one server (no retries; use it under :meth:`call`'s
        ``suppress_instrumentation`` and :func:`plumbing`)."""
        return redis.Redis(port=self.port, retry=Retry(NoBackoff(), 0), socket_timeout=timeout)

    def call(self, *args: Any) -> Any:
        return self.ask("execute_command", *args)

    def ask(self, method: str, *args: Any) -> Any:
        """``admin().<method>(*args)``, uninstrumented and not counted."""
        client = self.admin()
        try:
            with suppress_instrumentation(), plumbing():
                return getattr(client, method)(*args)
        finally:
            client.close()

    def kill(self) -> None:
        """SIGKILL: no goodbye to clients, replicas, sentinels or the cluster bus."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGCONT)
            self.process.kill()
            self.process.wait(timeout=10)

    def stop_answering(self) -> None:
        assert self.process is not None
        os.kill(self.process.pid, signal.SIGSTOP)
        until_stopped(self.process.pid)

    def resume(self) -> None:
        if self.alive:
            assert self.process is not None
            os.kill(self.process.pid, signal.SIGCONT)

    def close(self) -> None:
        if self.process is None:
            return
        with contextlib.suppress(OSError):
            self.process.send_signal(signal.SIGCONT)
        self.process.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout=10)
