"""Failures met at another server than the call's own: a redirect took the request there.

An HTTP instrumentor wraps the method that follows redirects (``Session.request``,
``Client.send``, ``ClientSession._request``), so one call may reach several servers, while
its plan, and with it the breaker and the retry budget, is the first URL's. When a
redirect's target fails (``api`` answers ``GET /dl`` with a 307 to ``files``, and
``files`` is down), the server the call was planned for answered, and answered well. Counted
on its breaker, another server's outage would open its circuit, and the application's next
``POST`` to the healthy ``api`` would be refused; retried, every attempt would ask ``api``
again for what ``api`` already answered.

So such a failure is the application's as it came: it is not retried, it counts as a
success on the first server's breaker (the answer it gave), a configured fallback still
answers it, and the recovery trace says ``otel_recovery.retry.disallowed=redirected``.
The HTTP site tells, on the failure path only, from what the failure carries: a failed
response's ``history`` (its first request's URL against its own), or the request an
exception names (httpx's ``error.request``, requests' ``error.request``, aiohttp's
``ClientConnectorError.host``/``port``; for an aiohttp failure that names no request, a
``ServerDisconnectedError``, the ``url`` its ``ClientSession._request`` frame was sending
to), against the URL the call asked for. A failure that says nothing of where it was met is
taken as the first server's, as before. A redirect that stays on the same host and port
changes nothing.
"""

from __future__ import annotations

__all__ = ["MARK", "Server", "answered_elsewhere", "mark_elsewhere"]

MARK = "_otel_recovery_answered_elsewhere"
"""The attribute a failure met at another server carries."""

Server = tuple[str, "int | None"]
"""A server as the target table names it: ``(host, port)`` (``_http.server_of_url``)."""


def mark_elsewhere(failure: BaseException, asked: Server | None, failed: Server | None) -> bool:
    """Mark ``failure`` if it was met at ``failed`` and the call asked ``asked``, both
    known and different; whether it was marked. An exception that refuses attributes is
    left unmarked (the first server's, as before)."""
    if asked is None or failed is None or asked == failed:
        return False
    try:
        setattr(failure, MARK, True)
    except Exception:  # an exotic exception type: no mark
        return False
    return True


def answered_elsewhere(failure: BaseException) -> bool:
    """Whether ``failure`` was marked as met at another server than the call's own."""
    try:
        return getattr(failure, MARK, False) is True
    except Exception:  # a hostile __getattr__ must not replace the caller's error
        return False
