"""Raising a library's exception again exactly as the library raised it.

A ``raise error`` sets ``error.__context__`` to the exception being handled at that moment,
replacing the one the library's own code gave it. Our layers raise the final error of a
call again after recovery, and when the application made the call inside an ``except``
block of its own, its exception would take the place of the library's chain (a requests
``ConnectionError`` would show the application's ``KeyError`` where its urllib3
``ProtocolError`` over the reset belonged). :func:`reraise` puts the context back before
the error leaves.

The write goes through ``BaseException``'s own slot, never the error's ``__setattr__``:
a domain error declared as a frozen dataclass (or a frozen ``attrs`` class) refuses every
attribute assignment, and ``error.__context__ = ...`` would replace the application's error
with a ``FrozenInstanceError`` about our bookkeeping. The interpreter's own ``raise`` sets
the slot the same way.
"""

from __future__ import annotations

from typing import Any, NoReturn

__all__ = ["reraise", "set_context"]

_CONTEXT_SLOT: Any = BaseException.__dict__["__context__"]
"""The slot descriptor itself: its ``__set__`` bypasses a subclass's ``__setattr__``."""


def reraise(error: BaseException) -> NoReturn:
    """Raise ``error`` with the ``__context__`` it had: a bare ``raise`` re-raises it
    without chaining it to anything again."""
    context = error.__context__
    try:
        raise error
    except BaseException:
        set_context(error, context)
        del error, context  # no frame -> error -> traceback -> frame cycle
        raise


def set_context(error: BaseException, context: BaseException | None) -> None:
    """Set ``error.__context__`` as ``raise`` does, whatever ``error``'s ``__setattr__``
    does (a frozen dataclass exception's refuses)."""
    if error.__context__ is not context:
        _CONTEXT_SLOT.__set__(error, context)
