"""MultiDB routes the application's commands to a database again while our circuit for its
server is still open: the next command is our circuit's probe, not a refusal
(``_redis_multidb_routing``).

Two breakers are stacked: MultiDB's circuit per database decides where the commands go, and
ours per server, beneath it, refuses them while it is open. Each runs on its own clock, so
MultiDB can fail back to a database that its checks found healthy again while our circuit
for it still has most of its open time to go; our refusals then count as failures to
MultiDB's failure detector, which fails over again, and a healthy database is shunned until
our open time ends. The tests make that happen on real servers, with the harness of
``test_redis_multidb``: our breaker on a ``FakeClock`` that never moves (its open time never
ends by itself), MultiDB's failure detector failing over on the first failure, its checks
every 50 ms.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from types import SimpleNamespace
from typing import Any

import pytest
import redis
import redis.asyncio
import redis.cluster
from redis.backoff import NoBackoff
from servers import PrivateRedis

from instrumentors.multidb_harness import (
    HAS_MULTIDB,
    KINDS,
    TIMEOUT,
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
from otel_recovery import CircuitState
from otel_recovery.instrumentors import _redis_multidb_routing, _wrapping
from otel_recovery.instrumentors.redis import RedisRecoveryInstrumentor
from otel_recovery.policies.circuit_breaker import CircuitBreaker, StateTransition
from otel_recovery.testing import FakeClock

if HAS_MULTIDB:
    import redis.asyncio.multidb.client
    import redis.asyncio.multidb.config
    import redis.asyncio.multidb.event
    import redis.multidb.client
    import redis.multidb.config
    import redis.multidb.event
    from redis.multidb.circuit import State

__all__ = ["h"]  # the harness fixture, shared with test_redis_multidb

pytestmark = [
    pytest.mark.server,
    pytest.mark.filterwarnings("ignore:MultiDBClient is an experimental:UserWarning"),
    pytest.mark.filterwarnings("ignore:A synchronous redis.retry.Retry:UserWarning"),
]

SMALL_WINDOW = {"breaker_window": 2, "breaker_minimum_calls": 2}
"""Our circuit opens when one call of the last two failed."""
FALLBACK = 0.05
"""MultiDB's ``auto_fallback_interval`` where the test fails back by it (real time: MultiDB
reads ``datetime.now()``)."""


def fails_over_at_once(kind: str) -> dict[str, Any]:
    """MultiDB options: its failure detector opens the active database's circuit on the
    first failed command, and MultiDB resends the command once (to the database it then
    makes active)."""
    retry = redis.retry.Retry if kind == "sync" else redis.asyncio.retry.Retry
    return {
        "min_num_failures": 1,
        "failure_rate_threshold": 0.0,
        "command_retry": retry(NoBackoff(), 1),
    }


def transitions(breaker: CircuitBreaker) -> list[tuple[str, str, str]]:
    """The transitions ``breaker`` makes from now on, as (from, to, reason)."""
    seen: list[tuple[str, str, str]] = []

    def heard(t: StateTransition) -> None:
        seen.append((t.from_state.value, t.to_state.value, t.reason))

    breaker.add_listener(heard)
    return seen


PROBED = [("open", "half_open", "multidb_active"), ("half_open", "closed", "probes_succeeded")]
"""Our circuit's transitions when MultiDB's routing ended its open time and the probe
(the application's next command) was answered."""


def our_breaker(ours: RedisRecoveryInstrumentor, port: int) -> CircuitBreaker:
    assert ours.targets is not None
    breaker = ours.targets.known_breaker("127.0.0.1", port)
    assert breaker is not None
    return breaker


async def fail_over_from_a(h: MultiHarness, client: Any) -> CircuitBreaker:
    """a dies under the application's GET: our retries fail, our circuit for a opens,
    MultiDB fails over to b and resends, and b answers. Then a comes back (empty: it is
    given its key again) and MultiDB's checks find it healthy; b is still the active
    database. Returns our circuit for a, open."""
    await maybe_await(client.set("k", "a"))
    peek(h.b, "SET", "k", "b")
    breaker = our_breaker(h.ours, h.a.port)
    h.a.crash()
    assert await maybe_await(client.get("k")) == b"b"
    db_a, db_b = database(client, h.a), database(client, h.b)
    assert breaker.state is CircuitState.OPEN
    assert client.command_executor.active_database is db_b
    h.a.start_again()
    peek(h.a, "SET", "k", "a")
    assert await eventually(lambda: db_a.circuit.state is State.CLOSED), "a never passed"
    return breaker


# -- MultiDB routing the commands back ends our open time -------------------------------------


@needs_multidb
@pytest.mark.parametrize("failback", ["automatic", "manual"])
@pytest.mark.parametrize("kind", KINDS)
async def test_a_failback_to_a_recovered_database_makes_the_next_command_our_probe(
    h: MultiHarness, kind: str, failback: str
) -> None:
    """a died and MultiDB failed over to b; a came back and passed MultiDB's checks, which
    moved nothing of ours. MultiDB fails back to it (by its ``auto_fallback_interval``, or
    ``set_active_database``) while our circuit for a is still open: MultiDB routing the
    commands there ends its open time, so the next GET is its probe, answered by a, and our
    circuit closes on that answer, not on a check's PING. Before, the GET was refused, the
    refusal failed a over once more, and b answered."""
    h.instrument(**SMALL_WINDOW)
    options = fails_over_at_once(kind)
    if failback == "automatic":
        options["auto_fallback_interval"] = FALLBACK
    async with initialized(multidb_client(kind, h, interval=0.05, **options)) as client:
        breaker = await fail_over_from_a(h, client)
        counted = breaker.snapshot()
        moves = transitions(breaker)
        assert breaker.state is CircuitState.OPEN  # the checks that passed moved nothing
        db_a = database(client, h.a)
        if failback == "manual":
            await maybe_await(client.set_active_database(db_a))
        else:  # due since the failover, FALLBACK ago at least: the next command fails back
            await asyncio.sleep(FALLBACK)
        h.attempts.clear()
        assert await maybe_await(client.get("k")) == b"a"
        assert client.command_executor.active_database is db_a
        assert db_a.circuit.state is State.CLOSED
        assert (h.attempts["GET", h.a.port], h.attempts["GET", h.b.port]) == (1, 0)
        assert moves == PROBED
        after = breaker.snapshot()  # the probe counted, no check did
        assert after.successful_calls == counted.successful_calls + 1
        assert after.failed_calls == counted.failed_calls


def single_database_client(kind: str, h: MultiHarness) -> Any:
    """A MultiDB client over ``h.a`` alone, checked every 50 ms, failing over at once."""
    config = redis.multidb.config if kind == "sync" else redis.asyncio.multidb.config
    client_class = (
        redis.multidb.client.MultiDBClient
        if kind == "sync"
        else redis.asyncio.multidb.client.MultiDBClient
    )
    kwargs = {"host": "127.0.0.1", "port": h.a.port, "socket_timeout": TIMEOUT}
    return client_class(
        config.MultiDbConfig(
            databases_config=[config.DatabaseConfig(weight=1.0, client_kwargs=kwargs)],
            health_check_interval=0.05,
            health_check_probes=1,
            health_check_delay=0.01,
            **fails_over_at_once(kind),
        )
    )


@needs_multidb
@pytest.mark.parametrize("kind", KINDS)
async def test_the_active_database_passing_its_checks_again_makes_the_next_command_our_probe(
    h: MultiHarness, kind: str
) -> None:
    """No database to fail over to (here the only one; or all of them down): a stays
    MultiDB's active database while it is down, and when its checks find it healthy again,
    MultiDB sends the commands to it again without changing the active database. That ends
    our circuit's open time as well: the next GET is its probe. Before, it was refused,
    MultiDB's failure detector opened a's circuit again, and the application had no database
    until our circuit's open time ended."""
    h.instrument(**SMALL_WINDOW)
    async with initialized(single_database_client(kind, h)) as client:
        db_a = database(client, h.a)
        await maybe_await(client.set("k", "a"))
        breaker = our_breaker(h.ours, h.a.port)
        h.a.crash()
        with pytest.raises(Exception):  # noqa: B017 - MultiDB's own "no database" error
            await maybe_await(client.get("k"))
        assert breaker.state is CircuitState.OPEN
        assert db_a.circuit.state is State.OPEN
        moves = transitions(breaker)

        h.a.start_again()
        peek(h.a, "SET", "k", "a")
        assert await eventually(lambda: db_a.circuit.state is State.CLOSED), "a never passed"
        assert client.command_executor.active_database is db_a
        assert await maybe_await(client.get("k")) == b"a"
        assert breaker.state is CircuitState.CLOSED and db_a.circuit.state is State.CLOSED
        assert moves == PROBED


@needs_multidb
def test_a_cluster_database_ends_the_open_time_of_its_nodes_circuits() -> None:
    """A MultiDB database may be a Redis Cluster (``client_class=RedisCluster``): our
    circuits for it are per shard, named after its primary, and each that is open ends its
    open time when MultiDB makes the database active. The event is built here as MultiDB
    builds it on a failover, over a one-node cluster of its own."""
    server = PrivateRedis(cluster=True)
    ours = RedisRecoveryInstrumentor()
    try:
        ours.instrument(clock=FakeClock(), **SMALL_WINDOW)
        client = redis.cluster.RedisCluster(host="127.0.0.1", port=server.port)
        try:
            assert client.set("k", "v") is True
            breaker = our_breaker(ours, server.port)
            breaker.record_failure()  # one call of the last two failed: open
            assert breaker.state is CircuitState.OPEN
            moves = transitions(breaker)
            old, new = SimpleNamespace(client=None), SimpleNamespace(client=client)
            redis.multidb.event.ActiveDatabaseChanged(old, new, None)
            assert moves == [PROBED[0]]
            assert client.get("k") == b"v"
            assert moves == PROBED
        finally:
            client.close()
    finally:
        ours.uninstrument()
        server.close()


# -- what it leaves alone ---------------------------------------------------------------------


@needs_multidb
def test_uninstrument_restores_the_event_constructors() -> None:
    sites = [
        (redis.multidb.event.ActiveDatabaseChanged, "__init__"),
        (redis.asyncio.multidb.event.AsyncActiveDatabaseChanged, "__init__"),
        (redis.multidb.client.MultiDBClient, "initialize"),
        (redis.asyncio.multidb.client.MultiDBClient, "initialize"),
        (redis.multidb.client.MultiDBClient, "_check_db_health"),
        (redis.asyncio.multidb.client.MultiDBClient, "_check_db_health"),
    ]
    originals = [vars(owner)[attribute] for owner, attribute in sites]
    ours = RedisRecoveryInstrumentor()
    for _round in (1, 2):  # and again after an uninstrument
        ours.instrument()
        try:
            for (owner, attribute), original in zip(sites, originals):
                patched = vars(owner)[attribute]
                assert patched is not original and inspect.unwrap(patched) is original
        finally:
            ours.uninstrument()
        for (owner, attribute), original in zip(sites, originals):
            assert vars(owner)[attribute] is original


@needs_multidb
@pytest.mark.parametrize("kind", KINDS)
async def test_a_failure_of_ours_leaves_multidb_to_route_as_without_us(
    h: MultiHarness,
    kind: str,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Should finding a database's servers fail, MultiDB initializes, fails over and back
    as it would without us (and our circuit refuses as it did before), and the failure is
    reported once for each site."""

    def broken(client: Any) -> Any:
        raise RuntimeError("routing bug")

    h.instrument(**SMALL_WINDOW)
    monkeypatch.setattr(_redis_multidb_routing, "servers_of", broken)
    monkeypatch.setattr(_wrapping, "_reported", set())
    sites = (
        ["redis MultiDBClient.initialize (routing)", "redis MultiDB ActiveDatabaseChanged"]
        if kind == "sync"
        else [
            "redis.asyncio MultiDBClient.initialize (routing)",
            "redis.asyncio MultiDB AsyncActiveDatabaseChanged",
        ]
    )
    client = multidb_client(kind, h, interval=0.05, **fails_over_at_once(kind))
    with caplog.at_level(logging.ERROR, logger="otel_recovery.instrumentors"):
        async with initialized(client):
            breaker = await fail_over_from_a(h, client)  # a failover: b made active
            await maybe_await(client.set_active_database(database(client, h.a)))
            assert client.command_executor.active_database is database(client, h.a)
            assert await maybe_await(client.get("k")) == b"b"  # refused, as before
            assert breaker.state is CircuitState.OPEN
    assert [r.message for r in caplog.records] == [
        f"otel_recovery internal error in {where}; the call proceeds uninstrumented "
        "(reported once per site)"
        for where in sites
    ]


@needs_multidb
@pytest.mark.parametrize("kind", KINDS)
async def test_a_client_initialized_while_our_circuit_is_open_makes_its_first_command_a_probe(
    h: MultiHarness, kind: str
) -> None:
    """A MultiDB client made (or made again, after it had no database) while our circuit for
    its server is still open: its initial checks pass and ``initialize()`` makes the
    database active without an ``ActiveDatabaseChanged`` event, which is MultiDB starting
    to send it the commands all the same. The first command is our circuit's probe. Before,
    it was refused, MultiDB's failure detector opened the database's circuit, and the new
    client had no database until our open time (or MultiDB's grace period) ended."""
    h.instrument(**SMALL_WINDOW)
    plain = redis.Redis(host="127.0.0.1", port=h.a.port, socket_timeout=TIMEOUT)
    try:
        plain.set("k", "a")  # through our layer: our circuit for a exists
    finally:
        plain.close()
    breaker = our_breaker(h.ours, h.a.port)
    breaker.record_failure()  # one call of the last two failed: open (the clock never moves)
    assert breaker.state is CircuitState.OPEN
    moves = transitions(breaker)
    async with initialized(single_database_client(kind, h)) as client:
        assert await maybe_await(client.get("k")) == b"a"
        assert client.command_executor.active_database is database(client, h.a)
    assert moves == PROBED
