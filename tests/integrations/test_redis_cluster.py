"""Redis Cluster under real faults, with and without us: 3 primaries, 3 replicas, failover.

The one-node cluster of ``tests/instrumentors/test_redis.py`` cannot fail over, redirect or
lose one shard while the others serve. Here a private six-node cluster
(``integrations.redis_cluster``) loses a primary to SIGKILL or SIGSTOP, has a replica promoted
(``CLUSTER FAILOVER TAKEOVER``: deterministic, no waiting for an election), has a slot
migrated (ASK, MOVED, TRYAGAIN) and goes ``CLUSTERDOWN``. Every scenario runs redis-py alone
(``baseline``) and under ``RedisRecoveryInstrumentor`` (alone, contrib first, ours first);
the instrumented stacks must never do worse than the baseline: no error the application did
not get before, no write applied twice, no circuit opened for a healthy node.

Clients are built as the README advises for one retry layer (redis-py's cluster ``retry``
with 0 retries), except where a test says otherwise, so what is repeated is ours alone.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from typing import Any

import pytest
from instrumentors.test_redis import events
from opentelemetry.trace import SpanKind, StatusCode
from redis.crc import key_slot
from redis.exceptions import ClusterDownError, ClusterError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from servers import aclose

from integrations.outcomes import aoutcome, healed_stacks, outcome
from integrations.redis_cluster import (
    REDIS_PY,
    STALE_ONCE,
    TIMEOUT,
    ClusterStack,
    PrivateCluster,
    key_on,
    module_cluster,
    wait_for,
)
from integrations.redis_process import RedisProcess
from otel_recovery.instrumentors._redis_routing import cluster_wide, shard_primary
from otel_recovery.policies.circuit_breaker import CircuitOpenError

pytestmark = [
    pytest.mark.server,
    pytest.mark.skipif(
        REDIS_PY < (5, 0), reason="redis-py < 5 has no cluster retry object to turn off"
    ),
]

STACKS = ["baseline", "contrib_first"]
"""The stacks most tests run on (``ours_only`` and ``ours_first`` run where a test names them:
each stack of a test that kills a node costs about 2 s of the suite)."""
K0, K1, K2 = key_on(0), key_on(1), key_on(2)
"""Keys on the first, second and third original primary's slots."""


@pytest.fixture(scope="module")
def cluster() -> Iterator[PrivateCluster]:
    with module_cluster() as made:
        yield made


@pytest.fixture
def stacks(cluster: PrivateCluster) -> Iterator[Any]:
    """``stacks(order, **settings)``: a new :class:`ClusterStack`; all of them are closed and
    the cluster healed (original topology, flushed) when the test ends, whatever happened."""
    yield from healed_stacks(
        lambda order, **settings: ClusterStack(cluster, order, **settings), cluster.heal
    )


def span_of(stack: ClusterStack, name: str) -> dict[str, Any]:
    """Attributes of the call's one span: contrib's ``name`` span or, without contrib, our
    ``recover`` span of the cluster call (the last to end: redis-py's own ``CLUSTER SLOTS``
    refreshes run through plain ``Redis`` clients inside it and may have theirs)."""
    if stack.order == "baseline":
        return {}
    finished = stack.exporter.get_finished_spans()
    if stack.contrib:
        found = [s for s in finished if s.name == name]
        assert len(found) == 1, [s.name for s in finished]
    else:
        found = [s for s in finished if s.name.startswith("recover redis ")]
        assert found, [s.name for s in finished]
    return dict(found[-1].attributes or {})


# -- 1. a primary killed, its replica promoted ---------------------------------------------


@pytest.mark.parametrize("order", STACKS)
def test_killed_primary_reads_fail_then_recover_via_the_promoted_replica(
    stacks: Any, cluster: PrivateCluster, order: str
) -> None:
    """While the shard has no primary a GET fails (we try it ``max_attempts`` times, each
    a fresh slot lookup); INCR is tried once and never reaches the dead node. After the
    takeover redis-py before 8.2 alone still fails once (its slot table was refreshed before
    the promotion, as the error happened); our retry refreshes it again and succeeds on the
    new primary. 8.2 refreshes as the next call starts: that call finds the heir at once,
    with or without us (:data:`STALE_ONCE`)."""
    stack = stacks(order)
    c = stack.cluster_client()
    assert c.set(K1, "v") is True and c.incr(K1 + "n") == 1
    cluster.wait_replicated()
    dead, heir = cluster.primaries[1], cluster.replicas[1]
    dead.kill()
    stack.reset_counts()
    assert outcome(lambda: c.get(K1)) is RedisConnectionError
    assert stack.attempts["execute_command"] == (3 if stack.instrumented else 1)
    stack.reset_counts()
    assert outcome(lambda: c.incr(K1 + "n")) is RedisConnectionError
    assert stack.attempts["execute_command"] == 1 and stack.sent["INCRBY"] == 0
    cluster.promote(heir, dead)
    stack.reset_counts()
    if not STALE_ONCE:
        assert c.get(K1) == b"v"
        assert stack.attempts["execute_command"] == 1
        assert stack.per_node[heir.port, "GET"] == 1
    elif stack.instrumented:
        assert c.get(K1) == b"v"
        assert stack.attempts["execute_command"] == 2
        assert stack.per_node[heir.port, "GET"] == 1
        attrs = span_of(stack, "GET")
        assert attrs["otel_recovery.outcome"] == "success"
        assert attrs["otel_recovery.retry.attempts"] == 2
    else:
        assert outcome(lambda: c.get(K1)) is RedisConnectionError
        assert c.get(K1) == b"v"
    stack.reset_counts()
    assert c.incr(K1 + "n") == 2  # once before the kill, once now: never twice
    assert stack.sent["INCRBY"] == 1 and stack.value(K1 + "n") == b"2"


@pytest.mark.parametrize("order", ["baseline", "contrib_first"])
def test_with_redis_pys_own_cluster_retry_a_failover_is_retried_once_by_redis_py(
    stacks: Any, cluster: PrivateCluster, order: str
) -> None:
    """redis-py's default cluster ``retry`` repeats connection errors itself (INCR too):
    we must not add attempts on top of it (``client_retried``)."""
    stack = stacks(order)
    c = stack.cluster_client(retries=3)
    assert c.set(K1, "v") is True
    cluster.wait_replicated()
    dead, heir = cluster.primaries[1], cluster.replicas[1]
    dead.kill()
    stack.reset_counts()
    assert outcome(lambda: c.get(K1)) is RedisConnectionError
    assert stack.attempts["execute_command"] == 1
    if stack.instrumented:
        attrs = span_of(stack, "GET")
        assert attrs["otel_recovery.retry.attempts"] == 1
        assert attrs["otel_recovery.retry.stop_reason"] == "not_retryable"
        assert attrs.get("otel_recovery.retry.disallowed") == "client_retried", attrs
    cluster.promote(heir, dead)
    stack.reset_counts()
    assert c.get(K1) == b"v"
    assert stack.attempts["execute_command"] == 1
    assert c.incr(K1 + "n") == 1 and stack.value(K1 + "n") == b"1"


@pytest.mark.skipif(REDIS_PY < (8, 2), reason="topology_refresh_min_interval came in 8.2")
def test_our_retries_keep_redis_pys_interval_between_slot_map_refreshes(
    stacks: Any, cluster: PrivateCluster
) -> None:
    """redis-py 8.2 runs the slot-map refresh an error asks for at most once per
    ``topology_refresh_min_interval`` (1 s by default), so that a fleet of clients does not
    flood a cluster that just lost a node. Our attempts are calls like any other: inside the
    interval they go where the current map says, the dead node, and refresh nothing; the
    first call after it refreshes and reaches the promoted replica. We never force a refresh
    (the README says to lower the interval for failovers seen sooner)."""
    interval = 4.0  # longer than the default, so the takeover surely fits inside it
    stack = stacks("ours_first")
    c = stack.cluster_client(topology_refresh_min_interval=interval)
    assert c.set(K1, "v") is True
    cluster.wait_replicated()
    refreshes = 0
    refresh = c.nodes_manager.initialize

    def counted(*args: Any, **kwargs: Any) -> Any:
        nonlocal refreshes
        refreshes += 1
        return refresh(*args, **kwargs)

    c.nodes_manager.initialize = counted  # type: ignore[method-assign]
    refresh()
    refreshed_at = time.monotonic()  # the interval runs from the end of a refresh
    dead, heir = cluster.primaries[1], cluster.replicas[1]
    dead.kill()
    cluster.promote(heir, dead)
    stack.reset_counts()
    assert outcome(lambda: c.get(K1)) is RedisConnectionError
    assert time.monotonic() - refreshed_at < interval, "the takeover outlasted the interval"
    assert stack.attempts["execute_command"] == 3 and refreshes == 0
    attrs = span_of(stack, "GET")
    assert attrs["otel_recovery.retry.attempts"] == 3
    assert attrs["otel_recovery.outcome"] == "failure"
    time.sleep(max(0.0, refreshed_at + interval - time.monotonic()) + 0.05)
    stack.reset_counts()
    assert c.get(K1) == b"v"
    assert stack.attempts["execute_command"] == 1 and refreshes == 1
    assert stack.per_node[heir.port, "GET"] == 1


@pytest.mark.parametrize("order", ["baseline", "ours_first"])
async def test_async_killed_primary_reads_recover_via_the_promoted_replica(
    stacks: Any, cluster: PrivateCluster, order: str
) -> None:
    stack = stacks(order)
    c = stack.acluster_client()
    try:
        assert await c.set(K1, "v") is True and await c.incr(K1 + "n") == 1
        cluster.wait_replicated()
        dead, heir = cluster.primaries[1], cluster.replicas[1]
        dead.kill()
        stack.reset_counts()
        assert await aoutcome(lambda: c.incr(K1 + "n")) is RedisConnectionError
        assert stack.attempts["execute_command"] == 1
        cluster.promote(heir, dead)
        stack.reset_counts()
        got = await aoutcome(lambda: c.get(K1))
        if got != b"v":  # redis-py alone: one failure on the stale slot table
            assert not stack.instrumented, got
            assert got is RedisConnectionError
            assert await c.get(K1) == b"v"
        assert await c.incr(K1 + "n") == 2
        assert stack.value(K1 + "n") == b"2"
    finally:
        await aclose(c)


# -- 2. a primary that stops answering: the write applied, its reply lost -------------------


@pytest.mark.parametrize("order", STACKS)
def test_stopped_primary_incr_is_applied_once_and_get_recovers_after_failover(
    stacks: Any, cluster: PrivateCluster, order: str
) -> None:
    stack = stacks(order)
    c = stack.cluster_client()
    assert c.set(K1, "v") is True
    cluster.wait_replicated()
    frozen, heir = cluster.primaries[1], cluster.replicas[1]
    frozen.stop_answering()
    stack.reset_counts()
    try:
        assert outcome(lambda: c.incr(K1 + "n")) is RedisTimeoutError
    finally:
        frozen.resume()  # it runs the INCR it finds in its socket buffer: applied, reply lost
    assert stack.attempts["execute_command"] == 1 and stack.sent["INCRBY"] == 1
    wait_for(lambda: frozen.call("GET", K1 + "n") == b"1", "the INCR was not applied")
    cluster.wait_replicated()
    frozen.stop_answering()
    cluster.promote(heir, frozen)
    stack.reset_counts()
    got = outcome(lambda: c.get(K1))
    if not STALE_ONCE:  # the refresh the timeout asked for runs as this call starts
        assert got == b"v"
        assert stack.attempts["execute_command"] == 1
    elif stack.instrumented:  # attempt 1 times out on the frozen node, 2 asks the heir
        assert got == b"v"
        assert stack.attempts["execute_command"] == 2
    else:
        assert got is RedisTimeoutError
        assert c.get(K1) == b"v"
    frozen.resume()
    assert stack.value(K1 + "n") == b"1"


@pytest.mark.parametrize("order", STACKS)
async def test_async_stopped_primary_incr_is_applied_once(
    stacks: Any, cluster: PrivateCluster, order: str
) -> None:
    stack = stacks(order)
    c = stack.acluster_client()
    try:
        assert await c.set(K1, "v") is True
        frozen = cluster.primaries[1]
        frozen.stop_answering()
        stack.reset_counts()
        try:
            assert await aoutcome(lambda: c.incr(K1 + "n")) is RedisTimeoutError
        finally:
            frozen.resume()
        assert stack.attempts["execute_command"] == 1 and stack.sent["INCRBY"] == 1
        wait_for(lambda: frozen.call("GET", K1 + "n") == b"1", "the INCR was not applied")
        got = await aoutcome(lambda: c.get(K1))
        if got != b"v":  # redis-py alone may fail once more on the reconnect
            assert not stack.instrumented, got
            assert await c.get(K1) == b"v"
        assert stack.value(K1 + "n") == b"1"
    finally:
        await aclose(c)


# -- 3. resharding: ASK and MOVED are routing, not failures -------------------------------


@pytest.mark.parametrize("order", STACKS)
def test_ask_and_moved_redirections_are_not_failures_and_not_our_attempts(
    stacks: Any, cluster: PrivateCluster, order: str
) -> None:
    stack = stacks(order, breaker_window=4, breaker_minimum_calls=4)
    c = stack.cluster_client()
    moved, stays = "{mig}a", "{mig}b"
    slot = key_slot(moved.encode())
    source = cluster.owner(slot)
    target = next(p for p in cluster.primaries if p is not source)
    assert c.set(moved, "1") is True and c.set(stays, "2") is True
    target.call("CLUSTER", "SETSLOT", str(slot), "IMPORTING", source.id)
    source.call("CLUSTER", "SETSLOT", str(slot), "MIGRATING", target.id)
    source.call("MIGRATE", "127.0.0.1", str(target.port), "", "0", "5000", "KEYS", moved)
    stack.reset_counts()
    assert c.get(moved) == b"1"  # source: ASK; target: ASKING + GET
    assert c.get(stays) == b"2"  # still on the source
    assert c.incr(moved) == 2  # ASK again: applied once, on the target
    assert stack.attempts["execute_command"] == 3
    assert stack.per_node[source.port, "GET"] == 2 and stack.per_node[target.port, "GET"] == 1
    assert stack.per_node[target.port, "ASKING"] == 2
    assert stack.per_node[target.port, "INCRBY"] == 1
    cluster.move_keys(slot, source, target)
    cluster.finish_migration(slot, source, target)
    stack.reset_counts()
    for _ in range(3):  # the first is MOVED from the source, then the table knows
        assert c.get(stays) == b"2"
    assert stack.attempts["execute_command"] == 3
    assert stack.per_node[source.port, "GET"] == 1 and stack.per_node[target.port, "GET"] == 3
    assert c.get(moved) == b"2"
    if stack.instrumented:
        assert stack.ours.targets is not None
        for breaker in stack.ours.targets.breakers():
            snapshot = breaker.snapshot()
            assert (snapshot.state, snapshot.failed_calls) == ("closed", 0), breaker.name


# -- 4. per-node breakers -------------------------------------------------------------------


@pytest.mark.parametrize("order", ["baseline", "ours_first"])
def test_a_dead_primary_does_not_open_the_circuit_for_the_healthy_ones(
    stacks: Any, cluster: PrivateCluster, order: str
) -> None:
    """One shard down is that shard's failure: calls to the other primaries go on exactly as
    with redis-py alone, and no breaker of a healthy node opens."""
    stack = stacks(order, breaker_window=4, breaker_minimum_calls=4)
    c = stack.cluster_client()
    default = c.get_default_node().port
    healthy = [p for p in cluster.primaries if p.port == default]
    dead = next(p for p in cluster.primaries if p.port != default)
    healthy += [p for p in cluster.primaries if p is not dead and p not in healthy]
    keys = {p.port: key_on(cluster.primaries.index(p)) for p in cluster.primaries}
    for port, key in keys.items():
        assert c.set(key, str(port)) is True
    cluster.serve_partially()  # on a loaded machine the reads below outlast node-timeout
    dead.kill()
    for _ in range(4):  # the dead node's own circuit may open: that is what it is for
        got = outcome(lambda: c.get(keys[dead.port]))
        assert got in (RedisConnectionError, CircuitOpenError), got
    for node in healthy:
        for _ in range(3):
            assert c.get(keys[node.port]) == str(node.port).encode()
    for node in healthy:
        breaker = stack.breaker(node)
        assert breaker is None or breaker.snapshot().state == "closed", stack.breakers()
    if stack.instrumented:
        breaker = stack.breaker(dead)
        assert breaker is not None and breaker.snapshot().failed_calls >= 1, stack.breakers()


@pytest.mark.parametrize("order", ["baseline", "contrib_first"])
async def test_async_a_dead_primary_does_not_open_the_circuit_for_the_healthy_ones(
    stacks: Any, cluster: PrivateCluster, order: str
) -> None:
    stack = stacks(order, breaker_window=4, breaker_minimum_calls=4)
    c = stack.acluster_client()
    try:
        await c.initialize()
        default = c.get_default_node().port
        dead = next(p for p in cluster.primaries if p.port != default)
        healthy = [p for p in cluster.primaries if p is not dead]
        keys = {p.port: key_on(cluster.primaries.index(p)) for p in cluster.primaries}
        for port, key in keys.items():
            assert await c.set(key, str(port)) is True
        cluster.serve_partially()  # on a loaded machine the reads below outlast node-timeout
        dead.kill()
        for _ in range(4):
            got = await aoutcome(lambda: c.get(keys[dead.port]))
            assert got in (RedisConnectionError, CircuitOpenError), got
        for node in healthy:
            for _ in range(3):
                assert await c.get(keys[node.port]) == str(node.port).encode()
        for node in healthy:
            breaker = stack.breaker(node)
            assert breaker is None or breaker.snapshot().state == "closed", stack.breakers()
    finally:
        await aclose(c)


# -- 5. cluster pipelines across the shards while one dies --------------------------------


@pytest.mark.parametrize("order", ["baseline", "ours_only"])
def test_cluster_pipeline_across_nodes_while_one_dies_never_double_applies(
    stacks: Any, cluster: PrivateCluster, order: str
) -> None:
    stack = stacks(order)
    c = stack.cluster_client()
    for key in (K0, K1, K2):
        assert c.set(key + "n", 0) is True
    cluster.wait_replicated()
    dead, heir = cluster.primaries[1], cluster.replicas[1]
    dead.kill()
    stack.reset_counts()
    pipe = c.pipeline()
    pipe.incr(K0 + "n").incr(K1 + "n").incr(K2 + "n").get(K0 + "n")
    got = outcome(pipe.execute)
    assert stack.attempts["execute"] == 1
    assert got is RedisConnectionError, got
    applied = {k: stack.value(k + "n") for k in (K0, K2)}
    assert set(applied.values()) <= {b"0", b"1"}, applied
    cluster.promote(heir, dead)
    pipe = c.pipeline()
    pipe.incr(K0 + "n").incr(K1 + "n").incr(K2 + "n")
    results = outcome(pipe.execute)
    if results is RedisConnectionError:  # the stale slot table, once
        pipe = c.pipeline()
        pipe.incr(K0 + "n").incr(K1 + "n").incr(K2 + "n")
        results = pipe.execute()
    assert results[1] == 1
    for key in (K0, K2):
        assert int(stack.value(key + "n")) == int(applied[key]) + 1


# -- 6. CLUSTERDOWN while a shard has no primary ------------------------------------------


@pytest.mark.parametrize("order", ["baseline", "ours_first"])
def test_clusterdown_reads_are_retried_as_the_readme_says_and_writes_are_not(
    stacks: Any, cluster: PrivateCluster, order: str
) -> None:
    """With no automatic failover (the harness turns it off), the cluster marks the dead
    primary FAIL after node-timeout and refuses every command with ``CLUSTERDOWN``; reads are retried
    (README: ``CLUSTERDOWN`` is retryable), INCR is not. A takeover ends it."""
    stack = stacks(order)
    c = stack.cluster_client()
    assert c.set(K0, "v") is True
    dead, heir = cluster.primaries[1], cluster.replicas[1]
    dead.kill()
    wait_for(
        lambda: b"cluster_state:fail" in cluster.primaries[0].call("CLUSTER", "INFO"),
        "the cluster did not go down",
    )
    stack.reset_counts()
    assert outcome(lambda: c.get(K0)) is ClusterDownError
    assert stack.attempts["execute_command"] == (3 if stack.instrumented else 1)
    if stack.instrumented:
        attrs = span_of(stack, "GET")
        assert attrs["otel_recovery.retry.attempts"] == 3
        assert attrs["otel_recovery.outcome"] == "failure"
    stack.reset_counts()
    assert outcome(lambda: c.incr(K0 + "n")) is ClusterDownError
    assert stack.attempts["execute_command"] == 1
    cluster.promote(heir, dead)
    wait_for(lambda: outcome(lambda: c.get(K0)) == b"v", "the cluster did not come back")
    assert stack.value(K0 + "n") is None


@pytest.mark.parametrize("order", STACKS)
def test_tryagain_mid_migration_is_redis_pys_to_repeat_not_ours(
    stacks: Any, cluster: PrivateCluster, order: str
) -> None:
    """A multi-key read whose keys are split by a migration gets ``TRYAGAIN``; redis-py
    repeats it itself (its request TTL, 16 sends) and then raises ``ClusterError``. We add
    no attempt of our own and open no circuit over it."""
    stack = stacks(order)
    c = stack.cluster_client()
    moved, stays = "{mig}a", "{mig}b"
    slot = key_slot(moved.encode())
    source = cluster.owner(slot)
    target = next(p for p in cluster.primaries if p is not source)
    assert c.set(moved, "1") is True and c.set(stays, "2") is True
    target.call("CLUSTER", "SETSLOT", str(slot), "IMPORTING", source.id)
    source.call("CLUSTER", "SETSLOT", str(slot), "MIGRATING", target.id)
    source.call("MIGRATE", "127.0.0.1", str(target.port), "", "0", "5000", "KEYS", moved)
    stack.reset_counts()
    assert outcome(lambda: c.execute_command("MGET", moved, stays)) is ClusterError
    assert stack.attempts["execute_command"] == 1
    assert stack.sent["MGET"] == stack.per_node[source.port, "MGET"] == 16
    if stack.instrumented:
        attrs = span_of(stack, "MGET")
        assert attrs["otel_recovery.retry.attempts"] == 1
        assert attrs["error.type"] == "redis.exceptions.ClusterError"


# -- 7. spans: one logical span per command, breaker named after the node -----------------


@pytest.mark.parametrize("order", ["contrib_first", "ours_first"])
def test_one_client_span_per_command_names_the_node_that_served_it(
    stacks: Any, cluster: PrivateCluster, order: str
) -> None:
    stack = stacks(order)
    c = stack.cluster_client()
    assert c.set(K1, "v") is True
    cluster.wait_replicated()
    dead, heir = cluster.primaries[1], cluster.replicas[1]
    dead.kill()
    cluster.promote(heir, dead)
    stack.reset_counts()
    assert c.get(K1) == b"v"
    spans = [s for s in stack.exporter.get_finished_spans() if s.name == "GET"]
    assert len(spans) == 1 and spans[0].kind is SpanKind.CLIENT
    span = spans[0]
    attrs = dict(span.attributes or {})
    assert attrs["otel_recovery.outcome"] == "success"
    assert attrs["otel_recovery.retry.attempts"] == 2
    assert len(events(span, "otel_recovery.attempt.failed")) == 1
    assert span.status.status_code is StatusCode.UNSET
    # A call runs under the policy (breaker and budget) of the shard's primary as the slot
    # map named it when the call began: the dead node, whose failure it was; redis-py then
    # learned the new map, so the next call runs under the heir's.
    assert attrs["otel_recovery.policy.name"] == f"redis 127.0.0.1:{dead.port}"
    stack.exporter.clear()
    assert c.get(K1) == b"v"
    (span,) = [s for s in stack.exporter.get_finished_spans() if s.name == "GET"]
    assert "otel_recovery.policy.name" not in (span.attributes or {})  # nothing to recover
    breaker = stack.breaker(heir)  # also counts redis-py's own CLUSTER SLOTS to the heir
    assert breaker is not None, stack.breakers()
    snapshot = breaker.snapshot()
    assert snapshot.successful_calls >= 1 and snapshot.failed_calls == 0, snapshot


def test_the_module_cluster_is_healthy_after_the_faults(cluster: PrivateCluster) -> None:
    """The heal between tests put the original topology back."""
    cluster.wait_healthy()
    for primary in cluster.primaries:
        assert primary.role() == "master"


# -- which shard a call counts on (review of the per-shard breakers) ---------------------


def test_a_call_counts_on_the_shard_redis_py_sends_it_to(
    stacks: Any, cluster: PrivateCluster
) -> None:
    """The shard we pick before the call is the one redis-py routes to: by the first key,
    after the key count of a script, after ``STREAMS``, by a channel; anything else counts
    on the cluster as a whole, never on a shard."""
    c = stacks("ours_only").cluster_client()
    key = key_on(1)
    owner = c.nodes_manager.slots_cache[c.keyslot(key)][0]
    assert owner.port == cluster.primaries[1].port
    for command in (
        ("GET", key),
        (b"GET", key),
        ("HSET", key, "f", "v"),
        ("EVAL", "return 1", 1, key),
        ("EVALSHA", "0" * 40, "1", key, "arg"),
        ("XREAD", "COUNT", 1, "STREAMS", key, "0"),
        ("PUBLISH", key, "m"),
    ):
        assert shard_primary(c, command) is owner, command
    for command in (
        ("EVAL", "return 1", 0),  # no key: redis-py picks a random node
        ("OBJECT", "ENCODING", key),  # a container command
        ("PING",),
        ("KEYS", "*"),
        ("DBSIZE",),
    ):
        assert shard_primary(c, command) is None, command
    assert cluster_wide(c)[0] == f"cluster {c.get_default_node().host}:{c.get_default_node().port}"


@pytest.mark.parametrize("order", ["baseline", "ours_only"])
def test_calls_no_one_shard_answers_for_never_open_a_healthy_shards_circuit(
    stacks: Any, cluster: PrivateCluster, order: str
) -> None:
    """Scripts on the dead shard count on it; a pipeline across shards, or a call sent to
    nodes the caller chose, counts on the cluster as a whole: none of them may open the
    circuit of the default node's (healthy) shard."""
    stack = stacks(order, breaker_window=4, breaker_minimum_calls=4)
    c = stack.cluster_client()
    default = c.get_default_node()
    dead = next(p for p in cluster.primaries if p.port != default.port)
    fine = next(p for p in cluster.primaries if p.port == default.port)
    on_dead, on_fine = key_on(cluster.primaries.index(dead)), key_on(cluster.primaries.index(fine))
    assert c.set(on_fine, "v") is True
    dead.kill()
    for _ in range(4):
        assert outcome(lambda: c.eval("return redis.call('GET', KEYS[1])", 1, on_dead)) in (
            RedisConnectionError,
            CircuitOpenError,
        )
        assert outcome(lambda: c.pipeline().get(on_fine).get(on_dead).execute()) in (
            RedisConnectionError,
            CircuitOpenError,
        )
    for _ in range(3):
        assert c.get(on_fine) == b"v"
    if stack.instrumented:
        breaker = stack.breaker(fine)
        assert breaker is not None and breaker.snapshot().state == "closed", stack.breakers()
        # the cross-shard pipelines' failures opened the cluster-wide circuit: calls that
        # no one shard answers for are refused for a while, shard calls are not
        # (named after the entry node when first needed: redis-py may have picked another
        # default node by then, after the dead shard's failure)
        wide = [state for name, state in stack.breakers().items() if " cluster " in name]
        assert wide == ["open"], stack.breakers()
        assert outcome(lambda: c.execute_command("PING", target_nodes=default)) is (
            CircuitOpenError
        )


PAUSE_MS = int((TIMEOUT + 1.1) * 1000)
"""How long ``paused_from_the_first_attempt`` pauses: its attempt times out if it reaches the
node within 1.1 s of the pause, which it does unless its thread stalls that long."""


@contextlib.contextmanager
def paused_from_the_first_attempt(stack: ClusterStack, node: RedisProcess) -> Iterator[None]:
    """``CLIENT PAUSE ALL`` on ``node`` issued as the call's next attempt starts (from inside
    it), so that attempt times out however late the call began: a pause of the socket
    timeout plus 0.15 s, issued before the call, was over before a call that started 0.15 s
    late reached the node. A second attempt waits for the pause to end (blocking, an asyncio
    test's loop too), and is answered; leaving the block waits for it too (Redis 7.0 answers
    no command during a pause ALL, ``CLIENT UNPAUSE`` included)."""
    first = stack.attempts["execute_command"] + 1

    def pause_or_wait(name: str, attempt: int) -> None:
        if (name, attempt) == ("execute_command", first):
            node.call("CLIENT", "PAUSE", str(PAUSE_MS), "ALL")
        elif (name, attempt) == ("execute_command", first + 1):
            node.call("PING")  # answered once the pause is over

    stack.before_attempt = pause_or_wait
    try:
        yield
    finally:
        stack.before_attempt = None
        node.call("PING")


@pytest.mark.parametrize("order", ["baseline", "contrib_first"])
def test_a_read_sent_to_a_node_the_caller_chose_is_ours_to_retry(
    stacks: Any, cluster: PrivateCluster, order: str
) -> None:
    """redis-py's cluster retry (on by default) repeats a command only where it picks the
    node itself: never one sent to a node object (``target_nodes=node``), which a slot-map
    refresh could leave stale. Such a read is therefore ours to repeat, while redis-py's
    retry covers a nodes flag (``target_nodes="primaries"``) and we add nothing to it.
    The fault: the node pauses clients from the first attempt on, past the socket timeout
    (``paused_from_the_first_attempt``)."""
    stack = stacks(order)
    c = stack.cluster_client(retries=3)
    paused = cluster.primaries[0]
    node = c.get_node(host="127.0.0.1", port=paused.port)
    assert node is not None and c.dbsize(target_nodes=node) == 0
    stack.reset_counts()
    with paused_from_the_first_attempt(stack, paused):
        if stack.instrumented:
            assert c.dbsize(target_nodes=node) == 0
        else:
            assert outcome(lambda: c.dbsize(target_nodes=node)) is RedisTimeoutError
    if stack.instrumented:
        assert stack.attempts["execute_command"] == 2
        assert stack.per_node[paused.port, "DBSIZE"] == 2
        attrs = span_of(stack, "DBSIZE")
        assert attrs["otel_recovery.outcome"] == "success", attrs
        assert attrs["otel_recovery.retry.attempts"] == 2
    else:
        assert stack.per_node[paused.port, "DBSIZE"] == 1
    wait_for(lambda: c.dbsize(target_nodes=node) == 0, "the pause did not end")
    stack.reset_counts()
    if stack.instrumented:
        stack.exporter.clear()
    # Issued before the call: redis-py's own retry rides it out whether the PING meets it
    # or, late, does not (each of its tries times out until the pause ends)
    paused.call("CLIENT", "PAUSE", str(int(TIMEOUT * 1000) + 150), "ALL")
    assert c.ping(target_nodes="primaries") is True  # redis-py repeats it on its own
    assert stack.attempts["execute_command"] == 1


@pytest.mark.parametrize("order", ["baseline", "ours_first"])
async def test_async_a_read_sent_to_a_node_the_caller_chose_is_ours_to_retry(
    stacks: Any, cluster: PrivateCluster, order: str
) -> None:
    stack = stacks(order)
    c = stack.acluster_client(retries=3)
    try:
        paused = cluster.primaries[0]
        assert await c.dbsize() >= 0  # the slot map is loaded on first use
        node = c.get_node(host="127.0.0.1", port=paused.port)
        assert node is not None
        stack.reset_counts()
        with paused_from_the_first_attempt(stack, paused):
            got = await aoutcome(lambda: c.dbsize(target_nodes=node))
        assert got == (0 if stack.instrumented else RedisTimeoutError)
        assert stack.per_node[paused.port, "DBSIZE"] == (2 if stack.instrumented else 1)
    finally:
        await aclose(c)


@pytest.mark.parametrize("order", ["baseline", "contrib_first", "ours_only"])
def test_calls_the_cluster_client_refuses_before_sending_never_open_a_circuit(
    stacks: Any, order: str
) -> None:
    """redis-py refuses, before sending anything, a transaction whose keys span slots
    (``CrossSlotTransactionError``) and a command with no key to route it by: the
    application's mistakes, which a healthy shard must not pay for with an open circuit."""
    stack = stacks(order, breaker_window=4, breaker_minimum_calls=4)
    c = stack.cluster_client()
    assert c.set(K0, "v") is True
    refused = set()
    for _ in range(6):
        pipe = c.pipeline(transaction=True)
        pipe.set(K0, "1")
        pipe.incr(K1)
        refused.add(outcome(pipe.execute))
        refused.add(outcome(lambda: c.execute_command("GET")))
    assert CircuitOpenError not in refused and RedisConnectionError not in refused, refused
    assert c.get(K0) == b"v" and c.set(K1, "w") is True and c.ping() is True
    if stack.instrumented:
        assert set(stack.breakers().values()) == {"closed"}, stack.breakers()
