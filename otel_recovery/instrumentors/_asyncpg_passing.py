"""What asyncpg sends that passes an open circuit: its own transaction control, and a pool's
reset of a connection it takes back.

``Transaction`` updates its bookkeeping before it sends ``BEGIN``, ``COMMIT``, ``ROLLBACK``
or a savepoint, so refusing one would leave the client and the server disagreeing about the
transaction (see :mod:`.asyncpg`): those go straight to the original ``Connection.execute``
(:func:`passing_transaction_control`). What a pool sends when it takes a connection back
would, refused, raise out of ``pool.release()`` after the application's work had committed:
while it runs (:func:`resetting`), :data:`RESETTING` names the connection, whose statements
the instrumentor then sends as without us.
"""

from __future__ import annotations

import contextvars
from collections.abc import Callable
from typing import Any

import asyncpg  # type: ignore[import-untyped]

__all__ = ["RESETTING", "passing_transaction_control", "resetting"]


RESETTING: contextvars.ContextVar[Any] = contextvars.ContextVar(
    "otel_recovery_asyncpg_resetting", default=None
)
"""The connection whose ``Connection.reset`` is running (a pool resets every connection it
takes back): its statements pass an open circuit (:meth:`~.asyncpg.\
AsyncPGRecoveryInstrumentor._passes_refused`)."""


_TRANSACTION_CONTROL = ("BEGIN", "COMMIT", "ROLLBACK", "SAVEPOINT ", "RELEASE SAVEPOINT ")
"""How the statements asyncpg's ``Transaction`` sends begin; it spells them so, as one
statement ending in ``;`` (``Connection._reset``, run by a pool taking a connection back,
sends ``ROLLBACK`` without one); a script such as ``"BEGIN; ...; COMMIT"`` is gated as
usual."""


def passing_transaction_control(
    build: Callable[[Callable[..., Any]], Callable[..., Any]],
    originals: dict[str, Callable[..., Any]],
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """``build`` for ``Connection.execute``, sending transaction control straight to the
    original (see the module docstring). ``Transaction`` calls ``execute(query)`` and
    nothing else; the layer stays a plain function returning the awaitable of the one it
    wraps, so every other statement still takes the compiled path. The original is kept in
    ``originals["execute"]`` (what a refused reset is sent through)."""

    def build_passing(original: Callable[..., Any]) -> Callable[..., Any]:
        originals["execute"] = original
        layer = build(original)

        def execute(*args: Any, **kwargs: Any) -> Any:
            if (
                len(args) == 2
                and not kwargs
                and type(args[1]) is str
                and args[1].startswith(_TRANSACTION_CONTROL)
                # one statement, not a script: `ROLLBACK;` as Transaction spells it, or
                # `ROLLBACK` as Connection._reset does
                and args[1].find(";") in (-1, len(args[1]) - 1)
            ):
                return original(*args)
            return layer(*args, **kwargs)

        return execute

    return build_passing


async def resetting(wrapped: Callable[..., Any], instance: Any, args: Any, kwargs: Any) -> Any:
    """``Connection.reset``, and ``PoolConnectionHolder.release`` (``instance._con``), what a
    pool runs on every connection it takes back: its statements pass an open circuit (see
    :meth:`~.asyncpg.AsyncPGRecoveryInstrumentor._passes_refused`). The release, not only ``reset``:
    a pool made with ``reset=`` runs ``Connection._reset`` and the application's callback
    instead of ``reset``."""
    connection = instance if isinstance(instance, asyncpg.Connection) else instance._con
    token = RESETTING.set(connection)
    try:
        return await wrapped(*args, **kwargs)
    finally:
        RESETTING.reset(token)
