"""Continuous health monitoring (``RecoveryOrchestrator.monitor``): the seed's "continuous
service health checks", with changes reported once and recovery of what went down."""

from __future__ import annotations

import asyncio
import logging
import time

import pytest
from opentelemetry.trace import StatusCode

from otel_recovery.interaction import ErrorRecoveryInteraction, RecoveryAction, RecoveryStrategy
from otel_recovery.orchestration import HealthMonitor, RecoveryOrchestrator, ServiceHealth


class Service:
    """A dependency whose health the test switches; its check counts how often it ran."""

    def __init__(self, up: bool = True) -> None:
        self.up = up
        self.checks = 0
        self.recoveries = 0

    async def check(self) -> bool:
        self.checks += 1
        return self.up

    def recover(self) -> str:
        self.recoveries += 1
        self.up = True
        return "restarted"


@pytest.fixture
def orchestrator(fake_clock) -> RecoveryOrchestrator:
    return RecoveryOrchestrator(ErrorRecoveryInteraction(clock=fake_clock))


def _states(monitor: HealthMonitor) -> dict[str, bool | None]:
    return {name: health.healthy for name, health in monitor.status.items()}


async def test_each_change_is_reported_once(orchestrator, recovery_telemetry, caplog):
    db, cache = Service(), Service()
    orchestrator.register_service("database", health_check=db.check)
    orchestrator.register_service("cache", health_check=cache.check)
    changes: list[ServiceHealth] = []
    monitor = orchestrator.monitor(interval=10, on_change=changes.append)

    with caplog.at_level(logging.INFO, logger="otel_recovery"):
        await monitor.check_once()  # first verdicts: both up
        db.up = False
        await monitor.check_once()
        await monitor.check_once()  # still down: nothing new to say
        db.up = True
        await monitor.check_once()

    assert _states(monitor) == {"database": True, "cache": True}
    assert [(c.service, c.healthy) for c in changes] == [
        ("database", True), ("cache", True), ("database", False), ("database", True),
    ]  # fmt: skip
    assert (db.checks, cache.checks) == (4, 4)
    assert "service 'database' is down" in caplog.text
    spans = [s for s in recovery_telemetry.spans() if s.name == "service_health"]
    assert len(spans) == 3  # a span only for rounds that changed something
    down = spans[1]
    assert down.status.status_code is StatusCode.ERROR
    assert [(e.attributes["otel_recovery.service.id"], e.attributes["otel_recovery.health.healthy"])
            for e in down.events] == [("database", False)]  # fmt: skip


async def test_each_services_health_is_a_metric(orchestrator, recovery_telemetry):
    db, cache = Service(), Service(up=False)
    orchestrator.register_service("metric-db", health_check=db.check)
    orchestrator.register_service("metric-cache", health_check=cache.check)
    monitor = orchestrator.monitor(interval=10, unhealthy_after=2)

    def points() -> list[tuple[str, int]]:  # other tests' monitors may still be alive
        found = recovery_telemetry.metric_points("otel_recovery.service.health")
        return sorted(
            (p["otel_recovery.service.id"], v)
            for p, v in found
            if p["otel_recovery.service.id"].startswith("metric-")
        )

    await monitor.check_once()
    assert points() == [("metric-db", 1)]  # the cache: no verdict yet
    await monitor.check_once()
    assert points() == [("metric-cache", 0), ("metric-db", 1)]


async def test_flapping_is_damped(orchestrator):
    db = Service()
    orchestrator.register_service("database", health_check=db.check)
    monitor = orchestrator.monitor(interval=10, unhealthy_after=2, healthy_after=3)
    await monitor.check_once()
    assert _states(monitor) == {"database": None}  # no verdict after one pass of three
    for _ in range(2):
        await monitor.check_once()
    assert _states(monitor) == {"database": True}
    db.up = False
    await monitor.check_once()
    assert _states(monitor) == {"database": True}  # one failure is not two
    await monitor.check_once()
    assert _states(monitor) == {"database": False} and monitor.down == ["database"]


async def test_a_check_that_raises_or_hangs_counts_as_down(orchestrator):
    import threading

    async def hangs() -> bool:
        await asyncio.sleep(3600)
        return True

    def raises() -> bool:
        raise ConnectionError("refused")

    released, returned = threading.Event(), threading.Event()
    ran_in: list[threading.Thread] = []

    def blocks() -> bool:  # a sync ping that hangs: it must neither pass nor stall the loop
        ran_in.append(threading.current_thread())
        released.wait(10)  # until the test lets go
        returned.set()
        return True

    orchestrator.register_service("slow", health_check=hangs)
    orchestrator.register_service("broken", health_check=raises)
    orchestrator.register_service("blocking", health_check=blocks)
    monitor = orchestrator.monitor(interval=10, check_timeout=0.05)  # real time: the point
    started = time.monotonic()
    try:
        await asyncio.wait_for(monitor.check_once(), 5)
        took = time.monotonic() - started
        # The loop came back while the blocking ping still hung: it neither waited for it nor
        # ran it (shown by events, not timed, so a loaded machine cannot change it).
        assert not returned.is_set()
    finally:
        released.set()
    assert _states(monitor) == {"slow": False, "broken": False, "blocking": False}
    assert returned.wait(5) and ran_in[0] is not threading.current_thread()
    # Cut at the 0.05 s check timeout; waiting for the hanging or the held check would have
    # run into wait_for's 5 s. Half of that: a wide margin for a loaded machine.
    assert took < 2.5


async def test_what_went_down_is_recovered_in_dependency_order(orchestrator, fake_clock):
    db, api = Service(), Service()
    orchestrator.dependencies = {"api": ["database"]}
    orchestrator.register_service("database", health_check=db.check, recover=db.recover)
    orchestrator.register_service("api", health_check=api.check, recover=api.recover)
    plan = {
        "database": RecoveryStrategy(RecoveryAction.SELF_HEAL),
        "api": RecoveryStrategy(RecoveryAction.SELF_HEAL),
    }
    monitor = orchestrator.monitor(interval=10, recovery_plan=plan)
    await monitor.check_once()
    db.up = api.up = False
    await monitor.check_once()  # both down: recovered, database first
    assert (db.recoveries, api.recoveries) == (1, 1)
    assert {n: r["status"] for n, r in monitor.last_recovery.items()} == {
        "database": "success", "api": "success",
    }  # fmt: skip
    await monitor.check_once()
    assert _states(monitor) == {"database": True, "api": True}


async def test_a_service_that_stays_down_is_recovered_again_only_after_the_interval(
    orchestrator, fake_clock
):
    db = Service()
    attempts: list[float] = []

    def fails() -> None:
        attempts.append(fake_clock.now())
        raise ConnectionError("still down")

    orchestrator.register_service("database", health_check=db.check, recover=fails)
    plan = {"database": RecoveryStrategy(RecoveryAction.RETRY, max_attempts=1)}
    monitor = orchestrator.monitor(interval=10, recovery_plan=plan, recovery_interval=30)
    db.up = False
    await monitor.check_once()
    for _ in range(3):
        fake_clock.advance(10)
        await monitor.check_once()
    assert len(attempts) == 2  # at 0 s and 30 s, not at 10 s and 20 s
    assert attempts[1] - attempts[0] >= 30


async def test_it_runs_until_stopped_and_survives_a_failing_callback(
    orchestrator, fake_clock, caplog
):
    db = Service()
    orchestrator.register_service("database", health_check=db.check)

    def broken(_: ServiceHealth) -> None:
        raise RuntimeError("a bug in the user's callback")

    with caplog.at_level(logging.ERROR, logger="otel_recovery"):
        async with orchestrator.monitor(interval=10, on_change=broken) as monitor:
            for _ in range(20):
                await asyncio.sleep(0)
            db.up = False
            for _ in range(20):
                await asyncio.sleep(0)
            assert monitor.down == ["database"]
    assert db.checks >= 3 and fake_clock.sleeps[:2] == [10, 10]
    assert "on_change('database') raised" in caplog.text
    checks = db.checks
    await asyncio.sleep(0)
    assert db.checks == checks  # stopped
    assert "stopped" in repr(monitor)


async def test_starting_twice_and_bad_arguments_are_refused(orchestrator):
    monitor = orchestrator.monitor(interval=10)
    monitor.start()
    with pytest.raises(RuntimeError, match="already running"):
        monitor.start()
    await monitor.stop()
    for bad, message in [
        ({"interval": 0}, "interval must be > 0 seconds"),
        ({"unhealthy_after": 0}, "unhealthy_after must be an int >= 1"),
        ({"recovery_plan": ["database"]}, "recovery_plan must map service"),
        ({"on_change": "log"}, "on_change must be callable"),
    ]:
        with pytest.raises((TypeError, ValueError), match=message):
            orchestrator.monitor(**bad)


async def test_a_monitor_made_before_the_telemetry_changed_is_still_a_metric(fake_clock):
    from otel_recovery.testing import capture_telemetry

    orchestrator = RecoveryOrchestrator(ErrorRecoveryInteraction(clock=fake_clock))
    db = Service()
    orchestrator.register_service("ledger", health_check=db.check)  # a name of its own:
    monitor = orchestrator.monitor(interval=10)  # other tests' monitors may still be alive
    await monitor.check_once()  # made before capture_telemetry's set_telemetry
    with capture_telemetry() as captured:
        points = captured.metric_points("otel_recovery.service.health")
    assert ({"otel_recovery.service.id": "ledger"}, 1) in points


def test_a_sync_check_stuck_in_its_thread_is_not_started_again_until_it_returns():
    """Every round started the stuck check once more in the loop's default executor: in a
    few rounds the executor was full, healthy services' checks and the application's own
    ``run_in_executor`` calls waited behind them, and ``asyncio.run`` could not return."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    released = threading.Event()
    entered = []

    def hangs() -> bool:  # a ping through a server that stopped answering, no timeout
        entered.append(threading.current_thread().name)
        released.wait(10)
        return True

    async def healthy() -> bool:
        return True

    def rounds(orchestrator: RecoveryOrchestrator) -> list[dict[str, bool | None]]:
        orchestrator.register_service("cache", health_check=hangs)
        orchestrator.register_service("db", health_check=lambda: True)
        orchestrator.register_service("api", health_check=healthy)
        # Real time: the healthy sync check ("db", a thread of its own each round) must
        # answer within it, on a loaded machine too; only the first round waits it out
        monitor = orchestrator.monitor(interval=10, check_timeout=1.0)

        async def main() -> list[dict[str, bool | None]]:
            # an executor as small as a 1-core host's default (5 workers): full after five
            # rounds if each round parked one more thread in it
            asyncio.get_running_loop().set_default_executor(ThreadPoolExecutor(5))
            seen = []
            for _ in range(8):
                await monitor.check_once()
                seen.append(_states(monitor))
            mine = await asyncio.wait_for(asyncio.to_thread(lambda: "app's own work"), 2)
            assert mine == "app's own work"
            return seen

        return asyncio.run(main())

    answered: list[list[dict[str, bool | None]]] = []
    runner = threading.Thread(
        target=lambda: answered.append(rounds(RecoveryOrchestrator(ErrorRecoveryInteraction()))),
        daemon=True,
    )
    runner.start()
    runner.join(8)  # asyncio.run returns although the check is still stuck
    stuck = runner.is_alive()
    released.set()
    runner.join(5)
    assert not stuck, "asyncio.run waited for the stuck check's thread"
    assert answered and all(
        states == {"cache": False, "db": True, "api": True} for states in answered[0]
    ), answered
    assert len(entered) == 1  # one thread for the stuck check, however many rounds


def test_a_sync_check_that_outlived_its_rounds_loop_runs_again_in_the_next_one():
    """``asyncio.run(monitor.check_once())`` per poll: the stuck run's future belonged to a
    closed loop and never completed, so the check was never run again and the service
    stayed down for good."""
    import threading

    gate, returned = threading.Event(), threading.Event()
    calls = []

    def check() -> bool:
        calls.append(1)
        if len(calls) == 1:
            gate.wait(5)  # slower than the round allows
            returned.set()
        return True

    orchestrator = RecoveryOrchestrator(ErrorRecoveryInteraction())
    orchestrator.register_service("db", health_check=check)
    # Real time: the second run must answer within it, on a loaded machine too
    monitor = orchestrator.monitor(interval=10, check_timeout=1.0)
    asyncio.run(monitor.check_once())
    assert _states(monitor) == {"db": False}
    gate.set()
    assert returned.wait(5)
    # the thread marks the run over right after the check returns
    assert monitor._sync_runs["db"].finished.wait(5)
    asyncio.run(monitor.check_once())
    assert _states(monitor) == {"db": True} and len(calls) == 2


def test_a_sync_check_failing_after_its_round_gave_up_logs_nothing(caplog):
    """Its exception was set on a future nobody read: asyncio logged "Future exception was
    never retrieved" (ERROR, with the check's traceback) into the application's logs."""
    import gc
    import threading

    raised = threading.Event()

    def check() -> bool:
        time.sleep(0.1)
        raised.set()
        raise ConnectionError("ping failed")

    orchestrator = RecoveryOrchestrator(ErrorRecoveryInteraction())
    orchestrator.register_service("cache", health_check=check)
    monitor = orchestrator.monitor(interval=10, check_timeout=0.02)

    async def rounds() -> None:
        await monitor.check_once()
        assert await asyncio.to_thread(raised.wait, 5)
        await asyncio.sleep(0.05)  # the outcome reaches the loop
        gc.collect()

    with caplog.at_level(logging.ERROR, logger="asyncio"):
        asyncio.run(rounds())
        gc.collect()
    assert "never retrieved" not in caplog.text


def test_a_plan_with_a_typo_is_refused_when_the_monitor_is_made(orchestrator):
    """Found at the first outage, it failed every recovery round, the well-planned
    services' too, with only an error log to say why."""
    orchestrator.register_service("cache", health_check=Service().check)
    with pytest.raises(ValueError, match="did you mean 'cache'"):
        orchestrator.monitor(recovery_plan={"cahce": RecoveryAction.RETRY})
    with pytest.raises(TypeError, match="must be a RecoveryStrategy"):
        orchestrator.monitor(recovery_plan={"cache": "retry"})


async def test_an_isolation_the_monitor_made_is_lifted_when_the_service_is_healthy(orchestrator):
    """A CIRCUIT_BREAK in the monitor's plan force-opens the breaker while the service is
    down; nobody else will reset it, so one blip isolated the service for good."""
    payments = Service()
    orchestrator.register_service("payments", health_check=payments.check)
    monitor = orchestrator.monitor(
        recovery_plan={"payments": RecoveryStrategy(RecoveryAction.CIRCUIT_BREAK)}
    )
    await monitor.check_once()
    payments.up = False
    await monitor.check_once()
    assert monitor.last_recovery["payments"]["status"] == "isolated"
    breaker = orchestrator.interaction.get_circuit_breaker("payments")
    assert not breaker.can_execute()
    payments.up = True
    await monitor.check_once()
    assert breaker.can_execute()
    outcome = await orchestrator.interaction.recover_from_error(
        ConnectionError("blip"), {"service_id": "payments", "retry_func": lambda: "paid"}
    )
    assert outcome["recovery_status"] == "success"


async def test_a_stopped_monitor_no_longer_reports_its_stale_verdicts(
    orchestrator, recovery_telemetry
):
    """Its last "up" hid a live monitor's "down" for the same service (the SDK keeps one
    point per series): an alert on down would not fire."""
    old_view, new_view = Service(), Service(up=False)
    orchestrator.register_service("stale-db", health_check=old_view.check)
    old = orchestrator.monitor(interval=10)
    await old.check_once()
    old.start()
    await old.stop()

    other = RecoveryOrchestrator(orchestrator.interaction)
    other.register_service("stale-db", health_check=new_view.check)
    live = other.monitor(interval=10)
    await live.check_once()
    found = recovery_telemetry.metric_points("otel_recovery.service.health")
    assert [v for p, v in found if p["otel_recovery.service.id"] == "stale-db"] == [0]
    assert old.stopped and not live.stopped


async def test_a_service_whose_dependency_is_known_down_waits_for_it(orchestrator, fake_clock):
    """The database went down and its recovery failed; the api went down a round later,
    while the database was not due again. Given only the api, the orchestration did not
    know its dependency was down, and recovered it against a dead database."""
    db, api = Service(), Service()
    db_attempts: list[float] = []

    def db_fails() -> None:
        db_attempts.append(fake_clock.now())
        raise ConnectionError("still down")

    orchestrator.dependencies = {"api": ["database"]}
    orchestrator.register_service("database", health_check=db.check, recover=db_fails)
    orchestrator.register_service("api", health_check=api.check, recover=api.recover)
    plan = {
        "database": RecoveryStrategy(RecoveryAction.RETRY, max_attempts=1),
        "api": RecoveryStrategy(RecoveryAction.SELF_HEAL),
    }
    monitor = orchestrator.monitor(interval=10, recovery_plan=plan, recovery_interval=60)
    await monitor.check_once()
    db.up = False
    await monitor.check_once()  # the database's recovery fails
    fake_clock.advance(10)
    api.up = False
    await monitor.check_once()  # the database is not due again yet
    assert api.recoveries == 0
    assert monitor.last_recovery["api"] == {
        "service": "api", "status": "skipped", "reason": "dependency 'database' is down",
    }  # fmt: skip
    db.up = True
    await monitor.check_once()  # the database is back: the api is recovered now
    assert api.recoveries == 1 and len(db_attempts) == 1
