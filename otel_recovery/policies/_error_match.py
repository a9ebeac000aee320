"""The ``on=`` of :class:`Retry` and :class:`Fallback`: which failures a policy acts on.

One check for both, so a mistake there is refused where the policy is built, with the same
words, rather than found at the first failure (``isinstance`` raising on a tuple holding a
string, or an empty tuple quietly matching nothing).
"""

from __future__ import annotations

from collections.abc import Callable

ErrorMatch = type[BaseException] | tuple[type[BaseException], ...] | Callable[[BaseException], bool]
"""Exception types, or a predicate of the exception."""


def check_error_match(on: object, who: str) -> ErrorMatch:
    """``on`` if it is exception types (a class or a non-empty tuple of them) or a predicate;
    otherwise a ``TypeError`` or ``ValueError`` naming ``who`` (``"Retry"``, ``"Fallback"``)."""
    if isinstance(on, type):
        if not issubclass(on, BaseException):
            raise TypeError(
                f"{who} on= must be exception types or a predicate, got class {on.__name__}"
            )
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
        return on
    if callable(on):
        return on
    raise TypeError(f"{who} on= must be exception types or a predicate, got {on!r}")


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
