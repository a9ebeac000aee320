"""``Bulkhead``: at most N calls in flight to one dependency, shared by threads and tasks.

A slow dependency otherwise absorbs every worker thread or connection and takes unrelated
endpoints down with it. Callers beyond the limit wait up to ``max_wait`` seconds for a slot
and are then rejected with :class:`BulkheadFullError` (a fallback may catch it).

One object serves sync and async callers: slots are a counter under a ``threading.Lock``,
and callers that find none free queue up in one first-come-first-served line, threads and
tasks alike. A thread waits on a lock of its own that the releasing caller unlocks; a task
waits on a future that the releasing caller resolves through its loop's
``call_soon_threadsafe`` (under trio: on an event it sets through the run's token). A freed
slot is handed straight to the oldest waiter (it stays counted as in use), and a caller
that arrives while anyone waits queues behind them: nobody barges in between a release and
the waiter it wakes, so no waiter, thread or task, is starved by callers that keep arriving.
"""

from __future__ import annotations

import asyncio
import collections
import threading
from typing import Any

from otel_recovery._clock import Duration, to_seconds
from otel_recovery._forksafe import new_lock, reset_in_child
from otel_recovery._trio import running_trio

__all__ = ["Bulkhead", "BulkheadFullError"]


class BulkheadFullError(Exception):
    """The bulkhead had no free slot within ``max_wait``."""

    def __init__(self, name: str, max_concurrent: int) -> None:
        super().__init__(f"bulkhead {name!r} is full ({max_concurrent} calls in flight)")
        self.name = name
        self.max_concurrent = max_concurrent

    def __reduce__(self) -> tuple[type[BulkheadFullError], tuple[str, int]]:
        # pickle and copy call the class with args, not __init__'s: raised in a process
        # pool's worker, an unpicklable error breaks the whole pool
        return (type(self), (self.name, self.max_concurrent))


class Bulkhead:
    """Concurrency limit with an optional bounded wait."""

    __slots__ = (
        "__weakref__",
        "_in_use",
        "_lock",
        "_orphaned",
        "_waiters",
        "max_concurrent",
        "max_wait",
        "name",
        "rejected",
    )

    def __init__(self, max_concurrent: int, *, max_wait: Duration = 0.0, name: str = "default"):
        if (
            isinstance(max_concurrent, bool)
            or not isinstance(max_concurrent, int)
            or max_concurrent < 1
        ):
            raise ValueError(f"max_concurrent must be an int >= 1, got {max_concurrent!r}")
        self.max_concurrent = max_concurrent
        self.max_wait = to_seconds(max_wait, "max_wait", allow_inf=True)
        self.name = name
        self._lock = new_lock()
        self._in_use = 0
        # Oldest first. Invariant: while anyone waits, every slot is in use (a release hands
        # its slot over instead of freeing it), so the fast path's check alone keeps
        # newcomers behind the waiters.
        self._waiters: collections.deque[_ThreadWaiter | _AsyncioWaiter | _TrioWaiter] = (
            collections.deque()
        )
        self.rejected = 0
        self._orphaned = 0
        reset_in_child(self)

    def _after_fork_in_child(self) -> None:
        """A forked child has none of the threads and tasks that held slots or waited for
        one: free the slots, forget the waiters (the lock is reinitialised by
        ``_forksafe``). Slots the forking thread itself held are released once each without
        complaint (``_orphaned``)."""
        self._orphaned, self._in_use = self._in_use, 0
        self._waiters.clear()

    @property
    def in_use(self) -> int:
        return self._in_use

    def acquire(self) -> None:
        """Take a slot for a thread, waiting up to ``max_wait``; raise if none frees up.
        Waiting callers get freed slots in the order they came."""
        with self._lock:
            if self._in_use < self.max_concurrent:  # nobody waits then (see __init__)
                self._in_use += 1
                return
            if self.max_wait <= 0:
                self.rejected += 1
                raise BulkheadFullError(self.name, self.max_concurrent)
            waiter = _ThreadWaiter()
            self._waiters.append(waiter)
        try:
            if waiter.wait(self.max_wait):
                return  # handed a slot by release()
        except BaseException:
            # Interrupted while waiting (KeyboardInterrupt from a signal handler, say).
            with self._lock:
                handed_over = waiter not in self._waiters
                if not handed_over:
                    self._waiters.remove(waiter)
            if handed_over:
                self.release()  # the slot arrived meanwhile: pass it on, never leak it
            raise
        with self._lock:
            if waiter not in self._waiters:
                return  # handed a slot just as the wait timed out: it is ours
            self._waiters.remove(waiter)
            self.rejected += 1
        raise BulkheadFullError(self.name, self.max_concurrent)

    async def aacquire(self) -> None:
        """Take a slot for a task, waiting up to ``max_wait``; raise if none frees up."""
        with self._lock:
            if self._in_use < self.max_concurrent:
                self._in_use += 1
                return
            if self.max_wait <= 0:
                self.rejected += 1
                raise BulkheadFullError(self.name, self.max_concurrent)
            trio = running_trio()
            waiter = _TrioWaiter(trio) if trio is not None else _AsyncioWaiter()
            self._waiters.append(waiter)
        try:
            await waiter.wait(self.max_wait)
        except BaseException as stopped:
            # Timed out, or the waiting task was cancelled.
            with self._lock:
                handed_over = waiter not in self._waiters
                if not handed_over:
                    self._waiters.remove(waiter)
            if handed_over:
                # The slot arrived just as we stopped waiting: pass it on, never leak it.
                self.release()
            if not isinstance(stopped, waiter.timed_out):
                raise  # cancellation stays cancellation (asyncio.timeout, TaskGroup rely on it)
            with self._lock:
                self.rejected += 1
            raise BulkheadFullError(self.name, self.max_concurrent) from None

    def release(self) -> None:
        """Give a slot back, handing it straight to the oldest waiter if there is one."""
        with self._lock:
            while self._waiters:
                # The slot stays counted as in use: ownership moves to the waiting thread or
                # task (unless a task's loop or run has ended: the next waiter then).
                if self._waiters.popleft().hand_over():
                    return
            if self._in_use <= 0:
                if self._orphaned:  # a slot taken before a fork, by the thread that forked
                    self._orphaned -= 1
                    return
                raise RuntimeError(f"bulkhead {self.name!r} released more often than acquired")
            self._in_use -= 1

    def __repr__(self) -> str:
        return (
            f"Bulkhead(max_concurrent={self.max_concurrent}, max_wait={self.max_wait}, "
            f"name={self.name!r})"
        )


class _ThreadWaiter:
    """A thread waiting for a slot: a lock it holds and waits to acquire again, which the
    releasing caller unlocks."""

    __slots__ = ("lock",)

    def __init__(self) -> None:
        self.lock = new_lock()
        self.lock.acquire()

    def wait(self, seconds: float) -> bool:
        # capped: a lock refuses timeouts past TIMEOUT_MAX (max_wait=float("inf") among them)
        return self.lock.acquire(timeout=min(seconds, threading.TIMEOUT_MAX))

    def hand_over(self) -> bool:
        self.lock.release()
        return True


class _AsyncioWaiter:
    """A task of an asyncio loop waiting for a slot: a future of its loop."""

    __slots__ = ("future", "loop")
    timed_out: tuple[type[BaseException], ...] = (asyncio.TimeoutError,)

    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.future: asyncio.Future[None] = self.loop.create_future()

    async def wait(self, seconds: float) -> None:
        # Not asyncio.wait_for: until Python 3.12 it returns normally when the task is
        # cancelled just after the slot was handed over (the future already done), and the
        # cancellation is lost: the guarded call runs in a task its TaskGroup or
        # asyncio.timeout had cancelled. Awaiting the future itself keeps every
        # cancellation; a slot handed over meanwhile is passed on by aacquire.
        timer = self.loop.call_later(seconds, _expire, self.future)
        try:
            await self.future
        finally:
            timer.cancel()

    def hand_over(self) -> bool:
        if self.loop.is_closed():
            return False
        self.loop.call_soon_threadsafe(_resolve, self.future)
        return True


class _TrioWaiter:
    """A trio task waiting for a slot: an event set through its run's token (from any
    thread, as ``call_soon_threadsafe`` does for asyncio)."""

    __slots__ = ("event", "finished", "timed_out", "token", "trio")

    def __init__(self, trio: Any) -> None:
        self.trio = trio
        self.token = trio.lowlevel.current_trio_token()
        self.event = trio.Event()
        self.finished = trio.RunFinishedError
        self.timed_out: tuple[type[BaseException], ...] = (trio.TooSlowError,)

    async def wait(self, seconds: float) -> None:
        with self.trio.fail_after(seconds):
            await self.event.wait()

    def hand_over(self) -> bool:
        try:
            self.token.run_sync_soon(self.event.set)
        except self.finished:
            return False
        return True


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


def _expire(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_exception(asyncio.TimeoutError())
