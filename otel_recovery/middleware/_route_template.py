"""The default route of a request: its method and its path with ids folded into ``{id}``.

A route names a breaker (:mod:`._route_breakers`), and a breaker's name ends up in metrics,
so the default must neither make a route per resource nor carry ids or personal data; pass
``route=`` to the middleware for your framework's own templates.
"""

from __future__ import annotations

import re

__all__ = ["route_template"]

_ROUTE_WORD = re.compile(r"\.?[a-z]+(?:[-_.][a-z]+)*|v\d{1,3}")
"""A path segment kept in a default route: lowercase words (``orders``, ``reset-password``,
``favicon.ico``, ``.well-known``) or an API version (``v1``)."""

_WORD_MAX = 40


def route_template(method: str, path: str) -> str:
    """``"GET /orders/{id}"`` for ``GET /orders/42``: the default route of both middlewares.

    A route is a breaker, and a breaker's name is a metric attribute: raw paths would make a
    breaker per order (up to ``max_routes``, then none) and put ids, tokens and personal
    data in metrics, as HTTP semantic conventions forbid for ``http.route``. So only
    segments that read as route words are kept, and every other one is ``{id}``: numbers,
    UUIDs and hashes, but also emails, short codes, tokens with or without digits, and
    anything with capitals, percent-escapes or punctuation. Telling a resource's name from
    a route's by its letters is a guess that errs on the side of folding (a route spelt
    ``/Search`` becomes ``/{id}``, and shares its breaker); a lowercase word that names a
    resource (``/users/alice``) still looks like a route. Pass ``route=`` for your
    framework's own templates."""
    segments = [
        segment
        if not segment or (len(segment) <= _WORD_MAX and _ROUTE_WORD.fullmatch(segment))
        else "{id}"
        for segment in path.split("/")
    ]
    return f"{method} {'/'.join(segments) or '/'}"
