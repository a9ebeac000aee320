"""Checkpoints: save a process's state before a risky step, restore it after a failure.

A checkpoint is a versioned record in a :class:`~otel_recovery.stores.Store`. Where it lives is
one URL (``store=`` or ``OTEL_RECOVERY_STORE_URL``); by default the SQLite file at
:func:`~otel_recovery.stores.default_sqlite_path`, because a checkpoint exists to outlive the
failure it guards against, and a crash takes process memory with it. Use ``store="memory://"``
for throwaway state and tests.

- **Versions** increase per id, assigned atomically by the store (two processes saving the
  same id never get the same number, even after a delete). ``load(id)`` returns the latest
  live version, ``load(id, version=n)`` an older one; each id keeps the newest 16 by default.
- **Compare-and-set**: ``save(id, state, expected_version=n)`` writes only if the latest live
  version is still ``n`` (``0``: only if none exists), else :class:`CheckpointConflictError`,
  so two concurrent writers can never lose an update silently.
- **Serialisation** is strict JSON by default, or any :class:`Serializer` (``name``, ``dumps``,
  ``loads``); its name is stored with the record. Nothing is ever unpickled: a store other hosts
  can write to must not be able to run code here. A restored state is always a fresh copy.
- **Errors name the checkpoint**: an unserialisable state (:class:`CheckpointError` with the
  path and type), a state over ``max_size`` bytes (:class:`CheckpointTooLargeError`; 1 MiB by
  default, ``OTEL_RECOVERY_CHECKPOINT_MAX_BYTES``), a stored record that cannot be read back
  (:class:`CheckpointCorruptError`), a missing one (:class:`CheckpointNotFoundError`, which the
  seed API turns into a ``"failed"`` result).
- **Outages**: stores other than ``memory://`` are wrapped in a
  :class:`~otel_recovery.stores.ResilientStore`: while the store is unreachable, saves are kept
  locally and replayed when it is back, and restores answer from what this process last saw
  (see that class for exactly what resync means). Only when there is no local copy does a
  restore fail, with :class:`CheckpointUnavailableError`.
"""

from __future__ import annotations

import builtins
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from otel_recovery._checkpoint_json import JSON, Serializer, UnserialisableStateError
from otel_recovery._clock import Clock, Duration, clock_or_default
from otel_recovery.stores import (
    CorruptRecordError,
    MemoryStore,
    Record,
    ResilientStore,
    Store,
    StoreConfigError,
    StoreUnavailableError,
    VersionConflictError,
    resolve_store,
)
from otel_recovery.stores._base import ttl_seconds

__all__ = [
    "Checkpoint",
    "CheckpointConflictError",
    "CheckpointCorruptError",
    "CheckpointError",
    "CheckpointNotFoundError",
    "CheckpointRecord",
    "CheckpointStore",
    "CheckpointTooLargeError",
    "CheckpointUnavailableError",
    "Checkpoints",
    "Serializer",
]

ENV_MAX_SIZE = "OTEL_RECOVERY_CHECKPOINT_MAX_BYTES"
DEFAULT_MAX_SIZE = 1024 * 1024
_T = TypeVar("_T")

CheckpointRecord = Record
"""What :meth:`Checkpoints.list` returns: key, version, data, created_at, expires_at."""
CheckpointStore = Store
"""The former name of :class:`~otel_recovery.stores.Store`, kept for existing imports."""


class CheckpointError(Exception):
    """A checkpoint could not be saved or restored; the message says which and why."""

    def __init__(self, message: str, *, checkpoint_id: str, offending_type: str | None = None):
        super().__init__(message)
        self.checkpoint_id = checkpoint_id
        self.offending_type = offending_type


class CheckpointNotFoundError(CheckpointError, LookupError):
    """No live checkpoint (or no such version) exists under the given id."""


class CheckpointUnavailableError(CheckpointError, LookupError):
    """The store is unreachable and this process holds no local copy of the checkpoint."""


class CheckpointConflictError(CheckpointError):
    """A compare-and-set save found another latest version than the one it expected."""

    def __init__(self, checkpoint_id: str, expected: int, actual: int) -> None:
        why = (
            "another writer saved first"
            if actual > expected
            else f"version {expected} expired or was deleted since"
        )
        super().__init__(
            f"checkpoint {checkpoint_id!r} was not saved: expected latest version {expected}, "
            f"but the store holds version {actual} ({why}); reload it, merge, and save again "
            f"with expected_version={actual}",
            checkpoint_id=checkpoint_id,
        )
        self.expected = expected
        self.actual = actual


class CheckpointTooLargeError(CheckpointError):
    """The serialised state is over the configured size limit."""

    def __init__(self, checkpoint_id: str, size: int, limit: int) -> None:
        super().__init__(
            f"checkpoint {checkpoint_id!r} cannot be saved: its state is {size} bytes once "
            f"serialised, over the {limit}-byte limit (Checkpoints(max_size=...) or "
            f"{ENV_MAX_SIZE})",
            checkpoint_id=checkpoint_id,
        )
        self.size = size
        self.limit = limit


class CheckpointCorruptError(CheckpointError):
    """A stored checkpoint cannot be read back; it is never half-interpreted."""


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """A restored checkpoint: ``state`` is a fresh copy."""

    checkpoint_id: str
    version: int
    state: Any
    created_at: float
    expires_at: float | None


def max_size_from_env() -> int:
    raw = os.environ.get(ENV_MAX_SIZE, "").strip()
    if not raw:
        return DEFAULT_MAX_SIZE
    if not (raw.isascii() and raw.isdigit()) or int(raw) < 1:  # "1²" is a digit to isdigit
        raise StoreConfigError(f"{ENV_MAX_SIZE} must be a positive number of bytes, got {raw!r}")
    return int(raw)


class Checkpoints:
    """Versioned checkpoints over a store; every operation has an ``a``-prefixed async form."""

    def __init__(
        self,
        store: Store | str | None = None,
        *,
        clock: Clock | None = None,
        serializer: Serializer | None = None,
        max_size: int | None = None,
        resilient: bool = True,
        retry_interval: Duration = 5.0,
    ) -> None:
        self.clock: Clock = clock_or_default(clock)
        if serializer is not None and not isinstance(serializer, Serializer):
            raise TypeError(f"serializer must have name, dumps and loads, got {serializer!r}")
        self.serializer: Serializer = serializer or JSON
        if max_size is not None and (
            isinstance(max_size, bool) or not isinstance(max_size, int) or max_size < 1
        ):
            raise ValueError(f"max_size must be a positive number of bytes, got {max_size!r}")
        self.max_size = max_size if max_size is not None else max_size_from_env()
        backend = resolve_store(store, clock=clock)
        if resilient and not isinstance(backend, (MemoryStore, ResilientStore)):
            backend = ResilientStore(backend, retry_interval=retry_interval, clock=clock)
        self.store: Store = backend

    # -- helpers shared by the sync and async forms ---------------------------------------------

    def _encode(self, checkpoint_id: str, state: Any) -> bytes:
        _check_id(checkpoint_id)
        try:
            data = self.serializer.dumps(state)
        except UnserialisableStateError as problem:
            raise CheckpointError(
                f"checkpoint {checkpoint_id!r} cannot be saved: {problem}; checkpoints hold "
                "JSON data only (dict with str keys, list, tuple, str, int, float, bool, None)",
                checkpoint_id=checkpoint_id,
                offending_type=problem.offending_type,
            ) from problem
        except (TypeError, ValueError, OverflowError, RecursionError) as problem:
            raise CheckpointError(
                f"checkpoint {checkpoint_id!r} cannot be saved with serializer "
                f"{self.serializer.name!r}: {problem}",
                checkpoint_id=checkpoint_id,
            ) from problem
        if not isinstance(data, bytes):
            raise TypeError(f"serializer {self.serializer.name!r} returned {type(data)}, not bytes")
        if len(data) > self.max_size:
            raise CheckpointTooLargeError(checkpoint_id, len(data), self.max_size)
        return data

    def _saved(self, checkpoint_id: str, attempt: Callable[[], _T]) -> _T:
        try:
            return attempt()
        except VersionConflictError as conflict:
            raise CheckpointConflictError(
                checkpoint_id, conflict.expected, conflict.actual
            ) from conflict
        except StoreUnavailableError as down:
            raise CheckpointUnavailableError(
                f"checkpoint {checkpoint_id!r} was not saved: {down}", checkpoint_id=checkpoint_id
            ) from down

    def _decode(self, checkpoint_id: str, version: int | None, record: Record | None) -> Checkpoint:
        if record is None or record.expired(self.clock.wall()):
            which = "" if version is None else f" with version {version}"
            raise CheckpointNotFoundError(
                f"no checkpoint named {checkpoint_id!r}{which}", checkpoint_id=checkpoint_id
            )
        if record.encoding != self.serializer.name:
            raise CheckpointError(
                f"checkpoint {checkpoint_id!r} version {record.version} was written with "
                f"serializer {record.encoding!r}; this Checkpoints reads "
                f"{self.serializer.name!r}",
                checkpoint_id=checkpoint_id,
            )
        try:
            state = self.serializer.loads(record.data)
        except Exception as exc:
            raise CheckpointCorruptError(
                f"checkpoint {checkpoint_id!r} version {record.version} is corrupt: its stored "
                f"{record.encoding} data cannot be decoded ({type(exc).__name__}: {exc})",
                checkpoint_id=checkpoint_id,
            ) from exc
        return Checkpoint(
            checkpoint_id, record.version, state, record.created_at, record.expires_at
        )

    def _read(self, checkpoint_id: str, attempt: Callable[[], _T]) -> _T:
        try:
            return attempt()
        except CorruptRecordError as corrupt:
            raise _corrupt(corrupt) from corrupt
        except StoreUnavailableError as down:
            raise CheckpointUnavailableError(
                f"checkpoint {checkpoint_id!r} cannot be restored: {down}",
                checkpoint_id=checkpoint_id,
            ) from down

    def _listed(self, prefix: str, attempt: Callable[[], _T]) -> _T:
        try:
            return attempt()
        except CorruptRecordError as corrupt:
            error = _corrupt(corrupt)
            raise CheckpointCorruptError(
                f"cannot list checkpoints starting with {prefix!r}: {error}",
                checkpoint_id=error.checkpoint_id,
            ) from corrupt
        except StoreUnavailableError as down:
            raise CheckpointUnavailableError(
                f"cannot list checkpoints starting with {prefix!r}: {down}",
                checkpoint_id=prefix,
            ) from down

    # -- sync -------------------------------------------------------------------------------------

    def save(
        self,
        checkpoint_id: str,
        state: Any,
        ttl: Duration | None = None,
        *,
        expected_version: int | None = None,
    ) -> int:
        """Store ``state``; returns its version. ``expected_version`` makes it compare-and-set."""
        data = self._encode(checkpoint_id, state)
        seconds = ttl_seconds(ttl)
        record = self._saved(
            checkpoint_id,
            lambda: self.store.put(
                checkpoint_id,
                data,
                expected_version=expected_version,
                ttl=seconds,
                encoding=self.serializer.name,
            ),
        )
        return record.version

    def load(self, checkpoint_id: str, version: int | None = None) -> Checkpoint:
        """The latest live version (or ``version``); raises :class:`CheckpointNotFoundError`."""
        _check_id(checkpoint_id)
        _check_version(version)
        record = self._read(checkpoint_id, lambda: self.store.get(checkpoint_id, version))
        return self._decode(checkpoint_id, version, record)

    def list(self, prefix: str = "") -> builtins.list[Record]:
        """Latest live version of every checkpoint whose id starts with ``prefix``.

        The records are listed as stored (``data`` is not decoded). A record the store itself
        cannot read back makes the whole listing fail with :class:`CheckpointCorruptError`
        naming that record (``checkpoint_id``; the version too when the store knows it): a
        listing that silently left it out would say that checkpoint does not exist. Every
        store's ``list`` stops at the first unreadable record, so the others cannot be listed
        past it. ``delete`` it, or ``save`` a new version of it, to clear it.
        """
        prefix = _check_prefix(prefix)
        now = self.clock.wall()
        found = self._listed(prefix, lambda: self.store.list(prefix))
        return [r for r in found if not r.expired(now)]

    def delete(self, checkpoint_id: str) -> int:
        """Remove every version; returns how many were live (0 if none existed)."""
        _check_id(checkpoint_id)
        return self._saved(checkpoint_id, lambda: self.store.delete(checkpoint_id))

    # -- async ------------------------------------------------------------------------------------

    async def asave(
        self,
        checkpoint_id: str,
        state: Any,
        ttl: Duration | None = None,
        *,
        expected_version: int | None = None,
    ) -> int:
        data = self._encode(checkpoint_id, state)
        seconds = ttl_seconds(ttl)
        put = self.store.aput(
            checkpoint_id,
            data,
            expected_version=expected_version,
            ttl=seconds,
            encoding=self.serializer.name,
        )
        record = await _async_guard(self._saved, checkpoint_id, put)
        return record.version

    async def aload(self, checkpoint_id: str, version: int | None = None) -> Checkpoint:
        _check_id(checkpoint_id)
        _check_version(version)
        found = self.store.aget(checkpoint_id, version)
        record = await _async_guard(self._read, checkpoint_id, found)
        return self._decode(checkpoint_id, version, record)

    async def alist(self, prefix: str = "") -> builtins.list[Record]:
        prefix = _check_prefix(prefix)
        now = self.clock.wall()
        found = await _async_guard(self._listed, prefix, self.store.alist(prefix))
        return [r for r in found if not r.expired(now)]

    async def adelete(self, checkpoint_id: str) -> int:
        _check_id(checkpoint_id)
        return await _async_guard(self._saved, checkpoint_id, self.store.adelete(checkpoint_id))

    def close(self) -> None:
        self.store.close()

    async def aclose(self) -> None:
        await self.store.aclose()

    def __repr__(self) -> str:
        return f"Checkpoints({self.store!r}, serializer={self.serializer.name!r})"


async def _async_guard(
    guard: Callable[[str, Callable[[], _T]], _T], checkpoint_id: str, pending: Awaitable[_T]
) -> _T:
    """Apply a sync error-translating guard to an awaitable's outcome."""
    try:
        value = await pending
    except Exception as exc:
        failure = exc

        def again() -> _T:
            raise failure

        return guard(checkpoint_id, again)
    return value


def _corrupt(corrupt: CorruptRecordError) -> CheckpointCorruptError:
    """The store's error about one record, as the checkpoint it is (its key, not a prefix)."""
    which = "" if corrupt.version is None else f" version {corrupt.version}"
    return CheckpointCorruptError(
        f"checkpoint {corrupt.key!r}{which} is corrupt: {corrupt.detail}; delete it, or save "
        "a new version of it, to clear it",
        checkpoint_id=corrupt.key,
    )


def _check_prefix(prefix: object) -> str:
    """``None`` lists every checkpoint, as ``""`` does (stores differed: one listed none,
    another raised about ``startswith``); anything else but a str is refused."""
    if prefix is None:
        return ""
    if not isinstance(prefix, str):
        raise TypeError(
            f"a checkpoint prefix is a str (the start of the ids to list; '' for all), "
            f"got {prefix!r}"
        )
    return prefix


def _check_id(checkpoint_id: object) -> None:
    if not isinstance(checkpoint_id, str) or not checkpoint_id or "\x00" in checkpoint_id:
        raise TypeError(f"checkpoint ids are non-empty strings, got {checkpoint_id!r}")


def _check_version(version: object) -> None:
    if version is not None and (isinstance(version, bool) or not isinstance(version, int)):
        raise TypeError(f"version must be an int or None, got {version!r}")
