"""Checkpoints: JSON-only deep copies, per-id versions, TTL, and the store protocol."""

from __future__ import annotations

import threading
from datetime import timedelta

import pytest

from otel_recovery.checkpoint import (
    CheckpointCorruptError,
    CheckpointError,
    CheckpointNotFoundError,
    Checkpoints,
    CheckpointTooLargeError,
)
from otel_recovery.interaction import ErrorRecoveryInteraction
from otel_recovery.stores import MemoryStore, Store


@pytest.fixture(autouse=True)
def _checkpoints_in_memory(monkeypatch):
    # The default store is the SQLite file (checkpoints must outlive a restart); these tests
    # want a fresh store each. tests/stores/ runs the same behaviour against every back end.
    monkeypatch.setenv("OTEL_RECOVERY_STORE_URL", "memory://")


@pytest.fixture
def checkpoints(fake_clock) -> Checkpoints:
    return Checkpoints(clock=fake_clock)


def test_restored_state_is_a_deep_copy(checkpoints):
    state = {"step": 3, "items": [1, 2, {"nested": True}], "name": "job"}
    checkpoints.save("p1", state)
    state["items"][2]["nested"] = False  # the caller keeps mutating its objects
    restored = checkpoints.load("p1").state
    assert restored == {"step": 3, "items": [1, 2, {"nested": True}], "name": "job"}
    restored["items"].append(99)
    assert checkpoints.load("p1").state["items"] == [1, 2, {"nested": True}]


def test_versions_increase_per_id_and_old_versions_stay_readable(checkpoints):
    assert checkpoints.save("a", {"n": 1}) == 1
    assert checkpoints.save("a", {"n": 2}) == 2
    assert checkpoints.save("b", {"n": 1}) == 1
    assert checkpoints.load("a").state == {"n": 2}
    assert checkpoints.load("a").version == 2
    assert checkpoints.load("a", version=1).state == {"n": 1}


def test_versions_keep_increasing_after_a_delete(checkpoints):
    checkpoints.save("a", 1)
    checkpoints.save("a", 2)
    assert checkpoints.delete("a") == 2
    assert checkpoints.save("a", 3) == 3


def test_tuples_become_lists_and_scalars_survive(checkpoints):
    checkpoints.save("s", {"t": (1, "x"), "f": 1.5, "b": False, "n": None, "u": "żółw"})
    assert checkpoints.load("s").state == {
        "t": [1, "x"],
        "f": 1.5,
        "b": False,
        "n": None,
        "u": "żółw",
    }


class Connection:
    pass


@pytest.mark.parametrize(
    ("state", "path", "offending"),
    [
        ({"conn": Connection()}, "state['conn']", f"{__name__}.Connection"),
        ({"ids": {1, 2}}, "state['ids']", "set"),
        ([1, 2, b"raw"], "state[2]", "bytes"),
        ({"rate": float("nan")}, "state['rate']", "float"),
        ({1: "one"}, "state[1]", "int"),
        # a file name from os.fsdecode: a lone surrogate UTF-8 cannot encode
        ({"files": ["ok.txt", "caf\udce9.txt"]}, "state['files'][1]", "str"),
        ({"by_name": {"caf\udce9": 1}}, "state['by_name']['caf\\udce9']", "str"),
    ],
)
def test_unserialisable_state_names_the_checkpoint_path_and_type(
    checkpoints, state, path, offending
):
    with pytest.raises(CheckpointError) as caught:
        checkpoints.save("job-7", state)
    message = str(caught.value)
    assert "'job-7'" in message and path in message
    assert caught.value.checkpoint_id == "job-7"
    assert caught.value.offending_type == offending
    with pytest.raises(CheckpointNotFoundError):
        checkpoints.load("job-7")  # nothing half-written


def test_cycles_are_reported_not_recursed_forever(checkpoints):
    state: dict = {}
    state["self"] = state
    with pytest.raises(CheckpointError, match="cycle"):
        checkpoints.save("loop", state)


def test_shared_but_acyclic_objects_are_fine(checkpoints):
    shared = [1, 2]
    checkpoints.save("dag", {"a": shared, "b": shared})
    assert checkpoints.load("dag").state == {"a": [1, 2], "b": [1, 2]}


def test_ttl_expires_on_the_injected_clock(checkpoints, fake_clock):
    checkpoints.save("short", {"v": 1}, ttl=10)
    checkpoints.save("forever", {"v": 2})
    fake_clock.advance(9.9)
    assert checkpoints.load("short").state == {"v": 1}
    fake_clock.advance(0.1)
    with pytest.raises(CheckpointNotFoundError, match="no checkpoint named 'short'"):
        checkpoints.load("short")
    assert [r.key for r in checkpoints.list()] == ["forever"]


def test_an_expired_latest_version_falls_back_to_the_latest_live_one(checkpoints, fake_clock):
    checkpoints.save("p", {"v": 1})
    checkpoints.save("p", {"v": 2}, ttl=timedelta(seconds=5))
    fake_clock.advance(6)
    found = checkpoints.load("p")
    assert (found.version, found.state) == (1, {"v": 1})


def test_ttl_must_be_positive(checkpoints):
    with pytest.raises(ValueError, match="ttl"):
        checkpoints.save("p", {}, ttl=0)
    with pytest.raises(ValueError, match="ttl"):
        checkpoints.save("p", {}, ttl=-1)


def test_list_filters_by_prefix_and_reports_latest_versions(checkpoints):
    checkpoints.save("order:1", {})
    checkpoints.save("order:1", {})
    checkpoints.save("order:2", {})
    checkpoints.save("user:1", {})
    assert [(r.key, r.version) for r in checkpoints.list("order:")] == [
        ("order:1", 2),
        ("order:2", 1),
    ]


def test_missing_and_unknown_versions(checkpoints):
    with pytest.raises(CheckpointNotFoundError, match="no checkpoint named 'nope'"):
        checkpoints.load("nope")
    checkpoints.save("p", 1)
    with pytest.raises(CheckpointNotFoundError, match="version 7"):
        checkpoints.load("p", version=7)
    assert checkpoints.delete("nope") == 0


def test_bad_ids_are_rejected(checkpoints):
    with pytest.raises(TypeError):
        checkpoints.save("", {})
    with pytest.raises(TypeError):
        checkpoints.save(3, {})  # type: ignore[arg-type]


def test_memory_store_keeps_a_bounded_history(fake_clock):
    store = MemoryStore(max_versions=2, clock=fake_clock)
    checkpoints = Checkpoints(store, clock=fake_clock)
    for n in range(5):
        checkpoints.save("p", n)
    assert checkpoints.load("p").state == 4
    assert checkpoints.load("p", version=4).state == 3
    with pytest.raises(CheckpointNotFoundError):
        checkpoints.load("p", version=3)


def test_stores_hold_serialised_bytes_and_non_stores_are_refused(fake_clock):
    store = MemoryStore(clock=fake_clock)
    assert isinstance(store, Store)
    checkpoints = Checkpoints(store, clock=fake_clock)
    checkpoints.save("p", {"a": 1})
    assert store.get("p").data == b'{"a":1}'  # JSON bytes are what stores hold
    assert store.get("p").encoding == "json"
    assert checkpoints.load("p").state == {"a": 1}
    with pytest.raises(TypeError, match="Store"):
        Checkpoints(object())  # type: ignore[arg-type]


def test_a_pluggable_serializer_is_used_and_its_name_stored(fake_clock):
    class Upper:
        name = "upper-text"

        def dumps(self, state):
            return str(state).upper().encode()

        def loads(self, data):
            return data.decode().lower()

    store = MemoryStore(clock=fake_clock)
    checkpoints = Checkpoints(store, clock=fake_clock, serializer=Upper())
    checkpoints.save("p", "hello")
    assert (store.get("p").data, store.get("p").encoding) == (b"HELLO", "upper-text")
    assert checkpoints.load("p").state == "hello"
    with pytest.raises(CheckpointError, match="written with serializer 'upper-text'"):
        Checkpoints(store, clock=fake_clock).load("p")


def test_size_limit_names_the_checkpoint_and_the_setting(fake_clock, monkeypatch):
    checkpoints = Checkpoints(clock=fake_clock, max_size=100)
    checkpoints.save("small", "x" * 90)
    with pytest.raises(CheckpointTooLargeError) as caught:
        checkpoints.save("big", "x" * 200)
    assert "'big'" in str(caught.value) and "OTEL_RECOVERY_CHECKPOINT_MAX_BYTES" in str(
        caught.value
    )
    assert (caught.value.size, caught.value.limit) == (202, 100)
    monkeypatch.setenv("OTEL_RECOVERY_CHECKPOINT_MAX_BYTES", "50")
    assert Checkpoints(clock=fake_clock).max_size == 50
    monkeypatch.setenv("OTEL_RECOVERY_CHECKPOINT_MAX_BYTES", "lots")
    with pytest.raises(ValueError, match="OTEL_RECOVERY_CHECKPOINT_MAX_BYTES"):
        Checkpoints(clock=fake_clock)


def test_concurrent_saves_get_distinct_versions(fake_clock):
    checkpoints = Checkpoints(clock=fake_clock)
    versions: list[int] = []
    lock = threading.Lock()

    def save() -> None:
        for _ in range(50):
            v = checkpoints.save("shared", {"x": 1})
            with lock:
                versions.append(v)

    threads = [threading.Thread(target=save) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(versions) == list(range(1, 201))


# -- the seed API's checkpoint methods -----------------------------------------------------------


async def test_interaction_create_restore_list_delete(fake_clock):
    recovery = ErrorRecoveryInteraction(clock=fake_clock, telemetry=False)
    assert recovery.create_checkpoint("process_1", {"cursor": 10}) == 1
    assert recovery.create_checkpoint("process_1", {"cursor": 20}, ttl=30) == 2
    restored = await recovery.restore_checkpoint("process_1")
    assert restored == {
        "recovery_status": "success",
        "state": {"cursor": 20},
        "version": 2,
        "checkpoint_id": "process_1",
    }
    assert (await recovery._restore_checkpoint("process_1", version=1))["state"] == {"cursor": 10}
    listed = recovery.list_checkpoints()
    assert [(c["checkpoint_id"], c["version"]) for c in listed] == [("process_1", 2)]
    assert listed[0]["expires_at"] == pytest.approx(listed[0]["created_at"] + 30)
    assert recovery.delete_checkpoint("process_1") == 2
    missing = await recovery.restore_checkpoint("process_1")
    assert missing["recovery_status"] == "failed"
    assert missing["reason"] == "no checkpoint named 'process_1'"


async def test_interaction_refuses_unserialisable_state(fake_clock):
    recovery = ErrorRecoveryInteraction(clock=fake_clock, telemetry=False)
    with pytest.raises(CheckpointError, match="'p'.*lock"):
        recovery.create_checkpoint("p", {"lock": threading.Lock()})


# -- a corrupt record in a listing ------------------------------------------------------------


def _corrupt_store(kind: str, tmp_path, key: str):
    """Checkpoints ``orders-1..3`` in a real ``kind`` store, ``key``'s record then overwritten
    behind the store's back; returns (checkpoints, cleanup)."""
    import uuid

    if kind == "sqlite":
        import sqlite3

        path = tmp_path / "checkpoints.db"
        checkpoints = Checkpoints(f"sqlite:///{path}")
        for name in ("orders-1", "orders-2", "orders-3"):
            checkpoints.save(name, {"cursor": 1})
        with sqlite3.connect(path) as conn:
            conn.execute("UPDATE records SET data = ? WHERE key = ?", ("not bytes", key))
        return checkpoints, checkpoints.close
    redis = pytest.importorskip("redis")
    client = redis.Redis.from_url("redis://127.0.0.1:6379/0", socket_connect_timeout=2)
    try:
        client.ping()
    except redis.RedisError as error:
        pytest.skip(f"Redis on 127.0.0.1:6379 unreachable: {error}")
    prefix = f"otr-test-list-{uuid.uuid4().hex[:10]}:"
    checkpoints = Checkpoints(f"redis://127.0.0.1:6379/0?prefix={prefix}")
    for name in ("orders-1", "orders-2", "orders-3"):
        checkpoints.save(name, {"cursor": 1})
    client.set(f"{prefix}v:{key}:1", b"garbage written by something else")

    def cleanup() -> None:
        checkpoints.close()
        for stale in client.scan_iter(match=f"{prefix}*"):
            client.delete(stale)
        client.close()

    return checkpoints, cleanup


@pytest.mark.parametrize("kind", ["sqlite", "redis"])
async def test_a_corrupt_record_fails_the_listing_naming_that_checkpoint(kind, tmp_path):
    checkpoints, cleanup = _corrupt_store(kind, tmp_path, "orders-2")
    try:
        for listing in (lambda: checkpoints.list("orders-"), checkpoints.list):
            with pytest.raises(CheckpointCorruptError) as caught:
                listing()
            error = caught.value
            assert error.checkpoint_id == "orders-2"  # the record, not the prefix
            assert "checkpoint 'orders-2'" in str(error) and "corrupt" in str(error)
            assert "checkpoint 'orders-'" not in str(error) and "delete it" in str(error)
        with pytest.raises(CheckpointCorruptError) as caught:
            await checkpoints.alist("orders-")
        assert caught.value.checkpoint_id == "orders-2"
        with pytest.raises(CheckpointCorruptError) as caught:
            checkpoints.load("orders-2")
        assert caught.value.checkpoint_id == "orders-2"
        # The fix the message names works: once deleted, the others list again.
        checkpoints.delete("orders-2")
        assert [r.key for r in checkpoints.list("orders-")] == ["orders-1", "orders-3"]
    finally:
        cleanup()


async def test_listing_with_no_prefix_lists_every_checkpoint_on_every_store(tmp_path):
    """``list(None)`` meant "all" to its callers; one store listed none, another raised a
    ``startswith`` error. A prefix that is not a str is refused naming what it takes."""
    for url in ("memory://", f"sqlite:///{tmp_path / 'c.db'}"):
        checkpoints = Checkpoints(url)
        checkpoints.save("job-1", {"step": 1})
        assert [r.key for r in checkpoints.list(None)] == ["job-1"]
        assert [r.key for r in await checkpoints.alist(None)] == ["job-1"]
        with pytest.raises(TypeError, match="a checkpoint prefix is a str"):
            checkpoints.list(7)
        checkpoints.close()
