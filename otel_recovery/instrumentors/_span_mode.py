"""Whose span a Redis or PostgreSQL call annotates: contrib's, when its wrapper sits above ours.

The database conventions want *one* span per logical operation, covering its retries. So
these instrumentors patch beneath contrib's wrappers and annotate contrib's span ("current"
span mode). Without contrib there is no such span, and annotating whatever span happens to be
current (an HTTP server span, say) would pin a Redis ``error.type`` on the request; so each
patch site checks, per call, whether a contrib wrapper sits above it (:class:`Site`) and
otherwise lets a failing call open its own ``recover ...`` span ("own" span mode).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

from otel_recovery.instrumentors._wrapping import _wrapper_module

__all__ = ["Site", "SpanMode"]

SpanMode = Literal["own", "current"]

_CONTRIB_PREFIX = "opentelemetry.instrumentation."


class Site:
    """One patched attribute: knows whether a contrib wrapper currently sits above ours.

    The answer is cached against the identity of the attribute's outermost value, so it
    follows contrib instrumenting or uninstrumenting later at the cost of one identity check.
    A hot path reads it inline: ``seen = site.seen``, and if ``site.namespace[attribute] is
    not seen[0]``, ``seen = site.refresh()``; ``seen[1]`` is the span mode.
    """

    __slots__ = ("attribute", "namespace", "owner", "proxy", "seen")

    def __init__(self, owner: Any, attribute: str) -> None:
        self.owner = owner
        self.attribute = attribute
        self.proxy: Any = None  # our layer, once installed
        self.namespace: Mapping[str, Any] = vars(owner)  # a live view of the namespace
        # (outermost value, answer) swapped as one reference, so threads never mix the two
        self.seen: tuple[Any, SpanMode] = (None, "own")

    def span_mode(self) -> SpanMode:
        """``current`` when contrib's wrapper (and so contrib's span) is above ours."""
        return self.current()[1]

    def current(self) -> tuple[Any, SpanMode]:
        """``seen``, brought up to date: one snapshot for a span mode and what a plan
        table made under it is valid for."""
        seen = self.seen
        if self.namespace.get(self.attribute) is not seen[0]:
            seen = self.refresh()
        return seen

    def refresh(self) -> tuple[Any, SpanMode]:
        """Walk the wrapper chain above our layer again; returns the new ``seen``."""
        top = self.namespace.get(self.attribute)
        mode: SpanMode = "own"
        node = top
        for _ in range(32):  # wrapper chains are short; never loop forever on a cycle
            if node is None or node is self.proxy:
                break
            if _wrapper_module(node).startswith(_CONTRIB_PREFIX):
                mode = "current"
                break
            node = getattr(node, "__wrapped__", None)
        self.seen = (top, mode)
        return self.seen
