"""Transaction rollback: compensation stacks (sagas) and whole-transaction retry.

Two ways to undo, for two kinds of work:

- Work spread over systems that share no transaction (charge a card, reserve stock, send a
  mail) is undone by **compensations**: each step registers its undo as it succeeds; if a
  later step fails, the undos run in reverse order. Each undo is a span event
  ``otel_recovery.compensation``. An undo that fails is never swallowed: the caller gets a
  :class:`CompensationError` carrying the original error and every failed undo. Nothing is
  lost and nothing is undone twice: an undo leaves the stack only once it has succeeded, so
  the failed ones, and after an interruption (cancellation, ``KeyboardInterrupt``) the one
  that was running and those not yet run, stay on it for a later ``compensate()``.
- Work inside one database is undone by the database: :func:`run_transaction` /
  :func:`arun_transaction` run a function in a transaction and, on a serialization failure
  (SQLSTATE 40001) or a deadlock (40P01), roll back and run the *whole* transaction again
  with backoff. That is the safe way to retry database writes: retrying a single statement
  after such a failure is wrong (the transaction is already aborted), and retrying after a
  lost connection may apply a write twice. Any other error rolls back and propagates.

The saga is here; the transaction retry, which shares nothing with it, is implemented in
``_transaction_retry`` and re-exported.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import logging
from collections.abc import Callable
from types import TracebackType
from typing import Any

from opentelemetry import trace

from otel_recovery._callables import close_unawaited
from otel_recovery._driver_async import resolve
from otel_recovery._forksafe import new_lock, reset_in_child
from otel_recovery._known_errors import safe_str
from otel_recovery._public_home import public_home
from otel_recovery._redact import redact
from otel_recovery._transaction_retry import arun_transaction, run_transaction, transaction_retry
from otel_recovery.telemetry.attributes import (
    COMPENSATION_NAME,
    COMPENSATION_OUTCOME,
    ERROR_TYPE,
    EVENT_COMPENSATION,
)

__all__ = [
    "CompensationError",
    "CompensationInProgressError",
    "Compensations",
    "arun_transaction",
    "run_transaction",
    "transaction_retry",
]

public_home(__name__, arun_transaction, run_transaction, transaction_retry)

_log = logging.getLogger("otel_recovery")


class CompensationInProgressError(RuntimeError):
    """These compensations are being run already, by another thread or task."""


class CompensationError(Exception):
    """Undoing failed: ``original`` is what went wrong first, ``failures`` the undos that failed."""

    def __init__(self, original: BaseException, failures: list[tuple[str, BaseException]]):
        names = ", ".join(
            f"{name!r} ({type(exc).__name__}: {redact(safe_str(exc))})" for name, exc in failures
        )
        super().__init__(
            f"{len(failures)} compensation(s) failed after {type(original).__name__}: {names}"
        )
        self.original = original
        self.failures = failures


Undo = Callable[[], Any]


class Compensations:
    """A stack of undos, usable as ``with`` or ``async with``.

    ::

        with Compensations() as saga:
            order = orders.create(...)
            saga.add(lambda: orders.cancel(order.id), name="cancel order")
            payments.charge(order)            # raises: the order is cancelled, error re-raised

    ``add`` takes sync callables in a ``with`` block and sync or async ones in ``async with``.
    Leaving the block normally discards the undos (the work stands). :meth:`compensate` /
    :meth:`acompensate` run them on demand, e.g. from ``TRANSACTION_ROLLBACK``.

    An undo leaves the stack only when it has succeeded. One that fails stays on it (and is
    reported), so running ``compensate()`` again retries exactly the undos still owed, never
    one that already succeeded. If the compensation itself is interrupted by a
    ``BaseException`` (the task is cancelled while an undo awaits, ``KeyboardInterrupt``),
    the interruption propagates at once and no further undo runs; the undo that was running
    **stays on the stack**, with every undo not yet run below it, in order. A warning names
    them, and the next ``compensate()`` / ``acompensate()`` runs them, starting with the
    interrupted one. That one may have partly run (a refund request already sent), so it runs
    again from the start: undos must be safe to repeat (an idempotency key for a payment
    refund, "cancel if not cancelled" for an order). Dropping it instead would lose the undo
    silently whenever the interruption came before it did anything. :attr:`pending` lists
    what is left.
    """

    def __init__(self) -> None:
        self._undos: list[tuple[str, Undo]] = []
        self._running = False
        self.owed_hint = "Call compensate() or acompensate() on this Compensations to run them"
        """How the warning after an interruption tells the caller to run what is owed."""
        self._guard = new_lock()
        reset_in_child(self)

    def _after_fork_in_child(self) -> None:
        """The thread that was running the undos is not in a forked child: the stack is
        free there (what it had not run yet is still on it)."""
        self._running = False

    def __deepcopy__(self, memo: dict[int, Any]) -> Compensations:
        clone = Compensations()
        clone._undos = copy.deepcopy(self._undos, memo)
        return clone

    def add(self, undo: Undo, *, name: str | None = None) -> None:
        if not callable(undo):
            raise TypeError(f"an undo must be callable, got {undo!r}")
        if name is not None and (not isinstance(name, str) or not name.strip()):
            raise TypeError(
                f"an undo's name must be a non-empty string (it names the undo in spans and "
                f"errors), or None for the function's own name; got {name!r}"
            )
        label = name or str(getattr(undo, "__qualname__", None) or repr(undo))
        self._undos.append((label, undo))

    def __len__(self) -> int:
        return len(self._undos)

    @property
    def pending(self) -> list[tuple[str, Undo]]:
        """The undos still on the stack as ``(name, undo)``, oldest first (the order ``add``
        put them there); a compensation runs them from the end."""
        return list(self._undos)

    def compensate(self) -> list[tuple[str, BaseException]]:
        """Run the undos, newest first; returns the ones that failed (never raises them).

        Each undo is taken off the stack as it succeeds; failed ones stay on it, and so do,
        after an interruption, the interrupted undo and those not yet run (see the class).
        """
        return self._run_sync(None)

    async def acompensate(self) -> list[tuple[str, BaseException]]:
        """:meth:`compensate` for ``async with``: async undos are awaited."""
        return await self._run_async(None)

    def _claim(self) -> None:
        """One run at a time. Two at once interleave: each pops the next undo while the
        other's is still running, so an older undo runs before a newer one has finished,
        and a failed one put back by the first is popped again by the second."""
        with self._guard:
            if self._running:
                raise CompensationInProgressError(
                    "these compensations are already being run by another thread or task; "
                    "running them now too would interleave the undos out of order. Wait "
                    "for that run to finish: what it leaves owed stays on the stack"
                )
            self._running = True

    def _release(self) -> None:
        with self._guard:
            self._running = False

    def _run_sync(self, original: BaseException | None) -> list[tuple[str, BaseException]]:
        self._claim()
        try:
            return self._undo_sync(original)
        finally:
            self._release()

    async def _run_async(self, original: BaseException | None) -> list[tuple[str, BaseException]]:
        self._claim()
        try:
            return await self._undo_async(original)
        finally:
            self._release()

    def _undo_sync(self, original: BaseException | None) -> list[tuple[str, BaseException]]:
        failures: list[tuple[str, BaseException]] = []
        failed: list[tuple[str, Undo]] = []
        try:
            while self._undos:
                name, undo = entry = self._undos.pop()
                try:
                    result = undo()
                    if inspect.isawaitable(result):
                        close_unawaited(result)
                        raise TypeError(f"undo {name!r} is async; use `async with Compensations()`")
                except Exception as error:
                    failed.append(entry)
                    failures.append((name, error))
                    _record(name, error)
                except BaseException as interruption:
                    self._interrupted(entry, failed, interruption, original)
                    raise
                else:
                    _record(name, None)
        finally:
            self._undos.extend(reversed(failed))
        return failures

    async def _undo_async(self, original: BaseException | None) -> list[tuple[str, BaseException]]:
        failures: list[tuple[str, BaseException]] = []
        failed: list[tuple[str, Undo]] = []
        try:
            while self._undos:
                name, undo = entry = self._undos.pop()
                try:
                    await resolve(undo())
                except Exception as error:
                    failed.append(entry)
                    failures.append((name, error))
                    _record(name, error)
                except BaseException as interruption:
                    self._interrupted(entry, failed, interruption, original)
                    raise
                else:
                    _record(name, None)
        finally:
            self._undos.extend(reversed(failed))
        return failures

    def _interrupted(
        self,
        entry: tuple[str, Undo],
        failed: list[tuple[str, Undo]],
        interruption: BaseException,
        original: BaseException | None,
    ) -> None:
        """Put the interrupted undo back (the failed ones, newer, go back above it) and say
        what is left, in the log, as a span event and as a note on the interruption."""
        self._undos.append(entry)
        self._undos.extend(reversed(failed))
        failed.clear()
        _record(entry[0], interruption, outcome="interrupted")
        left = ", ".join(repr(name) for name, _ in reversed(self._undos))
        after = (
            ""
            if original is None
            else f" (undoing after {type(original).__name__}: {redact(safe_str(original))})"
        )
        message = (
            f"compensation interrupted by {type(interruption).__name__} while undo "
            f"{entry[0]!r} was running{after}; {len(self._undos)} undo(s) left on the stack, "
            f"to run newest first: {left}. {self.owed_hint} (the interrupted one runs again "
            f"from the start)"
        )
        with contextlib.suppress(Exception):  # an exception that refuses attributes
            setattr(interruption, _INTERRUPTED, True)
        _tell(interruption, message)

    def __enter__(self) -> Compensations:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if error is None:
            self._undos.clear()
            return
        if self._left_for_later(error):
            return
        failures = self._run_sync(error)
        if failures:
            self._raise_failures(error, failures)

    async def __aenter__(self) -> Compensations:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if error is None:
            self._undos.clear()
            return
        if self._left_for_later(error):
            return
        failures = await self._run_async(error)
        if failures:
            self._raise_failures(error, failures)

    def _left_for_later(self, error: BaseException) -> bool:
        """Whether ``error`` interrupted a compensation inside this block (a nested stack's):
        that one still owes a newer undo, so this older stack's must not run before it. It
        is left whole, and said so; the interruption propagates."""
        if not self._undos or not _stopped_a_compensation(error):
            return False
        left = ", ".join(repr(name) for name, _ in reversed(self._undos))
        _tell(
            error,
            f"compensation of an enclosing stack skipped: {type(error).__name__} interrupted "
            f"a compensation inside it, which still owes a newer undo; {len(self._undos)} "
            f"undo(s) left here, to run newest first after it: {left}. {self.owed_hint}",
        )
        return True

    @staticmethod
    def _raise_failures(error: BaseException, failures: list[tuple[str, BaseException]]) -> None:
        """An error left the block and undos failed. A failure of the work (an Exception)
        becomes a :class:`CompensationError` carrying both; an interruption (cancellation,
        ``KeyboardInterrupt``, ``SystemExit``) keeps propagating as itself, with the failed
        undos in the log and in a note: made an ``Exception``, it was swallowed by the
        host's ``except Exception``, a cancelled task did not end cancelled, and
        ``asyncio.timeout`` never raised its ``TimeoutError``."""
        if isinstance(error, Exception):
            raise CompensationError(error, failures) from error
        _tell(error, str(CompensationError(error, failures)) + "; they stay on the stack")


def _record(name: str, error: BaseException | None, *, outcome: str = "failed") -> None:
    span = trace.get_current_span()
    if not span.is_recording():
        if error is not None and outcome == "failed":
            _log.error("compensation %r failed: %s", name, redact(safe_str(error)))
        return
    attributes: dict[str, Any] = {
        COMPENSATION_NAME: name,
        COMPENSATION_OUTCOME: "success" if error is None else outcome,
    }
    if error is not None:
        attributes[ERROR_TYPE] = type(error).__qualname__
    span.add_event(EVENT_COMPENSATION, attributes)


_INTERRUPTED = "_otel_recovery_interrupted_compensation"
"""Set on an interruption that stopped a compensation (see ``Compensations._left_for_later``)."""


def _stopped_a_compensation(error: BaseException) -> bool:
    """Whether ``error``, or one it was raised from or during (``asyncio.timeout`` turns the
    cancellation into a ``TimeoutError``, a task group wraps it), interrupted a compensation."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen and len(seen) < 16:
        if getattr(current, _INTERRUPTED, False) is True:
            return True
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return False


def _tell(interruption: BaseException, message: str) -> None:
    """Say ``message`` in the log and, where the exception takes one, as its note."""
    _log.warning("%s", message)
    add_note = getattr(interruption, "add_note", None)  # Python 3.11+
    if callable(add_note):
        with contextlib.suppress(Exception):  # an exception that refuses notes
            add_note(message)
