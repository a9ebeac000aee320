"""Lock-free counting for hot paths.

``next()`` on a counter is a single C-level step, atomic under the GIL, so threads can
count without a lock; :func:`peek` reads the value without advancing it. (On a
free-threaded build this atomicity is not guaranteed; the counters are then approximate.)

:func:`new_counter` gives the compiled ``Counter`` where the extension is built: the
compiled runner advances it by one addition, where ``itertools.count`` makes and frees an
int object on every ``next()`` (two per remembered happy call). Without the extension it
is ``itertools.count``; both are iterators of ints, and :func:`peek` reads either.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator

from otel_recovery._compiled import SPEEDUPS

__all__ = ["new_counter", "peek"]

_COMPILED: type | None = None if SPEEDUPS is None else SPEEDUPS.Counter


def new_counter() -> Iterator[int]:
    """A counter starting at 0: ``next()`` returns the count and moves it on."""
    if _COMPILED is not None:
        counter: Iterator[int] = _COMPILED()
        return counter
    return itertools.count()


def peek(counter: Iterator[int]) -> int:
    """The next value of ``counter`` without advancing it (a compiled ``Counter``'s
    ``value``; an ``itertools.count``'s repr is ``count(N)``)."""
    if type(counter) is _COMPILED:
        value: int = counter.value  # type: ignore[attr-defined]
        return value
    return int(repr(counter)[6:-1])
