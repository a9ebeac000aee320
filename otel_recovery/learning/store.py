"""Where a :class:`~otel_recovery.learning.StrategyLearner` keeps what it learned.

The protocol is deliberately one JSON document: ``load()`` and ``save(snapshot)``. A learner
is small (a few numbers per context and arm), a whole snapshot is easy to inspect, diff and
back up, and any key-value store can hold it, which is all the state work (Redis, SQLite)
needs to plug in. Snapshots are JSON, never pickles (DESIGN.md section 5).
"""

from __future__ import annotations

import json
import threading
from collections.abc import Mapping
from typing import Any, Protocol, runtime_checkable

__all__ = ["LearnerStore", "MemoryLearnerStore"]


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
        self._lock = threading.Lock()

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

    @property
    def text(self) -> str | None:
        """The stored JSON document, for inspection."""
        with self._lock:
            return self._text

    def __repr__(self) -> str:
        size = 0 if self._text is None else len(self._text)
        return f"MemoryLearnerStore({size} bytes)"
