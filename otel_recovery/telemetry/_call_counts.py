"""Breaker call counts per name that never go down.

``otel_recovery.circuit_breaker.calls`` is an observable *monotonic* counter: each
collection reports, per breaker name and outcome, the calls the live breakers of that name
have seen. A breaker that is collected takes its counts along, and one made again under the
same name starts from zero (a target the instrumentors forgot and met again, a breaker made
per configuration reload): the reported total fell, which a cumulative backend takes for a
reset and a delta exporter sends as a negative delta on a monotonic sum.

So the counts a breaker had when last observed are kept for its name when it goes (a weak
reference's callback queues it, without a lock: the collector may run anywhere) and added to
that name's live total from then on. A name with no live breaker left is not reported (its
series goes stale rather than growing the output with every host ever met), and its retired
total is kept for :data:`RETIRED_NAMES` names, least recently retired dropped first, so a
breaker that comes back under it goes on from where it was. Calls made after a breaker's last
observation and before it goes are not counted: the total may lag, never fall.
"""

from __future__ import annotations

import itertools
import weakref
from collections import OrderedDict, deque
from collections.abc import Iterable
from functools import partial

from otel_recovery.policies.circuit_breaker import CircuitBreaker

__all__ = ["OUTCOMES", "RETIRED_NAMES", "BreakerCallCounts"]

OUTCOMES = ("successful", "failed", "not_permitted")
RETIRED_NAMES = 4096
"""Names whose retired totals are kept after their last breaker went."""

_Counts = tuple[int, int, int]


class BreakerCallCounts:
    """The monotonic per-name totals; the caller serialises :meth:`track` and
    :meth:`observe` (``RecoveryMetrics`` holds its lock)."""

    def __init__(self) -> None:
        self._tokens: weakref.WeakKeyDictionary[CircuitBreaker, int] = weakref.WeakKeyDictionary()
        self._refs: dict[int, weakref.ref[CircuitBreaker]] = {}
        self._last: dict[int, tuple[str, _Counts]] = {}
        self._gone: deque[int] = deque()  # appended by weak-reference callbacks
        self._retired: OrderedDict[str, _Counts] = OrderedDict()
        self._numbers = itertools.count()

    def track(self, breaker: CircuitBreaker) -> None:
        if breaker in self._tokens:
            return
        token = next(self._numbers)
        self._tokens[breaker] = token
        self._refs[token] = weakref.ref(breaker, partial(_queue, self._gone, token))

    def observe(self, breakers: Iterable[CircuitBreaker]) -> dict[tuple[str, str], int]:
        """Per (name, outcome), the calls of the live breakers of each name plus what the
        name's breakers that went had counted."""
        self._retire_gone()
        totals: dict[tuple[str, str], int] = {}
        for breaker in breakers:
            token = self._tokens.get(breaker)
            if token is None:
                continue
            snap = breaker.snapshot()
            counts = (snap.successful_calls, snap.failed_calls, snap.not_permitted_calls)
            self._last[token] = (breaker.name, counts)
            for outcome, value in zip(OUTCOMES, counts, strict=True):
                key = (breaker.name, outcome)
                totals[key] = totals.get(key, 0) + value
        for name in {name for name, _ in totals}:
            retired = self._retired.get(name)
            if retired is not None:
                for outcome, value in zip(OUTCOMES, retired, strict=True):
                    totals[(name, outcome)] += value
        return totals

    def _retire_gone(self) -> None:
        while self._gone:
            token = self._gone.popleft()
            self._refs.pop(token, None)
            last = self._last.pop(token, None)
            if last is None:
                continue  # never observed: nothing was reported
            name, counts = last
            before = self._retired.pop(name, (0, 0, 0))
            self._retired[name] = (
                before[0] + counts[0],
                before[1] + counts[1],
                before[2] + counts[2],
            )
            while len(self._retired) > RETIRED_NAMES:
                self._retired.popitem(last=False)


def _queue(gone: deque[int], token: int, _ref: object) -> None:
    """A breaker went: queue its token (no lock: this runs wherever the collector runs)."""
    gone.append(token)
