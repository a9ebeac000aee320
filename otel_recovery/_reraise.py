"""Raising a library's exception again exactly as the library raised it.

A ``raise error`` sets ``error.__context__`` to the exception being handled at that moment,
replacing the one the library's own code gave it. Our layers raise the final error of a
call again after recovery, and when the application made the call inside an ``except``
block of its own, its exception would take the place of the library's chain (a requests
``ConnectionError`` would show the application's ``KeyError`` where its urllib3
``ProtocolError`` over the reset belonged). :func:`reraise` puts the context back before
the error leaves.
"""

from __future__ import annotations

from typing import NoReturn

__all__ = ["reraise"]


def reraise(error: BaseException) -> NoReturn:
    """Raise ``error`` with the ``__context__`` it had: a bare ``raise`` re-raises it
    without chaining it to anything again."""
    context = error.__context__
    try:
        raise error
    except BaseException:
        error.__context__ = context
        del error, context  # no frame -> error -> traceback -> frame cycle
        raise
