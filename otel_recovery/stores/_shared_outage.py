"""A link's outage: every member local at once, one announcement, reconnecting, the resync.

**Degradation.** Any member call that meets an unreachable or failing Redis (refused, timed
out, or an error reply such as OOM or READONLY) degrades the whole link
(:meth:`LinkOutage.degrade`, or the exchange's turn itself: :mod:`._shared_exchange`):
every member switches to its plain local logic at once, one warning is logged and one
``otel_recovery.store.degraded`` event is added (to the current span, or to a short
``otel_recovery.store`` span when the thread noticed it). While degraded nobody calls Redis
except the link thread (:mod:`._shared_link`), which PINGs every :data:`RECONNECT_INTERVAL`
seconds with the bounded timeout. When Redis answers, each member *resyncs* (pushes what it
did locally, then adopts the shared state; defined in each member's module), and one info
line plus one ``otel_recovery.store.resynced`` event close the outage. Store errors never
reach callers.

:class:`LinkOutage` is a mixin of ``Link``: it works on the link's attributes (``_Degradable``
lists those it uses).
"""

from __future__ import annotations

import logging
import threading
import weakref
from typing import TYPE_CHECKING, Any, Protocol

from opentelemetry import trace

from otel_recovery._clock import SYSTEM_CLOCK
from otel_recovery._redact import redact
from otel_recovery.stores._base import StoreUnavailableError
from otel_recovery.telemetry import attributes as names

if TYPE_CHECKING:
    from otel_recovery.stores._shared_member import Member

__all__ = ["RECONNECT_INTERVAL", "LinkOutage", "announce"]

_log = logging.getLogger("otel_recovery")

RECONNECT_INTERVAL = 1.0
"""Seconds between reconnection attempts while degraded."""


class _Degradable(Protocol):
    """What of ``Link`` :class:`LinkOutage` uses."""

    url: str
    _lock: threading.Lock
    _closed: bool
    _members: weakref.WeakSet[Member]
    _degraded_at: float | None
    _next_probe: float

    def _ping(self) -> bool: ...

    def degrade(self, error: StoreUnavailableError) -> None: ...

    def _go_local(
        self, error: StoreUnavailableError
    ) -> tuple[StoreUnavailableError, list[Member]] | None: ...

    def _report(self, error: StoreUnavailableError, members: list[Member]) -> None: ...


class LinkOutage:
    """A link's outage bookkeeping: degrading, reporting, and recovering from it."""

    __slots__ = ()

    # Link's attribute, None while not degraded (declared for the type checker: the
    # methods below set it, and would otherwise define it as a plain float)
    _degraded_at: float | None

    def degrade(self: _Degradable, error: StoreUnavailableError) -> None:
        """Switch every member to local state; announce the outage once."""
        outage = self._go_local(error)
        if outage is not None:
            self._report(*outage)

    def _go_local(
        self: _Degradable, error: StoreUnavailableError
    ) -> tuple[StoreUnavailableError, list[Member]] | None:
        """Switch every member to local state; what to report if this began the outage."""
        with self._lock:
            # the store is gone: no member is left to tell (nothing to report)
            first = self._degraded_at is None and not self._closed
            now = SYSTEM_CLOCK.now()
            if first:
                self._degraded_at = now
            if first or self._next_probe <= now:  # callers queued behind it: no postponing
                self._next_probe = now + RECONNECT_INTERVAL
            members = list(self._members)
        for member in members:
            member.go_local()
        return (error, members) if first else None

    def _report(self: _Degradable, error: StoreUnavailableError, members: list[Member]) -> None:
        _log.warning(
            "otel_recovery: store %s is unreachable (%s); circuit breakers and retry budgets "
            "sharing state through it use local state until it is back, then resync",
            self.url,
            redact(str(error.__cause__ or error)),
        )
        attrs: dict[str, Any] = {
            names.STORE_URL: self.url,
            names.ERROR_TYPE: type(error.__cause__ or error).__name__,
            names.STORE_COMPONENTS: sorted(m.description for m in members),
        }
        announce(names.EVENT_STORE_DEGRADED, attrs)

    def _recover(self: _Degradable, members: list[Member]) -> None:
        if not self._ping():
            with self._lock:
                self._next_probe = SYSTEM_CLOCK.now() + RECONNECT_INTERVAL
            return
        try:
            for member in members:
                member.resync()
        except StoreUnavailableError as error:
            self.degrade(error)  # members that did resync go local again; no second warning
            return
        with self._lock:
            started, self._degraded_at = self._degraded_at, None
        outage = 0.0 if started is None else max(0.0, SYSTEM_CLOCK.now() - started)
        _log.info(
            "otel_recovery: store %s is reachable again after %.1fs; %d circuit breaker(s) and "
            "retry budget(s) pushed their local outcomes and use shared state again",
            self.url,
            outage,
            len(members),
        )
        announce(
            names.EVENT_STORE_RESYNCED,
            {
                names.STORE_URL: self.url,
                names.STORE_OUTAGE: outage,
                names.STORE_COMPONENTS: sorted(m.description for m in members),
            },
        )


def announce(event: str, attrs: dict[str, Any]) -> None:
    """Add ``event`` to the current span, or to a short span of its own when there is none."""
    try:
        span = trace.get_current_span()
        if span.is_recording():
            span.add_event(event, attrs)
            return
        from otel_recovery.telemetry import get_telemetry

        with get_telemetry().tracer.start_as_current_span(names.STORE_SPAN) as own:
            own.add_event(event, attrs)
    except Exception:  # telemetry must never turn an outage report into a failure
        _log.debug("otel_recovery: could not record %s", event, exc_info=True)
