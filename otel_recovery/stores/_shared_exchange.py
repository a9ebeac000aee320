"""One exchange of a fleet-wide breaker or budget with Redis: its turn, its script, its bound.

Each link (:mod:`._shared_link`) talks to Redis over a connection pool of its own
(:func:`bounded_client`), built from the store's URL and options but with
:data:`DECISION_TIMEOUT` socket timeouts: a breaker decision may wait for Redis on a failure
or probe, and must never wait the store's 5 s for a server that stopped answering. Scripts
(:meth:`LinkExchanges.run`) and the PING of a degraded link run with OpenTelemetry
instrumentation suppressed, so the sync traffic neither makes spans nor passes through our
own Redis instrumentor.

**The decision bound.** Each member talks to Redis one exchange at a time (its ``_talk``
lock, taken through :meth:`LinkExchanges.turn`: pushes and replies stay in order), yet a
server that stops answering must not cost each caller queued on a member the timeout in
turn. So an exchange that meets an error degrades the link (:mod:`._shared_outage`)
*before* it lets go of the lock (whoever gets the lock next finds the member local and
decides locally at once), and nobody waits for the lock longer than
:data:`DECISION_TIMEOUT` (a turn not had by then counts as a timeout: the exchange ahead is
stuck). When Redis stops answering, every decision, the first included, thus waits at most
that long, however many callers there are. The worst case is twice that: the exchange ahead
got its reply just within the bound, then this caller's got none.

:class:`LinkExchanges` is a mixin of ``Link``: it works on the link's attributes
(``_Exchanging`` lists those it uses).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any, Protocol

from opentelemetry import context as otel_context

from otel_recovery._redact import redact
from otel_recovery.stores._base import StoreUnavailableError
from otel_recovery.telemetry._suppressed import SUPPRESS_KEY

if TYPE_CHECKING:
    import redis

    from otel_recovery._redis_replica import ReplicaReconnect
    from otel_recovery.stores._shared_member import Member
    from otel_recovery.stores.redis import RedisStore

__all__ = ["DECISION_TIMEOUT", "LinkExchanges", "bounded_client"]

DECISION_TIMEOUT = 0.25
"""Connect and read timeout (s) of every shared-state call, and the longest a caller waits for
its turn to make one (see "The decision bound" in the module doc)."""


def bounded_client(store: RedisStore) -> redis.Redis:
    """A client on the store's server with :data:`DECISION_TIMEOUT` timeouts and no retries."""
    import redis
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    options = {
        **getattr(store, "_options", {}),
        "socket_timeout": DECISION_TIMEOUT,
        "socket_connect_timeout": DECISION_TIMEOUT,
        "retry": Retry(NoBackoff(), 0),
    }
    target = getattr(store, "_target", None)
    if target is None:  # pragma: no cover - a RedisStore without its URL: share its client
        return store.client
    return redis.Redis.from_url(target, **options)


class _Exchanging(Protocol):
    """What of ``Link`` :class:`LinkExchanges` uses."""

    url: str
    client: redis.Redis
    _closed: bool
    _errors: tuple[type[redis.exceptions.RedisError], type[OSError]]
    _replica: ReplicaReconnect
    _scripts: dict[str, Any]

    def _disconnect(self) -> None: ...

    def _go_local(
        self, error: StoreUnavailableError
    ) -> tuple[StoreUnavailableError, list[Member]] | None: ...

    def _report(self, error: StoreUnavailableError, members: list[Member]) -> None: ...


class LinkExchanges:
    """A link's exchanges with Redis: a member's turn, a script run, a PING."""

    __slots__ = ()

    @contextlib.contextmanager
    def turn(
        self: _Exchanging, talk: threading.Lock, member: Member | None = None
    ) -> Iterator[None]:
        """Hold a member's ``talk`` lock for one exchange (see "The decision bound").

        Raises :class:`StoreUnavailableError` when the lock is not had within
        :data:`DECISION_TIMEOUT`, or when ``member`` (None for a resync, which runs while the
        member is local) is no longer shared once it is: the exchange it waited for degraded
        the link. An error inside degrades the link before the lock is let go.
        """
        if not talk.acquire(timeout=DECISION_TIMEOUT):
            raise StoreUnavailableError(
                f"Redis store {self.url} is unavailable: no turn to ask it"
            ) from TimeoutError(f"waited {DECISION_TIMEOUT}s for the reply to an exchange ahead")
        outage: tuple[StoreUnavailableError, list[Member]] | None = None
        try:
            if member is not None and member.degraded:
                raise StoreUnavailableError(f"Redis store {self.url} is unavailable")
            yield
        except StoreUnavailableError as error:
            outage = self._go_local(error)
            raise
        finally:
            talk.release()
            if outage is not None:  # reported outside the lock: logging runs user handlers
                self._report(*outage)

    def run(self: _Exchanging, source: str, keys: Sequence[str], args: Sequence[Any]) -> Any:
        """Run a script; an unreachable server raises :class:`StoreUnavailableError`."""
        if self._closed:  # pragma: no cover - members hold the store: none is left to call
            raise StoreUnavailableError(f"Redis store {self.url} is gone")
        token = otel_context.attach(otel_context.set_value(SUPPRESS_KEY, True))
        try:
            script = self._scripts.get(source)
            if script is None:
                script = self._scripts[source] = self.client.register_script(source)
            try:
                return script(keys=list(keys), args=list(args))
            except self._errors as exc:
                # READONLY: the connection reached a demoted primary (a failover moved the
                # address) and the script did not run: once more, on a new connection
                if not self._replica.close_stale(exc, self.client):
                    raise
            return script(keys=list(keys), args=list(args))
        except self._errors as exc:
            detail = redact(str(exc)) or type(exc).__name__
            raise StoreUnavailableError(f"Redis store {self.url} is unavailable: {detail}") from exc
        finally:
            otel_context.detach(token)
            if self._closed:  # pragma: no cover - gone while we talked: close what we reopened
                self._disconnect()

    def _ping(self: _Exchanging) -> bool:
        token = otel_context.attach(otel_context.set_value(SUPPRESS_KEY, True))
        try:
            return bool(self.client.ping())
        except Exception:  # any failure means: not back yet
            return False
        finally:
            otel_context.detach(token)
