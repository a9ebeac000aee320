"""One behavioural suite, run against every back end (memory, SQLite, Redis, PostgreSQL)."""

from __future__ import annotations

import threading

import pytest

from otel_recovery.checkpoint import (
    CheckpointConflictError,
    CheckpointError,
    CheckpointNotFoundError,
    Checkpoints,
)
from otel_recovery.interaction import ErrorRecoveryInteraction
from otel_recovery.stores import Record, Store, VersionConflictError


def test_every_backend_is_a_store(backend):
    assert isinstance(backend.open(), Store)


def test_versions_increase_and_every_kept_version_is_readable(backend):
    store = backend.open()
    assert [store.put("a", f"{n}".encode()).version for n in range(1, 4)] == [1, 2, 3]
    assert store.put("b", b"x").version == 1
    latest = store.get("a")
    assert isinstance(latest, Record)
    assert (latest.key, latest.version, latest.data, latest.encoding) == ("a", 3, b"3", "json")
    assert latest.created_at == pytest.approx(backend.clock.wall())
    assert store.get("a", 1).data == b"1"
    assert store.get("a", 9) is None and store.get("missing") is None


def test_versions_never_repeat_after_a_delete(backend):
    store = backend.open()
    store.put("a", b"1")
    store.put("a", b"2")
    assert store.delete("a") == 2
    assert store.get("a") is None and store.get("a", 1) is None
    assert store.put("a", b"3").version == 3
    assert store.delete("never-written") == 0


def test_only_the_newest_max_versions_are_kept(backend):
    store = backend.open("max_versions=3")
    for n in range(1, 7):
        store.put("k", str(n).encode())
    assert store.get("k").version == 6
    assert [store.get("k", n) is not None for n in range(1, 7)] == [False] * 3 + [True] * 3


def test_list_returns_latest_live_versions_by_prefix_sorted(backend):
    store = backend.open()
    for key in ("order:2", "order:1", "order:1", "user:1", "order_x", "ord%er"):
        store.put(key, b"{}")
    assert [(r.key, r.version) for r in store.list("order:")] == [("order:1", 2), ("order:2", 1)]
    # SQL LIKE and Redis glob characters in the prefix are literal.
    assert [r.key for r in store.list("order_")] == ["order_x"]
    assert [r.key for r in store.list("ord%")] == ["ord%er"]
    assert [r.key for r in store.list()] == ["ord%er", "order:1", "order:2", "order_x", "user:1"]
    for key in ("b", "B", "a", "Z", "é"):
        store.put(key, b"{}")
    # code point order on every store, whatever the database's locale would sort
    assert [r.key for r in store.list()] == sorted(
        [*"bBaZ", "é", "ord%er", "order:1", "order:2", "order_x", "user:1"]
    )
    assert [r.key for r in store.list()][:4] == ["B", "Z", "a", "b"]


def test_ttl_expires_and_the_latest_live_version_is_returned(backend):
    store = backend.open()
    store.put("p", b"1")
    second = store.put("p", b"2", ttl=0.3)
    assert second.expires_at == pytest.approx(second.created_at + 0.3)
    store.put("gone", b"x", ttl=0.3)
    assert store.get("p").version == 2
    backend.advance(0.45)
    assert store.get("p").version == 1 and store.get("p", 2) is None
    assert store.get("gone") is None
    assert [r.key for r in store.list()] == ["p"]


def test_compare_and_set_writes_only_over_the_expected_version(backend):
    store = backend.open()
    assert store.put("c", b"first", expected_version=0).version == 1  # create-only
    with pytest.raises(VersionConflictError) as caught:
        store.put("c", b"again", expected_version=0)
    assert (caught.value.key, caught.value.expected, caught.value.actual) == ("c", 0, 1)
    assert store.put("c", b"second", expected_version=1).version == 2
    with pytest.raises(VersionConflictError, match="expected latest version 1, found 2"):
        store.put("c", b"stale", expected_version=1)
    assert store.get("c").data == b"second"  # the refused write left nothing behind
    store.delete("c")
    assert store.put("c", b"after delete", expected_version=0).version == 3


def test_counters_add_atomically_and_read_as_a_snapshot(backend):
    store = backend.open()
    assert store.incr("stats", {"retry:ok": 1, "retry:fail": 2, "time": 0.25})
    assert store.incr("stats", {"retry:ok": 3, "time": 0.5})
    assert store.incr("other", {"retry:ok": 100})
    assert store.counters("stats") == {"retry:ok": 4.0, "retry:fail": 2.0, "time": 0.75}
    assert store.counters("stats", ["retry:ok", "absent"]) == {"retry:ok": 4.0}
    assert store.counters("nothing-here") == {}


def test_a_batch_id_is_applied_at_most_once(backend):
    store = backend.open()
    assert store.incr("s", {"n": 5}, batch_id="batch-1") is True
    assert store.incr("s", {"n": 5}, batch_id="batch-1") is False
    assert store.incr("s", {"n": 1}, batch_id="batch-2") is True
    assert store.counters("s") == {"n": 6.0}


def test_bad_arguments_are_refused_before_reaching_the_backend(backend):
    store = backend.open()
    with pytest.raises(TypeError):
        store.put("", b"x")
    with pytest.raises(ValueError, match="expected_version"):
        store.put("k", b"x", expected_version=-1)
    with pytest.raises(ValueError, match="ttl"):
        store.put("k", b"x", ttl=0)
    with pytest.raises(ValueError, match="finite"):
        store.incr("s", {"n": float("nan")})
    # past what Redis, PostgreSQL and datetime take: one message on every store
    for ttl in (float("inf"), 1e17):
        with pytest.raises(ValueError, match=r"ttl must be at most 1e\+09 seconds"):
            store.put("k", b"x", ttl=ttl)
    with pytest.raises(TypeError, match="encodes as UTF-8"):
        store.put("k\ud800", b"x")
    with pytest.raises(TypeError, match="encodes as UTF-8"):
        store.incr("s", {"n\udfff": 1})
    assert store.get("k") is None


async def test_async_forms_behave_like_the_sync_ones(backend):
    store = backend.open()
    assert (await store.aput("a", b"1")).version == 1
    assert (await store.aput("a", b"2", expected_version=1)).version == 2
    with pytest.raises(VersionConflictError):
        await store.aput("a", b"x", expected_version=1)
    assert (await store.aget("a")).data == b"2"
    assert (await store.aget("a", 1)).data == b"1"
    assert [r.key for r in await store.alist("a")] == ["a"]
    assert await store.aincr("s", {"n": 2}, batch_id="once")
    assert not await store.aincr("s", {"n": 2}, batch_id="once")
    assert await store.acounters("s") == {"n": 2.0}
    assert await store.adelete("a") == 2
    assert await store.aget("a") is None
    await store.aclose()


def test_concurrent_writers_get_distinct_versions(backend):
    store = backend.open()
    versions: list[int] = []
    lock = threading.Lock()

    def write() -> None:
        for _ in range(25):
            number = store.put("shared", b"{}").version
            with lock:
                versions.append(number)

    threads = [threading.Thread(target=write) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(versions) == list(range(1, 101))


# -- checkpoints over every back end ------------------------------------------------------------


def test_checkpoints_round_trip_on_every_backend(backend):
    checkpoints = Checkpoints(backend.open(), clock=backend.clock)
    state = {"cursor": "żółw-7", "done": [1, 2, {"deep": None}], "rate": 0.5, "ok": True}
    assert checkpoints.save("job", state) == 1
    assert checkpoints.save("job", {**state, "cursor": "next"}, ttl=60) == 2
    assert checkpoints.load("job").state["cursor"] == "next"
    assert checkpoints.load("job", version=1).state == state
    assert [(r.key, r.version) for r in checkpoints.list("j")] == [("job", 2)]
    with pytest.raises(CheckpointConflictError) as caught:
        checkpoints.save("job", state, expected_version=1)
    assert (caught.value.expected, caught.value.actual) == (1, 2)
    assert "'job'" in str(caught.value)
    assert checkpoints.save("job", state, expected_version=2) == 3
    with pytest.raises(CheckpointError, match="'bad'.*set"):
        checkpoints.save("bad", {"ids": {1, 2}})
    with pytest.raises(CheckpointNotFoundError, match="no checkpoint named 'bad'"):
        checkpoints.load("bad")
    assert checkpoints.delete("job") == 3


def test_every_float_comes_back_a_float_of_the_same_value_and_sign(backend):
    """PostgreSQL's jsonb printed 1e+300 back as an integer (not even equal to it) and
    dropped the sign of -0.0: such a state now goes to the raw column there."""
    import math

    checkpoints = Checkpoints(backend.open(), clock=backend.clock)
    numbers = [1e300, 1e16, 2.5e-12, -0.0, 0.1, 123456789.125, 7]
    checkpoints.save("floats", {"numbers": numbers, "label": "e+ -0.0 in a string"})
    restored = checkpoints.load("floats").state["numbers"]
    assert [type(n) for n in restored] == [type(n) for n in numbers]
    assert restored == numbers
    assert math.copysign(1.0, restored[3]) == -1.0


async def test_async_checkpoints_on_every_backend(backend):
    checkpoints = Checkpoints(backend.open(), clock=backend.clock)
    assert await checkpoints.asave("a", {"n": 1}) == 1
    assert await checkpoints.asave("a", {"n": 2}, expected_version=1) == 2
    assert (await checkpoints.aload("a")).state == {"n": 2}
    assert [r.key for r in await checkpoints.alist()] == ["a"]
    with pytest.raises(CheckpointConflictError):
        await checkpoints.asave("a", {"n": 3}, expected_version=1)
    assert await checkpoints.adelete("a") == 2
    with pytest.raises(CheckpointNotFoundError):
        await checkpoints.aload("a")


async def test_the_seed_api_takes_a_store_url(backend):
    recovery = ErrorRecoveryInteraction(store=backend.url, clock=backend.clock, telemetry=False)
    assert recovery.create_checkpoint("process_1", {"cursor": 10}) == 1
    restored = await recovery.restore_checkpoint("process_1")
    assert restored == {
        "recovery_status": "success",
        "state": {"cursor": 10},
        "version": 1,
        "checkpoint_id": "process_1",
    }
    missing = await recovery.restore_checkpoint("nobody")
    assert missing["recovery_status"] == "failed"
    assert missing["reason"] == "no checkpoint named 'nobody'"
    recovery.checkpoints.close()


async def test_learned_statistics_counters_on_every_backend(backend):
    from otel_recovery.stores.counters import Counters

    store = backend.open()
    learner_a = Counters("strategy", store)
    learner_b = Counters("strategy", backend.open() if backend.kind != "memory" else store)
    learner_a.add("timeout:retry:success")
    learner_b.add_many({"timeout:retry:success": 2, "timeout:retry:seconds": 0.75})
    await learner_b.aadd("timeout:fallback:success", 1)
    assert learner_a.snapshot() == {
        "timeout:retry:success": 3.0,
        "timeout:retry:seconds": 0.75,
        "timeout:fallback:success": 1.0,
    }
    assert await learner_a.asnapshot(["timeout:retry:success"]) == {"timeout:retry:success": 3.0}
    assert Counters("other", store).snapshot() == {}
