"""A request's mapping as it came in, put back in place before a retry.

A retried request runs the app again on the very scope (ASGI) or environ (WSGI) the failed
attempt ran on, and apps, routers and middlewares edit that mapping as they go. Both
middlewares take a :class:`Snapshot` before the first attempt of a request they may retry,
and restore it before each retry, so every attempt starts from the request the server
passed in.
"""

from __future__ import annotations

from collections.abc import MutableMapping
from typing import Any

__all__ = ["Snapshot"]


class Snapshot:
    """A request's mapping (an ASGI scope, a WSGI environ) as it came in, put back in place
    before a retry.

    In place, because the layers outside ours hold the very dict (and the very ``state``
    dict, the ``headers`` list in it) they passed in, and read them once we return: an
    access log, a metrics or an auth middleware must see what the attempt that answered
    stored there, as it would without a retry, not what the failed one did. Each list or
    dict value is copied too, as routers and header middlewares edit those in place
    (``scope["headers"].append(...)``): a retry would otherwise see the failed attempt's
    edits, twice over once it made them again. Anything deeper is shared.
    """

    def __init__(self, request: MutableMapping[str, Any]) -> None:
        self._request = request
        self._items = dict(request)
        self._contents: dict[str, list[Any] | dict[Any, Any]] = {
            key: value.copy()
            for key, value in self._items.items()
            if isinstance(value, (list, dict))
        }

    def restore(self) -> None:
        """The mapping, and each list or dict in it, holds again what it held at first."""
        for key, contents in self._contents.items():
            value = self._items[key]
            if isinstance(value, list):
                value[:] = contents
            elif isinstance(value, dict):
                value.clear()
                value.update(contents)
        self._request.clear()
        self._request.update(self._items)
