"""Compensations and checkpoints at their edges: interruptions, nesting, odd inputs.

Each test here failed before the twenty-fifth session's review: an undo lost or run twice,
an interruption turned into an ordinary error, or a refusal that did not say why.
"""

from __future__ import annotations

import asyncio
import collections
import gc
import sys

import psycopg
import pytest

from otel_recovery import _rollback as rollback_lists
from otel_recovery.checkpoint import CheckpointConflictError, CheckpointError, Checkpoints
from otel_recovery.compensation import (
    CompensationError,
    Compensations,
    arun_transaction,
    run_transaction,
)
from otel_recovery.interaction import ErrorRecoveryInteraction, RecoveryAction
from otel_recovery.stores import MemoryStore
from otel_recovery.testing import FakeClock
from tests.test_compensation import DSN, _connect


def _rollback(undos: object) -> dict[str, object]:
    context = {"strategy": RecoveryAction.TRANSACTION_ROLLBACK, "compensations": undos}
    recovery = ErrorRecoveryInteraction(store=MemoryStore(), telemetry=False)
    return asyncio.run(recovery.recover_from_error(RuntimeError("shipping failed"), context))


# -- TRANSACTION_ROLLBACK takes a list or a stack ---------------------------------------------


@pytest.mark.parametrize("make", [collections.deque, tuple], ids=["deque", "tuple"])
def test_undos_that_cannot_be_consumed_are_refused_and_none_runs(make):
    """A deque failed after its undos ran (it takes no slice assignment) and left a stale
    stack under its id: rolled back again, its undos ran twice, and a later deque given the
    same id ran nothing. A tuple was never consumed: passed again, every undo ran again."""
    ran: list[str] = []
    undos = make([lambda: ran.append("cancel order"), lambda: ran.append("refund")])
    result = _rollback(undos)
    assert result["recovery_status"] == "failed"
    assert "a tuple or a deque cannot be; pass list(...)" in str(result["reason"])
    assert ran == [] and rollback_lists._LISTS_ROLLING == {}
    gc.collect()


def test_a_list_interrupted_mid_rollback_says_to_pass_the_list_again(caplog):
    def interrupted() -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _rollback([lambda: None, interrupted])
    assert "Pass the same list to TRANSACTION_ROLLBACK again to run them" in caplog.text
    assert "on this Compensations" not in caplog.text


# -- an interruption stays an interruption ---------------------------------------------------


def _failing_undo() -> None:
    raise RuntimeError("refund API down")


def test_ctrl_c_with_a_failing_undo_is_still_a_keyboard_interrupt(caplog):
    """It became a CompensationError, an Exception: the host's ``except Exception`` took
    the user's Ctrl-C."""
    saga = Compensations()
    with pytest.raises(KeyboardInterrupt) as raised:
        with saga:
            saga.add(_failing_undo, name="refund")
            raise KeyboardInterrupt
    assert "'refund' (RuntimeError: refund API down)" in caplog.text
    assert [name for name, _ in saga.pending] == ["refund"]  # still owed
    notes = getattr(raised.value, "__notes__", None)
    assert notes is None or "1 compensation(s) failed" in notes[-1]


async def test_a_cancelled_task_with_a_failing_undo_ends_cancelled():
    started = asyncio.Event()

    async def worker() -> None:
        async with Compensations() as saga:
            saga.add(_failing_undo, name="refund")
            started.set()
            await asyncio.sleep(10)

    task = asyncio.ensure_future(worker())
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert task.cancelled()


async def test_a_time_limit_around_a_saga_with_a_failing_undo_is_still_a_timeout():
    async def worker() -> None:
        async with Compensations() as saga:
            saga.add(_failing_undo, name="refund")
            await asyncio.sleep(10)

    with pytest.raises(asyncio.TimeoutError):
        await asyncio.wait_for(worker(), 0.01)


def test_an_ordinary_failure_with_a_failing_undo_is_still_a_compensation_error():
    with pytest.raises(CompensationError) as raised:
        with Compensations() as saga:
            saga.add(_failing_undo, name="refund")
            raise ValueError("out of stock")
    assert isinstance(raised.value.original, ValueError)


# -- nested stacks keep newest-first ----------------------------------------------------------


def test_an_interrupted_inner_compensation_leaves_the_outer_undos_owed(caplog):
    """The interruption reached the outer block, which ran its older undo while the inner
    one was still owed: an order cancelled before its payment was refunded."""
    ran: list[str] = []

    def refund() -> None:
        ran.append("refund started")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        with Compensations() as outer:
            outer.add(lambda: ran.append("cancel order"), name="cancel order")
            with Compensations() as inner:
                inner.add(refund, name="refund")
                raise RuntimeError("shipping failed")
    assert ran == ["refund started"]
    assert [n for n, _ in inner.pending] == ["refund"]
    assert [n for n, _ in outer.pending] == ["cancel order"]
    assert "compensation of an enclosing stack skipped" in caplog.text


async def test_a_cancelled_inner_compensation_leaves_the_outer_undos_owed():
    ran: list[str] = []
    refunding = asyncio.Event()

    async def refund() -> None:
        ran.append("refund started")
        refunding.set()
        await asyncio.sleep(10)

    async def cancel_order() -> None:
        ran.append("cancel order")

    async def work() -> None:
        async with Compensations() as outer:
            outer.add(cancel_order, name="cancel order")
            async with Compensations() as inner:
                inner.add(refund, name="refund")
                raise RuntimeError("shipping failed")

    task = asyncio.ensure_future(work())
    await refunding.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert ran == ["refund started"]


# -- an undo error that cannot be printed -----------------------------------------------------


class _Unprintable(Exception):
    def __str__(self) -> str:
        raise TypeError("'NoneType' object is not subscriptable")


def test_an_undo_error_that_cannot_be_printed_does_not_stop_the_others():
    ran: list[str] = []

    def refund() -> None:
        ran.append("refund")
        raise _Unprintable

    saga = Compensations()
    saga.add(lambda: ran.append("cancel order"), name="cancel order")
    saga.add(refund, name="refund")
    failures = saga.compensate()
    assert ran == ["refund", "cancel order"]
    assert [name for name, _ in failures] == ["refund"]
    with pytest.raises(CompensationError, match=r"'refund' \(_Unprintable: <unprintable"):
        with Compensations() as block:
            block.add(refund, name="refund")
            raise KeyError("shipping failed")
    result = _rollback([refund])
    assert result["recovery_status"] == "failed" and "_Unprintable" in str(result["reason"])


@pytest.mark.parametrize("name", [123, "", "   "])
def test_an_undo_name_must_be_a_non_empty_string(name):
    with pytest.raises(TypeError, match="an undo's name must be a non-empty string"):
        Compensations().add(lambda: None, name=name)


# -- checkpoints -------------------------------------------------------------------------------


def test_an_int_too_long_to_read_back_is_refused_where_it_is_saved():
    """Saved by a process that raised its own digit limit, it was a checkpoint every other
    process read as corrupt."""
    checkpoints = Checkpoints("memory://")
    with pytest.raises(CheckpointError, match=r"\['ledger'\]\['checksum'\].*4,300 digits"):
        checkpoints.save("big", {"ledger": {"checksum": 7**6000}})
    with pytest.raises(CheckpointError, match=r"\[0\].*as a string"):
        checkpoints.save("big", [-(10**4300)])
    checkpoints.save("fine", {"n": 10**4299})
    assert checkpoints.load("fine").state == {"n": 10**4299}


@pytest.mark.skipif(not hasattr(sys, "set_int_max_str_digits"), reason="Python < 3.10.7")
def test_a_process_that_raised_the_digit_limit_still_cannot_save_an_int_others_cannot_read():
    checkpoints = Checkpoints("memory://")
    before = sys.get_int_max_str_digits()
    sys.set_int_max_str_digits(0)
    try:
        with pytest.raises(CheckpointError, match=r"\['ledger'\]\[1\].*4,300 digits"):
            checkpoints.save("big", {"ledger": [1, 7**6000]})
    finally:
        sys.set_int_max_str_digits(before)


def test_a_conflict_with_an_expired_version_says_it_expired():
    clock = FakeClock()
    checkpoints = Checkpoints("memory://", clock=clock)
    checkpoints.save("job", {"n": 1})
    version = checkpoints.save("job", {"n": 2}, ttl=10)
    clock.advance(11)
    with pytest.raises(CheckpointConflictError, match="version 2 expired or was deleted"):
        checkpoints.save("job", {"n": 3}, expected_version=version)
    checkpoints.save("job", {"n": 3}, expected_version=1)
    with pytest.raises(CheckpointConflictError, match="another writer saved first"):
        checkpoints.save("job", {"n": 4}, expected_version=1)


# -- run_transaction / arun_transaction refuse the other form's inputs ---------------------


def test_a_body_returning_a_task_is_refused_and_rolled_back():
    """Only a coroutine was refused: a Task or Future returned by the body committed the
    transaction without its work."""
    loop = asyncio.new_event_loop()
    try:
        with _connect() as conn:
            future = loop.create_future()
            with pytest.raises(TypeError, match="which returned an awaitable"):
                run_transaction(conn, lambda c: future, telemetry=False)
            assert conn.info.transaction_status == 0
    finally:
        loop.close()


async def test_arun_transaction_refuses_a_sync_connection_or_function():
    with psycopg.connect(DSN, autocommit=True) as conn:
        with pytest.raises(TypeError, match=r"the synchronous connection .*run_transaction"):
            await arun_transaction(conn, lambda c: asyncio.sleep(0), telemetry=False)
    aconn = await psycopg.AsyncConnection.connect(DSN, autocommit=True)
    try:
        with pytest.raises(TypeError, match=r"the synchronous function .*run_transaction"):
            await arun_transaction(aconn, lambda c: 1, telemetry=False)
        assert aconn.info.transaction_status == 0  # rolled back
    finally:
        await aconn.close()


async def test_an_inner_compensation_cut_by_a_time_limit_leaves_the_outer_undos_owed():
    """``asyncio.wait_for`` between the stacks turns the cancellation into a new
    ``TimeoutError``, which did not carry the mark: the outer stack ran its older undo."""
    ran: list[str] = []

    async def refund() -> None:
        ran.append("refund started")
        await asyncio.sleep(10)

    async def cancel_order() -> None:
        ran.append("cancel order")

    async def inner_work() -> None:
        async with Compensations() as inner:
            inner.add(refund, name="refund")
            raise RuntimeError("shipping failed")

    with pytest.raises(asyncio.TimeoutError):
        async with Compensations() as outer:
            outer.add(cancel_order, name="cancel order")
            await asyncio.wait_for(inner_work(), 0.05)
    assert ran == ["refund started"]
    assert [n for n, _ in outer.pending] == ["cancel order"]
