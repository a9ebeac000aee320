"""Garbage in a store and states that cannot be stored give the documented, named errors."""

from __future__ import annotations

import os
import sqlite3
import threading

import pytest

from otel_recovery.checkpoint import (
    CheckpointCorruptError,
    CheckpointError,
    CheckpointNotFoundError,
    Checkpoints,
    CheckpointTooLargeError,
)
from otel_recovery.interaction import ErrorRecoveryInteraction
from otel_recovery.stores import CorruptRecordError

from .conftest import POSTGRES_URL, REDIS_URL


def _corrupt_natively(backend, key: str, version: int) -> None:
    """Overwrite a stored version behind the store's back, as a disk or a person might."""
    garbage = os.urandom(64)
    if backend.kind == "memory":
        store = backend.opened[0]
        old = store._records[key][version]
        store._records[key][version] = type(old)(key, version, garbage, old.created_at)
    elif backend.kind == "sqlite":
        with sqlite3.connect(backend.url.removeprefix("sqlite:///")) as conn:
            conn.execute("UPDATE records SET data = ? WHERE key = ?", ("not bytes", key))
    elif backend.kind == "redis":
        import redis

        client = redis.Redis.from_url(REDIS_URL)
        client.set(f"otr-test:{backend.name}:v:{key}:{version}", garbage)
        client.close()
    else:
        import psycopg

        with psycopg.connect(POSTGRES_URL, autocommit=True) as conn:
            conn.execute(
                f'UPDATE "{backend.name}_records" SET data = NULL, raw = NULL WHERE key = %s',
                (key,),
            )


def test_a_record_corrupted_in_the_backend_is_a_named_error(backend):
    checkpoints = Checkpoints(backend.open(), clock=backend.clock)
    checkpoints.save("job-9", {"step": 1})
    _corrupt_natively(backend, "job-9", 1)
    with pytest.raises(CheckpointCorruptError, match="'job-9'") as caught:
        checkpoints.load("job-9")
    assert caught.value.checkpoint_id == "job-9"
    assert isinstance(caught.value.__cause__, (CorruptRecordError, ValueError))


@pytest.mark.parametrize("garbage", [b"\xff\xfe\x00garbage", b"{not json", b'{"half": [1, 2'])
def test_garbage_bytes_under_a_checkpoint_id_are_a_named_corrupt_error(backend, garbage):
    store = backend.open()
    store.put("job-7", garbage)  # written directly, labelled as JSON
    checkpoints = Checkpoints(store, clock=backend.clock)
    with pytest.raises(CheckpointCorruptError) as caught:
        checkpoints.load("job-7")
    message = str(caught.value)
    assert "'job-7'" in message and "version 1" in message and "corrupt" in message


async def test_the_seed_api_raises_on_corrupt_but_fails_softly_on_missing(backend):
    store = backend.open()
    store.put("broken", b"\x00\x01")
    recovery = ErrorRecoveryInteraction(store=store, clock=backend.clock, telemetry=False)
    with pytest.raises(CheckpointCorruptError, match="'broken'"):
        await recovery.restore_checkpoint("broken")
    missing = await recovery.restore_checkpoint("absent")
    assert (missing["recovery_status"], missing["reason"]) == (
        "failed",
        "no checkpoint named 'absent'",
    )


class Connection:
    pass


@pytest.mark.parametrize(
    ("state", "where", "offending"),
    [
        ({"conn": Connection()}, "state['conn']", f"{__name__}.Connection"),
        ({"lock": threading.Lock()}, "state['lock']", "_thread.lock"),
        ({"raw": b"bytes"}, "state['raw']", "bytes"),
        ({"nested": [{"x": float("inf")}]}, "state['nested'][0]['x']", "float"),
        ({(1, 2): "tuple key"}, "state[(1, 2)]", "tuple"),
    ],
)
def test_unserialisable_states_name_the_checkpoint_and_write_nothing(
    backend, state, where, offending
):
    checkpoints = Checkpoints(backend.open(), clock=backend.clock)
    with pytest.raises(CheckpointError) as caught:
        checkpoints.save("job-3", state)
    assert "'job-3'" in str(caught.value) and where in str(caught.value)
    assert caught.value.offending_type == offending
    with pytest.raises(CheckpointNotFoundError):
        checkpoints.load("job-3")


def test_states_over_the_size_limit_are_refused_by_name(backend):
    checkpoints = Checkpoints(backend.open(), clock=backend.clock, max_size=1024)
    with pytest.raises(CheckpointTooLargeError, match="'huge'.*1024-byte limit"):
        checkpoints.save("huge", {"blob": "x" * 2000})
    with pytest.raises(CheckpointNotFoundError):
        checkpoints.load("huge")
