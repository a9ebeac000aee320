"""The ``on=`` of :class:`Retry` and :class:`Fallback`: which failures a policy acts on.

One check for both, so a mistake there is refused where the policy is built, with the same
words, rather than found at the first failure (``isinstance`` raising on a tuple holding a
string, or an empty tuple quietly matching nothing).
"""

from __future__ import annotations

import asyncio
import types
import typing
from collections.abc import Callable

ErrorMatch = type[BaseException] | tuple[type[BaseException], ...] | Callable[[BaseException], bool]
"""Exception types, or a predicate of the exception."""


def check_error_match(on: object, who: str) -> ErrorMatch:
    """``on`` if it is exception types (a class, a non-empty tuple of them, or a union
    ``A | B``, taken as the tuple) or a predicate; otherwise a ``TypeError`` or
    ``ValueError`` naming ``who`` (``"Retry"``, ``"Fallback"``)."""
    if isinstance(on, types.UnionType) or typing.get_origin(on) is typing.Union:
        on = typing.get_args(on)  # A | B, typing.Union[A, B]: the tuple isinstance takes
    if isinstance(on, type):
        _check_type(on, who)
        return on
    if isinstance(on, tuple):
        leaves = _leaves(on)  # isinstance takes nested tuples: so does on=
        if not leaves:
            raise ValueError(
                f"{who} on=() names no exception type, so it would never act; name the "
                "types (on=(ConnectionError, TimeoutError)) or leave on= out"
            )
        for item in leaves:
            if not (isinstance(item, type) and issubclass(item, BaseException)):
                raise TypeError(f"{who} on= tuple must hold exception types only, got {item!r}")
        if not any(_can_act(item) for item in leaves if isinstance(item, type)):
            _check_type(leaves[0], who)  # type: ignore[arg-type]  # a type: checked above
        return on
    if callable(on):
        return on
    hint = ""
    if isinstance(on, (list, set, frozenset)):
        names = ", ".join(getattr(item, "__name__", repr(item)) for item in on)
        hint = (
            f": write a tuple, on=({names},)" if len(on) == 1 else f": write a tuple, on=({names})"
        )
    raise TypeError(f"{who} on= must be exception types or a predicate, got {on!r}{hint}")


def _check_type(kind: type, who: str) -> None:
    if not issubclass(kind, BaseException):
        raise TypeError(
            f"{who} on= must be exception types or a predicate, got class {kind.__name__}"
        )
    if not _can_act(kind):
        raise ValueError(
            f"{who} on= names {kind.__name__}, an interruption: cancellation,"
            " KeyboardInterrupt and SystemExit are never retried or answered by a fallback,"
            " so it would never act; leave it out"
        )


def error_matches(on: ErrorMatch, error: BaseException) -> bool:
    """Whether ``error`` is one ``on`` names: an instance of its types, or one its predicate
    accepts (a predicate that raises raises here: each caller says what that means)."""
    if isinstance(on, (type, tuple)):
        return isinstance(error, on)
    return bool(on(error))


def _leaves(types: tuple[object, ...]) -> list[object]:
    found: list[object] = []
    for item in types:
        found.extend(_leaves(item) if isinstance(item, tuple) else [item])
    return found


_INTERRUPTIONS = (KeyboardInterrupt, SystemExit, GeneratorExit, asyncio.CancelledError)
"""What a policy never retries nor answers with a fallback: naming one in ``on=`` is a
mistake. Other ``BaseException`` types can still match (an ``ExceptionGroup`` is a
``BaseExceptionGroup``; a user's base class may have ``Exception`` subclasses)."""


def _can_act(kind: type) -> bool:
    """Whether ``kind`` can name a failure a policy acts on: anything but an interruption."""
    return not issubclass(kind, _INTERRUPTIONS)
