"""Every snippet of the original system's README, run as written.

The only change to each snippet is the import: ``from otel_recovery import ...`` instead of
``from error_recovery.error_recovery_interaction import ...``. The names the snippets leave
undefined (``operation``, ``process_request``, ``db``, ``sql``...) are supplied by the tests,
failing the way a real dependency would. Snippets build ``ErrorRecoveryInteraction()`` with
the real clock, so they run in testing mode: the retry path is exercised without waiting.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import pytest

from otel_recovery import testing


@pytest.fixture(autouse=True)
def _no_real_waits():
    with testing.testing_mode(attempts=3):
        yield


async def test_basic_error_recovery(capsys):
    calls = 0

    # fmt: off
    # --- seed: Usage -------------------------------------------------------------------
    from otel_recovery import ErrorRecoveryInteraction

    # Initialize recovery system
    recovery = ErrorRecoveryInteraction()

    # Basic error recovery
    async def risky_operation():
        # Your code that might fail
        nonlocal calls
        calls += 1
        if calls == 1:
            raise ConnectionResetError("connection reset by peer")

    try:
        result = await risky_operation()  # noqa: F841
    except Exception as error:
        recovery_result = await recovery.recover_from_error(
            error,
            context={
                "service_id": "my_service",
                "retry_func": risky_operation
            }
        )

        if recovery_result["recovery_status"] == "success":
            print("Recovered successfully!")
    # --- end seed --------------------------------------------------------------------------
    # fmt: on

    assert capsys.readouterr().out == "Recovered successfully!\n"
    assert calls == 2 and recovery_result["attempts"] == 1


async def test_circuit_breaker():
    class Unavailable(Exception):
        status_code = 503

    calls = 0

    async def operation():
        nonlocal calls
        calls += 1
        raise Unavailable("service unavailable")

    # fmt: off
    # --- seed: Circuit Breaker -----------------------------------------------------------
    from otel_recovery import CircuitBreaker

    breaker = CircuitBreaker(failure_threshold=5, timeout=60.0)
    # --- end seed --------------------------------------------------------------------------
    # fmt: on

    async def guarded():
        result = None
        # fmt: off
        # --- seed (continued) -------------------------------------------------------------
        if breaker.can_execute():
            try:
                result = await operation()
                breaker.record_success()
            except Exception:
                breaker.record_failure()
                raise
        # --- end seed ----------------------------------------------------------------------
        # fmt: on
        return result

    for _ in range(5):
        with pytest.raises(Unavailable):
            await guarded()
    assert await guarded() is None  # open: the operation is not called at all
    assert calls == 5 and breaker.state.value == "open"


async def test_checkpointing():
    from otel_recovery import ErrorRecoveryInteraction

    recovery = ErrorRecoveryInteraction()
    current_state = {"processed": 120, "cursor": "batch-7", "pending": ["a", "b"]}

    # fmt: off
    # --- seed: Checkpointing ------------------------------------------------------------
    # Create checkpoint before risky operation
    recovery.create_checkpoint("process_1", current_state)

    # Restore on failure
    result = await recovery._restore_checkpoint("process_1")
    # --- end seed --------------------------------------------------------------------------
    # fmt: on

    assert result["recovery_status"] == "success"
    assert result["state"] == current_state and result["state"] is not current_state


async def test_recovery_orchestration():
    from otel_recovery import RecoveryAction, RecoveryOrchestrator, RecoveryStrategy

    # fmt: off
    # --- seed: Recovery Orchestration ---------------------------------------------------
    orchestrator = RecoveryOrchestrator()

    # Define dependencies
    orchestrator.dependencies = {
        "api": ["database", "cache"],
        "frontend": ["api", "cdn"]
    }

    # Orchestrate recovery respecting dependencies
    results = await orchestrator.orchestrate_recovery(
        failed_services=["frontend", "api", "database"],
        recovery_plan={
            "database": RecoveryStrategy(action=RecoveryAction.RETRY),
            "api": RecoveryStrategy(action=RecoveryAction.CIRCUIT_BREAK),
            "frontend": RecoveryStrategy(action=RecoveryAction.FALLBACK)
        }
    )
    # --- end seed --------------------------------------------------------------------------
    # fmt: on

    assert set(results) == {"frontend", "api", "database"}
    assert results["api"]["status"] == "isolated"
    # nothing was registered to recover with: each says how to fix that
    assert results["database"]["status"] == "failed"
    assert "register_service('database', recover=...)" in results["database"]["reason"]
    assert results["frontend"]["status"] == "failed"
    assert "fallback=" in results["frontend"]["reason"]


async def test_recovery_orchestration_with_registered_services():
    from otel_recovery import RecoveryAction, RecoveryOrchestrator, RecoveryStrategy

    orchestrator = RecoveryOrchestrator()
    orchestrator.register_service("database", recover=lambda: "reconnected")
    orchestrator.register_service("frontend", fallback=lambda: "maintenance page")
    orchestrator.dependencies = {"api": ["database", "cache"], "frontend": ["api", "cdn"]}
    results = await orchestrator.orchestrate_recovery(
        failed_services=["frontend", "api", "database"],
        recovery_plan={
            "database": RecoveryStrategy(action=RecoveryAction.RETRY),
            "api": RecoveryStrategy(action=RecoveryAction.CIRCUIT_BREAK),
            "frontend": RecoveryStrategy(action=RecoveryAction.FALLBACK),
        },
    )
    assert {name: r["status"] for name, r in results.items()} == {
        "frontend": "fallback",
        "api": "isolated",
        "database": "success",
    }


async def test_statistics_and_monitoring(capsys):
    from otel_recovery import ErrorRecoveryInteraction

    recovery = ErrorRecoveryInteraction()
    await recovery.recover_from_error(ConnectionError(), context={"retry_func": lambda: "ok"})
    await recovery.recover_from_error(ValueError("bad"), context={"retry_func": lambda: "ok"})

    # fmt: off
    # --- seed: Statistics & Monitoring --------------------------------------------------
    # Get recovery statistics
    stats = recovery.get_recovery_stats()
    print(f"Success Rate: {stats['success_rate']:.2%}")
    print(f"Avg Recovery Time: {stats['avg_recovery_time']:.2f}s")
    print(f"Active Circuit Breakers: {stats['active_circuit_breakers']}")
    # --- end seed --------------------------------------------------------------------------
    # fmt: on

    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "Success Rate: 50.00%"
    assert re.fullmatch(r"Avg Recovery Time: \d+\.\d\ds", lines[1])
    assert lines[2] == "Active Circuit Breakers: 0"


@dataclass
class Request:
    path: str


@pytest.mark.parametrize(("failures", "expected"), [(1, "ok"), (9, "error")])
async def test_api_gateway_integration(failures, expected):
    from otel_recovery import ErrorRecoveryInteraction

    recovery = ErrorRecoveryInteraction()
    left = [failures]

    class BadGateway(Exception):
        status_code = 502

    async def process_request(request):
        if left[0]:
            left[0] -= 1
            raise BadGateway(f"upstream failed for {request.path}")
        return {"path": request.path}

    def success_response():
        return "ok"

    def error_response(result):
        assert result["recovery_status"] == "failed" and result["reason"]
        return "error"

    # fmt: off
    # --- seed: With API Gateway ---------------------------------------------------------
    async def api_handler(request):
        try:
            return await process_request(request)
        except Exception as error:
            result = await recovery.recover_from_error(
                error,
                context={
                    "service_id": "api_gateway",
                    "endpoint": request.path,
                    "retry_func": lambda: process_request(request)
                }
            )

            if result["recovery_status"] == "success":
                return success_response()
            else:
                return error_response(result)
    # --- end seed --------------------------------------------------------------------------
    # fmt: on

    assert await api_handler(Request("/orders/7")) == expected


async def test_database_operations_integration():
    from otel_recovery import ErrorRecoveryInteraction

    recovery = ErrorRecoveryInteraction()

    class DatabaseError(Exception):
        pass

    class OperationalError(DatabaseError):
        sqlstate = "08006"  # connection failure, as psycopg reports it

    class DB:
        def __init__(self) -> None:
            self.connected = False
            self.reconnects = 0

        async def query(self, sql):
            if not self.connected:
                raise OperationalError("server closed the connection unexpectedly")
            return [("row", sql)]

        def reconnect(self) -> None:
            self.reconnects += 1
            self.connected = True

    db = DB()
    sql = "SELECT 1"
    recovery.healing.register_reconnect("database", db.reconnect)

    # fmt: off
    # --- seed: With Database Operations -------------------------------------------------
    async def db_operation():
        try:
            return await db.query(sql)
        except DatabaseError as error:
            # Recovery system handles reconnection, retry, and failover
            return await recovery.recover_from_error(
                error,
                context={
                    "service_id": "database",
                    "operation": "query",
                    "retry_func": lambda: db.query(sql)
                }
            )
    # --- end seed --------------------------------------------------------------------------
    # fmt: on

    outcome = await db_operation()
    assert outcome["recovery_status"] == "success" and outcome["strategy"] == "self_heal"
    assert outcome["result"] == [("row", "SELECT 1")]
    assert db.reconnects == 1 and outcome["attempts"] == 1


async def test_database_operations_heal_a_real_connection_the_server_ended():
    """The seed's database example against a real PostgreSQL session ended by the server
    (``pg_terminate_backend``, as a restart or a failover does): psycopg raises
    ``AdminShutdown`` (57P01), which is a lost connection to heal, not one to retry on
    (older psycopg: a plain ``OperationalError``, a lost connection too)."""
    import psycopg

    from otel_recovery import ErrorRecoveryInteraction

    conninfo = "host=127.0.0.1 port=5432 user=postgres dbname=test"
    recovery = ErrorRecoveryInteraction(telemetry=False)

    class DB:
        def __init__(self) -> None:
            self.conn = psycopg.connect(conninfo, autocommit=True)
            self.reconnects = 0

        async def query(self, sql: str):
            return self.conn.execute(sql).fetchall()

        def reconnect(self) -> None:
            self.conn.close()
            self.conn = psycopg.connect(conninfo, autocommit=True)
            self.reconnects += 1

    db = DB()
    recovery.healing.register_reconnect("database", db.reconnect)
    pid = db.conn.info.backend_pid
    with psycopg.connect(conninfo, autocommit=True) as admin:
        admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
    try:
        # AdminShutdown (57P01); before psycopg 3.2.4, a plain OperationalError without it
        with pytest.raises(psycopg.OperationalError) as raised:
            await db.query("SELECT 1")
        outcome = await recovery.recover_from_error(
            raised.value,
            context={"service_id": "database", "retry_func": lambda: db.query("SELECT 1")},
        )
        assert outcome["recovery_status"] == "success" and outcome["strategy"] == "self_heal"
        assert outcome["result"] == [(1,)] and db.reconnects == 1
    finally:
        db.conn.close()
