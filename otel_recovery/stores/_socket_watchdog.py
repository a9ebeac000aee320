"""A deadline for blocking socket I/O that cannot take one: a watchdog thread that shuts the
socket down.

psycopg's blocking calls have no per-call timeout, and neither ``statement_timeout`` (a
frozen backend never runs its timer) nor TCP keepalives (a partition where the kernel still
acknowledges) bound them. One daemon thread per process keeps the deadlines of the
operations in flight and, at a deadline, shuts that operation's socket down: its blocked
read returns at once with an error, which the caller turns into an outage. The thread waits
for the next deadline or to be told of an earlier one, and sleeps when nothing is armed.
"""

from __future__ import annotations

import builtins
import contextlib
import itertools
import os
import select
import socket
import threading
import time

from otel_recovery._forksafe import new_lock

__all__ = ["WATCHDOG", "Watchdog", "readable"]


def readable(fd: int) -> bool:
    """Whether the socket has something to read (or its end) right now; never waits."""
    if hasattr(select, "poll"):
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        return bool(poller.poll(0))
    return bool(select.select([fd], [], [], 0)[0])  # pragma: no cover - Windows


class Watchdog:
    """One daemon thread for every store of the process: shuts down the socket of an
    operation still running at its deadline, so its blocked wait returns at once.

    It holds a duplicate of the socket's descriptor while armed, so a deadline can never
    reach another file that reused the number after libpq closed the connection's own."""

    def __init__(self) -> None:
        self._cond = threading.Condition(new_lock())
        self._armed: dict[int, tuple[float, int, bool]] = {}  # deadline, fd, fd is a dup
        self._fired: dict[int, tuple[float, int, bool]] = {}
        self._tokens = itertools.count(1)
        self._wake_at: float | None = None  # when the thread looks next; None: when told
        self._pid = 0

    def arm(self, fd: int, deadline: float) -> int:
        try:
            held = (deadline, os.dup(fd), True)
        except OSError:  # pragma: no cover - a socket handle os.dup cannot copy (Windows)
            held = (deadline, fd, False)
        with self._cond:
            if self._pid != os.getpid():  # first use, or a forked child: no thread here yet
                for _, old, owned in [*self._armed.values(), *self._fired.values()]:
                    _close(old, owned)
                self._armed.clear()
                self._fired.clear()
                self._wake_at = None
                self._pid = os.getpid()
                threading.Thread(
                    target=self._watch, name="otel-recovery-pg-watchdog", daemon=True
                ).start()
            token = next(self._tokens)
            self._armed[token] = held
            if self._wake_at is None or deadline < self._wake_at:
                # all: in a forked child the parent's thread is still listed as waiting
                self._cond.notify_all()
            return token

    def disarm(self, token: int) -> bool:
        """Whether the deadline had passed and the socket was shut down."""
        with self._cond:
            held = self._armed.pop(token, None)
            fired = held is None
            if fired:
                held = self._fired.pop(token, None)
        if held is not None:
            _close(held[1], held[2])
        return fired

    def _watch(self) -> None:
        with self._cond:
            while True:
                now = time.monotonic()
                for token, held in builtins.list(self._armed.items()):
                    if held[0] <= now:
                        del self._armed[token]
                        self._fired[token] = held
                        _shut(held[1])
                if self._armed:
                    self._wake_at = min(deadline for deadline, _, _ in self._armed.values())
                    self._cond.wait(max(0.0, self._wake_at - now))
                else:
                    self._wake_at = None
                    self._cond.wait()


def _shut(fd: int) -> None:
    try:
        sock = socket.fromfd(fd, socket.AF_INET, socket.SOCK_STREAM)  # another duplicate
    except OSError:
        return
    with contextlib.suppress(OSError), sock:
        sock.shutdown(socket.SHUT_RDWR)


def _close(fd: int, owned: bool) -> None:
    if owned:
        with contextlib.suppress(OSError):
            os.close(fd)


WATCHDOG = Watchdog()
