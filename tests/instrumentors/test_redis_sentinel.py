"""Which target a Sentinel-managed pool counts on (``_redis_sentinel.server_of``), without a
Sentinel deployment: the names a pool gets before any sentinel answers, and two deployments
whose sentinels are all down. The failovers themselves are in
``tests/integrations/test_redis_sentinel.py``."""

from __future__ import annotations

from typing import Any

import pytest
import redis.asyncio.sentinel
import redis.sentinel
from redis.backoff import NoBackoff
from redis.retry import Retry
from servers import free_port

from otel_recovery.instrumentors._redis_sentinel import server_of
from otel_recovery.instrumentors.redis import RedisCircuitOpenError, RedisRecoveryInstrumentor

SENTINELS = {"sync": redis.sentinel.Sentinel, "async": redis.asyncio.sentinel.Sentinel}


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_a_service_is_named_with_its_deployments_sentinels_sorted(mode):
    """Every deployment may call its master ``mymaster``: the replicas, and the master
    before it has connected, are named with the deployment's sentinels, sorted (the order
    they were given in, or the one redis-py moves them into, does not matter)."""
    kind = SENTINELS[mode]
    one = kind([("10.0.0.2", 26379), ("10.0.0.1", 26379)], sentinel_kwargs={"password": "s3"})
    same = kind([("10.0.0.1", 26379), ("10.0.0.2", 26379)])
    other = kind([("10.0.0.9", 26379)], password="pw")
    sorted_name = "@10.0.0.1:26379,10.0.0.2:26379"
    assert server_of(one.slave_for("mymaster").connection_pool) == (
        f"mymaster replicas{sorted_name}",
        None,
    )
    assert server_of(same.slave_for("mymaster").connection_pool)[0].endswith(sorted_name)
    assert server_of(one.master_for("mymaster").connection_pool) == (
        f"mymaster master{sorted_name}",
        None,
    )
    assert server_of(other.slave_for("mymaster").connection_pool) == (
        "mymaster replicas@10.0.0.9:26379",
        None,
    )


def test_the_names_are_bounded_and_hold_no_password():
    many = [(f"sentinel-{n:02d}.a-rather-long-domain.example", 26379) for n in range(40)]
    pool = (
        redis.sentinel.Sentinel(
            [("::1", 26379), *many], sentinel_kwargs={"password": "s3cret"}, password="pw"
        )
        .slave_for("svc", password="pw")
        .connection_pool
    )
    name, port = server_of(pool)
    assert port is None and name.startswith("svc replicas@[::1]:26379,sentinel-00.")
    assert len(name) < 300 and name.endswith(" more")
    assert "s3cret" not in name and "pw" not in name


def test_a_pool_whose_sentinels_cannot_be_read_is_named_by_its_service():
    class Pool:
        service_name = "svc"
        is_master = False
        sentinel_manager = None

    assert server_of(Pool()) == ("svc replicas", None)


def _outcome(call: Any) -> str:
    try:
        call()
    except Exception as error:
        return type(error).__name__
    return "ok"


def test_another_deployments_failures_do_not_open_this_ones_circuit():
    """Two deployments, one service name (``mymaster``), all sentinels down: the first one's
    failures open its own replicas' and master's circuits, and the second one's calls still
    go out (failing on their own, not refused)."""
    ours = RedisRecoveryInstrumentor()
    ours.instrument(max_attempts=1, breaker_window=2, breaker_minimum_calls=2)
    try:
        once = {"socket_timeout": 0.5, "retry": Retry(NoBackoff(), 0)}  # redis-py's own: off
        first = redis.sentinel.Sentinel([("127.0.0.1", free_port())], sentinel_kwargs=once)
        second = redis.sentinel.Sentinel([("127.0.0.1", free_port())], sentinel_kwargs=once)
        for role in ("slave_for", "master_for"):
            client = getattr(first, role)("mymaster", **once)
            outcomes = [_outcome(lambda c=client: c.get("k")) for _ in range(3)]
            assert outcomes[-1] == RedisCircuitOpenError.__name__, outcomes
            other = getattr(second, role)("mymaster", **once)
            assert _outcome(lambda c=other: c.get("k")) != RedisCircuitOpenError.__name__
        states = {b.name: b.state.value for b in ours.targets.breakers()}
        for role in ("replicas", "master"):
            mine = [name for name in states if name.startswith(f"redis mymaster {role}@")]
            assert len(mine) == 2, states
            assert sorted(states[name] for name in mine) == ["closed", "open"], states
    finally:
        ours.uninstrument()
