"""Lock-free counting for hot paths.

``next()`` on an ``itertools.count`` is a single C-level step, atomic under the GIL, so
threads can count without a lock; :func:`peek` reads the value without advancing it. (On a
free-threaded build this atomicity is not guaranteed; the counters are then approximate.)
"""

from __future__ import annotations

import itertools

__all__ = ["peek"]


def peek(counter: itertools.count[int]) -> int:
    """The next value of ``counter`` without advancing it; its repr is ``count(N)``."""
    return int(repr(counter)[6:-1])
