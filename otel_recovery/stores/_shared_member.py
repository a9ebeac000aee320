"""What a fleet-wide breaker or budget offers the link that shares its state through Redis.

The link (:mod:`._shared_link`) drives its members without knowing what they are: its
thread asks each whether a sync is due and runs it, an outage turns every member local at
once, and its end resyncs each. :class:`Member` is that contract (met by
:mod:`._shared_view` and :mod:`._shared_budget`), kept apart so that each part of the link
(:mod:`._shared_exchange`, :mod:`._shared_outage`) can name it without importing
:mod:`._shared_link`, which is made of them.
"""

from __future__ import annotations

from typing import Protocol

__all__ = ["Member"]


class Member(Protocol):
    """What a fleet-wide component offers its link (all called from the link thread but
    ``go_local``, which may run in any thread, and ``after_fork``, which runs in a forked
    child before any other code of the child)."""

    @property
    def description(self) -> str: ...

    @property
    def sync_interval(self) -> float: ...

    @property
    def shared(self) -> bool: ...

    @property
    def degraded(self) -> bool:
        """Local because the link is degraded: its exchanges stop until the resync."""
        ...

    def sync_due(self, now: float) -> bool: ...

    def sync_now(self) -> None: ...

    def go_local(self) -> None: ...

    def resync(self) -> None: ...

    def after_fork(self) -> None: ...
