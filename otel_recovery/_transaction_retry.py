"""Retrying a whole database transaction: :func:`run_transaction` and :func:`arun_transaction`.

Work inside one database is undone by the database. These run a function in a transaction
and, on a serialization failure (SQLSTATE 40001) or a deadlock (40P01), roll back and run
the *whole* transaction again with backoff. That is the safe way to retry database writes:
retrying a single statement after such a failure is wrong (the transaction is already
aborted), and retrying after a lost connection may apply a write twice. Any other error
rolls back and propagates.

Kept apart from the saga (compensation stacks, for work spread over systems that share no
transaction), which shares nothing with it but the question it answers; both are public in
:mod:`otel_recovery.compensation`, which re-exports these names and gives them its
``__module__``. What lives here besides the retry itself is refusing what cannot work: a
connection already inside a transaction, and the sync and async forms mixed up (each error
names the right form).
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from otel_recovery._callables import close_unawaited
from otel_recovery.policies import ExponentialBackoff, Retry
from otel_recovery.policies._error_match import error_matches
from otel_recovery.recover import RecoveryPolicy

__all__ = ["arun_transaction", "run_transaction", "transaction_retry"]

T = TypeVar("T")
_RETRYABLE_SQLSTATES = frozenset({"40001", "40P01"})


def _sqlstate(error: BaseException) -> str | None:
    for name in ("sqlstate", "pgcode"):
        value = getattr(error, name, None)
        if isinstance(value, str):
            return value
    return None


def transaction_retry(attempts: int = 5) -> Retry:
    """The default retry of :func:`run_transaction`: only 40001 and 40P01, jittered backoff."""
    return Retry(
        attempts,
        on=lambda error: _sqlstate(error) in _RETRYABLE_SQLSTATES,
        backoff=ExponentialBackoff(initial=0.01, maximum=1.0, jitter="full"),
    )


def _policy(retry: Retry | None, name: str, **options: Any) -> RecoveryPolicy:
    return RecoveryPolicy(retry=_transactional(retry), name=name, **options)


def _transactional(retry: Retry | None) -> Retry:
    """The caller's ``retry`` sets how often and how long; what is retried stays 40001 and
    40P01 (narrowed further by its ``on=``). A ``Retry()`` retrying anything would run the
    whole transaction again after, say, a connection lost during COMMIT, which may have
    committed: the write applied twice."""
    if retry is None:
        return transaction_retry()
    narrowed = copy.copy(retry)
    own = retry.on

    def serialization_failure(error: BaseException) -> bool:
        if _sqlstate(error) not in _RETRYABLE_SQLSTATES:
            return False
        return own is None or error_matches(own, error)

    narrowed.on = serialization_failure
    return narrowed


def _check_idle_psycopg(conn: Any) -> None:
    status = getattr(getattr(conn, "info", None), "transaction_status", None)
    if status is not None and int(status) != 0:  # psycopg.pq.TransactionStatus.IDLE == 0
        raise ValueError(
            "run_transaction needs a connection outside any transaction (it found one "
            "already open): a retried statement inside an aborted transaction cannot succeed. "
            "Commit or roll back first, or pass a fresh connection."
        )


_USE_ARUN = (
    "run_transaction() runs a synchronous function on a psycopg Connection; for {what} "
    "use `await arun_transaction(conn, fn)`"
)


def _refuse_async(conn: Any, fn: Callable[..., Any]) -> None:
    """An async body or connection given to the sync form: its transaction would commit
    with nothing done (the coroutine not awaited) or fail on ``with`` with a message about
    context managers. Said where the call is written, naming the async form."""
    if inspect.iscoroutinefunction(fn):
        raise TypeError(_USE_ARUN.format(what=f"the coroutine function {fn!r}"))
    if inspect.iscoroutinefunction(getattr(conn, "close", None)):
        raise TypeError(_USE_ARUN.format(what=f"the async connection {conn!r}"))


_USE_RUN = (
    "arun_transaction() awaits an async function on an async connection (psycopg "
    "AsyncConnection, asyncpg Connection or Pool); for {what} use run_transaction(conn, fn)"
)


def _refuse_sync(conn: Any, fn: Callable[..., Any]) -> None:
    """A sync connection or a function that cannot be awaited, given to the async form: it
    failed inside the transaction with a message about context managers or ``await``."""
    if not callable(fn):
        raise TypeError(f"arun_transaction() needs a function fn(conn), got {fn!r}")
    close = getattr(conn, "close", None)
    if callable(close) and not inspect.iscoroutinefunction(close):
        raise TypeError(_USE_RUN.format(what=f"the synchronous connection {conn!r}"))


def _awaited(fn: Callable[[Any], Awaitable[T]]) -> Callable[[Any], Awaitable[T]]:
    """``fn``, refusing at its first call what it returns if that cannot be awaited (a
    sync function): the transaction then rolls back, as for any error of ``fn``."""

    async def body(conn: Any) -> T:
        result = fn(conn)
        if not inspect.isawaitable(result):
            raise TypeError(_USE_RUN.format(what=f"the synchronous function {fn!r}"))
        return await result

    return body


def run_transaction(
    conn: Any,
    fn: Callable[[Any], T],
    *,
    retry: Retry | None = None,
    name: str = "transaction",
    **options: Any,
) -> T:
    """Run ``fn(conn)`` in a psycopg transaction; on 40001/40P01 roll back and run it again.

    ``fn`` must be safe to run again from the start: everything it does in the database is
    rolled back between attempts, but side effects outside it (e-mails, HTTP calls) are
    not. ``retry`` defaults to :func:`transaction_retry`; ``options`` go to
    :class:`RecoveryPolicy` (``clock``, ``telemetry``...).
    """
    _refuse_async(conn, fn)
    _check_idle_psycopg(conn)

    def once() -> T:
        with conn.transaction():
            result = fn(conn)
            if inspect.isawaitable(result):  # a lambda around an async body: roll back
                close_unawaited(result)  # a coroutine never runs; a task or future: not ours
                raise TypeError(_USE_ARUN.format(what=f"{fn!r}, which returned an awaitable,"))
            return result

    return _policy(retry, name, **options).call(once)


async def arun_transaction(
    conn: Any,
    fn: Callable[[Any], Awaitable[T]],
    *,
    retry: Retry | None = None,
    name: str = "transaction",
    **options: Any,
) -> T:
    """The async form, for a psycopg ``AsyncConnection``, an asyncpg ``Connection`` or ``Pool``.

    With an asyncpg pool each attempt acquires a connection of its own, so an attempt that
    lost its connection does not doom the next one.
    """
    _refuse_sync(conn, fn)
    module = type(conn).__module__
    fn = _awaited(fn)

    is_pool = hasattr(conn, "acquire") and not hasattr(conn, "is_in_transaction")
    if module.startswith("asyncpg") and is_pool:

        async def on_pool() -> T:
            async with conn.acquire() as connection, connection.transaction():
                return await fn(connection)

        return await _policy(retry, name, **options).acall(on_pool)

    if module.startswith("asyncpg"):
        if conn.is_in_transaction():
            raise ValueError(
                "arun_transaction needs an asyncpg connection outside any transaction; "
                "commit or roll back first, or pass the pool"
            )

        async def on_connection() -> T:
            async with conn.transaction():
                return await fn(conn)

        return await _policy(retry, name, **options).acall(on_connection)

    _check_idle_psycopg(conn)

    async def on_psycopg() -> T:
        async with conn.transaction():
            return await fn(conn)

    return await _policy(retry, name, **options).acall(on_psycopg)
