"""Continuous health monitoring for a :class:`~otel_recovery.orchestration.RecoveryOrchestrator`.

The orchestrator's ``check_health()`` answers once, when asked. A service goes down between
two questions, and what an operator wants is to hear of it when it happens and, where a
recovery plan says how, to have it recovered without anyone asking. :class:`HealthMonitor`
runs every registered ``health_check`` every ``interval`` seconds and keeps, per service, a
:class:`ServiceHealth`.

- **Flapping is damped.** A service counts as down after ``unhealthy_after`` failed checks in
  a row and as up again after ``healthy_after`` passing ones (both 1 by default). Until its
  first verdict a service is unknown (``healthy is None``). A check that raises, answers
  falsy, or takes longer than ``check_timeout`` (default: the interval) fails. A sync check
  runs in a thread of its own, so a blocking ping is bounded too and never stalls the event
  loop. A thread stuck in one is left to finish on its own, and until it does the check
  fails without another thread being started: one started every round (the default
  executor's, as ``asyncio.to_thread`` did) filled that executor in a few rounds, after
  which healthy services' checks and the application's own ``run_in_executor`` calls
  waited too, and ``asyncio.run`` could not return at exit. The threads are daemons.
- **Every change is reported**, and only changes: one ``otel_recovery.health.changed`` event
  per service that changed, on one ``service_health`` span per round that had any (status
  ERROR when a service went down); a warning or info log line; and ``on_change(health)``
  (sync or async) if given. A failing callback is logged and the monitor goes on.
- **Recovery, if asked for.** With ``recovery_plan`` (what
  :meth:`~otel_recovery.orchestration.RecoveryOrchestrator.orchestrate_recovery` takes), a
  service that goes down is recovered in dependency order together with the others that are
  down, and again every ``recovery_interval`` seconds while it stays down; the next check
  decides whether it is up. ``last_recovery`` holds the latest results.

The monitor never raises into its caller's event loop: a round that fails is logged and the
next one runs. Time comes from the orchestrator's clock, so tests drive it with a fake one.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import inspect
import logging
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from types import TracebackType
from typing import TYPE_CHECKING, Any

from opentelemetry.trace import Status, StatusCode

from otel_recovery._callables import resolve
from otel_recovery._clock import Clock, Duration, to_seconds, within
from otel_recovery._recovery_spans import activated, start_span, tracer_of
from otel_recovery._strategy_selection import RecoveryAction, RecoveryStrategy
from otel_recovery.telemetry import Telemetry, watch_health_globally
from otel_recovery.telemetry import attributes as names

if TYPE_CHECKING:
    from otel_recovery.orchestration import RecoveryOrchestrator

__all__ = ["HealthMonitor", "ServiceHealth"]

_log = logging.getLogger("otel_recovery")


@dataclass(frozen=True)
class ServiceHealth:
    """What the monitor knows of one service. Times are on the monitor's clock."""

    service: str
    healthy: bool | None = None
    """None until the first verdict (``unhealthy_after`` or ``healthy_after`` checks)."""
    since: float | None = None
    """When ``healthy`` last changed."""
    checks: int = 0
    failures_in_a_row: int = 0
    passes_in_a_row: int = 0
    last_checked: float | None = None
    last_recovery_at: float | None = None


class HealthMonitor:
    """Runs an orchestrator's health checks continuously; see the module doc.

    Use it as ``async with orchestrator.monitor(interval=10) as monitor:`` (it runs while the
    block does), or ``monitor.start()`` / ``await monitor.stop()``; :meth:`check_once` runs
    one round by hand."""

    def __init__(
        self,
        orchestrator: RecoveryOrchestrator,
        *,
        interval: Duration = 10.0,
        unhealthy_after: int = 1,
        healthy_after: int = 1,
        check_timeout: Duration | None = None,
        recovery_plan: Mapping[str, RecoveryStrategy | RecoveryAction] | None = None,
        recovery_interval: Duration | None = None,
        on_change: Callable[[ServiceHealth], Any] | None = None,
        clock: Clock | None = None,
    ) -> None:
        self.orchestrator = orchestrator
        self.interval = _positive_seconds(interval, "interval")
        self.unhealthy_after = _at_least_one(unhealthy_after, "unhealthy_after")
        self.healthy_after = _at_least_one(healthy_after, "healthy_after")
        self.check_timeout = (
            self.interval
            if check_timeout is None
            else _positive_seconds(check_timeout, "check_timeout")
        )
        if recovery_plan is not None:
            # checked now, as orchestrate_recovery checks it: found at the first outage, a
            # typo would fail every recovery round, the well-planned services' too
            orchestrator._plan(recovery_plan, [])
        self.recovery_plan = recovery_plan
        self.recovery_interval = (
            5 * self.interval
            if recovery_interval is None
            else _positive_seconds(recovery_interval, "recovery_interval")
        )
        if on_change is not None and not callable(on_change):
            raise TypeError(f"on_change must be callable, got {on_change!r}")
        self.on_change = on_change
        self.clock: Clock = clock or orchestrator.clock
        self._health: dict[str, ServiceHealth] = {}
        self.last_recovery: dict[str, dict[str, Any]] = {}
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self.stopped = False
        """:meth:`stop` was called (and :meth:`start` not since): the health metric no
        longer reports this monitor's verdicts, which no one updates any more."""
        self._isolated: set[str] = set()
        """Services this monitor's plan isolated (CIRCUIT_BREAK): their breakers are closed
        again when their health check passes, since nobody else will."""
        self._sync_runs: dict[str, _SyncRun] = {}  # a sync check's latest run
        telemetry = orchestrator.interaction.telemetry
        with contextlib.suppress(Exception):  # telemetry never stops the monitor
            if isinstance(telemetry, Telemetry):
                telemetry.metrics.track_health(self)
            elif telemetry is not False:  # the process-wide one, now and after set_telemetry
                watch_health_globally(self)

    @property
    def status(self) -> dict[str, ServiceHealth]:
        """Each monitored service's health, as of the latest round."""
        return dict(self._health)

    @property
    def down(self) -> list[str]:
        """The services known to be down, in registration order."""
        return [name for name, health in self._health.items() if health.healthy is False]

    # -- one round ------------------------------------------------------------------------------

    async def check_once(self) -> dict[str, ServiceHealth]:
        """Run every health check once (concurrently), report what changed, recover what
        went down if a plan says how; returns :attr:`status`."""
        checks = {
            name: registered.health_check
            for name, registered in self.orchestrator.services.items()
            if registered.health_check is not None
        }
        verdicts = await asyncio.gather(*(self._probe(n, check) for n, check in checks.items()))
        now = self.clock.now()
        changed = [
            health
            for name, passed in zip(checks, verdicts, strict=True)
            if (health := self._record(name, passed, now)) is not None
        ]
        for name in [n for n in self._health if n not in checks]:
            del self._health[name]  # unregistered, or its check removed
        if changed:
            self._report(changed)
            for health in changed:
                if health.healthy and health.service in self._isolated:
                    self._isolated.discard(health.service)
                    self.orchestrator.interaction.reset_circuit(health.service)
                    _log.info(
                        "otel_recovery: service %r is healthy again: its isolation "
                        "(CIRCUIT_BREAK) is lifted",
                        health.service,
                    )
                await self._tell(health)
        if self.recovery_plan is not None:
            await self._recover(now)
        return self.status

    async def _probe(self, name: str, check: Callable[[], Any]) -> bool:
        async def answer() -> Any:
            if inspect.iscoroutinefunction(check):
                return await check()
            # A sync check (a blocking ping) runs in a thread: bounded by the check timeout
            # like any other, it never stalls the event loop it would share.
            running = self._sync_runs.get(name)
            if running is not None and not running.finished.is_set():
                return False  # its last run has not come back: still down, no new thread
            run = self._sync_runs[name] = _SyncRun(check, name)
            return await resolve(await run.outcome())

        try:
            return bool(await within(self.check_timeout, answer()))
        except Exception:  # raising, or too slow (asyncio.TimeoutError): down
            return False

    def _record(self, name: str, passed: bool, now: float) -> ServiceHealth | None:
        """Book one verdict; the new health if the service changed state, else None."""
        old = self._health.get(name) or ServiceHealth(name)
        passes = old.passes_in_a_row + 1 if passed else 0
        failures = 0 if passed else old.failures_in_a_row + 1
        healthy = old.healthy
        if passed and passes >= self.healthy_after:
            healthy = True
        elif not passed and failures >= self.unhealthy_after:
            healthy = False
        new = replace(
            old,
            healthy=healthy,
            since=now if healthy is not old.healthy else old.since,
            checks=old.checks + 1,
            failures_in_a_row=failures,
            passes_in_a_row=passes,
            last_checked=now,
            last_recovery_at=old.last_recovery_at if healthy is False else None,
        )
        self._health[name] = new
        return new if healthy is not old.healthy else None

    def _report(self, changed: list[ServiceHealth]) -> None:
        tracer = tracer_of(self.orchestrator.interaction.telemetry)
        span = start_span(tracer, names.HEALTH_SPAN, {}, self.clock)
        with activated(span, tracer):
            for health in changed:
                span.add_event(
                    names.EVENT_HEALTH_CHANGED,
                    {names.SERVICE_ID: health.service, names.HEALTH_HEALTHY: bool(health.healthy)},
                )
                if health.healthy:
                    _log.info("otel_recovery: service %r is healthy", health.service)
                else:
                    _log.warning(
                        "otel_recovery: service %r is down (%d failed health check(s) in a row)",
                        health.service, health.failures_in_a_row,
                    )  # fmt: skip
            down = sorted(h.service for h in changed if not h.healthy)
            if down:
                span.set_status(Status(StatusCode.ERROR, f"down: {', '.join(down)}"))
        span.end(end_time=int(self.clock.wall() * 1e9))

    async def _tell(self, health: ServiceHealth) -> None:
        if self.on_change is None:
            return
        try:
            await resolve(self.on_change(health))
        except Exception:
            _log.exception("otel_recovery: HealthMonitor on_change(%r) raised", health.service)

    async def _recover(self, now: float) -> None:
        due = [
            name
            for name, health in self._health.items()
            if health.healthy is False
            and (
                health.last_recovery_at is None
                or now - health.last_recovery_at >= self.recovery_interval
            )
        ]
        if not due:
            return
        # A dependency known to be down but not due (recovered a moment ago, in vain) is not
        # among the services orchestrate_recovery is given, so it would not know to skip
        # what needs it: said here, and such a service is looked at again next round.
        down = {name for name, health in self._health.items() if health.healthy is False}
        waiting: dict[str, dict[str, Any]] = {}
        for name in due:
            needs = self.orchestrator._needs(name)
            blocked = sorted(d for d in needs if d in down and d not in due)
            if blocked:
                listed = ", ".join(map(repr, blocked))
                waiting[name] = {
                    "service": name,
                    "status": "skipped",
                    "reason": f"dependency {listed} is down",
                }
        due = [name for name in due if name not in waiting]
        for name in due:
            self._health[name] = replace(self._health[name], last_recovery_at=now)
        results: dict[str, dict[str, Any]] = {}
        if due:
            try:
                results = await self.orchestrator.orchestrate_recovery(due, self.recovery_plan)
            except Exception:
                _log.exception("otel_recovery: recovering %s after a failed health check", due)
                return
        self.last_recovery = {**results, **waiting}
        self._isolated.update(
            name for name, result in results.items() if result.get("status") == "isolated"
        )

    # -- running --------------------------------------------------------------------------------

    async def run(self) -> None:
        """Check every ``interval`` seconds until :meth:`stop` (or cancellation)."""
        self._stopping = False
        self.stopped = False
        while not self._stopping:
            try:
                await self.check_once()
            except Exception:  # one bad round must not end the monitoring
                _log.exception("otel_recovery: a health monitoring round failed")
            if not self._stopping:
                await self.clock.asleep(self.interval)

    def start(self) -> asyncio.Task[None]:
        """Run :meth:`run` as a task of the running event loop (once)."""
        if self._task is not None and not self._task.done():
            raise RuntimeError("this HealthMonitor is already running; stop() it first")
        self._task = asyncio.get_running_loop().create_task(self.run(), name="HealthMonitor")
        return self._task

    async def stop(self) -> None:
        """Stop monitoring and wait for the round in progress to be cancelled."""
        self._stopping = True
        self.stopped = True
        task, self._task = self._task, None
        if task is None or task.done():
            return
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if current is not None and getattr(current, "cancelling", lambda: 0)():
                raise  # our own caller is being cancelled too

    async def __aenter__(self) -> HealthMonitor:
        self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.stop()

    def __repr__(self) -> str:
        state = "running" if self._task is not None and not self._task.done() else "stopped"
        return f"HealthMonitor(interval={self.interval:g}s, {state}, down={self.down})"


class _SyncRun:
    """One run of a sync check, in a daemon thread of its own (in a copy of the caller's
    context).

    Not the loop's default executor: a check stuck there holds one of its few workers, and
    the loop's shutdown waits for it. Whether the run is over is ``finished``, a thread's
    event, not the future the starting round awaits: that future belongs to the round's
    loop, which may be closed before the check returns (``asyncio.run(check_once())`` per
    poll), and a later round in another loop must still see the run end. The outcome
    reaches the future as a value, never as an exception set on it, so a check that fails
    after its round stopped waiting leaves no "exception was never retrieved" behind."""

    __slots__ = ("_outcome", "finished")

    def __init__(self, check: Callable[[], Any], service: str) -> None:
        loop = asyncio.get_running_loop()
        self.finished = threading.Event()
        self._outcome: asyncio.Future[tuple[Any, Exception | None]] = loop.create_future()
        context = contextvars.copy_context()
        outcome = self._outcome

        def run() -> None:
            failure: Exception | None = None
            result: Any = None
            try:
                result = context.run(check)
            except BaseException as error:  # the check's own failure: its verdict is "down"
                # (one that is not an Exception, a SystemExit say, must not end the monitor)
                failure = (
                    error
                    if isinstance(error, Exception)
                    else RuntimeError(f"the health check raised {error!r}")
                )
            self.finished.set()
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits
                loop.call_soon_threadsafe(_settle, outcome, (result, failure))

        name = f"otel-recovery health check {service}"
        threading.Thread(target=run, name=name, daemon=True).start()

    async def outcome(self) -> Any:
        """The check's answer (its exception raised here), shielded: the round's time limit
        cancels the waiting, not the run."""
        result, failure = await asyncio.shield(self._outcome)
        if failure is not None:
            raise failure
        return result


def _settle(outcome: asyncio.Future[Any], value: Any) -> None:
    if not outcome.done():
        outcome.set_result(value)


def _positive_seconds(value: Duration, name: str) -> float:
    seconds = to_seconds(value, name)
    if seconds <= 0:
        raise ValueError(f"{name} must be > 0 seconds, got {value!r}")
    return seconds


def _at_least_one(value: int, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an int >= 1 (checks in a row), got {value!r}")
    return value
