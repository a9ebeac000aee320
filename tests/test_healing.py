"""Self-healing registry: built-in actions, user actions, span events, failure containment."""

from __future__ import annotations

import asyncio
import logging

import pytest

from otel_recovery.classify import ErrorKind, classify
from otel_recovery.healing import EVENT_SELF_HEAL, HealingRegistry, HealResult
from otel_recovery.interaction import ErrorRecoveryInteraction


def info_for(error: BaseException):
    return classify(error)


async def test_connection_runs_the_context_reconnect_callback():
    registry = HealingRegistry()
    calls: list[str] = []
    report = await registry.heal(
        ConnectionError("reset"),
        info_for(ConnectionError("reset")),
        service_id="db",
        context={"reconnect": lambda: calls.append("ctx")},
    )
    assert calls == ["ctx"]
    assert [r.to_dict() for r in report.results] == [
        {"action": "reconnect", "outcome": "success", "detail": ""}
    ]


async def test_connection_falls_back_to_the_registered_async_reconnect():
    registry = HealingRegistry()
    calls: list[str] = []

    async def reconnect_db() -> None:
        await asyncio.sleep(0)
        calls.append("db")

    registry.register_reconnect("db", reconnect_db)
    registry.register_reconnect("cache", lambda: calls.append("cache"))
    error = ConnectionRefusedError("refused")
    report = await registry.heal(error, info_for(error), service_id="db")
    assert calls == ["db"]
    assert report.results[0].outcome == "success"


async def test_connection_without_callback_is_recorded_as_skipped():
    registry = HealingRegistry()
    error = ConnectionError("x")
    report = await registry.heal(error, info_for(error), service_id="nobody")
    assert report.results == [HealResult("reconnect", "skipped", "no reconnect callback")]
    assert report.ok


async def test_memory_runs_every_cache_clearer_then_collects(monkeypatch):
    registry = HealingRegistry()
    cleared: list[str] = []
    registry.register_cache_clearer(lambda: cleared.append("a"))

    async def clear_b() -> None:
        cleared.append("b")

    registry.register_cache_clearer(clear_b)
    collected: list[bool] = []
    monkeypatch.setattr("otel_recovery.healing.gc.collect", lambda: collected.append(True) or 7)
    report = await registry.heal(MemoryError(), info_for(MemoryError()))
    assert cleared == ["a", "b"] and collected == [True]
    (result,) = report.results
    assert result.action == "clear_caches" and result.outcome == "success"
    assert "2 cache clearer(s)" in result.detail and "7 object(s)" in result.detail


async def test_memory_clearer_failure_is_recorded_and_the_others_still_run(caplog):
    registry = HealingRegistry()
    cleared: list[str] = []

    def broken() -> None:
        raise RuntimeError("cache backend down; password=hunter2")

    registry.register_cache_clearer(broken)
    registry.register_cache_clearer(lambda: cleared.append("b"))
    with caplog.at_level(logging.WARNING, logger="otel_recovery"):
        report = await registry.heal(MemoryError(), info_for(MemoryError()))
    assert cleared == ["b"]
    (result,) = report.results
    assert result.outcome == "failed" and "RuntimeError" in result.detail
    assert "hunter2" not in result.detail and "hunter2" not in caplog.text
    assert not report.ok


@pytest.mark.parametrize(("before", "after"), [(5, 10), (20, 30), (30, 30), (0.5, 1.0)])
async def test_timeout_doubles_the_context_timeout_up_to_the_cap(before, after):
    registry = HealingRegistry()
    report = await registry.heal(
        TimeoutError(), info_for(TimeoutError()), context={"timeout": before}
    )
    assert report.context["timeout"] == after
    assert report.results[0].outcome == "success"


async def test_timeout_cap_is_configurable_and_missing_timeout_is_skipped():
    registry = HealingRegistry(max_timeout=8)
    report = await registry.heal(TimeoutError(), info_for(TimeoutError()), context={"timeout": 5})
    assert report.context["timeout"] == 8
    report = await registry.heal(TimeoutError(), info_for(TimeoutError()))
    assert report.results == [HealResult("raise_timeout", "skipped", "no timeout in context")]


async def test_heal_does_not_mutate_the_callers_context():
    context = {"timeout": 2}
    await HealingRegistry().heal(TimeoutError(), info_for(TimeoutError()), context=context)
    assert context == {"timeout": 2}


async def test_rate_limit_has_no_action_the_retry_policy_waits_as_told():
    registry = HealingRegistry()
    assert not registry.heals(ErrorKind.RATE_LIMIT)
    assert registry.heals(ErrorKind.CONNECTION)
    assert registry.heals(ErrorKind.MEMORY) and registry.heals(ErrorKind.TIMEOUT)


async def test_users_register_unregister_and_replace_actions():
    registry = HealingRegistry()
    ran: list[str] = []

    async def refresh_token(ctx) -> HealResult:
        ran.append(ctx.service_id)
        return HealResult("refresh_token", "success", "new token")

    remove = registry.register(ErrorKind.AUTH, refresh_token)
    assert registry.heals(ErrorKind.AUTH)
    error = PermissionError("denied")
    report = await registry.heal(error, info_for(error), service_id="api")
    assert ran == ["api"] and report.results[0].detail == "new token"
    remove()
    assert not registry.heals(ErrorKind.AUTH)

    registry.register(ErrorKind.CONNECTION, lambda ctx: ran.append("mine"), replace=True)
    report = await registry.heal(ConnectionError(), info_for(ConnectionError()))
    assert ran == ["api", "mine"] and [r.action for r in report.results] == ["<lambda>"]


def test_registration_is_validated():
    registry = HealingRegistry()
    with pytest.raises(TypeError, match="ErrorKind"):
        registry.register("connection", lambda ctx: None)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        registry.register(ErrorKind.CONNECTION, "not callable")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        registry.register_reconnect("db", None)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        HealingRegistry(max_timeout=0)


async def test_a_raising_action_never_escapes():
    registry = HealingRegistry(builtins=False)

    def explode(ctx) -> None:
        raise ValueError("boom")

    registry.register(ErrorKind.CONNECTION, explode)
    report = await registry.heal(ConnectionError(), info_for(ConnectionError()))
    assert report.results == [HealResult("explode", "failed", "ValueError: boom")]


async def test_concurrent_heals_of_one_service_share_a_single_reconnect():
    registry = HealingRegistry()
    started = asyncio.Event()
    release = asyncio.Event()
    calls = 0

    async def reconnect() -> None:
        nonlocal calls
        calls += 1
        started.set()
        await release.wait()

    registry.register_reconnect("db", reconnect)
    error = ConnectionError()
    info = info_for(error)
    first = asyncio.ensure_future(registry.heal(error, info, service_id="db"))
    await started.wait()
    others = [asyncio.ensure_future(registry.heal(error, info, service_id="db")) for _ in range(5)]
    await asyncio.sleep(0)
    release.set()
    reports = await asyncio.gather(first, *others)
    assert calls == 1
    assert {r.results[0].outcome for r in reports} == {"success"}
    # once finished, the next failure reconnects again
    await registry.heal(error, info, service_id="db")
    assert calls == 2


async def test_a_hundred_concurrent_failures_share_one_sync_reconnect(fake_clock):
    """A sync callback (``engine.dispose``, ``pool.reconnect``) finishes without yielding:
    each of a hundred concurrent recoveries ran its own reconnect."""
    recovery = ErrorRecoveryInteraction(clock=fake_clock, telemetry=False)
    reconnects = 0

    def reconnect() -> None:
        nonlocal reconnects
        reconnects += 1

    recovery.healing.register_reconnect("db", reconnect)

    async def request() -> dict:
        return await recovery.recover_from_error(
            ConnectionRefusedError("refused"), {"service_id": "db", "retry_func": lambda: "ok"}
        )

    outcomes = await asyncio.gather(*(request() for _ in range(100)))
    assert reconnects == 1 and {o["recovery_status"] for o in outcomes} == {"success"}
    await request()  # a later failure reconnects again
    assert reconnects == 2


async def test_each_action_outcome_is_a_span_event(recovery_telemetry, fake_clock):
    recovery = ErrorRecoveryInteraction(clock=fake_clock)
    recovery.healing.register_reconnect("db", lambda: None)
    await recovery.recover_from_error(
        ConnectionError("reset"), context={"service_id": "db", "retry_func": lambda: "ok"}
    )
    span = recovery_telemetry.span("recover_from_error db")
    (event,) = [e for e in span.events if e.name == EVENT_SELF_HEAL]
    assert event.attributes["otel_recovery.heal.action"] == "reconnect"
    assert event.attributes["otel_recovery.heal.outcome"] == "success"
    assert event.attributes["otel_recovery.service.id"] == "db"


async def test_unshared_actions_run_once_per_concurrent_heal():
    registry = HealingRegistry(builtins=False)
    runs = 0

    async def bump(ctx) -> None:
        nonlocal runs
        runs += 1
        await asyncio.sleep(0)

    registry.register(ErrorKind.CONNECTION, bump, shared=False)
    error = ConnectionError()
    await asyncio.gather(
        *(registry.heal(error, info_for(error), service_id="db") for _ in range(3))
    )
    assert runs == 3
