"""What the Redis store sends its Lua scripts and reads back: arguments, replies, packed versions.

:class:`~otel_recovery.stores.redis.RedisStore` does one thing per call (validate, run a
script or a command, turn failures into
:class:`~otel_recovery.stores.StoreUnavailableError`); how a record and a counter batch are
spelled on the wire is the other half, and is the same for its sync and
asyncio methods. So it lives here once: the KEYS and ARGV of the ``PUT`` and ``INCR``
scripts (:mod:`._redis_lua` documents the layout they write), the reply of ``PUT`` as a
:class:`Record` or a :class:`VersionConflictError`, the SCAN pattern of the index keys under
a key prefix, and a packed version or a counter hash read back (:func:`unpack`,
:func:`unpack_counters`), anything unreadable a :class:`CorruptRecordError`.

:class:`RecordCodec` is a mixin of ``RedisStore``: it has no slots of its own and works on
the store's (``_Keyed`` lists what it uses).
"""

from __future__ import annotations

import builtins
from collections.abc import Iterable, Mapping
from typing import Any, Protocol

from otel_recovery._clock import Clock, Duration
from otel_recovery.stores import _redis_lua as lua
from otel_recovery.stores._base import (
    CorruptRecordError,
    Record,
    VersionConflictError,
    check_amounts,
    check_key,
    check_put,
)

__all__ = ["BATCH_TTL_S", "TOMBSTONE_MS", "RecordCodec", "unpack", "unpack_counters"]

TOMBSTONE_MS = 7 * 86400 * 1000
"""How long (ms) a record's index outlives its last write or delete (see :mod:`._redis_lua`)."""
BATCH_TTL_S = 7 * 86400
"""How long (s) an ``incr`` batch id is remembered as applied."""


class _Keyed(Protocol):
    """What of ``RedisStore`` :class:`RecordCodec` uses."""

    clock: Clock
    max_versions: int

    def key(self, *parts: str) -> str: ...


class RecordCodec:
    """The script arguments of ``RedisStore``'s calls, and the ``PUT`` reply read back."""

    __slots__ = ()

    def _put_args(
        self: _Keyed,
        key: str,
        data: bytes,
        expected_version: int | None,
        ttl: Duration | None,
        encoding: str,
    ) -> tuple[builtins.list[str], builtins.list[Any], float, float | None]:
        check_key(key)
        expected, seconds = check_put(expected_version, ttl, encoding)
        now = self.clock.wall()
        expires = None if seconds is None else now + seconds
        args: builtins.list[Any] = [
            self.key("v", key, ""),
            "" if expected is None else str(expected),
            repr(now),
            "" if expires is None else repr(expires),
            0 if seconds is None else max(1, round(seconds * 1000)),
            encoding,
            bytes(data),
            self.max_versions,
            TOMBSTONE_MS,
        ]
        return [self.key("i", key)], args, now, expires

    def _put_result(
        self, key: str, reply: Any, expected: int | None, data: bytes, now: float,
        expires: float | None, encoding: str,
    ) -> Record:  # fmt: skip
        applied, number = int(reply[0]), int(reply[1])
        if not applied:
            raise VersionConflictError(key, expected or 0, number)
        return Record(key, number, bytes(data), now, expires, encoding)

    def _match(self: _Keyed, prefix: str) -> str:
        """A SCAN pattern for the index keys of ``prefix`` (glob characters escaped)."""
        literal = self.key("i", prefix)
        return "".join("\\" + c if c in "*?[]\\" else c for c in literal) + "*"

    def _incr_args(
        self: _Keyed, namespace: str, amounts: Mapping[str, float], batch_id: str | None
    ) -> tuple[builtins.list[str], builtins.list[Any]]:
        checked = check_amounts(namespace, amounts)
        keys = [self.key("c", namespace)]
        if batch_id is not None:
            keys.append(self.key("b", check_key(batch_id, "batch_id")))
        args: builtins.list[Any] = [BATCH_TTL_S]
        for counter, amount in checked.items():
            args += [counter, repr(amount)]
        return keys, args


def unpack(key: str, raw: bytes) -> Record:
    """Parse a packed version; anything else is a :class:`CorruptRecordError`."""
    parts = raw.split(b"\n", 5) if isinstance(raw, bytes) else []
    if len(parts) != 6 or parts[0] != lua.MAGIC:
        raise CorruptRecordError(key, "not an otel-recovery record (bad header)")
    try:
        version = int(parts[1])
        created = float(parts[2])
        expires = float(parts[3]) if parts[3] else None
        encoding = parts[4].decode("ascii")
    except (ValueError, UnicodeDecodeError) as exc:
        raise CorruptRecordError(key, f"unreadable header ({exc})") from exc
    return Record(key, version, parts[5], created, expires, encoding)


def unpack_counters(raw: Mapping[Any, Any], keys: Iterable[str] | None) -> dict[str, float]:
    """A counter hash as read (``HGETALL``): the counters named by ``keys``, or all of them."""
    values = {
        (k.decode("utf-8", "replace") if isinstance(k, bytes) else str(k)): float(v)
        for k, v in raw.items()
    }
    if keys is None:
        return values
    return {k: values[k] for k in keys if k in values}
