"""What every store is: the :class:`Store` protocol, :class:`Record` and the store errors.

A store keeps two kinds of state, because those are the two shapes recovery state comes in:

- **Versioned records** (checkpoints, snapshots): ``put`` appends a new version and the store,
  not the caller, picks its number inside one atomic step, so two processes writing the same
  key can never both get version 7. ``expected_version`` turns a put into a compare-and-set:
  the write happens only if the latest live version is exactly that number (``0`` means "only
  if none is live"), otherwise :class:`VersionConflictError`, so a writer never silently
  overwrites an update it has not seen. Versions never repeat for a key, even across a
  ``delete`` (the store keeps a tiny "head" with the last number), which keeps compare-and-set
  safe from the ABA problem. Each key keeps its newest ``max_versions`` versions.
- **Counters** (learned statistics): ``incr`` adds a batch of amounts atomically, and
  ``counters`` reads a consistent snapshot of one namespace. A ``batch_id`` makes an increment
  idempotent, which is what lets a process replay increments made while the store was
  unreachable without ever counting them twice.

Every operation has a sync form and an ``a``-prefixed async form. Payloads are opaque bytes;
what they mean (JSON by default) is the caller's business, and nothing here ever unpickles.
"""

from __future__ import annotations

import builtins
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from otel_recovery._clock import Duration, to_seconds

__all__ = [
    "CorruptRecordError",
    "Record",
    "Store",
    "StoreConfigError",
    "StoreError",
    "StoreUnavailableError",
    "VersionConflictError",
    "check_key",
    "ttl_seconds",
]


@dataclass(frozen=True, slots=True)
class Record:
    """One stored version. Times are wall-clock epoch seconds: records outlive processes."""

    key: str
    version: int
    data: bytes
    created_at: float
    expires_at: float | None = None
    encoding: str = "json"

    def expired(self, wall_now: float) -> bool:
        return self.expires_at is not None and self.expires_at <= wall_now


class StoreError(Exception):
    """Base class of the errors a store raises."""


class StoreConfigError(StoreError, ValueError):
    """A store URL or option is invalid; raised at start-up, naming the setting."""


class StoreUnavailableError(StoreError, ConnectionError):
    """The store cannot be reached right now (connection refused, timeout, locked file).

    The message never contains a password: URLs are redacted before they are quoted.
    """


class VersionConflictError(StoreError):
    """A compare-and-set put found another latest version than the one it expected."""

    def __init__(self, key: str, expected: int, actual: int) -> None:
        super().__init__(
            f"version conflict on {key!r}: expected latest version {expected}, found {actual}"
        )
        self.key = key
        self.expected = expected
        self.actual = actual


class CorruptRecordError(StoreError):
    """A stored record cannot be read back (garbage bytes, missing fields, bad header)."""

    def __init__(self, key: str, detail: str, version: int | None = None) -> None:
        which = "" if version is None else f" version {version}"
        super().__init__(f"stored record {key!r}{which} is corrupt: {detail}")
        self.key = key
        self.version = version
        self.detail = detail


@runtime_checkable
class Store(Protocol):
    """Versioned records and atomic counters, sync and async. Safe to share between threads.

    ``get(key)`` returns the latest live (unexpired) version, ``get(key, n)`` version ``n`` if
    it is live; ``list(prefix)`` the latest live version of every key starting with
    ``prefix``, sorted by key; ``delete(key)`` removes every version and returns how many were
    live. Unreachable back ends raise :class:`StoreUnavailableError`; unreadable records
    :class:`CorruptRecordError`.
    """

    url: str
    """The store's URL with any password replaced by ``***``: safe to log."""

    def put(
        self,
        key: str,
        data: bytes,
        *,
        expected_version: int | None = None,
        ttl: float | None = None,
        encoding: str = "json",
    ) -> Record: ...

    def get(self, key: str, version: int | None = None) -> Record | None: ...

    def list(self, prefix: str = "") -> builtins.list[Record]: ...

    def delete(self, key: str) -> int: ...

    def incr(
        self, namespace: str, amounts: Mapping[str, float], *, batch_id: str | None = None
    ) -> bool: ...

    def counters(self, namespace: str, keys: Iterable[str] | None = None) -> dict[str, float]: ...

    def close(self) -> None: ...

    async def aput(
        self,
        key: str,
        data: bytes,
        *,
        expected_version: int | None = None,
        ttl: float | None = None,
        encoding: str = "json",
    ) -> Record: ...

    async def aget(self, key: str, version: int | None = None) -> Record | None: ...

    async def alist(self, prefix: str = "") -> builtins.list[Record]: ...

    async def adelete(self, key: str) -> int: ...

    async def aincr(
        self, namespace: str, amounts: Mapping[str, float], *, batch_id: str | None = None
    ) -> bool: ...

    async def acounters(
        self, namespace: str, keys: Iterable[str] | None = None
    ) -> dict[str, float]: ...

    async def aclose(self) -> None: ...


def check_key(key: object, what: str = "key") -> str:
    """Keys are non-empty strings without NUL (SQL text and Redis key names both need that)
    that encode as UTF-8: a lone surrogate (``"\\ud800"``, from a badly decoded file name)
    would fail in the driver, with its own words, on some stores and not others."""
    if not isinstance(key, str) or not key or "\x00" in key:
        raise TypeError(f"{what} must be a non-empty string without NUL characters, got {key!r}")
    if not key.isascii():
        try:
            key.encode("utf-8")
        except UnicodeEncodeError:
            raise TypeError(
                f"{what} must be text that encodes as UTF-8, got {key!r} (a lone surrogate); "
                "decode the name it came from with errors='replace'"
            ) from None
    return key


def check_put(
    expected_version: int | None, ttl: Duration | None, encoding: str
) -> tuple[int | None, float | None]:
    """Validate the put options shared by every back end; returns (expected, ttl seconds)."""
    if expected_version is not None and (
        isinstance(expected_version, bool)
        or not isinstance(expected_version, int)
        or expected_version < 0
    ):
        raise ValueError(f"expected_version must be an int >= 0 or None, got {expected_version!r}")
    if not isinstance(encoding, str) or not encoding or any(c in encoding for c in "\n\x00 "):
        raise ValueError(f"encoding must be a short name without spaces, got {encoding!r}")
    return expected_version, ttl_seconds(ttl)


def ttl_seconds(ttl: Duration | None) -> float | None:
    """A positive number of seconds, or None for "never expires"."""
    if ttl is None:
        return None
    seconds = to_seconds(ttl, "ttl")
    if seconds <= 0:
        raise ValueError(f"ttl must be > 0 seconds when given, got {ttl!r}")
    return seconds


def check_amounts(namespace: str, amounts: Mapping[str, float]) -> dict[str, float]:
    """Validated counter increments: string keys, finite numbers."""
    check_key(namespace, "namespace")
    checked: dict[str, float] = {}
    for key, amount in amounts.items():
        check_key(key, "counter key")
        if isinstance(amount, bool) or not isinstance(amount, (int, float)):
            raise TypeError(f"counter {key!r}: amount must be a number, got {amount!r}")
        value = float(amount)
        if not math.isfinite(value):
            raise ValueError(f"counter {key!r}: amount must be finite, got {amount!r}")
        checked[key] = checked.get(key, 0.0) + value
    return checked


def check_version(version: object) -> int | None:
    if version is not None and (
        isinstance(version, bool) or not isinstance(version, int) or version < 1
    ):
        raise TypeError(f"version must be an int >= 1 or None, got {version!r}")
    return version
