"""The pools' and ORMs' health checks our PostgreSQL instrumentors patch (``_health_checks``).

What a skipped check does to a real pool is tested beside each pool in this directory
(psycopg_pool sync and async, SQLAlchemy's ``pool_pre_ping`` sync and asyncio, Django). Here: when a
check is skipped (``CircuitBreaker.would_refuse()`` is tested with the breaker; here the
global switch and a dead connection), the patch lifecycle
(installed when the library is imported after ``instrument()``, shared by both instrumentors,
removed with the last), and that a failure of ours lets the check run untouched.
"""

from __future__ import annotations

import logging
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from psycopg_pool import ConnectionPool
from servers import PG_DSN, kill_idle, require_postgres

from otel_recovery.instrumentors import _wrapping
from otel_recovery.instrumentors._health_checks import HEALTH_CHECKS
from otel_recovery.instrumentors._wrapping import _wrapper_module
from otel_recovery.instrumentors.asyncpg import AsyncPGRecoveryInstrumentor
from otel_recovery.instrumentors.psycopg import PsycopgRecoveryInstrumentor
from otel_recovery.testing import recovery_disabled


def ours_on_top(owner: type, attribute: str) -> bool:
    return _wrapper_module(vars(owner)[attribute]).startswith("otel_recovery.")


# -- when a check is skipped -----------------------------------------------------------------


@pytest.fixture
def psycopg_ours() -> Iterator[PsycopgRecoveryInstrumentor]:
    instrumentor = PsycopgRecoveryInstrumentor()
    instrumentor.instrument()
    try:
        yield instrumentor
    finally:
        instrumentor.uninstrument()


@pytest.fixture
def connection() -> Iterator[psycopg.Connection[Any]]:
    require_postgres()
    with psycopg.connect(PG_DSN, autocommit=True) as conn:
        yield conn


@pytest.mark.server
def test_a_dead_connection_passes_the_skipped_check_and_fails_the_sent_one(
    psycopg_ours: PsycopgRecoveryInstrumentor, connection: psycopg.Connection[Any]
) -> None:
    """Skipped means not sent: while the circuit is open even a dead connection passes (the
    app's statement then fails fast on the circuit); with recovery switched off nothing of
    ours gates anything, so the check is sent and fails as the pool expects."""
    connection.execute("SELECT 1")  # the first call makes the server's breaker
    assert psycopg_ours.targets is not None
    (breaker,) = psycopg_ours.targets.breakers()
    kill_idle(connection.info.backend_pid)
    breaker.force_open()
    assert ConnectionPool.check_connection(connection) is None
    with recovery_disabled(), pytest.raises(psycopg.OperationalError):
        ConnectionPool.check_connection(connection)


# -- the patches' lifecycle -----------------------------------------------------------------


def test_both_instrumentors_share_the_patches_and_the_last_one_removes_them() -> None:
    psycopg_ours, asyncpg_ours = PsycopgRecoveryInstrumentor(), AsyncPGRecoveryInstrumentor()
    psycopg_ours.instrument()
    try:
        asyncpg_ours.instrument()
        assert ours_on_top(ConnectionPool, "check_connection")
        assert not _wrapper_module(vars(ConnectionPool)["check_connection"].__wrapped__).startswith(
            "otel_recovery."
        )  # one patch for both
        psycopg_ours.uninstrument()
        assert ours_on_top(ConnectionPool, "check_connection")
    finally:
        psycopg_ours.uninstrument()
        asyncpg_ours.uninstrument()
    assert isinstance(vars(ConnectionPool)["check_connection"], staticmethod)


def test_a_library_imported_after_instrument_is_patched_and_restored() -> None:
    """``opentelemetry-instrument`` instruments before the application imports its pool or
    ORM: the patch waits for the import. After ``uninstrument()`` nothing of ours is left, and
    a library first imported then is not patched at all."""
    script = textwrap.dedent(
        """
        import sys
        from otel_recovery.instrumentors._wrapping import _wrapper_module
        from otel_recovery.instrumentors.psycopg import PsycopgRecoveryInstrumentor

        def ours(owner, attribute):
            return _wrapper_module(vars(owner)[attribute]).startswith("otel_recovery.")

        assert "psycopg_pool" not in sys.modules and "sqlalchemy" not in sys.modules
        instrumentor = PsycopgRecoveryInstrumentor()
        instrumentor.instrument()
        from psycopg_pool import AsyncConnectionPool, ConnectionPool
        from sqlalchemy.engine.default import DefaultDialect
        patched = [
            ours(ConnectionPool, "check_connection"),
            ours(AsyncConnectionPool, "check_connection"),
            ours(DefaultDialect, "_do_ping_w_event"),
        ]
        instrumentor.uninstrument()
        restored = [
            type(vars(ConnectionPool)["check_connection"]) is staticmethod,
            not ours(DefaultDialect, "_do_ping_w_event"),
        ]
        instrumentor.instrument()
        again = ours(ConnectionPool, "check_connection")
        instrumentor.uninstrument()
        import django.db.backends.postgresql.base as django_pg
        untouched = not ours(django_pg.DatabaseWrapper, "is_usable")
        print(patched, restored, again, untouched)
        """
    )
    pytest.importorskip("django")
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["[True,", "True,", "True]", "[True,", "True]", "True", "True"]


@pytest.mark.server
def test_a_failing_guard_lets_the_check_run_and_is_reported_once(
    psycopg_ours: PsycopgRecoveryInstrumentor,
    connection: psycopg.Connection[Any],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    def broken(connection: Any) -> None:
        raise RuntimeError("guard bug")

    monkeypatch.setattr(HEALTH_CHECKS, "_guards", [broken])
    monkeypatch.setattr(_wrapping, "_reported", set())
    connection.close()
    with caplog.at_level(logging.ERROR, logger="otel_recovery"):
        for _ in range(2):  # the pool's own check, untouched: a closed connection fails it
            with pytest.raises(psycopg.OperationalError):
                ConnectionPool.check_connection(connection)
    reports = [r for r in caplog.records if "psycopg_pool ConnectionPool" in r.getMessage()]
    assert len(reports) == 1 and "guard bug" in str(reports[0].exc_info[1])
