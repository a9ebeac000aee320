"""Failures that the client library's own retry already repeated: never repeated again.

HTTP clients retry too. ``requests`` sends through urllib3, which repeats a request as an
``HTTPAdapter``'s ``max_retries`` (a urllib3 ``Retry``) says: connection errors, read errors,
statuses in its ``status_forcelist``, and 413/429/503 answers carrying ``Retry-After``.
httpx's ``HTTPTransport(retries=N)`` repeats failed connections N times. Our retry runs one
level up, around the whole send, so stacking both multiplies what a server receives: an
adapter with ``Retry(total=3, status_forcelist=[503])`` under our three attempts sent twelve
requests for one call. (redis-py's connection ``Retry`` is the same story, decided per plan
from the pool's configuration: see :mod:`._redis_own_retry`.)

So an HTTP failure that the client's retry repeated is only recorded: it is classified,
counted on the breaker, handed to a fallback if one is configured, and returned or raised
unchanged. The trace says why (``otel_recovery.retry.disallowed=client_retried``, and
``otel_recovery.http.client_retries``: how many times the client repeats such a failure).
Making otel-recovery the only retry layer is a matter of the client's own setting (no
``max_retries``, no transport ``retries``).

An HTTP plan is shared by every session and client that sends the same request, while
adapters and transports belong to one of them, so the decision cannot sit in the plan as
Redis's does. The site decides per failure, on the failure path only, and marks the failure
object (:func:`mark`): our own status signal, or the library's exception, which then goes on
unchanged. :class:`~._target_policy.TargetPolicy` reads the mark (:func:`client_retries`) when it
decides what to do after a failure.
"""

from __future__ import annotations

__all__ = ["MARK", "client_retries", "mark"]

MARK = "_otel_recovery_client_retries"
"""The attribute a marked failure carries: how many times the client repeats it."""


def mark(failure: BaseException, retries: int) -> None:
    """Record on ``failure`` that the client's own retry repeats it ``retries`` times.

    Nothing is recorded for 0. An exception that refuses attributes (a read-only
    ``__setattr__``) is left unmarked: our retry then treats it as before, which can only
    cost extra sends, never a lost call.
    """
    if retries <= 0:
        return
    try:
        setattr(failure, MARK, retries)
    except Exception:  # an exotic exception type: no mark, no harm
        return


def client_retries(failure: BaseException) -> int:
    """How many times the client's own retry repeated ``failure``; 0 if it was not marked."""
    try:
        retries = getattr(failure, MARK, 0)
    except Exception:  # a hostile __getattr__ must not replace the caller's error
        return 0
    return retries if type(retries) is int else 0
