"""Locks that no ``fork()`` leaves held in the child.

``fork()`` copies every lock in whatever state it is in, and the child has only the thread
that forked. A lock another thread held at that moment (a failure being recorded, a retry
withdrawing from a budget, the metric reader listing the breakers, a first call planning a
new target) stays held forever in the child, whose first call that needs it hangs. Pre-fork
servers (``gunicorn --preload``), ``multiprocessing`` with the fork start method and
celery's prefork pool all fork processes that may have such threads.

:func:`new_lock` is ``threading.Lock()`` plus a weak registration (:func:`new_rlock` the
same for an ``RLock``), paid once when the owning object is built (a breaker, a budget, a
target's plans), never per call: the per-call paths take and release the lock exactly as
before. In a forked child, before any of its own code runs, every registered lock still
alive is reinitialised, unlocked, in place (objects and closures that hold a reference keep
a working lock), as the ``logging`` module does for its handlers' locks. State such a lock
guarded may be half-updated in the child (a counter off by one): the child goes on from
there, as the parent does. Every lock of the package but the demo's is made here
(``tests/test_tooling.py`` checks). This module registers its handler when imported, so
before any module that uses it registers its own: the fleet-wide link, which restarts its
sync thread in the child, finds its members' locks already free.

Objects whose state belongs to threads (a breaker's half-open permits, a bulkhead's slots
and waiters) register with :func:`reset_in_child` and give that state back in the child: no
thread there will ever return it.

A lock held by the forking thread itself is released in the child too; that code's own
``release()`` would then raise. None of ours forks while holding one, unless a user's
breaker listener forks and then returns into the delivery loop in the child.
"""

from __future__ import annotations

import os
import threading
import weakref
from typing import Any, Protocol

__all__ = ["ForkAware", "new_lock", "new_rlock", "reset_in_child"]

_locks: weakref.WeakSet[Any] = weakref.WeakSet()


def new_lock() -> threading.Lock:
    """A ``threading.Lock`` that a forked child finds unlocked."""
    lock = threading.Lock()
    _locks.add(lock)
    return lock


def new_rlock() -> threading.RLock:
    """A ``threading.RLock`` that a forked child finds unlocked."""
    lock = threading.RLock()
    _locks.add(lock)
    return lock


class ForkAware(Protocol):
    """State that threads own (a half-open probe permit, a bulkhead slot) and that a forked
    child, which has none of those threads, must give back."""

    def _after_fork_in_child(self) -> None: ...


_aware: weakref.WeakSet[Any] = weakref.WeakSet()


def reset_in_child(owner: ForkAware) -> None:
    """Call ``owner._after_fork_in_child()`` in every forked child, after the locks are
    reinitialised (held weakly: registering keeps nothing alive)."""
    _aware.add(owner)


def _reinit_in_child() -> None:
    lock: Any
    for lock in list(_locks):
        lock._at_fork_reinit()
    for owner in list(_aware):
        owner._after_fork_in_child()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reinit_in_child)
