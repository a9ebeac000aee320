"""Numbered pushes: what a fleet-wide member sends Redis counts once, even when sent twice.

Why: a push whose reply timed out (Redis slow, not down) may still run on the server a
moment later, and the member, which counted it locally meanwhile, pushes the outage's
counts at the resync: without a number, that failure, batch of calls or retry counted twice
(a threshold-2 circuit opened on one failure; 50 calls became 100). Every push that adds
counts now carries its member's next number, and the scripts skip a number at or below the
last one they applied for that member (:data:`ONCE`; the budget's script also keeps
whether that push's withdrawal was granted). The push that timed out stays *in
doubt* (:class:`Doubt`): the resync sends it again under its own number before anything
else, and Redis applies whichever copy arrives first, once. Its counts are then no longer
owed by the rest of the resync (each member knows which of its local counts the push in
doubt carried).

A member's last number lives in a key of its own (``<prefix><kind>:<name>:<member id>``)
that each push keeps alive for :data:`REMEMBERED_MS`: a copy of a push arriving later than
that (a network partition holding a packet for a day) would be counted again.
"""

from __future__ import annotations

import itertools
import uuid
from typing import TYPE_CHECKING

from otel_recovery.stores._base import StoreUnavailableError

if TYPE_CHECKING:
    from otel_recovery.stores.redis import RedisStore

__all__ = ["ONCE", "REMEMBERED_MS", "Doubt", "UnansweredPushError", "Pushes"]

REMEMBERED_MS = 86400 * 1000
"""How long Redis remembers a member's last applied number after its last push (1 day)."""

ONCE = """
local function applied_before(key, number, remembered)
  if number == '' then return false end
  if tonumber(redis.call('GET', key) or '0') >= tonumber(number) then return true end
  redis.call('SET', key, number, 'PX', remembered)
  return false
end
"""
"""Lua: ``applied_before(key, number, remembered)`` is true for a number this member's
pushes already reached (skip it), else records the number and is false."""


class Doubt:
    """A push sent without a reply: its number and the counts to send it again with.

    ``own``: the counts of the push that the member also recorded locally when the push
    failed (the failure that was being pushed, say), taken off what the resync owes once
    handed over (:meth:`hand_over`)."""

    __slots__ = ("handed", "number", "own", "sent")

    def __init__(self, number: int, sent: tuple[int, ...], own: tuple[int, ...]) -> None:
        self.number = number
        self.sent = sent
        self.own = own
        self.handed = False

    def hand_over(self) -> tuple[int, ...] | None:
        """The own counts, the first time they are asked for; None after (lock held)."""
        if self.handed:
            return None
        self.handed = True
        return self.own


class UnansweredPushError(StoreUnavailableError):
    """The caller's own push got no reply: it may have been applied (``doubt``)."""

    def __init__(self, message: str, doubt: Doubt) -> None:
        super().__init__(message)
        self.doubt = doubt


class Pushes:
    """One member's numbering: the key Redis keeps its last number under, the next number,
    and the push in doubt, if any."""

    __slots__ = ("_kind", "_name", "_numbers", "_store", "doubt", "key")

    def __init__(self, store: RedisStore, kind: str, name: str) -> None:
        self._store, self._kind, self._name = store, kind, name
        self.doubt: Doubt | None = None
        self.key = ""
        self._numbers = itertools.count(1)
        self.restart()

    def restart(self) -> None:
        """A new member id, numbering from 1, nothing in doubt: a forked child's pushes are
        its own (the parent sends its push in doubt again itself)."""
        self.key = self._store.key(self._kind, self._name, uuid.uuid4().hex[:12])
        self._numbers = itertools.count(1)
        self.doubt = None

    def number(self) -> int:
        return next(self._numbers)

    def in_doubt(
        self,
        error: StoreUnavailableError,
        number: int,
        sent: tuple[int, ...],
        own: tuple[int, ...],
    ) -> UnansweredPushError:
        """Remember the push numbered ``number`` as in doubt; the error to raise for it."""
        doubt = self.doubt
        if doubt is None or doubt.number != number:  # a resend keeps its first record
            doubt = self.doubt = Doubt(number, sent, own)
        failed = UnansweredPushError(str(error), doubt)
        failed.__cause__ = error.__cause__ or error
        return failed
