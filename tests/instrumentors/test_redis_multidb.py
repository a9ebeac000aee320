"""redis-py's MultiDB client (sync and asyncio) under RedisRecoveryInstrumentor, against two
private redis-servers (``_redis_multidb``).

MultiDB's health checks are its failure detector: they run under ``suppress_recovery()``,
so a check's PING is sent once (not retried by us), reaches a server whose circuit of ours
is open, and counts on no breaker of ours; the application's commands through the client
still recover in our layer. ``attempts`` counts calls into redis-py beneath every layer (a
counting wrapper installed before we instrument, as ``test_redis.py``'s Harness does), by
command and server port: the checks PING, the tests' commands never do. Our timing runs on
a ``FakeClock``; MultiDB's own (its health-check interval) is real, and kept short.
"""

from __future__ import annotations

import importlib
import inspect
import logging
import subprocess
import sys
import textwrap
from typing import Any

import pytest
import redis
import redis.asyncio
from ours import marked_by_us
from redis.backoff import NoBackoff

from instrumentors.multidb_harness import (
    HAS_MULTIDB,
    KINDS,
    MultiHarness,
    database,
    eventually,
    h,
    initialized,
    maybe_await,
    multidb_client,
    needs_multidb,
    peek,
)
from otel_recovery.instrumentors import _redis_multidb, _wrapping
from otel_recovery.instrumentors._redis_multidb import MultiDBHealthChecks, _Site
from otel_recovery.instrumentors._wrapping import PatchSet
from otel_recovery.instrumentors.redis import RedisCircuitOpenError, RedisRecoveryInstrumentor

if HAS_MULTIDB:
    from redis.multidb.circuit import State
    from redis.multidb.exception import UnhealthyDatabaseException

__all__ = ["h"]  # the harness fixture

pytestmark = [
    pytest.mark.server,
    pytest.mark.filterwarnings("ignore:MultiDBClient is an experimental:UserWarning"),
    # redis-py's own: its health-check client is built from the sync database client's kwargs
    pytest.mark.filterwarnings("ignore:A synchronous redis.retry.Retry:UserWarning"),
]


# -- the health checks step aside -------------------------------------------------------------


@needs_multidb
@pytest.mark.parametrize("fault", ["killed", "stopped"])
@pytest.mark.parametrize("kind", KINDS)
async def test_a_health_check_of_a_dead_server_pings_it_once(
    h: MultiHarness, kind: str, fault: str
) -> None:
    """Each check sends one PING, as MultiDB asked: not retried by us, whose retries would
    hide a flapping server and delay MultiDB's failover. It counts on no breaker of ours,
    and contrib still traces it (a span without anything of ours)."""
    ours = h.instrument(contrib=True)
    async with initialized(multidb_client(kind, h)) as client:
        await maybe_await(client.set("k", "v"))  # the application's: counted on a's breaker
        assert ours.targets is not None
        breaker = ours.targets.known_breaker("127.0.0.1", h.a.port)
        assert breaker is not None
        before = breaker.snapshot()
        h.attempts.clear()
        h.exporter.clear()
        if fault == "killed":
            h.a.crash()
        else:
            h.a.stop_answering()
        try:
            for checks in (1, 2):
                with pytest.raises(UnhealthyDatabaseException):
                    await maybe_await(client.set_active_database(database(client, h.a)))
                assert h.pings(h.a) == checks
        finally:
            if fault == "stopped":
                h.a.resume()
    assert breaker.snapshot() == before
    pings = [s for s in h.exporter.get_finished_spans() if s.name == "PING"]
    assert len(pings) == 2 and marked_by_us(pings) == []


@needs_multidb
@pytest.mark.parametrize("kind", KINDS)
async def test_a_recovered_server_passes_its_checks_while_our_circuit_is_open(
    h: MultiHarness, kind: str
) -> None:
    """a dies: MultiDB's recurring checks find it, and our circuit for it is forced open
    (an operator's override, which nothing but ``reset()`` ends). a comes back: the next
    checks' PINGs reach it past our circuit, count on no breaker of ours, and report it
    healthy, so MultiDB can fail back to it. The application's commands are still ours to
    refuse: a circuit that merely opened would let the next one through as its probe
    (``test_redis_multidb_routing``), a forced one does not."""
    ours = h.instrument()
    async with initialized(multidb_client(kind, h, interval=0.05)) as client:
        await maybe_await(client.set("k", "v"))
        db_a = database(client, h.a)
        assert ours.targets is not None
        breaker = ours.targets.known_breaker("127.0.0.1", h.a.port)
        assert breaker is not None
        h.a.crash()
        assert await eventually(lambda: db_a.circuit.state is State.OPEN), "a never failed"
        breaker.force_open()
        before = breaker.snapshot()
        h.a.start_again()
        assert await eventually(lambda: db_a.circuit.state is State.CLOSED), (
            "MultiDB never saw a again"
        )
        assert breaker.snapshot() == before
        # a check's PING reached the restarted server past our circuit (its stats are new:
        # start_again asks INFO, not PING). Not counted from the attempts: a check that
        # started before the restart, counted then, may be the one that got through.
        stats = peek(h.a, "INFO", "commandstats")
        assert stats["cmdstat_ping"]["calls"] >= 1
        await maybe_await(client.set_active_database(db_a))  # a check, and the fail-back
        assert client.command_executor.active_database is db_a
        with pytest.raises(RedisCircuitOpenError):  # the application's, refused: forced open
            await maybe_await(client.get("k"))


# -- the application's commands go through our layer ----------------------------------------


@needs_multidb
@pytest.mark.parametrize("kind", KINDS)
async def test_the_applications_commands_recover_in_our_layer_and_only_they_count(
    h: MultiHarness, kind: str
) -> None:
    """A GET that meets a stopped server is retried by us beneath MultiDB and answered;
    a's breaker counts exactly the application's calls, none of the checks' PINGs. Once
    our circuit is open, our refusal is a failure to MultiDB's failure detector (here the
    first one fails over), and MultiDB's one resend is answered by b."""
    ours = h.instrument()
    retry = redis.retry.Retry if kind == "sync" else redis.asyncio.retry.Retry
    client = multidb_client(
        kind, h, min_num_failures=1, failure_rate_threshold=0.0, command_retry=retry(NoBackoff(), 1)
    )
    async with initialized(client):  # its first checks PING a and b
        await maybe_await(client.set("k", "a"))
        peek(h.b, "SET", "k", "b")
        await maybe_await(client.set_active_database(database(client, h.a)))  # a check of a
        assert h.pings(h.a) == 2
        h.attempts.clear()

        def resume_for_the_retry(name: str, port: int, count: int) -> None:
            if (name, port, count) == ("GET", h.a.port, 2):
                h.a.resume()

        h.before_attempt = resume_for_the_retry
        h.a.stop_answering()
        try:
            assert await maybe_await(client.get("k")) == b"a"
        finally:
            h.before_attempt = None
            h.a.resume()
        assert h.attempts["GET", h.a.port] == 2
        (span,) = [s for s in h.exporter.get_finished_spans() if s.name.startswith("recover")]
        assert dict(span.attributes or {})["otel_recovery.retry.attempts"] == 2
        assert ours.targets is not None
        breaker = ours.targets.known_breaker("127.0.0.1", h.a.port)
        assert breaker is not None
        counted = breaker.snapshot()
        # SET and GET (a call counts once, whatever its attempts): not the checks' PINGs
        assert (counted.successful_calls, counted.failed_calls) == (2, 0)
        breaker.force_open()
        h.attempts.clear()
        assert await maybe_await(client.get("k")) == b"b"
        assert h.attempts["GET", h.a.port] == 0 and h.attempts["GET", h.b.port] == 1
        assert database(client, h.a).circuit.state is State.OPEN
        assert breaker.snapshot().not_permitted_calls == counted.not_permitted_calls + 1


# -- the patch's lifecycle --------------------------------------------------------------------


@needs_multidb
def test_uninstrument_restores_the_original_methods() -> None:
    owners = [redis.multidb.client.MultiDBClient, redis.asyncio.multidb.client.MultiDBClient]
    originals = [vars(owner)["_check_db_health"] for owner in owners]
    ours = RedisRecoveryInstrumentor()
    for _round in (1, 2):  # and again after an uninstrument
        ours.instrument()
        try:
            for owner, original in zip(owners, originals):
                patched = vars(owner)["_check_db_health"]
                assert patched is not original and inspect.unwrap(patched) is original
                assert inspect.iscoroutinefunction(patched)
        finally:
            ours.uninstrument()
        for owner, original in zip(owners, originals):
            assert vars(owner)["_check_db_health"] is original


@needs_multidb
def test_a_client_module_imported_after_instrument_is_patched_and_restored() -> None:
    """``opentelemetry-instrument`` instruments before the application imports MultiDB: the
    patch waits for the import. After ``uninstrument()`` nothing of ours is left, and a
    module first imported then is not patched at all."""
    script = textwrap.dedent(
        """
        import inspect, sys
        from otel_recovery.instrumentors.redis import RedisRecoveryInstrumentor

        def ours(owner):
            method = vars(owner)["_check_db_health"]
            return inspect.unwrap(method) is not method

        assert not [m for m in sys.modules if m.startswith("redis.") and "multidb" in m]
        instrumentor = RedisRecoveryInstrumentor()
        instrumentor.instrument()
        from redis.asyncio.multidb.client import MultiDBClient as AsyncMultiDBClient
        patched = ours(AsyncMultiDBClient)
        instrumentor.uninstrument()
        restored = not ours(AsyncMultiDBClient)
        instrumentor.instrument()
        again = ours(AsyncMultiDBClient)
        instrumentor.uninstrument()
        from redis.multidb.client import MultiDBClient
        untouched = not ours(MultiDBClient) and not ours(AsyncMultiDBClient)
        print(patched, restored, again, untouched)
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["True", "True", "True", "True"]


def test_a_redis_py_without_multidb_patches_nothing_and_reports_nothing(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """redis-py 4.5 to 6 have no ``redis.multidb``: the hook waits for a module that never
    comes, and a module without the method is left alone; the import fails as it would."""
    checks = MultiDBHealthChecks(
        (
            _Site("redis.no_multidb_here.client", "MultiDBClient", "_check_db_health", "absent"),
            _Site("redis.client", "MultiDBClient", "_check_db_health", "no such class"),
            _Site("redis.client", "Redis", "_check_db_health", "no such method"),
        )
    )
    patches = PatchSet("test")
    patches.enabled = True
    with caplog.at_level(logging.ERROR, logger="otel_recovery"):
        checks.install(patches)
        with pytest.raises(ImportError):
            importlib.import_module("redis.no_multidb_here.client")
        patches.remove_all()
    assert not caplog.records
    assert not hasattr(redis.client.Redis, "_check_db_health")


@needs_multidb
@pytest.mark.parametrize("kind", KINDS)
async def test_a_failure_of_ours_lets_the_check_run_and_is_reported_once(
    h: MultiHarness,
    kind: str,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    def broken() -> Any:
        raise RuntimeError("suppression bug")

    h.instrument()
    monkeypatch.setattr(_redis_multidb, "suppress_recovery", broken)
    monkeypatch.setattr(_wrapping, "_reported", set())
    where = f"{'redis' if kind == 'sync' else 'redis.asyncio'} MultiDBClient._check_db_health"
    with caplog.at_level(logging.ERROR, logger="otel_recovery.instrumentors"):
        async with initialized(multidb_client(kind, h)) as client:
            for _check in (1, 2):
                await maybe_await(client.set_active_database(database(client, h.a)))
            assert await maybe_await(client.set("k", "v")) is True
    assert h.pings(h.a) == 3  # initialize's, and the two checks'
    assert [r.message for r in caplog.records] == [
        f"otel_recovery internal error in {where}; the call proceeds uninstrumented "
        "(reported once per site)"
    ]
