"""The responses a middleware answers with in place of the app, and their check.

A fallback's response goes straight to the server, past the app and every layer that would
have checked it there, so its shape is checked here (:func:`check_response`): a fixed one
at construction already, and every one again as it is given. A header value
with a line break in it would split the response (header injection), and one that is not
latin-1 cannot be sent at all; both are refused with the form a response must take.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

__all__ = ["Fallback", "Response", "check_response"]

Response = tuple[int, Sequence[tuple[str, str]], bytes]
"""``(status, headers, body)``: what a middleware answers with in place of the app."""

Fallback = Response | Callable[[str, BaseException], Response]
"""A fixed response, or ``(route, error) -> response``; ``error`` is a
:class:`~otel_recovery.CircuitOpenError` when the route's breaker is open."""


def _header_ok(pair: object) -> bool:
    if not (isinstance(pair, tuple) and len(pair) == 2):
        return False
    for text in pair:
        if not isinstance(text, str) or "\r" in text or "\n" in text:
            return False
        try:
            text.encode("latin-1")
        except UnicodeEncodeError:
            return False
    return True


def check_response(response: object, what: str) -> None:
    """Refuse ``response`` (``what`` names it in the message) unless it is a valid
    :data:`Response` whose headers can be sent as they are."""
    if not (
        isinstance(response, tuple)
        and len(response) == 3
        and isinstance(response[0], int)
        and 100 <= response[0] <= 599
        and isinstance(response[1], (list, tuple))
        and isinstance(response[2], bytes)
        and all(_header_ok(pair) for pair in response[1])
    ):
        raise TypeError(
            f"{what} must be (status, [(header, value), ...], body bytes) with latin-1 "
            "headers and no line breaks in them, for instance "
            f"(503, [('content-type', 'text/plain')], b'try later'); got {response!r}"
        )
