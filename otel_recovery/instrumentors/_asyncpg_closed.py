"""asyncpg's "connection is closed": news of the server once per connection, not per call.

asyncpg checks a connection before it sends anything, and raises
``InterfaceError("connection is closed")`` for a statement on one that is closed. The first
such error on a connection may be the only sign that the server ended it while it sat idle
(a restart, ``pg_terminate_backend``), so it counts on the server's breaker, as
:class:`~._pg_errors.PostgresClassifier` classifies it. Every later one on that same connection
says nothing more about the server: the application goes on using a connection it was told
is closed, or closed itself. Counted each time, 25 statements on one closed connection
opened the circuit for every other, healthy, connection of that server.

So the failure path finds the connection the check was made on (the ``self`` of asyncpg's
``Connection._check_open``, the innermost frame of the error's traceback) and remembers it,
weakly: from the second error on, the failure is the client's own
(:func:`~._guarded.clients_own` semantics: not retried, not counted, raised as asyncpg
raised it). Nothing of this runs on the happy path.
"""

from __future__ import annotations

import contextlib
import weakref
from typing import Any

from otel_recovery.instrumentors._asyncpg_acquire import ACQUIRING
from otel_recovery.instrumentors._guarded import GuardedPolicy, raised_in

__all__ = ["AsyncpgPolicy", "closed_before"]

_SEEN_CLOSED: weakref.WeakSet[Any] = weakref.WeakSet()
"""Connections a "connection is closed" error has already been counted for."""

_VERDICT = "_otel_recovery_closed_before"
"""Where an error keeps the verdict, so that asking twice gives the same answer."""


def closed_before(error: BaseException) -> bool:
    """Whether ``error`` is asyncpg's "connection is closed" on a connection that such an
    error was already counted for."""
    known = getattr(error, _VERDICT, None)
    if known is not None:
        return bool(known)
    verdict = _judge(error)
    with contextlib.suppress(Exception):  # an error refusing attributes: judged again
        setattr(error, _VERDICT, verdict)
    return verdict


def _judge(error: BaseException) -> bool:
    if type(error).__name__ != "InterfaceError" or str(error) != "connection is closed":
        return False
    frame = raised_in(error)
    if frame is None or frame.f_code.co_name != "_check_open":
        return False
    connection = frame.f_locals.get("self")
    if connection is None:
        return False
    try:
        if connection in _SEEN_CLOSED:
            return True
        _SEEN_CLOSED.add(connection)
    except TypeError:  # not weakly referable: counted each time, as before
        return False
    return False


class AsyncpgPolicy(GuardedPolicy):
    """An asyncpg target's policy: a closed connection is news of the server once."""

    __slots__ = ()

    def _clients_own(self, error: BaseException) -> bool:
        return closed_before(error) or super()._clients_own(error)

    def _counted(self, error: BaseException) -> None:
        """Counted inside a pool's acquire that holds a connection (a statement of its
        ``init`` or ``setup`` callback): the acquire must not count it again."""
        state = ACQUIRING.get()
        if state is not None and state.holding:
            state.counted = error
