"""The attempt of asyncpg's ``Pool._acquire`` in progress, seen from the layers inside it.

Why a module of its own: the acquire wrapper (:mod:`._asyncpg_connects`) and the target's policy
(:mod:`._asyncpg_closed`), whose statements run inside an acquire when a pool's ``init`` or
``setup`` callback sends them, both read it.
"""

from __future__ import annotations

import contextvars

__all__ = ["ACQUIRING", "Acquiring"]


class Acquiring:
    """One attempt of ``Pool._acquire``: whether it has taken a connection holder from the
    pool yet (``PoolConnectionHolder.acquire``, which connects if need be), and the failure
    a statement inside it (a pool callback's) already counted on the server's breaker.
    Before taking a holder it only waits for the application's own pool: a failure then
    (its ``acquire(timeout=)`` running out on an exhausted pool, the pool closing) is the
    client's own, never the server's (:func:`~._guarded.clients_own`)."""

    __slots__ = ("counted", "holding")

    def __init__(self) -> None:
        self.holding = False
        self.counted: BaseException | None = None


ACQUIRING: contextvars.ContextVar[Acquiring | None] = contextvars.ContextVar(
    "otel_recovery_asyncpg_acquiring", default=None
)
"""The attempt of ``Pool._acquire`` in progress: a connect nested in it passes straight
through (the acquire is the one retried), and taking a holder is noted on it. asyncpg's
``wait_for`` runs the acquire in a task of its own, with a copy of this context: the object
is shared, so what it notes there is seen here."""
