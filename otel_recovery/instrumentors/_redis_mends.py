"""What the Redis instrumentor mends after a failed attempt: calls that must not go out again.

A command that may not be sent twice is resent after a failure that proves it never ran
(:func:`~._redis_errors.never_ran`), and any command may be resent on a new connection.
Neither holds for every client, and which client it is shows only after the failure:
redis-py's own ``Retry`` may have resent the command already (the refusal, or the failed
reconnect, may then answer that resend, after the first send ran); a replica's refusal would
meet the same replica again on a connection we do not close; a client with a connection of
its own carries session state (a ``MULTI``, a ``WATCH``, a ``SELECT``) that a new connection
lacks. The instrumentor's mend (``RedisRecoveryInstrumentor._mends``) asks after each failed
attempt and marks the failure (``hold_back``, ``session_bound`` of :mod:`._target_retries`), so
that its policy does not resend it.
"""

from __future__ import annotations

from typing import Any

from otel_recovery._redis_replica import closable, refused_by_replica
from otel_recovery.instrumentors._redis_errors import never_ran
from otel_recovery.instrumentors._redis_own_retry import idle_ones_resend, own_coverage
from otel_recovery.instrumentors._target_retries import hold_back, session_bound

__all__ = ["hold_back_unproven", "keep_to_the_session"]


def hold_back_unproven(error: BaseException, args: tuple[Any, ...]) -> None:
    """Where a failure that would prove a command never ran
    (:func:`~._redis_errors.never_ran`) proves nothing or a resend cannot help, keep the
    failed call from being resent (a mend, after each failed attempt). Checked again per
    failure, beyond the target's ``never_ran``: a ``Retry`` changed in place
    (``update_retries``) keeps its identity, and with it the target's cached facts."""
    if not never_ran(error):
        return
    client = args[0] if args else None
    pool = getattr(client, "connection_pool", None)
    kwargs = getattr(pool, "connection_kwargs", None)
    if not isinstance(kwargs, dict):
        hold_back(error)
        return
    errors, retries, _ = own_coverage(kwargs, kwargs.get("retry"))
    # redis-py may have resent it (so it may have run), or a resend would meet the same
    # replica on the same connection (one we do not close)
    stale = refused_by_replica(error) and not closable(client)
    if (retries and errors) or stale or idle_ones_resend(pool):
        hold_back(error)


def keep_to_the_session(error: BaseException, args: tuple[Any, ...]) -> None:
    """A client with a connection of its own (``single_connection_client=True``,
    ``Redis.client()``) is one session, whose state the application may have set by hand:
    a ``MULTI`` (the command was queued, not run), a ``WATCH``, a ``SELECT``. A resend goes
    on a new connection, without that state: a queued ``SET`` would run at once, outside
    the transaction, and a read would see another database. Such a client's failed calls
    are not resent (``retry.disallowed=session``); its failures still count. Asked after a
    failure only."""
    client = args[0] if args else None
    if getattr(client, "connection", None) is not None:
        session_bound(error)
