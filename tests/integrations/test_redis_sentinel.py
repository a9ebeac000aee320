"""Redis under Sentinel with real failovers, with and without us: 1 master, 2 replicas, 3
sentinels (``integrations.redis_sentinel``).

Clients are built as production code builds them, ``Sentinel([...]).master_for("svc")`` /
``slave_for("svc")`` (sync) and ``redis.asyncio.sentinel.Sentinel`` (async): every new
connection asks the sentinels for the master (or a replica) first. Faults are real: a
planned failover (``SENTINEL FAILOVER``), the master killed (SIGKILL) or stopped (SIGSTOP)
and the sentinels' automatic failover, a former master demoted under connected clients
(``READONLY``), a replica dying under ``slave_for``. Every scenario runs redis-py alone
(``baseline``) and under ``RedisRecoveryInstrumentor`` (alone, contrib first, ours first);
the instrumented stacks must never do worse than the baseline: no error the application did
not get before, no write applied twice, no circuit left open against a healthy server.

Seen, as without us (redis-py and Sentinel themselves):

- After a planned failover the former master stays a master for some ten seconds, until the
  sentinels convert it; a pooled connection keeps writing to it and those writes are lost
  (split brain). The sentinel leading the failover lists the old master (flagged
  ``failover_in_progress``) in ``SENTINEL MASTERS`` until the failover ends, and redis-py
  takes it: a connection made then goes to the old master too.
- An idle pooled connection killed by the demotion (``CLIENT KILL TYPE normal``) or by the
  master's death is replaced when the pool hands it out (redis-py's ``can_read`` check): no
  error. Only a command in flight at that moment fails.
- On a Sentinel-managed connection to a master, ``READONLY`` becomes a ``ConnectionError``
  ("The previous master is now a slave"). redis-py's own ``Retry`` repeats it, but
  reconnects the same connection object to the address it cached (``send_packed_command``
  calls ``connect_check_health``, not the Sentinel ``connect()`` that asks the sentinels), so
  every repeat meets ``READONLY`` on the old master again (redis-py 8.1); only the next call
  asks the sentinels. Our retry is such a next call.

Found: a Sentinel-managed pool's target is its service name with redis-py's default port
(``redis svc:6379``): one breaker and one budget for the ``master_for`` and ``slave_for``
pools of the service, and for every master it will ever have. The master's failures open a
circuit that refuses reads from the healthy replicas, a circuit opened while the master was
down refuses the new master after the failover (``breaker_open_seconds``, 30 s by default,
where redis-py alone is served at once), and the recovery span names a server that does not
exist. Those tests assert the correct behaviour.

Clients are built as the README advises for one retry layer (``retry=Retry(NoBackoff(), 0)``),
except where a test says otherwise, so what is repeated is ours alone.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest
from instrumentors.test_redis import events
from opentelemetry.trace import SpanKind, StatusCode
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from integrations.outcomes import aoutcome, aoutcome_of, healed_stacks, outcome
from integrations.redis_cluster import wait_for
from integrations.redis_sentinel import SERVICE, PrivateSentinel, SentinelStack, module_sentinel

pytestmark = [pytest.mark.server]

STACKS = ["baseline", "ours_only", "contrib_first"]


@pytest.fixture(scope="module")
def setup() -> Iterator[PrivateSentinel]:
    with module_sentinel() as made:
        yield made


@pytest.fixture
def stacks(setup: PrivateSentinel) -> Iterator[Any]:
    """``stacks(order, **settings)``: a new :class:`SentinelStack`; all of them are closed and
    the setup healed (a healthy topology, flushed) when the test ends, whatever happened."""
    yield from healed_stacks(
        lambda order, **settings: SentinelStack(setup, order, **settings), setup.heal
    )


def local_address(client: Any) -> str:
    """``host:port`` of the client's one pooled connection, as ``CLIENT KILL ADDR`` takes
    it."""
    (connection,) = client.connection_pool._available_connections
    host, port = connection._sock.getsockname()[:2]
    return f"{host}:{port}"


def connection_error(got: Any) -> bool:
    """``got`` is a ``redis.ConnectionError`` (``MasterNotFoundError``, our
    ``RedisCircuitOpenError`` and redis-py's own are)."""
    return isinstance(got, type) and issubclass(got, RedisConnectionError)


def span_of(stack: SentinelStack, name: str) -> Any:
    """The call's one span: contrib's ``name`` span or, without contrib, our ``recover``
    span (redis-py's own ``SENTINEL`` queries inside it have contrib spans of their own)."""
    finished = stack.exporter.get_finished_spans()
    if stack.contrib:
        found = [s for s in finished if s.name == name]
        assert len(found) == 1, [s.name for s in finished]
        assert found[0].kind is SpanKind.CLIENT
    else:
        found = [s for s in finished if s.name.startswith("recover redis ")]
        assert len(found) == 1, [s.name for s in finished]
    return found[0]


def no_open_circuit(stack: SentinelStack) -> None:
    states = stack.breakers()
    assert all(state == "closed" for state in states.values()), states


# -- 1. a planned failover: the old master demoted under its clients ------------------------


@pytest.mark.parametrize("order", STACKS)
async def test_planned_failover_readonly_then_the_conversion_kills_commands_in_flight(
    stacks: Any, setup: PrivateSentinel, order: str
) -> None:
    """``SENTINEL FAILOVER`` with sync and asyncio clients connected to the master.

    Split brain first, as without us: pooled connections keep writing to the old master.
    Then the old master becomes a replica under them (``REPLICAOF`` alone): reads still
    work; a write gets ``READONLY``, which redis-py's Sentinel connection turns into a
    ``ConnectionError`` after dropping the connection; we repeat a SET (reconnecting through
    the sentinels to the new master), never an INCR. Then the sentinels' conversion kills
    the old master's clients (``CLIENT KILL``) with a command in flight: an INCR is lost
    unapplied for everyone, a GET is repeated by us and reaches the new master, an idle
    connection is replaced by redis-py's pool without an error. No INCR is applied twice,
    and the failover opens no circuit."""
    stack = stacks(order)
    getter, setter, counter = stack.master(), stack.master(), stack.master()
    retried = stack.master(retries=3)  # redis-py's own retry on
    incr_victim, get_victim, idle = stack.master(), stack.master(), stack.master()
    asetter, acounter, aget_victim = stack.amaster(), stack.amaster(), stack.amaster()
    try:
        assert setter.set("k", "v") is True and counter.incr("n") == 1
        assert getter.get("k") == b"v" and retried.set("r", "v") is True
        assert incr_victim.incr("i") == 1 and get_victim.get("k") == b"v"
        assert idle.get("k") == b"v"
        assert await asetter.set("a", "v") is True and await acounter.incr("an") == 1
        assert await aget_victim.get("a") == b"v"
        setup.wait_replicated()
        old, new = setup.failover()
        stack.reset_counts()
        assert getter.set("split", "1") is True and stack.per_node[old.port, "SET"] == 1

        # the old master, a replica now: READONLY
        setup.demote(old, new, kill_clients=False)
        wait_for(lambda: old.replication().get("master_link_status") == "up", "no resync")
        stack.reset_counts()
        assert getter.get("k") == b"v" and stack.per_node[old.port, "GET"] == 1
        for incr in (lambda: counter.incr("n"), lambda: acounter.incr("an")):
            stack.reset_counts()
            assert await aoutcome_of(incr) is RedisConnectionError
            assert stack.attempts["execute_command"] == 1
            assert stack.per_node[old.port, "INCRBY"] == 1
            assert stack.per_node[new.port, "INCRBY"] == 0
        for write in (lambda: setter.set("k", "w"), lambda: asetter.set("a", "w")):
            stack.reset_counts()
            got = await aoutcome_of(write)
            assert stack.per_node[old.port, "SET"] == 1
            if stack.instrumented:
                assert got is True
                assert stack.attempts["execute_command"] == 2
                assert stack.per_node[new.port, "SET"] == 1
                span = span_of(stack, "SET")
                attrs = dict(span.attributes or {})
                assert attrs["otel_recovery.outcome"] == "success"
                assert attrs["otel_recovery.retry.attempts"] == 2
                assert len(events(span, "otel_recovery.attempt.failed")) == 1
                assert span.status.status_code is StatusCode.UNSET
                if stack.contrib:  # redis-py's reconnect asked a sentinel, inside the SET
                    asked = stack.spans_named("SENTINEL MASTERS")
                    assert asked and all(
                        a.parent is not None and a.parent.span_id == span.context.span_id
                        for a in asked
                    )
            else:
                assert got is RedisConnectionError
                assert stack.attempts["execute_command"] == 1
        # redis-py's own Retry reconnects the same connection object to the address it
        # cached (``send_packed_command`` -> ``connect_check_health``, not the Sentinel
        # ``connect()``): every repeat meets READONLY on the old master. We do not repeat
        # what it repeated; the next call asks the sentinels and reaches the new master.
        stack.reset_counts()
        assert outcome(lambda: retried.set("r", "w")) is RedisConnectionError
        assert stack.attempts["execute_command"] == 1
        assert stack.per_node[old.port, "SET"] == 4 and stack.per_node[new.port, "SET"] == 0
        if stack.instrumented:
            attrs = dict(span_of(stack, "SET").attributes or {})
            assert attrs["otel_recovery.retry.disallowed"] == "client_retried", attrs
        stack.reset_counts()
        assert retried.set("r", "w") is True and stack.per_node[new.port, "SET"] == 1

        # the sentinels' conversion kills the old master's clients: commands in flight (one
        # connection at a time first, by its address, then all of them)
        stack.reset_counts()
        kill = ("CLIENT", "KILL", "ADDR", local_address(incr_victim))
        stack.when_sent(old, "INCRBY", lambda: old.call(*kill))
        assert outcome(lambda: incr_victim.incr("i")) is RedisConnectionError
        assert stack.attempts["execute_command"] == 1
        assert stack.per_node[old.port, "INCRBY"] == 1 and stack.per_node[new.port, "INCRBY"] == 0
        stack.reset_counts()
        kill = ("CLIENT", "KILL", "ADDR", local_address(get_victim))
        stack.when_sent(old, "GET", lambda: old.call(*kill))
        got = outcome(lambda: get_victim.get("k"))
        assert stack.per_node[old.port, "GET"] == 1
        if stack.instrumented:
            assert got == b"w" and stack.attempts["execute_command"] == 2
            assert stack.per_node[new.port, "GET"] == 1
            assert dict(span_of(stack, "GET").attributes or {})["otel_recovery.outcome"] == (
                "success"
            )
        else:
            assert got is RedisConnectionError and stack.attempts["execute_command"] == 1
        stack.reset_counts()
        stack.when_sent(old, "GET", lambda: setup.demote(old, new))  # all of them, at once
        got = await aoutcome(lambda: aget_victim.get("a"))
        assert stack.per_node[old.port, "GET"] == 1
        if stack.instrumented:
            assert got == b"w" and stack.attempts["execute_command"] == 2
            assert stack.per_node[new.port, "GET"] == 1
        else:
            assert got is RedisConnectionError and stack.attempts["execute_command"] == 1
        stack.reset_counts()
        assert idle.get("k") == stack.value("k")  # killed while idle: replaced, no error
        assert stack.attempts["execute_command"] == 1 and stack.per_node[new.port, "GET"] == 1

        # every client reaches the new master; no INCR applied twice, the split write lost
        assert counter.incr("n") == 2 and await acounter.incr("an") == 2
        assert incr_victim.incr("i") == 2
        for key in ("n", "an", "i"):
            assert stack.value(key) == b"2", key
        assert stack.value("split") is None
        expected = b"w" if stack.instrumented else b"v"
        assert stack.value("k") == expected and stack.value("a") == expected
        if stack.instrumented:
            no_open_circuit(stack)
            assert stack.ours.targets is not None
            failed = sum(b.snapshot().failed_calls for b in stack.ours.targets.breakers())
            assert failed == 4, stack.breakers()  # 3 INCRs, the SET redis-py repeated
    finally:
        await stack.aclose_async()


# -- 2. the master killed or stopped, the sentinels' automatic failover --------------------


@pytest.mark.parametrize("order", ["baseline", "contrib_first"])
def test_killed_master_fails_until_the_failover_then_the_new_master_serves(
    stacks: Any, setup: PrivateSentinel, order: str
) -> None:
    """SIGKILL of the master. Until the sentinels fail over, a GET fails (we try it
    ``max_attempts`` times, each asking the sentinels again) and an INCR is tried once and
    never sent. The application keeps calling through the failover (default settings); as
    soon as the sentinels name the new master redis-py alone reaches it, and so must we: a
    circuit opened against the dead master must not refuse the new one."""
    stack = stacks(order)
    c = stack.master()
    assert c.set("k", "v") is True and c.incr("n") == 1
    setup.wait_replicated()
    dead = setup.master()
    dead.kill()
    stack.reset_counts()
    assert connection_error(outcome(lambda: c.get("k")))
    assert stack.attempts["execute_command"] == (3 if stack.instrumented else 1)
    stack.reset_counts()
    assert connection_error(outcome(lambda: c.incr("n")))
    assert stack.attempts["execute_command"] == 1 and stack.sent["INCRBY"] == 0
    calls, deadline = 0, time.monotonic() + 20
    while setup.named_master() in (None, dead.port) or calls < 25:
        got = outcome(lambda: c.get("k"))
        assert got == b"v" or connection_error(got), got
        calls += 1
        assert time.monotonic() < deadline, "the sentinels did not fail over"
        time.sleep(0.01)
    new = setup.master()
    # A call the dead master's open circuit refuses asks the sentinels at most once a second
    # per pool (_redis_sentinel._ASK_EVERY): the last one may have asked just before they
    # named the new master, so the refusals may go on for up to a second after that.
    wait_for(lambda: outcome(lambda: c.get("k")) == b"v", "no GET reached the new master", 3.0)
    stack.reset_counts()
    assert outcome(lambda: c.get("k")) == b"v", stack.breakers()
    assert stack.per_node[new.port, "GET"] == 1, (new.port, dict(stack.per_node))
    assert c.incr("n") == 2 and stack.value("n") == b"2"


@pytest.mark.parametrize("order", ["baseline", "ours_only"])
def test_stopped_master_incr_applied_once_reply_lost_and_get_recovers_after_failover(
    stacks: Any, setup: PrivateSentinel, order: str
) -> None:
    """SIGSTOP of the master past the socket timeout: an INCR times out (sent once, left in
    the frozen server's buffer); the sentinels fail over; an idle pooled connection still
    points at the frozen server, so redis-py alone times out once more where our retry
    reconnects through the sentinels to the new master."""
    stack = stacks(order)
    reader, writer = stack.master(), stack.master()
    assert writer.set("k", "v") is True and writer.incr("n") == 1 and reader.get("k") == b"v"
    setup.wait_replicated()
    frozen = setup.master()
    frozen.stop_answering()
    try:
        stack.reset_counts()
        assert outcome(lambda: writer.incr("n")) is RedisTimeoutError
        assert stack.attempts["execute_command"] == 1
        assert stack.per_node[frozen.port, "INCRBY"] == 1
        new = setup.wait_master_other_than(frozen)  # the sentinels' timing is under test
        stack.reset_counts()
        got = outcome(lambda: reader.get("k"))
        assert stack.per_node[frozen.port, "GET"] == 1
        if stack.instrumented:
            assert got == b"v"
            assert stack.attempts["execute_command"] == 2
            assert stack.per_node[new.port, "GET"] == 1
        else:
            assert got is RedisTimeoutError
            assert reader.get("k") == b"v"
        assert writer.incr("n") == 2 and stack.value("n") == b"2"
    finally:
        frozen.resume()  # it runs the INCR it finds in its buffer: applied there, reply lost
    wait_for(lambda: frozen.call("GET", "n") == b"2", "the frozen master did not run the INCR")
    assert stack.value("n") == b"2"  # the survivor applied each INCR once
    if stack.instrumented:
        no_open_circuit(stack)


# -- 3. slave_for: a replica dies under a read ----------------------------------------------


REPLICA_FAULTS = [("kill", "baseline"), ("kill", "ours_only"), ("stop", "baseline")] + [
    ("stop", "contrib_first")
]


@pytest.mark.parametrize(("fault", "order"), REPLICA_FAULTS)
def test_replica_dies_under_a_read_we_retry_on_the_other_replica(
    stacks: Any, setup: PrivateSentinel, fault: str, order: str
) -> None:
    """The replica a ``slave_for`` client is connected to is killed (or stops answering) as
    a GET is sent. redis-py alone fails that GET; our retry reconnects, and redis-py's
    round-robin over the sentinels' replicas picks the other one."""
    stack = stacks(order)
    writer, reader = stack.master(), stack.replica()
    assert writer.set("k", "v") is True
    setup.wait_replicated()
    assert reader.get("k") == b"v"
    (port,) = stack.connected_to(reader)
    victim = setup.node(port)
    (other,) = [n for n in setup.replicas() if n is not victim]
    stack.reset_counts()
    stack.when_sent(victim, "GET", victim.kill if fault == "kill" else victim.stop_answering)
    got = outcome(lambda: reader.get("k"))
    assert stack.per_node[victim.port, "GET"] == 1
    if stack.instrumented:
        assert got == b"v"
        assert stack.attempts["execute_command"] == 2
        assert stack.per_node[other.port, "GET"] == 1
        no_open_circuit(stack)
    else:
        assert got is (RedisConnectionError if fault == "kill" else RedisTimeoutError)
        assert stack.attempts["execute_command"] == 1
        assert reader.get("k") == b"v"
    assert writer.set("k", "w") is True  # the master is not concerned
    victim.resume()


# -- 4. names and breakers: one target per service --------------------------------------------


@pytest.mark.parametrize("order", ["ours_only", "contrib_first"])
def test_a_recovered_call_names_a_real_server_or_the_service(
    stacks: Any, setup: PrivateSentinel, order: str
) -> None:
    """The recovery span (without contrib: its name; with contrib: the policy attribute on
    contrib's span) names the server the call went to or the Sentinel service, not an
    address that does not exist (the service name as a host, with redis-py's default port):
    a replica pool counts on the service's replicas as one target."""
    stack = stacks(order)
    reader = stack.replica()
    assert stack.master().set("k", "v") is True
    setup.wait_replicated()
    assert reader.get("k") == b"v"
    (port,) = stack.connected_to(reader)
    victim = setup.node(port)
    stack.reset_counts()
    stack.when_sent(victim, "GET", victim.kill)
    assert reader.get("k") == b"v"
    span = span_of(stack, "GET")
    policy = dict(span.attributes or {})["otel_recovery.policy.name"]
    sentinels = ",".join(sorted(f"{host}:{port}" for host, port in setup.addresses()))
    sane = {f"redis {SERVICE} replicas@{sentinels}", f"redis {SERVICE} master@{sentinels}"}
    sane |= {f"redis 127.0.0.1:{n.port}" for n in setup.data}
    assert policy in sane, policy
    if not stack.contrib:
        assert span.name == f"recover {policy}"


@pytest.mark.parametrize("order", ["baseline", "ours_first"])
def test_a_dead_master_does_not_refuse_reads_from_the_healthy_replicas(
    stacks: Any, setup: PrivateSentinel, order: str
) -> None:
    """While the master is down (before the failover) writes fail, as without us; the
    replicas are up and ``slave_for`` reads are served by them. The master's failures may
    open a circuit, but not one that refuses the replicas (it opens after 4 calls here, 20
    by default)."""
    stack = stacks(order, breaker_window=4, breaker_minimum_calls=4)
    writer, reader = stack.master(), stack.replica()
    assert writer.set("k", "v") is True
    setup.wait_replicated()
    assert reader.get("k") == b"v"
    dead = setup.master()
    dead.kill()
    try:
        for _ in range(6):
            assert connection_error(outcome(lambda: writer.set("w", "1")))
        assert outcome(lambda: reader.get("k")) == b"v", stack.breakers()
    finally:  # back (empty) within down-after-milliseconds: no failover to wait for
        dead.start()


def test_the_module_setup_is_healthy_after_the_faults(setup: PrivateSentinel) -> None:
    """The heal between tests left one master, two replicas, three agreeing sentinels."""
    setup.wait_healthy()
    assert setup.master().role() == "master"
    assert all(node.role() == "slave" for node in setup.replicas())
