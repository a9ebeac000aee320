"""Replaying one journal entry of a ResilientStore, without applying a write twice.

A write the store was sent and did not answer may have been applied there all the same (its
reply was lost, or a timeout cut it off after the commit). The wrapper journals it anyway,
marked as maybe applied, so its replay has to find out whether it landed rather than send it
again blindly:

- A counter batch carries its id, and the store applies an id once.
- A put looks first, and does not write again what the store already holds: a plain one at
  the latest versions, written around its send; a compare-and-set one, refused because the
  key moved on, at the versions after the one it expected, where its own write would be
  (other writers may have built on it since).
- A delete is replayed only if nobody wrote the key after it was made: the key's latest
  version is the one this process knew, or was created before the delete (another process's
  clock; the check and the delete are two steps, so a write landing between them can still
  be deleted).

A record is taken for the journaled write only with the same payload and encoding, written
after the newest version this process knew before the send: the same bytes written earlier
(``idle`` -> ``busy`` -> ``idle``) are not this write. The same payload, not the same bytes:
a store may give JSON back in its own rendering.
"""

from __future__ import annotations

import json
from typing import Any

from opentelemetry.instrumentation.utils import suppress_instrumentation

from otel_recovery.stores._base import Record, Store, VersionConflictError
from otel_recovery.stores._local_state import Call, JournalDelete, JournalPut, LocalState, Work

__all__ = ["areplay", "replay"]


def replay(store: Store, local: LocalState, item: Work) -> Any:
    """Send one journal entry; what :meth:`LocalState.replayed_one` books."""
    try:
        if isinstance(item, JournalDelete):
            latest = _send(store, ("get", (item.key,), {}))
            refused = _delete_refused(local, item, latest)
            return 0 if refused else _send(store, ("delete", (item.key,), {}))
        call = local.call_for(item)
        if call is None:
            return None
        if isinstance(item, JournalPut) and item.maybe_applied and item.expected is None:
            latest = _send(store, ("get", (item.key,), {}))
            if _holds(latest, item):
                return latest
            for version in _versions_below(latest):  # others may have written since
                record = _send(store, ("get", (item.key, version), {}))
                if _holds(record, item) and _sent_then(record, item):
                    return record
        try:
            return _send(store, call)
        except VersionConflictError as conflict:
            if not isinstance(item, JournalPut):
                raise
            for version in _own_write_versions(item, call, conflict):
                record = _send(store, ("get", (item.key, version), {}))
                if _holds(record, item):
                    return record
            raise
    except VersionConflictError as conflict:
        return conflict


async def areplay(store: Store, local: LocalState, item: Work) -> Any:
    """The async twin of :func:`replay`."""
    try:
        if isinstance(item, JournalDelete):
            latest = await _asend(store, ("get", (item.key,), {}))
            refused = _delete_refused(local, item, latest)
            return 0 if refused else await _asend(store, ("delete", (item.key,), {}))
        call = local.call_for(item)
        if call is None:
            return None
        if isinstance(item, JournalPut) and item.maybe_applied and item.expected is None:
            latest = await _asend(store, ("get", (item.key,), {}))
            if _holds(latest, item):
                return latest
            for version in _versions_below(latest):
                record = await _asend(store, ("get", (item.key, version), {}))
                if _holds(record, item) and _sent_then(record, item):
                    return record
        try:
            return await _asend(store, call)
        except VersionConflictError as conflict:
            if not isinstance(item, JournalPut):
                raise
            for version in _own_write_versions(item, call, conflict):
                record = await _asend(store, ("get", (item.key, version), {}))
                if _holds(record, item):
                    return record
            raise
    except VersionConflictError as conflict:
        return conflict


def _delete_refused(local: LocalState, item: JournalDelete, latest: Record | None) -> bool:
    """Whether a replayed delete must not run: another writer wrote the key after it."""
    if latest is None:
        return False  # nothing live to delete; deleting keeps the store's head as is
    basis = local.delete_basis(item)
    newer = latest.version > basis if basis is not None else latest.created_at > item.made_at
    if newer:
        local.delete_refused(item, latest.version, basis)
    return newer


def _send(store: Store, call: Call) -> Any:
    name, args, options = call
    with suppress_instrumentation():
        return getattr(store, name)(*args, **options)


async def _asend(store: Store, call: Call) -> Any:
    name, args, options = call
    with suppress_instrumentation():
        return await getattr(store, "a" + name)(*args, **options)


_OWN_WRITE_SEARCH = 8
"""How many versions past the expected one a replayed compare-and-set put looks at for its
own write (its reply lost): other writers may have built on it since."""


def _holds(record: Record | None, item: JournalPut) -> bool:
    """The store's record may be this journal entry's write: written after the newest
    version this process knew before sending it, with the same payload and encoding.

    The same payload, not the same bytes: a store may give JSON back in its own rendering
    (PostgreSQL's ``jsonb`` spaces and orders it: ``{"step":2}`` reads back as
    ``{"step": 2}``), so JSON payloads are compared as the values they decode to."""
    if record is None or record.encoding != item.encoding:
        return False
    if item.known_head is not None and record.version <= item.known_head:
        return False  # there before the write was sent
    return record.data == item.data or (
        item.encoding == "json" and _same_json(record.data, item.data)
    )


def _same_json(stored: bytes, sent: bytes) -> bool:
    """Equal as JSON documents: ``true`` is not ``1`` and ``1.0`` is not ``1`` here, though
    Python's ``==`` says they are, so the decoded values are compared re-encoded."""
    try:
        return _canonical(stored) == _canonical(sent)
    except ValueError:  # not JSON after all (UnicodeDecodeError is one): bytes decided
        return False


def _canonical(data: bytes) -> str:
    return json.dumps(json.loads(data), sort_keys=True, separators=(",", ":"))


_SEND_WINDOW = 60.0
"""How long before the local write a plain put's unanswered send may have landed (its
timeout, and clock skew between the writers)."""


def _versions_below(latest: Record | None) -> range:
    """The versions under the latest where a plain put whose reply was lost may have landed
    before others wrote over it."""
    if latest is None:
        return range(0)
    return range(latest.version - 1, max(0, latest.version - _OWN_WRITE_SEARCH), -1)


def _sent_then(record: Record, item: JournalPut) -> bool:
    """The record was written around the unanswered send, not long before: an old version
    with the same bytes is not this write."""
    return record.created_at >= item.made_at - _SEND_WINDOW


def _own_write_versions(item: JournalPut, call: Call, conflict: VersionConflictError) -> range:
    """The versions where a compare-and-set put whose reply was lost may have landed."""
    if not item.maybe_applied:
        return range(0)
    expected = call[2]["expected_version"]
    return range(expected + 1, min(conflict.actual, expected + _OWN_WRITE_SEARCH) + 1)
