"""The default checkpoint serializer: strict JSON, checked before anything is written.

What JSON cannot hold faithfully is refused up front with the path inside the state and the
offending type, because failing when the checkpoint is *created* is far better than
discovering an unusable checkpoint during an outage. Tuples become lists; dict keys must be
strings (JSON would silently turn ``1`` into ``"1"``); NaN and infinities are refused because
other stores (PostgreSQL's ``jsonb``) reject them.
"""

from __future__ import annotations

import builtins
import json
import math
import sys
from typing import Any, Protocol, runtime_checkable

__all__ = ["JSON", "JsonSerializer", "Serializer", "UnserialisableStateError"]

_JSON_SCALARS = (str, int, float, bool, type(None))
_MAX_DEPTH = 200
_Problem = tuple[list[Any], str, str]


@runtime_checkable
class Serializer(Protocol):
    """Turns states into bytes and back. ``name`` is stored with each record.

    ``loads`` must never run code chosen by the data (so: no pickle), because other hosts can
    write to a shared store.
    """

    name: str

    def dumps(self, state: Any) -> bytes: ...

    def loads(self, data: bytes) -> Any: ...


class UnserialisableStateError(ValueError):
    """Part of a state cannot be stored; ``path`` says where, ``offending_type`` what."""

    def __init__(self, path: str, offending_type: str, why: str) -> None:
        super().__init__(f"{path} {why}")
        self.path = path
        self.offending_type = offending_type


class JsonSerializer:
    """Compact UTF-8 JSON of dicts (str keys), lists, tuples, str, int, finite float, bool, None."""

    name = "json"

    def dumps(self, state: Any) -> bytes:
        problem = _find_problem(state, set(), 0)
        if problem is not None:
            raise _unserialisable(*problem)
        if _digits_limit_raised():
            _refuse_long_ints(state)
        try:
            text = json.dumps(state, allow_nan=False, separators=(",", ":"), ensure_ascii=False)
        except ValueError:  # an int past the digit limit: the walk let every int through
            _refuse_long_ints(state)
            raise
        try:
            return text.encode("utf-8")
        except UnicodeEncodeError:
            # A lone surrogate (a str from os.fsdecode or bytes decoded with
            # errors="surrogateescape"): rare, so its path is only looked for now.
            raise _unserialisable(
                _find_surrogate(state, 0) or [],
                "str",
                "is a str holding a lone surrogate, which UTF-8 cannot encode; decode the "
                "bytes it came from with errors='replace', or keep them as base64",
            ) from None

    def loads(self, data: bytes) -> Any:
        return json.loads(data)

    def __repr__(self) -> str:
        return "JsonSerializer()"


JSON = JsonSerializer()


_FAST = frozenset({str, int, bool, type(None)})
"""Exact types that need no further look (checked by identity: the hot path of the walk)."""
_DEFAULT_DIGITS = 4300
"""Python reads back no int of more than 4,300 digits by default
(``sys.get_int_max_str_digits``). Where that limit is in force, encoding such an int fails,
and only then is its path looked for; a process that raised its own limit would save a
checkpoint every other process finds corrupt, so there every int is looked at."""
_LONGEST_INT = 10**_DEFAULT_DIGITS - 1
_LOWEST_INT = -_LONGEST_INT


def _unencodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _find_surrogate(value: Any, depth: int) -> list[Any] | None:
    """The reversed path to the first str (value or key) UTF-8 cannot encode, or None.
    The state has passed :func:`_find_problem`: no cycles, bounded depth."""
    if isinstance(value, str):
        return [] if _unencodable(value) else None
    if isinstance(value, (dict, builtins.list, tuple)) and depth < _MAX_DEPTH:
        items = value.items() if isinstance(value, dict) else enumerate(value)
        for key, item in items:
            if isinstance(key, str) and _unencodable(key):
                return [key]
            found = _find_surrogate(item, depth + 1)
            if found is not None:
                found.append(key)
                return found
    return None


def _find_problem(value: Any, parents: set[int], depth: int) -> _Problem | None:
    """The first thing JSON cannot faithfully hold, or None.

    Paths are built only when a problem is found (as reversed segments), so walking a large,
    valid state allocates nothing per element; that keeps the check cheaper than encoding.
    """
    kind = type(value)
    if kind in _FAST:
        return None
    if kind is float or isinstance(value, float):
        return (
            None
            if math.isfinite(value)
            else ([], "float", f"is {value!r}, which JSON cannot represent")
        )
    if isinstance(value, _JSON_SCALARS):
        return None
    if depth >= _MAX_DEPTH:
        return [], type(value).__qualname__, f"is nested more than {_MAX_DEPTH} levels deep"
    if isinstance(value, (dict, builtins.list, tuple)):
        if id(value) in parents:
            return [], type(value).__qualname__, "refers back to itself (a cycle)"
        parents.add(id(value))
        try:
            items = value.items() if isinstance(value, dict) else enumerate(value)
            for key, item in items:
                if isinstance(value, dict) and type(key) is not str and not isinstance(key, str):
                    name = type(key).__qualname__
                    return [key], name, f"has a {name} key, but JSON keys are strings"
                if type(item) in _FAST:
                    continue
                found = _find_problem(item, parents, depth + 1)
                if found is not None:
                    found[0].append(key)
                    return found
        finally:
            parents.discard(id(value))
        return None
    cls = type(value)
    name = (
        cls.__qualname__ if cls.__module__ == "builtins" else f"{cls.__module__}.{cls.__qualname__}"
    )
    return [], name, f"is a {name}"


def _unserialisable(segments: list[Any], offending: str, why: str) -> UnserialisableStateError:
    """The error for what sits at ``segments`` (a reversed path), named ``state[...]``."""
    path = "state" + "".join(f"[{key!r}]" for key in reversed(segments))
    return UnserialisableStateError(path, offending, why)


def _digits_limit_raised() -> bool:
    limit = getattr(sys, "get_int_max_str_digits", None)  # Python 3.10.7 on
    return limit is not None and limit() != _DEFAULT_DIGITS


def _refuse_long_ints(state: Any) -> None:
    segments = _find_long_int(state, 0)
    if segments is not None:
        raise _unserialisable(
            segments,
            "int",
            "is an int of more than 4,300 digits, which Python reads back only where "
            "sys.set_int_max_str_digits() raised the limit: store it as a string",
        )


def _find_long_int(value: Any, depth: int) -> list[Any] | None:
    """The reversed path to the first int of more than 4,300 digits, or None (the state
    has passed :func:`_find_problem`: no cycles, bounded depth)."""
    if isinstance(value, int):
        return None if _LOWEST_INT <= value <= _LONGEST_INT else []
    if isinstance(value, (dict, builtins.list, tuple)) and depth < _MAX_DEPTH:
        items = value.items() if isinstance(value, dict) else enumerate(value)
        for key, item in items:
            found = _find_long_int(item, depth + 1)
            if found is not None:
                found.append(key)
                return found
    return None
