"""Compensation stacks, and whole-transaction retry against the real PostgreSQL."""

from __future__ import annotations

import asyncio
import os
import threading
import uuid

import pytest

from otel_recovery.compensation import (
    CompensationError,
    Compensations,
    arun_transaction,
    run_transaction,
)
from otel_recovery.policies import FixedBackoff, Retry
from otel_recovery.telemetry import attributes as names

DSN = "host=127.0.0.1 port=5432 user=postgres dbname=test connect_timeout=3"
ASYNCPG_DSN = "postgresql://postgres@127.0.0.1:5432/test"


# -- compensations -------------------------------------------------------------------------


def test_undos_run_in_reverse_and_the_original_error_propagates():
    done = []
    with pytest.raises(KeyError), Compensations() as saga:
        saga.add(lambda: done.append("undo order"), name="order")
        saga.add(lambda: done.append("undo payment"), name="payment")
        raise KeyError("shipping failed")
    assert done == ["undo payment", "undo order"]


def test_success_discards_the_undos():
    done = []
    with Compensations() as saga:
        saga.add(lambda: done.append("undo"))
    assert done == [] and len(saga) == 0


def test_a_failing_undo_is_reported_with_the_original_error_and_the_others_still_run():
    done = []

    def broken() -> None:
        raise RuntimeError("refund API down")

    with pytest.raises(CompensationError) as caught, Compensations() as saga:
        saga.add(lambda: done.append("release stock"), name="stock")
        saga.add(broken, name="refund")
        raise ValueError("charge declined")
    error = caught.value
    assert isinstance(error.original, ValueError) and error.__cause__ is error.original
    assert [(name, type(exc)) for name, exc in error.failures] == [("refund", RuntimeError)]
    assert done == ["release stock"]
    assert "refund" in str(error) and "charge declined" not in str(error.failures)


def test_each_undo_is_a_span_event(recovery_telemetry):
    tracer = recovery_telemetry.tracer_provider.get_tracer("app")
    with tracer.start_as_current_span("checkout"):
        with pytest.raises(CompensationError), Compensations() as saga:
            saga.add(lambda: None, name="a")
            saga.add(lambda: 1 / 0, name="b")
            raise ValueError()
    (span,) = [s for s in recovery_telemetry.spans() if s.name == "checkout"]
    events = [
        (e.attributes[names.COMPENSATION_NAME], e.attributes[names.COMPENSATION_OUTCOME])
        for e in span.events
    ]
    assert events == [("b", "failed"), ("a", "success")]


async def test_async_undos_are_awaited():
    done = []

    async def undo() -> None:
        await asyncio.sleep(0)
        done.append("async undo")

    with pytest.raises(KeyError):
        async with Compensations() as saga:
            saga.add(undo)
            saga.add(lambda: done.append("sync undo"))
            raise KeyError()
    assert done == ["sync undo", "async undo"]


def test_async_undo_in_a_sync_block_is_reported_not_silently_skipped():
    async def undo() -> None:
        return None

    with pytest.raises(CompensationError, match="is async"), Compensations() as saga:
        saga.add(undo, name="async-one")
        raise KeyError()


# -- interrupted compensation: nothing lost, nothing undone twice ----------------------------


def _checkout_saga(ran: list[str], refund_started: asyncio.Event) -> Compensations:
    """The reviewer's checkout: cancel order, release stock, then a slow network refund."""

    async def refund() -> None:
        refund_started.set()
        await asyncio.sleep(0.2)
        ran.append("refund")

    async def release_stock() -> None:
        ran.append("release stock")

    saga = Compensations()
    saga.add(lambda: ran.append("cancel order"), name="cancel order")
    saga.add(release_stock, name="release stock")
    saga.add(refund, name="refund")
    return saga


async def test_a_compensation_cancelled_mid_undo_keeps_every_undo_still_owed(caplog):
    ran: list[str] = []
    refund_started = asyncio.Event()
    saga = _checkout_saga(ran, refund_started)

    async def checkout() -> None:
        async with saga:
            raise RuntimeError("shipping failed")

    task = asyncio.create_task(checkout())
    await refund_started.wait()  # the saga is compensating: 'refund' is awaiting
    task.cancel()
    with caplog.at_level("WARNING", logger="otel_recovery"):
        with pytest.raises(asyncio.CancelledError) as caught:
            await task
    assert ran == []
    # The interrupted undo and the two not yet run stay, in their order.
    assert [name for name, _ in saga.pending] == ["cancel order", "release stock", "refund"]
    # The cancellation is not silent: the log (and a note on the error) names what is left
    # and the original error the saga was undoing.
    (record,) = [r for r in caplog.records if "interrupted" in r.getMessage()]
    message = record.getMessage()
    assert "CancelledError" in message and "RuntimeError: shipping failed" in message
    assert "'refund', 'release stock', 'cancel order'" in message and "acompensate()" in message
    assert isinstance(caught.value.__context__, RuntimeError)
    # A later compensation finishes the job, newest first, each undo exactly once.
    assert await saga.acompensate() == []
    assert ran == ["refund", "release stock", "cancel order"] and len(saga) == 0
    assert await saga.acompensate() == [] and len(ran) == 3


def test_a_keyboard_interrupt_in_a_sync_undo_keeps_it_and_the_older_ones():
    ran: list[str] = []
    interrupt = [KeyboardInterrupt]  # only the first call is interrupted

    def release_stock() -> None:
        if interrupt:
            raise interrupt.pop()
        ran.append("release stock")

    saga = Compensations()
    with pytest.raises(KeyboardInterrupt):
        with saga:
            saga.add(lambda: ran.append("cancel order"), name="cancel order")
            saga.add(release_stock, name="release stock")
            saga.add(lambda: ran.append("refund"), name="refund")
            raise ValueError("shipping failed")
    assert ran == ["refund"]
    assert [name for name, _ in saga.pending] == ["cancel order", "release stock"]
    assert saga.compensate() == []
    assert ran == ["refund", "release stock", "cancel order"]  # refund never ran twice


def test_failed_undos_stay_so_running_again_retries_only_them():
    ran: list[str] = []
    refund_api_up = [False]

    def refund() -> None:
        if not refund_api_up[0]:
            raise OSError("refund API down")
        ran.append("refund")

    saga = Compensations()
    with pytest.raises(CompensationError):
        with saga:
            saga.add(lambda: ran.append("cancel order"), name="cancel order")
            saga.add(refund, name="refund")
            saga.add(lambda: ran.append("release stock"), name="release stock")
            raise ValueError("shipping failed")
    assert ran == ["release stock", "cancel order"]
    assert [name for name, _ in saga.pending] == ["refund"]
    refund_api_up[0] = True
    assert saga.compensate() == [] and len(saga) == 0
    assert ran == ["release stock", "cancel order", "refund"]


def test_an_interruption_after_a_failed_undo_keeps_the_stack_in_order():
    def down() -> None:
        raise OSError("down")

    def interrupted() -> None:
        raise KeyboardInterrupt

    saga = Compensations()
    saga.add(lambda: None, name="a")
    saga.add(interrupted, name="b")
    saga.add(lambda: None, name="c")
    saga.add(down, name="d")
    with pytest.raises(KeyboardInterrupt):
        saga.compensate()  # d fails, c succeeds, b is interrupted, a never runs
    assert [name for name, _ in saga.pending] == ["a", "b", "d"]


async def test_an_interrupted_undo_is_a_span_event(recovery_telemetry):
    tracer = recovery_telemetry.tracer_provider.get_tracer("app")
    started = asyncio.Event()

    async def slow() -> None:
        started.set()
        await asyncio.sleep(10)

    saga = Compensations()
    saga.add(lambda: None, name="fast")
    saga.add(slow, name="slow")

    async def undo() -> None:
        with tracer.start_as_current_span("checkout"):
            await saga.acompensate()

    task = asyncio.create_task(undo())
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    (span,) = [s for s in recovery_telemetry.spans() if s.name == "checkout"]
    events = [
        (
            e.attributes[names.COMPENSATION_NAME],
            e.attributes[names.COMPENSATION_OUTCOME],
            e.attributes.get("error.type"),
        )
        for e in span.events
        if e.name == names.EVENT_COMPENSATION
    ]
    assert events == [("slow", "interrupted", "CancelledError")]


# -- TRANSACTION_ROLLBACK: a re-run never undoes twice --------------------------------------


async def test_rolling_back_the_same_list_again_runs_only_the_undos_still_owed():
    from otel_recovery.interaction import ErrorRecoveryInteraction, RecoveryAction

    refunds: list[str] = []
    released: list[str] = []
    stock_api_up = [False]

    def refund() -> None:
        refunds.append("refund")

    def release_stock() -> None:
        if not stock_api_up[0]:
            raise OSError("stock API down")
        released.append("release")

    undos = [refund, release_stock]  # in the order their steps ran
    context = {"strategy": RecoveryAction.TRANSACTION_ROLLBACK, "compensations": undos}
    recovery = ErrorRecoveryInteraction()
    first = await recovery.recover_from_error(RuntimeError("shipping failed"), context=context)
    assert first["recovery_status"] == "failed" and refunds == ["refund"]
    assert undos == [release_stock]  # the list now holds only what is still owed
    stock_api_up[0] = True
    again = await recovery.recover_from_error(RuntimeError("shipping failed"), context=context)
    assert again["recovery_status"] == "success" and again["compensations_run"] == 1
    assert refunds == ["refund"] and released == ["release"]  # no double refund
    assert undos == []
    done = await recovery.recover_from_error(RuntimeError("shipping failed"), context=context)
    assert done["recovery_status"] == "success" and done["compensations_run"] == 0
    assert refunds == ["refund"] and released == ["release"]


async def test_rolling_back_a_used_compensations_stack_says_nothing_is_left_to_undo():
    from otel_recovery.interaction import ErrorRecoveryInteraction, RecoveryAction

    ran: list[str] = []
    saga = Compensations()
    saga.add(lambda: ran.append("refund"), name="refund")
    recovery = ErrorRecoveryInteraction()
    context = {"strategy": RecoveryAction.TRANSACTION_ROLLBACK, "compensations": saga}
    first = await recovery.recover_from_error(RuntimeError("x"), context=context)
    assert first["recovery_status"] == "success" and ran == ["refund"]
    again = await recovery.recover_from_error(RuntimeError("x"), context=context)
    assert again["recovery_status"] == "success" and again["compensations_run"] == 0
    assert "needs context" not in str(again.get("reason")) and ran == ["refund"]


@pytest.mark.parametrize("shared", ["list", "stack"])
async def test_two_recoveries_rolling_back_the_same_undos_at_once_run_each_undo_once(shared):
    """Each recovery made its own stack of the list (or both ran the one stack): every undo
    ran twice, or an older undo ran while a newer one was still awaiting."""
    from otel_recovery.interaction import ErrorRecoveryInteraction, RecoveryAction

    ran: list[str] = []
    refund_started, refund_may_finish = asyncio.Event(), asyncio.Event()

    async def refund() -> None:
        ran.append("refund started")
        refund_started.set()
        await refund_may_finish.wait()
        ran.append("refund done")

    def cancel_order() -> None:
        ran.append("cancel order")

    undos: list | Compensations = [cancel_order, refund]  # in the order their steps ran
    if shared == "stack":
        undos = Compensations()
        undos.add(cancel_order, name="cancel order")
        undos.add(refund, name="refund")
    context = {"strategy": RecoveryAction.TRANSACTION_ROLLBACK, "compensations": undos}
    recovery = ErrorRecoveryInteraction()
    first = asyncio.create_task(recovery.recover_from_error(RuntimeError("x"), context=context))
    await refund_started.wait()
    # (bounded: run twice, the second refund would wait for the first's release forever)
    second = await asyncio.wait_for(
        recovery.recover_from_error(RuntimeError("x"), context=context), 10
    )
    assert second["recovery_status"] == "failed"
    assert "another recovery is rolling these compensations back" in second["reason"]
    refund_may_finish.set()
    assert (await first)["recovery_status"] == "success"
    assert ran == ["refund started", "refund done", "cancel order"]
    assert len(undos) == 0


async def test_a_rollback_cancelled_mid_undo_leaves_the_list_with_what_is_owed():
    from otel_recovery.interaction import ErrorRecoveryInteraction, RecoveryAction

    ran: list[str] = []
    refund_started = asyncio.Event()
    saga = _checkout_saga(ran, refund_started)
    undos = [undo for _, undo in saga.pending]
    context = {"strategy": RecoveryAction.TRANSACTION_ROLLBACK, "compensations": undos}
    recovery = ErrorRecoveryInteraction()
    task = asyncio.create_task(recovery.recover_from_error(RuntimeError("x"), context=context))
    await refund_started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert ran == [] and len(undos) == 3
    result = await recovery.recover_from_error(RuntimeError("x"), context=context)
    assert result["recovery_status"] == "success" and result["compensations_run"] == 3
    assert ran == ["refund", "release stock", "cancel order"] and undos == []


# -- run_transaction against PostgreSQL -----------------------------------------------------

psycopg = pytest.importorskip("psycopg")


def _connect():
    try:
        return psycopg.connect(DSN, autocommit=True)
    except psycopg.OperationalError as error:
        if os.environ.get("CI") == "true":
            pytest.fail(f"PostgreSQL on 127.0.0.1:5432 is required in CI: {error}")
        pytest.skip(f"PostgreSQL on 127.0.0.1:5432 unreachable: {error}")


@pytest.fixture
def table():
    name = f"otel_recovery_tx_{uuid.uuid4().hex[:10]}"
    with _connect() as conn:
        conn.execute(f"CREATE TABLE {name} (id int PRIMARY KEY, value int NOT NULL)")
        conn.execute(f"INSERT INTO {name} VALUES (1, 0), (2, 0)")
    yield name
    with _connect() as conn:
        conn.execute(f"DROP TABLE IF EXISTS {name}")


def test_concurrent_serializable_increments_all_land_through_run_transaction(table):
    """Real 40001s: 8 threads x 10 read-modify-write increments at SERIALIZABLE."""
    conflicts = []

    def increment(conn):
        conn.execute("SET TRANSACTION ISOLATION LEVEL SERIALIZABLE")
        (value,) = conn.execute(f"SELECT value FROM {table} WHERE id = 1").fetchone()
        conn.execute(f"UPDATE {table} SET value = %s WHERE id = 1", (value + 1,))

    def worker() -> None:
        with _connect() as conn:
            for _ in range(10):
                run_transaction(conn, increment, retry=_counting_retry(conflicts), telemetry=False)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    with _connect() as conn:
        (value,) = conn.execute(f"SELECT value FROM {table} WHERE id = 1").fetchone()
    assert value == 80  # nothing lost, nothing doubled
    assert conflicts, "the test must actually provoke serialization failures"
    assert set(conflicts) <= {"40001", "40P01"}


def _counting_retry(conflicts: list[str]):
    from otel_recovery.policies import ExponentialBackoff, Retry

    def on(error: BaseException) -> bool:
        code = getattr(error, "sqlstate", None)
        if code in ("40001", "40P01"):
            conflicts.append(code)
            return True
        return False

    return Retry(50, on=on, backoff=ExponentialBackoff(0.001, maximum=0.05))


def test_deadlock_victim_is_rerun_and_both_transfers_complete(table):
    """Real 40P01: two transactions lock rows 1 and 2 in opposite orders."""
    barrier = threading.Barrier(2)
    attempts = {"a": 0, "b": 0}

    def transfer(first: int, second: int, key: str):
        def body(conn):
            attempts[key] += 1
            conn.execute(f"UPDATE {table} SET value = value + 1 WHERE id = %s", (first,))
            if attempts[key] == 1:
                barrier.wait(timeout=10)  # both hold their first lock now
            conn.execute(f"UPDATE {table} SET value = value + 1 WHERE id = %s", (second,))

        return body

    errors = []

    def run(first: int, second: int, key: str) -> None:
        try:
            with _connect() as conn:
                conn.execute("SET deadlock_timeout = '100ms'")
                own = Retry(3, backoff=FixedBackoff(0.01))  # still reruns the victim
                run_transaction(conn, transfer(first, second, key), retry=own, telemetry=False)
        except Exception as error:  # pragma: no cover - reported below
            errors.append(error)

    threads = [
        threading.Thread(target=run, args=(1, 2, "a")),
        threading.Thread(target=run, args=(2, 1, "b")),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    with _connect() as conn:
        rows = dict(conn.execute(f"SELECT id, value FROM {table} ORDER BY id").fetchall())
    assert rows == {1: 2, 2: 2}
    assert sorted(attempts.values()) == [1, 2]  # exactly one victim, run exactly twice


@pytest.mark.parametrize(
    "retry", [None, Retry(3, on=Exception, backoff=FixedBackoff(0))], ids=["default", "own"]
)
def test_other_errors_roll_back_and_propagate_without_retry(table, retry):
    """With the caller's own ``Retry`` too: it sets how often, not what is retried (a lost
    COMMIT retried would apply the transaction twice)."""
    calls = 0

    def body(conn):
        nonlocal calls
        calls += 1
        conn.execute(f"UPDATE {table} SET value = 99 WHERE id = 1")
        conn.execute(f"INSERT INTO {table} VALUES (1, 1)")  # unique violation, 23505

    with _connect() as conn, pytest.raises(psycopg.errors.UniqueViolation):
        run_transaction(conn, body, retry=retry, telemetry=False)
    assert calls == 1
    with _connect() as conn:
        (value,) = conn.execute(f"SELECT value FROM {table} WHERE id = 1").fetchone()
    assert value == 0  # rolled back


def test_refuses_a_connection_already_inside_a_transaction(table):
    with psycopg.connect(DSN) as conn:  # not autocommit: the SELECT opens a transaction
        conn.execute("SELECT 1")
        with pytest.raises(ValueError, match="outside any transaction"):
            run_transaction(conn, lambda c: None, telemetry=False)


def test_an_async_body_or_connection_is_refused_naming_arun_transaction(table):
    """The sync form with an async body would commit an empty transaction (the coroutine
    never awaited); with an async connection, fail on ``with`` about context managers."""

    async def body(conn):
        await conn.execute(f"UPDATE {table} SET value = 1 WHERE id = 1")

    with _connect() as conn:
        with pytest.raises(TypeError, match=r"use `await arun_transaction\(conn, fn\)`"):
            run_transaction(conn, body, telemetry=False)
        with pytest.raises(TypeError, match="which returned an awaitable"):
            run_transaction(conn, lambda c: body(c), telemetry=False)
        assert conn.info.transaction_status == 0  # rolled back, nothing left open

    async def with_async_connection() -> None:
        aconn = await psycopg.AsyncConnection.connect(DSN, autocommit=True)
        try:
            with pytest.raises(TypeError, match="the async connection"):
                run_transaction(aconn, lambda c: None, telemetry=False)
        finally:
            await aconn.close()

    asyncio.run(with_async_connection())


async def test_asyncpg_pool_transaction_is_rerun_on_serialization_failure(table):
    asyncpg = pytest.importorskip("asyncpg")
    pool = await asyncpg.create_pool(ASYNCPG_DSN, min_size=2, max_size=4)
    conflicts: list[str] = []
    try:

        async def increment(conn):
            await conn.execute("SET TRANSACTION ISOLATION LEVEL SERIALIZABLE")
            value = await conn.fetchval(f"SELECT value FROM {table} WHERE id = 2")
            await asyncio.sleep(0.001)
            await conn.execute(f"UPDATE {table} SET value = $1 WHERE id = 2", value + 1)

        await asyncio.gather(
            *(
                arun_transaction(pool, increment, retry=_counting_retry(conflicts), telemetry=False)
                for _ in range(12)
            )
        )
        assert await pool.fetchval(f"SELECT value FROM {table} WHERE id = 2") == 12
        assert conflicts
    finally:
        await pool.close()


async def test_psycopg_async_connection(table):
    async with await psycopg.AsyncConnection.connect(DSN, autocommit=True) as conn:

        async def body(c):
            await c.execute(f"UPDATE {table} SET value = value + 5 WHERE id = 1")

        await arun_transaction(conn, body, telemetry=False)
        cur = await conn.execute(f"SELECT value FROM {table} WHERE id = 1")
        assert (await cur.fetchone())[0] == 5


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_forked_child_runs_what_its_parent_thread_had_not_run_yet():
    """The stack's "being run" mark belongs to a thread the child does not have: it is
    cleared there, or every compensate() in the child would be refused for good."""
    ran: list[str] = []
    started, release = threading.Event(), threading.Event()
    saga = Compensations()
    saga.add(lambda: ran.append("cancel order"), name="cancel order")
    saga.add(lambda: started.set() or release.wait(10), name="slow refund")
    thread = threading.Thread(target=saga.compensate)
    thread.start()
    assert started.wait(10)  # the refund is running in the thread
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child's verdict is its exit code
        try:
            failures = saga.compensate()
            os._exit(0 if failures == [] and ran == ["cancel order"] else 1)
        except BaseException:
            os._exit(2)
    _, status = os.waitpid(pid, 0)
    release.set()
    thread.join(10)
    assert os.waitstatus_to_exitcode(status) == 0
    assert ran == ["cancel order"] and len(saga) == 0
