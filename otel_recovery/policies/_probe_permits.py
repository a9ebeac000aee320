"""Whose half-open probe permit is whose: permits held by the calling context.

A half-open breaker lets ``half_open_max_calls`` probes through and decides on their
outcomes. Calls it admitted while it was still closed (stragglers: slow calls to the
dependency that tripped it) end during the half-open period too, and if their outcomes
counted as probes, or their cancellations gave a permit back, one cancelled straggler
would let one more probe through to a dependency that is still stalled (thirty stragglers
cut by ``asyncio.timeout``: thirty-one concurrent probes), and a straggler's late success
would close the circuit before any probe answered.

So a probe permit is held by the context that took it (the thread, or the asyncio task: a
:class:`contextvars.ContextVar`), stamped with the half-open period it was taken in; only the
holder gives it back or counts as a probe. Drivers record a call in the context that asked
:meth:`CircuitBreaker.can_execute`, and nothing on the closed path changes. A permit whose
holder never reports (a call abandoned in another context) is presumed lost after a lease
(see ``CircuitBreaker._acquire``), so a breaker can never stay half-open for good.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from contextvars import ContextVar

__all__ = ["grant", "new_period", "take"]

_PERIODS = itertools.count(1)

_HELD: ContextVar[tuple[tuple[int, int], ...]] = ContextVar(
    "otel_recovery_probe_permits", default=()
)
"""(breaker serial, ticket) of every probe permit the current context holds. A local breaker's
ticket is its half-open period's number (one per permit taken, so a context may hold several
of the same); a fleet-wide breaker's names one permit it was granted."""


def new_period() -> int:
    """A number no other period, ticket or breaker serial has (``next`` is atomic)."""
    return next(_PERIODS)


def grant(serial: int, ticket: int) -> None:
    """The current context holds one more probe permit of breaker ``serial``."""
    _HELD.set((*_HELD.get(), (serial, ticket)))


def take(serial: int, valid: Callable[[int], bool]) -> int | None:
    """Give back one of the current context's permits of breaker ``serial`` whose ticket is
    still ``valid``, and return its ticket; None if it holds none.

    The breaker's tickets that are no longer valid are dropped on the way: their permits
    were lost to a reopened or closed circuit, and nothing else would clear them."""
    held = _HELD.get()
    if not held:
        return None
    found: int | None = None
    kept: list[tuple[int, int]] = []
    for entry in held:
        if entry[0] != serial:
            kept.append(entry)
        elif found is None and valid(entry[1]):
            found = entry[1]
        elif valid(entry[1]):
            kept.append(entry)
    if len(kept) != len(held):
        _HELD.set(tuple(kept))
    return found
