"""A local circuit breaker's half-open probe permits: given back, presumed lost, reset on fork.

In HALF_OPEN, ``can_execute()`` grants at most ``half_open_max_calls`` probe permits (the
state machine, :mod:`otel_recovery.policies.circuit_breaker`, counts them in ``_in_flight``
and stamps each with the current half-open period). A permit is held by the context that
took it (:mod:`._probe_permits`): only its holder gives it back or counts as a probe. The
breaker cannot wait for every holder for ever, though: a call abandoned where its permit
cannot be given back would keep it half-open for good, and a forked child has none of the
threads that held permits. What the breaker does about each is here.

The fleet-wide breaker keeps its permits in Redis, under leases of its own, and overrides
``_take_probe()`` (``stores/_shared_view.py``).

:class:`BreakerProbes` is a mixin of ``CircuitBreaker``: it has no slots of its own and works
on the breaker's (``_Probed`` lists those it uses).
"""

from __future__ import annotations

from typing import Protocol

from otel_recovery._clock import Clock
from otel_recovery.policies._probe_permits import take

__all__ = ["PROBE_LEASE_FLOOR", "BreakerProbes"]

PROBE_LEASE_FLOOR = 30.0
"""Seconds a half-open probe permit may be out, at least, before it is presumed lost."""


class _Probed(Protocol):
    """The slots of ``CircuitBreaker`` that :class:`BreakerProbes` uses."""

    _clock: Clock
    _current_timeout: float
    _in_flight: int
    _period: int
    _probe_granted_at: float
    _serial: int


class BreakerProbes:
    """The probe-permit bookkeeping of ``CircuitBreaker`` (see the module doc)."""

    __slots__ = ()

    def _after_fork_in_child(self: _Probed) -> None:
        """A forked child has none of the threads that held half-open probe permits: give
        them back, or the child's breaker would refuse every call for good. A probe of the
        forking thread itself then ends on a breaker with no permit out (``record_*`` and
        ``release`` never take the count below zero)."""
        self._in_flight = 0

    def _take_probe(self: _Probed) -> int | None:
        """The calling context gives back a probe permit of this half-open period, if it
        holds one (:mod:`otel_recovery.policies._probe_permits`)."""
        period = self._period
        return take(self._serial, lambda ticket: ticket == period)

    def _probes_lost(self: _Probed) -> bool:
        """Whether the permits out have been held for longer than a probe may take: the
        open time, and at least 30 s, since the latest was granted. Their holders are
        presumed gone (a call abandoned where its permit cannot be given back), so the
        breaker cannot stay half-open for good; a late report then counts as a straggler's
        (totals only), not as a probe. Long, because a
        probe to a stalled dependency is slow by nature and must not be joined by another."""
        lease = max(self._current_timeout, PROBE_LEASE_FLOOR)
        return self._clock.now() - self._probe_granted_at >= lease
