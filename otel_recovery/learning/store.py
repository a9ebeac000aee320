"""Where a :class:`~otel_recovery.learning.StrategyLearner` keeps what it learned.

The protocol is deliberately one JSON document: ``load()`` and ``save(snapshot)``. A learner
is small (a few numbers per context and arm), a whole snapshot is easy to inspect, diff and
back up, and any key-value store can hold it, which is all the state work (Redis, SQLite)
needs to plug in. Snapshots are JSON, never pickles (DESIGN.md section 5).

Two optional members make a store safe to share between replicas and bounded in size:

- ``update(merge)``: load the latest snapshot, save ``merge(latest)``, atomically: if another
  writer saved in between, load and merge again. The learner's ``merge`` adds only what it
  learned since its last save, so with ``update`` no replica's learning is lost or counted
  twice. A store without it gets ``save(merge(load()))``, which two replicas saving at the
  same moment can interleave (one interval of one replica's learning lost).
- ``max_bytes``: the largest snapshot the store takes; the learner trims to it.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from typing import Any, Protocol, runtime_checkable

from otel_recovery._forksafe import new_lock

__all__ = ["CheckpointLearnerStore", "LearnerStore", "MemoryLearnerStore"]

Merge = Callable[[Mapping[str, Any] | None], Mapping[str, Any]]

_UPDATE_ATTEMPTS = 8


@runtime_checkable
class LearnerStore(Protocol):
    """Persistence for learned statistics: the latest snapshot in, the latest snapshot out."""

    def load(self) -> Mapping[str, Any] | None:
        """The last saved snapshot, or None when nothing was saved yet."""

    def save(self, snapshot: Mapping[str, Any]) -> None:
        """Replace the stored snapshot (a JSON-serialisable mapping)."""


class MemoryLearnerStore:
    """The default: keeps the snapshot as JSON text in memory.

    Storing text rather than the mapping proves on every save that the snapshot really is
    JSON, so a store that writes to disk or Redis later cannot meet a surprise.
    """

    def __init__(self) -> None:
        self._text: str | None = None
        self._lock = new_lock()

    def load(self) -> Mapping[str, Any] | None:
        with self._lock:
            text = self._text
        if text is None:
            return None
        loaded: dict[str, Any] = json.loads(text)
        return loaded

    def save(self, snapshot: Mapping[str, Any]) -> None:
        text = json.dumps(snapshot, separators=(",", ":"), allow_nan=False)
        with self._lock:
            self._text = text

    def update(self, merge: Merge) -> None:
        """Replace the snapshot with ``merge(current)``, atomically (one lock)."""
        with self._lock:
            current = None if self._text is None else json.loads(self._text)
            self._text = json.dumps(merge(current), separators=(",", ":"), allow_nan=False)

    @property
    def text(self) -> str | None:
        """The stored JSON document, for inspection."""
        with self._lock:
            return self._text

    def __repr__(self) -> str:
        size = 0 if self._text is None else len(self._text)
        return f"MemoryLearnerStore({size} bytes)"


class CheckpointLearnerStore:
    """Keeps the snapshot as a versioned checkpoint in any :mod:`otel_recovery.stores` store.

    ``CheckpointLearnerStore("redis://cache:6379/0")`` shares what a fleet learned and keeps it
    across restarts; the default store (SQLite, or ``OTEL_RECOVERY_STORE_URL``) keeps it on
    this host. Replicas sharing one ``name`` merge into one snapshot: :meth:`update` is a
    compare-and-set on the checkpoint's version, retried on a conflict, so no replica
    overwrites another's learning. Reads and writes go through the store's resilient layer,
    so an unreachable store degrades to local state instead of failing the learner (a merge
    saved locally during an outage that another replica's save overtook is dropped at resync,
    with a warning: that replica's learning of the outage is lost, never counted twice).
    ``name`` separates learners that share a store. Only the latest few versions are kept
    (the store's ``max_versions``); ``max_bytes`` is the checkpoint size limit
    (``OTEL_RECOVERY_CHECKPOINT_MAX_BYTES``, 1 MiB by default), which the learner's snapshot
    is trimmed to.
    """

    def __init__(self, store: Any = None, *, name: str = "default") -> None:
        from otel_recovery.checkpoint import Checkpoints  # the stores load lazily

        if not isinstance(name, str) or not name:
            raise ValueError(f"name must be a non-empty string, got {name!r}")
        self._checkpoints = Checkpoints(store)
        self._id = f"otel_recovery.learner.{name}"

    def load(self) -> Mapping[str, Any] | None:
        from otel_recovery.checkpoint import CheckpointError

        try:
            state = self._checkpoints.load(self._id).state
        except (CheckpointError, LookupError):
            return None  # nothing learned yet, or unreadable: start from the priors
        return state if isinstance(state, Mapping) else None

    @property
    def max_bytes(self) -> int:
        return int(self._checkpoints.max_size)

    def save(self, snapshot: Mapping[str, Any]) -> None:
        self._checkpoints.save(self._id, dict(snapshot))

    def update(self, merge: Merge) -> None:
        """Save ``merge(latest)`` if nobody saved since ``latest`` was read; else read the
        newer snapshot and merge again (up to 8 times, then the conflict is raised)."""
        from otel_recovery.checkpoint import (
            CheckpointConflictError,
            CheckpointCorruptError,
            CheckpointNotFoundError,
        )

        conflict: CheckpointConflictError | None = None
        for _ in range(_UPDATE_ATTEMPTS):
            expected: int | None
            try:
                checkpoint = self._checkpoints.load(self._id)
                state, expected = checkpoint.state, checkpoint.version
            except CheckpointNotFoundError:
                state, expected = None, 0  # only if nobody creates it first
            except CheckpointCorruptError:
                state, expected = None, None  # unreadable: replaced
            current = state if isinstance(state, Mapping) else None
            try:
                self._checkpoints.save(self._id, dict(merge(current)), expected_version=expected)
                return
            except CheckpointConflictError as error:
                conflict = error
        assert conflict is not None
        raise conflict

    def __repr__(self) -> str:
        return f"CheckpointLearnerStore({self._checkpoints.store!r}, id={self._id!r})"
