"""RecoveryOrchestrator: dependency order, concurrency, cascade prevention, health, correlation."""

from __future__ import annotations

import asyncio

import pytest
from opentelemetry.trace import StatusCode

from otel_recovery.classify import Classifier
from otel_recovery.interaction import ErrorRecoveryInteraction, RecoveryAction, RecoveryStrategy
from otel_recovery.orchestration import RecoveryOrchestrator
from otel_recovery.policies import CircuitState, FixedBackoff

RETRY = RecoveryStrategy(action=RecoveryAction.RETRY, backoff=FixedBackoff(1.0))


@pytest.fixture
def orchestrator(fake_clock) -> RecoveryOrchestrator:
    interaction = ErrorRecoveryInteraction(
        classifier=Classifier(clock=fake_clock), clock=fake_clock, telemetry=False
    )
    orch = RecoveryOrchestrator(interaction)
    orch.dependencies = {"api": ["database", "cache"], "frontend": ["api", "cdn"]}
    return orch


class Recorder:
    """Recover callables that log their calls and fail a given number of times first."""

    def __init__(self) -> None:
        self.log: list[str] = []

    def make(self, name: str, failures: int = 0, error: type[Exception] = ConnectionError):
        left = [failures]

        async def recover() -> str:
            self.log.append(name)
            await asyncio.sleep(0)
            if left[0]:
                left[0] -= 1
                raise error(f"{name} still down")
            return f"{name} up"

        return recover


def test_recovery_order_puts_dependencies_first_and_groups_independent_services(orchestrator):
    assert orchestrator.recovery_order(["frontend", "api", "database"]) == [
        ["database"],
        ["api"],
        ["frontend"],
    ]
    assert orchestrator.recovery_order(["cache", "database", "api"]) == [
        ["cache", "database"],
        ["api"],
    ]


def test_order_sees_through_healthy_services_in_between(orchestrator):
    # frontend needs api (healthy) which needs database (failed): database still goes first
    assert orchestrator.recovery_order(["frontend", "database"]) == [["database"], ["frontend"]]


def test_a_dependency_cycle_is_a_value_error_naming_it(orchestrator):
    orchestrator.dependencies = {"a": ["b"], "b": ["c"], "c": ["a"], "d": []}
    with pytest.raises(ValueError, match=r"cycle.*(a -> .*|b -> .*|c -> .*)") as caught:
        orchestrator.recovery_order(["a", "b", "c", "d"])
    assert all(name in str(caught.value) for name in "abc")
    assert orchestrator.recovery_order(["a", "d"]) in ([["a", "d"]], [["d", "a"]])


def test_dependencies_are_validated_on_assignment(orchestrator):
    with pytest.raises(TypeError):
        orchestrator.dependencies = {"api": "database"}  # a string is not a list of names
    with pytest.raises(TypeError):
        orchestrator.dependencies = ["api"]  # type: ignore[assignment]
    orchestrator.dependencies = {"x": ("y",)}
    assert orchestrator.dependencies == {"x": ("y",)}


def test_the_dependency_graph_read_back_cannot_be_changed_in_place(orchestrator):
    """An item written into the live dict skipped the checks: ``deps["api"] = "database"``
    was read one letter at a time, and ``api`` recovered alongside ``database``."""
    orchestrator.dependencies = {"api": ["database"]}
    graph = orchestrator.dependencies
    with pytest.raises(TypeError):
        graph["api"] = "database"  # type: ignore[index]
    assert orchestrator.recovery_order(["api", "database"]) == [["database"], ["api"]]


async def test_services_recover_in_dependency_order(orchestrator, fake_clock):
    recorder = Recorder()
    for name in ("database", "api", "frontend"):
        orchestrator.register_service(name, recover=recorder.make(name, failures=1))
    results = await orchestrator.orchestrate_recovery(
        failed_services=["frontend", "api", "database"],
        recovery_plan={name: RETRY for name in ("frontend", "api", "database")},
    )
    assert recorder.log == ["database", "database", "api", "api", "frontend", "frontend"]
    assert list(results) == ["frontend", "api", "database"]
    for name, result in results.items():
        assert result["status"] == "success" and result["attempts"] == 2
        assert result["result"] == f"{name} up" and result["strategy"] == "retry"
    assert fake_clock.sleeps == [1.0, 1.0, 1.0]


async def test_independent_services_of_a_layer_recover_concurrently(orchestrator):
    arrived: list[str] = []
    release = asyncio.Event()

    def make(name: str):
        async def recover() -> str:
            arrived.append(name)
            if len(arrived) == 2:
                release.set()
            await asyncio.wait_for(release.wait(), timeout=5)  # deadlocks if run one by one
            return name

        return recover

    orchestrator.register_service("cache", recover=make("cache"))
    orchestrator.register_service("database", recover=make("database"))
    results = await orchestrator.orchestrate_recovery(["cache", "database"], {})
    assert {r["status"] for r in results.values()} == {"success"}
    assert sorted(arrived) == ["cache", "database"]


async def test_a_service_whose_dependency_failed_is_skipped(orchestrator, fake_clock):
    recorder = Recorder()
    orchestrator.register_service("database", recover=recorder.make("database", failures=9))
    orchestrator.register_service("api", recover=recorder.make("api"))
    orchestrator.register_service("frontend", recover=recorder.make("frontend"))
    results = await orchestrator.orchestrate_recovery(
        ["frontend", "api", "database"], {"database": RETRY, "api": RETRY, "frontend": RETRY}
    )
    assert results["database"]["status"] == "failed" and results["database"]["attempts"] == 3
    assert results["api"]["status"] == "skipped"
    assert results["api"]["reason"] == "dependency 'database' (failed) did not recover"
    assert (
        results["frontend"]["status"] == "skipped"
        and "'api' (skipped)" in results["frontend"]["reason"]
    )
    assert recorder.log == ["database"] * 3  # api and frontend were never touched


async def test_isolation_actions_still_run_when_a_dependency_is_down(orchestrator):
    orchestrator.register_service("frontend", fallback=lambda: "static page")
    results = await orchestrator.orchestrate_recovery(
        failed_services=["frontend", "api", "database"],
        recovery_plan={
            "database": RETRY,  # nothing registered: fails
            "api": RecoveryStrategy(action=RecoveryAction.CIRCUIT_BREAK),
            "frontend": RecoveryStrategy(action=RecoveryAction.FALLBACK),
        },
    )
    assert results["database"]["status"] == "failed"
    assert "register_service('database', recover=...)" in results["database"]["reason"]
    assert results["api"]["status"] == "isolated"
    assert results["frontend"] == {
        "service": "frontend",
        "strategy": "fallback",
        "attempts": 0,
        "result": "static page",
        "status": "fallback",
        "recovery_time": 0.0,
    }


async def test_circuit_break_opens_the_breaker_the_interaction_uses(orchestrator):
    await orchestrator.orchestrate_recovery(
        ["api"], {"api": RecoveryStrategy(action=RecoveryAction.CIRCUIT_BREAK)}
    )
    interaction = orchestrator.interaction
    assert interaction.get_circuit_breaker("api").state is CircuitState.FORCED_OPEN
    result = await interaction.recover_from_error(
        ConnectionError(), context={"service_id": "api", "retry_func": lambda: "never"}
    )
    assert result["recovery_status"] == "circuit_open" and result["attempts"] == 0
    interaction.reset_circuit("api")
    assert interaction.get_circuit_breaker("api").state is CircuitState.CLOSED


async def test_missing_callables_say_how_to_register_them(orchestrator):
    results = await orchestrator.orchestrate_recovery(
        ["cdn"], {"cdn": RecoveryStrategy(action=RecoveryAction.FALLBACK)}
    )
    assert results["cdn"]["status"] == "failed"
    assert "register_service('cdn', fallback=...)" in results["cdn"]["reason"]


async def test_health_check_must_pass_after_recovery(orchestrator):
    orchestrator.register_service(
        "database", recover=lambda: "restarted", health_check=lambda: False
    )
    orchestrator.register_service("cache", recover=lambda: "flushed", health_check=lambda: True)
    results = await orchestrator.orchestrate_recovery(
        ["database", "cache"], {"database": RETRY, "cache": RETRY}
    )
    assert results["database"]["status"] == "failed"
    assert results["database"]["reason"] == "recovered, but the health check still fails"
    assert results["cache"]["status"] == "success"


async def test_unplanned_services_get_exponential_backoff_and_actions_accept_enums(orchestrator):
    orchestrator.register_service("cache", recover=lambda: "ok")
    orchestrator.register_service("cdn", fallback=lambda: "origin")
    results = await orchestrator.orchestrate_recovery(
        ["cache", "cdn"], {"cdn": RecoveryAction.FALLBACK}
    )
    assert results["cache"]["strategy"] == "exponential_backoff"
    assert results["cdn"]["status"] == "fallback"
    with pytest.raises(TypeError):
        await orchestrator.orchestrate_recovery(["cache"], {"cache": "retry"})  # type: ignore[dict-item]
    with pytest.raises(TypeError):
        await orchestrator.orchestrate_recovery("cache")


async def test_checkpoint_restore_and_rollback_actions(orchestrator):
    orchestrator.interaction.create_checkpoint("database", {"wal": 42})
    seen: list[dict] = []
    orchestrator.register_service(
        "database", recover=lambda state: seen.append(state) or "replayed"
    )
    undone: list[str] = []
    rollback = RecoveryStrategy(
        action=RecoveryAction.TRANSACTION_ROLLBACK,
        params={"compensations": [lambda: undone.append("a"), lambda: undone.append("b")]},
    )
    results = await orchestrator.orchestrate_recovery(
        ["database", "cache"],
        {"database": RecoveryStrategy(action=RecoveryAction.CHECKPOINT_RESTORE), "cache": rollback},
    )
    assert results["database"]["status"] == "success" and seen == [{"wal": 42}]
    assert results["cache"]["status"] == "success" and undone == ["b", "a"]


async def test_the_orchestration_is_one_span_with_an_event_per_service(
    recovery_telemetry, fake_clock
):
    orchestrator = RecoveryOrchestrator(clock=fake_clock)
    orchestrator.dependencies = {"api": ["database"]}
    orchestrator.register_service("api", recover=lambda: "ok")
    results = await orchestrator.orchestrate_recovery(
        ["api", "database"], {"database": RETRY, "api": RETRY}
    )
    assert results["database"]["status"] == "failed" and results["api"]["status"] == "skipped"
    span = recovery_telemetry.span("orchestrate_recovery")
    assert span.status.status_code is StatusCode.ERROR
    events = [
        (e.attributes["otel_recovery.service.id"], e.attributes["otel_recovery.outcome"])
        for e in span.events
    ]
    assert events == [("database", "failure"), ("api", "skipped")]  # the spans' words
    assert tuple(span.attributes["otel_recovery.orchestration.services"]) == ("api", "database")


async def test_check_health_runs_every_check(orchestrator):
    async def db_ok() -> bool:
        return True

    def cache_broken() -> bool:
        raise ConnectionError("no route")

    orchestrator.register_service("database", health_check=db_ok)
    orchestrator.register_service("cache", health_check=cache_broken)
    orchestrator.register_service("cdn", recover=lambda: None)  # no check: not reported
    assert await orchestrator.check_health() == {"database": True, "cache": False}


def test_correlate_groups_by_fingerprint_and_names_the_root_cause(orchestrator):
    errors = [
        ("frontend", ConnectionError("upstream 10.0.0.7:8080 refused")),
        ("api", ConnectionError("upstream 10.0.0.9:8080 refused")),
        ("database", TimeoutError("statement timeout")),
    ]
    correlation = orchestrator.correlate(errors)
    assert correlation.root_cause == "database"
    assert correlation.dependents == ["frontend", "api"]
    groups = sorted(correlation.groups.values())
    assert groups == [["database"], ["frontend", "api"]]  # same fingerprint despite addresses
    assert "2 failed service(s) depend on 'database'" == correlation.reason


def test_correlate_without_dependencies_has_no_root_cause(orchestrator):
    correlation = orchestrator.correlate([("cdn", OSError("a")), ("cache", OSError("b"))])
    assert correlation.root_cause is None
    assert orchestrator.correlate([("cdn", OSError("a"))]).root_cause == "cdn"
    with pytest.raises(TypeError):
        orchestrator.correlate([("cdn", "not an exception")])  # type: ignore[list-item]


async def test_a_misspelt_plan_key_is_an_error_not_a_default_strategy(orchestrator):
    """``"databse": FAIL_FAST`` meant database; ignored, the default EXPONENTIAL_BACKOFF ran
    the service's recover."""
    with pytest.raises(ValueError, match="'databse'.*did you mean 'database'"):
        await orchestrator.orchestrate_recovery(
            ["database"], {"databse": RecoveryStrategy(RecoveryAction.FAIL_FAST)}
        )
    with pytest.raises(TypeError, match="recovery_plan must map service"):
        await orchestrator.orchestrate_recovery(["database"], ["database"])  # type: ignore[arg-type]


class _Garbled:
    """A serializer that writes what it cannot read back: every checkpoint is corrupt."""

    name = "json"

    def dumps(self, state: object) -> bytes:
        return b"{not json"

    def loads(self, data: bytes) -> object:
        import json

        return json.loads(data)


async def test_a_corrupt_checkpoint_fails_its_service_not_the_orchestration(orchestrator):
    """The corrupt checkpoint's error escaped orchestrate_recovery: the layer's other
    recoveries went on unawaited and the later layers never ran."""
    from otel_recovery.checkpoint import Checkpoints

    interaction = orchestrator.interaction
    interaction.checkpoints = Checkpoints(serializer=_Garbled(), clock=interaction.clock)
    interaction.create_checkpoint("database", {"wal": 42})
    recorder = Recorder()
    orchestrator.register_service("cache", recover=recorder.make("cache"))
    orchestrator.register_service("api", recover=recorder.make("api"))
    results = await orchestrator.orchestrate_recovery(
        ["database", "cache", "api"],
        {"database": RecoveryStrategy(action=RecoveryAction.CHECKPOINT_RESTORE)},
    )
    database = results["database"]
    assert database["status"] == "failed"
    assert database["reason"] == "checkpoint_restore raised CheckpointCorruptError"
    assert "checkpoint 'database' version 1 is corrupt" in database["error"]
    assert results["cache"]["status"] == "success" and recorder.log == ["cache"]
    assert results["api"]["status"] == "skipped"  # its dependency is still down


async def test_overlapping_orchestrations_share_one_remediation_per_service(orchestrator):
    """A monitor's round and an operator's call at once: the service's restart ran once
    per orchestration, concurrently, where healing already shared one reconnect."""
    running = peak = runs = 0

    async def restart() -> str:
        nonlocal running, peak, runs
        runs += 1
        running += 1
        peak = max(peak, running)
        await asyncio.sleep(0.02)
        running -= 1
        return "restarted"

    orchestrator.register_service("database", recover=restart)
    plan = {"database": RecoveryStrategy(RecoveryAction.SELF_HEAL)}
    results = await asyncio.gather(
        *(orchestrator.orchestrate_recovery(["database"], plan) for _ in range(3))
    )
    assert [r["database"]["status"] for r in results] == ["success"] * 3
    assert (runs, peak) == (1, 1)
    assert len({id(r["database"]) for r in results}) == 3  # each caller's own result
