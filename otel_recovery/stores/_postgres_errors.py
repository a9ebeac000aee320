"""What a failed call tells the PostgreSQL store: is its server unavailable, may it run again?

Two decisions made from the error alone, and the words the caller is told.

Unavailable (:func:`is_unavailable`): the server cannot take the call in its present state,
which is not the caller's fault and may pass. Such a failure reaches the caller as
:class:`StoreUnavailableError`, so a :class:`~otel_recovery.stores.ResilientStore` degrades
instead of the application failing, and closes the connection, so the next call connects
again (perhaps to a new primary). Any other error (a bug, a refused compare-and-set) goes to
the caller as it is.

Once more (:func:`runs_again`): only a failure that proves nothing ran may be followed by a
second attempt, since this store never does anything twice. The proof is that the session
ended (the server's ``57P0x`` or a connection found lost) on the attempt's first round trip,
and that round trip could change nothing: a ``BEGIN``, or a read. The same holds for a table
dropped under a running store (:func:`table_missing`): the statement failed before it could
change anything. The rule and its reasons are the store's (:mod:`.postgres`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, NoReturn

import psycopg

from otel_recovery._redact import redact
from otel_recovery.stores._base import StoreUnavailableError
from otel_recovery.stores._postgres_plans import Step

if TYPE_CHECKING:
    from otel_recovery.stores.postgres import PostgresStore

__all__ = [
    "UNAVAILABLE",
    "busy",
    "failed",
    "is_unavailable",
    "raise_failure",
    "runs_again",
    "table_missing",
    "unavailable",
]

UNAVAILABLE = (psycopg.OperationalError, psycopg.InterfaceError, OSError)
"""Every error of these types means unavailable: a connection lost or refused, ``57P01``
terminated, ``57014`` ``statement_timeout``, ``53xxx`` out of resources, ..."""
_REFUSED_NOW = frozenset({"25006", "25P03", "25P04", "42501"})
"""SQLSTATEs (outside ``OperationalError``) of a server that cannot take the call now."""
_SESSION_ENDED = frozenset({"57P01", "57P02", "57P03"})


def is_unavailable(error: BaseException) -> bool:
    return isinstance(error, UNAVAILABLE) or getattr(error, "sqlstate", None) in _REFUSED_NOW


def runs_again(
    exc: Exception,
    conn: psycopg.Connection[Any] | psycopg.AsyncConnection[Any],
    reused: bool,
    fired: bool,
    step: Step,
    atomic: bool,
    repeatable: bool,
    again: bool,
) -> bool:
    """The store's rule: the session (reused, idle before) ended on the first round trip of
    an attempt, and that round trip could have changed nothing."""
    if again or fired or not reused or not step.first or not (atomic or repeatable):
        return False
    ended = getattr(exc, "sqlstate", None) in _SESSION_ENDED
    return ended or (isinstance(exc, psycopg.OperationalError) and conn.closed)


def table_missing(exc: Exception, fired: bool) -> bool:
    # The statement failed before it could change anything (a transaction is rolled
    # back whole): create what is missing, then run the operation once more.
    return not fired and isinstance(exc, psycopg.errors.UndefinedTable)


def failed(
    store: PostgresStore, exc: BaseException | None, fired: bool
) -> StoreUnavailableError | None:
    """The :class:`StoreUnavailableError` the caller gets for ``exc`` (None: the watchdog
    cut a success short), or None when ``exc`` goes to the caller as it is."""
    if fired:
        return StoreUnavailableError(
            f"PostgreSQL store {store.url} is unavailable: no reply within "
            f"{store.operation_timeout:g} s (operation_timeout); the connection was closed"
        )
    assert exc is not None
    if isinstance(exc, psycopg.errors.UndefinedTable):
        return StoreUnavailableError(
            f"PostgreSQL store {store.url} is unavailable: {redact(str(exc).strip())} "
            f"(its tables {store.table}_* were dropped and could not be created again; "
            "create them, or let the store's role create them)"
        )
    return unavailable(store, exc) if is_unavailable(exc) else None


def raise_failure(store: PostgresStore, exc: BaseException | None, fired: bool) -> NoReturn:
    """Raise what the caller gets for ``exc`` (see :func:`failed`)."""
    converted = failed(store, exc, fired)
    if converted is None:
        assert exc is not None
        raise exc
    raise converted from exc


def busy(store: PostgresStore) -> StoreUnavailableError:
    return StoreUnavailableError(
        f"PostgreSQL store {store.url} is unavailable: its connection has been busy for "
        f"{store.operation_timeout:g} s (operation_timeout) with another operation"
    )


def unavailable(store: PostgresStore, exc: BaseException) -> StoreUnavailableError:
    detail = redact(str(exc).strip()) or type(exc).__name__
    return StoreUnavailableError(f"PostgreSQL store {store.url} is unavailable: {detail}")
