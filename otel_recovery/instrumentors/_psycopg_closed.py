"""psycopg's "the connection is closed": the client's own refusal, never news of the server.

psycopg checks a connection before it sends anything. On one that is closed (by the
application's ``close()``, or by an earlier failure that broke it) it raises a plain
``OperationalError("the connection is closed")``, or ``"the connection is lost"`` where
libpq has already let go of the socket, without a SQLSTATE and without a byte sent. Unlike
asyncpg (:mod:`._asyncpg_closed`), psycopg does not watch an idle connection: a server that
ended one is learned of only when a statement is sent on it, from libpq's own error, which
counts on the breaker as the server's failure. So every one of these later refusals is the
client's doing: counted each time, 20 statements on a cursor whose connection was closed
opened the circuit of a healthy server, and every other connection's statements and
connects were refused for its open time.

Such a failure is neither retried nor counted (:class:`~._guarded.GuardedPolicy`'s
``_clients_own``) and reaches the application as psycopg raised it.
"""

from __future__ import annotations

import psycopg

from otel_recovery.instrumentors._guarded import GuardedPolicy

__all__ = ["PsycopgPolicy", "refused_closed"]

_CLOSED_MESSAGES = frozenset({"the connection is closed", "the connection is lost"})
"""psycopg's words (3.1 to 3.3) for a connection it will not send on."""


def refused_closed(error: BaseException) -> bool:
    """Whether ``error`` is psycopg refusing to send on a connection already closed: the
    base ``OperationalError`` with one of :data:`_CLOSED_MESSAGES` and no SQLSTATE (a
    server's error always carries one, and maps to a subclass)."""
    return (
        type(error) is psycopg.OperationalError
        and error.sqlstate is None
        and str(error) in _CLOSED_MESSAGES
    )


class PsycopgPolicy(GuardedPolicy):
    """A psycopg target's policy: a statement refused on a closed connection is the
    client's own failure (:func:`refused_closed`)."""

    __slots__ = ()

    def _clients_own(self, error: BaseException) -> bool:
        return refused_closed(error) or super()._clients_own(error)
