"""Checkpoints: save a process's state before a risky step, restore it after a failure.

State is stored as JSON text and restored by parsing it again, so a restored state is always a
deep copy that shares nothing with the caller's objects, and nothing is ever unpickled from a
store (a store that other hosts can write to must not be able to run code here). What JSON
cannot hold is refused when the checkpoint is *created*, with a :class:`CheckpointError` naming
the checkpoint, the path inside the state and the offending type: failing at save time is far
better than discovering an unusable checkpoint during an outage. Tuples are stored as lists;
dict keys must be strings (JSON would silently turn ``1`` into ``"1"``); NaN and infinities are
refused because other stores (PostgreSQL's ``jsonb``) reject them.

Each checkpoint id keeps a short history: every save gets the next version number for that id
(versions only increase within a process, even across a delete), and ``restore(id)`` returns
the latest live version unless a version is asked for. A ``ttl`` makes a version expire; an
expired version is never returned.

Storage goes through the small :class:`CheckpointStore` protocol so that other back ends
(SQLite, Redis, PostgreSQL) slot in without touching the callers; :class:`MemoryCheckpointStore`
is the in-process default.
"""

from __future__ import annotations

import builtins
import json
import math
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from otel_recovery._clock import SYSTEM_CLOCK, Clock, Duration, to_seconds

__all__ = [
    "Checkpoint",
    "CheckpointError",
    "CheckpointNotFoundError",
    "CheckpointRecord",
    "CheckpointStore",
    "Checkpoints",
    "MemoryCheckpointStore",
]

_JSON_SCALARS = (str, int, float, bool, type(None))


class CheckpointError(Exception):
    """A checkpoint could not be saved or restored; the message says which and why."""

    def __init__(self, message: str, *, checkpoint_id: str, offending_type: str | None = None):
        super().__init__(message)
        self.checkpoint_id = checkpoint_id
        self.offending_type = offending_type


class CheckpointNotFoundError(CheckpointError, LookupError):
    """No live checkpoint (or no such version) exists under the given id."""


@dataclass(frozen=True, slots=True)
class CheckpointRecord:
    """What a store keeps: already-serialised JSON ``data`` plus bookkeeping.

    Times are wall-clock epoch seconds, because records may outlive the process (and the
    monotonic clock) that wrote them.
    """

    key: str
    version: int
    data: str
    created_at: float
    expires_at: float | None = None

    def expired(self, wall_now: float) -> bool:
        return self.expires_at is not None and self.expires_at <= wall_now


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """A restored checkpoint: ``state`` is a fresh deep copy."""

    checkpoint_id: str
    version: int
    state: Any
    created_at: float
    expires_at: float | None


@runtime_checkable
class CheckpointStore(Protocol):
    """Where checkpoint records live. Implementations must be safe to call from many threads.

    A store never returns a record whose ``expires_at`` has passed (it may use native expiry,
    as Redis does, or filter on read). ``get(key)`` returns the latest live version;
    ``list(prefix)`` returns the latest live version of every key starting with ``prefix``,
    sorted by key; ``delete(key)`` removes every version and returns how many there were.
    """

    def put(self, key: str, record: CheckpointRecord) -> None: ...

    def get(self, key: str, version: int | None = None) -> CheckpointRecord | None: ...

    def list(self, prefix: str = "") -> builtins.list[CheckpointRecord]: ...

    def delete(self, key: str) -> int: ...


class MemoryCheckpointStore:
    """Checkpoints in a dict: fast, per process, gone on restart.

    Keeps the newest ``max_versions`` versions per key (older ones are dropped on save) so a
    loop that checkpoints every iteration cannot grow memory without bound.
    """

    def __init__(self, *, max_versions: int = 16, clock: Clock | None = None) -> None:
        if isinstance(max_versions, bool) or not isinstance(max_versions, int) or max_versions < 1:
            raise ValueError(f"max_versions must be an int >= 1, got {max_versions!r}")
        self._max_versions = max_versions
        self._clock = clock or SYSTEM_CLOCK
        self._lock = threading.Lock()
        self._data: dict[str, OrderedDict[int, CheckpointRecord]] = {}

    def put(self, key: str, record: CheckpointRecord) -> None:
        with self._lock:
            versions = self._data.setdefault(key, OrderedDict())
            versions[record.version] = record
            while len(versions) > self._max_versions:
                versions.popitem(last=False)

    def get(self, key: str, version: int | None = None) -> CheckpointRecord | None:
        now = self._clock.wall()
        with self._lock:
            versions = self._data.get(key)
            if not versions:
                return None
            if version is not None:
                record = versions.get(version)
                return None if record is None or record.expired(now) else record
            return next((r for r in reversed(versions.values()) if not r.expired(now)), None)

    def list(self, prefix: str = "") -> builtins.list[CheckpointRecord]:
        now = self._clock.wall()
        with self._lock:
            keys = sorted(k for k in self._data if k.startswith(prefix))
            found = []
            for key in keys:
                live = [r for r in self._data[key].values() if not r.expired(now)]
                if live:
                    found.append(max(live, key=lambda r: r.version))
            return found

    def delete(self, key: str) -> int:
        with self._lock:
            versions = self._data.pop(key, None)
            return len(versions) if versions else 0

    def __repr__(self) -> str:
        return f"MemoryCheckpointStore(keys={len(self._data)}, max_versions={self._max_versions})"


class Checkpoints:
    """Versioned, JSON-only checkpoints over a :class:`CheckpointStore`."""

    def __init__(self, store: CheckpointStore | None = None, *, clock: Clock | None = None) -> None:
        self.clock: Clock = clock or SYSTEM_CLOCK
        if store is None:
            store = MemoryCheckpointStore(clock=self.clock)
        elif not isinstance(store, CheckpointStore):
            raise TypeError(
                f"store must implement CheckpointStore (put/get/list/delete), got {store!r}"
            )
        self.store = store
        self._lock = threading.Lock()
        self._last_version: dict[str, int] = {}

    def save(self, checkpoint_id: str, state: Any, ttl: Duration | None = None) -> int:
        """Store ``state`` under ``checkpoint_id``; returns the new version number."""
        _check_id(checkpoint_id)
        seconds = None if ttl is None else to_seconds(ttl, "ttl")
        if seconds is not None and seconds <= 0:
            raise ValueError(f"ttl must be > 0 seconds when given, got {ttl!r}")
        data = encode_state(checkpoint_id, state)
        with self._lock:
            latest = self.store.get(checkpoint_id)
            version = max(self._last_version.get(checkpoint_id, 0), latest.version if latest else 0)
            version += 1
            self._last_version[checkpoint_id] = version
            now = self.clock.wall()
            expires = None if seconds is None else now + seconds
            self.store.put(
                checkpoint_id, CheckpointRecord(checkpoint_id, version, data, now, expires)
            )
        return version

    def load(self, checkpoint_id: str, version: int | None = None) -> Checkpoint:
        """The latest live version (or ``version``); raises :class:`CheckpointNotFoundError`."""
        _check_id(checkpoint_id)
        if version is not None and (isinstance(version, bool) or not isinstance(version, int)):
            raise TypeError(f"version must be an int or None, got {version!r}")
        record = self.store.get(checkpoint_id, version)
        if record is None or record.expired(self.clock.wall()):
            which = "" if version is None else f" with version {version}"
            raise CheckpointNotFoundError(
                f"no checkpoint named {checkpoint_id!r}{which}", checkpoint_id=checkpoint_id
            )
        try:
            state = json.loads(record.data)
        except ValueError as exc:
            raise CheckpointError(
                f"checkpoint {checkpoint_id!r} version {record.version} holds invalid JSON: {exc}",
                checkpoint_id=checkpoint_id,
            ) from exc
        return Checkpoint(
            checkpoint_id, record.version, state, record.created_at, record.expires_at
        )

    def list(self, prefix: str = "") -> builtins.list[CheckpointRecord]:
        """Latest live version of every checkpoint whose id starts with ``prefix``."""
        now = self.clock.wall()
        return [r for r in self.store.list(prefix) if not r.expired(now)]

    def delete(self, checkpoint_id: str) -> int:
        """Remove every version; returns how many were removed (0 if none existed)."""
        _check_id(checkpoint_id)
        return self.store.delete(checkpoint_id)


def _check_id(checkpoint_id: object) -> None:
    if not isinstance(checkpoint_id, str) or not checkpoint_id:
        raise TypeError(f"checkpoint ids are non-empty strings, got {checkpoint_id!r}")


def encode_state(checkpoint_id: str, state: Any) -> str:
    """JSON text of ``state``, or a :class:`CheckpointError` naming what JSON cannot hold."""
    problem = _find_problem(state, "state", set(), 0)
    if problem is not None:
        path, offending, why = problem
        raise CheckpointError(
            f"checkpoint {checkpoint_id!r} cannot be saved: {path} {why}; checkpoints hold "
            "JSON data only (dict with str keys, list, tuple, str, int, float, bool, None)",
            checkpoint_id=checkpoint_id,
            offending_type=offending,
        )
    return json.dumps(state, allow_nan=False, separators=(",", ":"), ensure_ascii=False)


_MAX_DEPTH = 200


def _find_problem(
    value: Any, path: str, parents: set[int], depth: int
) -> tuple[str, str, str] | None:
    """``(path, type name, why)`` of the first thing JSON cannot faithfully hold, or None."""
    if isinstance(value, float) and not math.isfinite(value):
        return path, "float", f"is {value!r}, which JSON cannot represent"
    if isinstance(value, _JSON_SCALARS):
        return None
    if depth >= _MAX_DEPTH:
        return path, type(value).__qualname__, f"is nested more than {_MAX_DEPTH} levels deep"
    if isinstance(value, (dict, builtins.list, tuple)):
        if id(value) in parents:
            return path, type(value).__qualname__, "refers back to itself (a cycle)"
        parents.add(id(value))
        try:
            if isinstance(value, dict):
                for key, item in value.items():
                    if not isinstance(key, str):
                        return (
                            f"{path}[{key!r}]",
                            type(key).__qualname__,
                            f"has a {type(key).__qualname__} key, but JSON keys are strings",
                        )
                    found = _find_problem(item, f"{path}[{key!r}]", parents, depth + 1)
                    if found is not None:
                        return found
            else:
                for index, item in enumerate(value):
                    found = _find_problem(item, f"{path}[{index}]", parents, depth + 1)
                    if found is not None:
                        return found
        finally:
            parents.discard(id(value))
        return None
    kind = type(value)
    name = (
        kind.__qualname__
        if kind.__module__ == "builtins"
        else f"{kind.__module__}.{kind.__qualname__}"
    )
    return path, name, f"is a {name}"
