"""TRANSACTION_ROLLBACK: running the compensations a caller handed over, each undo once.

The seed API and the orchestrator take ``compensations`` as a
:class:`~otel_recovery.compensation.Compensations` stack or as a plain list of undo
callables. A list is consumed as a stack is: the undos that succeeded leave it, so passing
it again runs only what is still owed. Recoveries handed the same list at the same time share
one stack for it, so no undo runs twice however many of them roll it back.
"""

from __future__ import annotations

import os
from typing import Any

from opentelemetry import trace
from opentelemetry.trace import Span

from otel_recovery._callables import callable_name
from otel_recovery._forksafe import new_lock
from otel_recovery._recovery_spans import describe
from otel_recovery.compensation import CompensationInProgressError, Compensations

__all__ = ["rollback"]


_LISTS_ROLLING: dict[int, tuple[Compensations, int]] = {}
"""The stack each list of undos being rolled back is run as, and how many rollbacks hold
it: recoveries given the same list at once share one stack, so its undos run once."""
_lists_lock = new_lock()
if hasattr(os, "register_at_fork"):  # a forked child rolls back nothing of its parent's
    os.register_at_fork(after_in_child=_LISTS_ROLLING.clear)


def _stack_of(undos: list[Any]) -> Compensations:
    with _lists_lock:
        held = _LISTS_ROLLING.get(id(undos))
        if held is None:
            saga = Compensations()
            saga.owed_hint = "Pass the same list to TRANSACTION_ROLLBACK again to run them"
            for undo in undos:
                saga.add(undo, name=callable_name(undo))
        else:
            saga = held[0]
        _LISTS_ROLLING[id(undos)] = (saga, 1 if held is None else held[1] + 1)
        return saga


def _list_done(undos: list[Any], saga: Compensations, *, update: bool) -> None:
    """The list keeps what is still owed (told by the rollback that ran the stack); the last
    rollback holding the stack lets it go."""
    with _lists_lock:
        _, holders = _LISTS_ROLLING[id(undos)]
        if holders == 1:
            del _LISTS_ROLLING[id(undos)]
        else:
            _LISTS_ROLLING[id(undos)] = (saga, holders - 1)
        if update:
            undos[:] = [undo for _, undo in saga.pending]


async def rollback(
    compensations: object, span: Span
) -> tuple[str, str | None, Exception | None, int]:
    """TRANSACTION_ROLLBACK: ``(status, reason, last undo error, steps that ran cleanly)``.

    A list is consumed like a :class:`Compensations` stack: the undos that succeeded leave it
    (in place), the failed or interrupted ones stay, so passing the same list or stack again
    runs only what is still owed, never an undo twice. An empty one has nothing to undo.
    """
    if compensations is None:
        reason = "TRANSACTION_ROLLBACK needs context['compensations']: the undo callables, in "
        return "failed", reason + "the order their steps ran", None, 0
    if isinstance(compensations, Compensations):
        saga = compensations
    elif not isinstance(compensations, list):
        reason = (
            "context['compensations'] must be a Compensations stack or a list of callables, "
            f"not {type(compensations).__name__}: a list is consumed as its undos succeed, so "
            "passing it again runs only what is owed (a tuple or a deque cannot be; pass "
            "list(...) and keep that list)"
        )
        return "failed", reason, None, 0
    else:
        for undo in compensations:
            if not callable(undo):
                return "failed", f"compensation {undo!r} is not callable", None, 0
        saga = _stack_of(compensations)
    total = len(saga)
    ran_here = True
    try:
        with trace.use_span(
            span, end_on_exit=False, record_exception=False, set_status_on_exception=False
        ):
            failures = await saga.acompensate()
    except CompensationInProgressError:
        ran_here = False
        reason = "another recovery is rolling these compensations back now; none ran twice"
        return "failed", reason, None, 0
    finally:
        if isinstance(compensations, list):
            _list_done(compensations, saga, update=ran_here)
    ran = total - len(failures)
    if not failures:
        return "success", None, None, ran
    listed = "; ".join(f"{name}: {describe(exc)}" for name, exc in failures)
    reason = f"{len(failures)} of {total} compensations failed: {listed}"
    last = failures[-1][1]
    return "failed", reason, last if isinstance(last, Exception) else None, ran
