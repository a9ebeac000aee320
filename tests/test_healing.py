"""Self-healing registry: built-in actions, user actions, span events, failure containment."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

import otel_recovery._single_flight as single_flight
from otel_recovery.classify import ErrorKind, classify
from otel_recovery.healing import EVENT_SELF_HEAL, HealingRegistry, HealingReport, HealResult
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


# -- one reconnect across threads and event loops ------------------------------------------------

THREADS = 16
WAIT = 10.0
"""Bound on every cross-thread wait below, so a regression fails instead of hanging."""


def _in_threads(*functions: Callable[[], Any]) -> list[Any]:
    """Run each function in a thread of its own; their results, in order."""
    with ThreadPoolExecutor(len(functions)) as pool:
        futures = [pool.submit(function) for function in functions]
        return [future.result(timeout=WAIT) for future in futures]


async def _heal_db(registry: HealingRegistry, context: dict[str, Any] | None = None):
    error = ConnectionResetError("connection reset by peer")
    return await registry.heal(error, info_for(error), service_id="db", context=context)


async def _join_then(registry: HealingRegistry, then: Callable[[], object], context=None):
    """Start a heal, let it take its first step (it joins the reconnect in flight, or leads
    one: that is decided before it first yields), call ``then()``, and return its report."""
    task = asyncio.ensure_future(_heal_db(registry, context))
    await asyncio.sleep(0)
    then()
    return await task


@pytest.mark.parametrize("fails", [False, True], ids=["succeeds", "fails"])
@pytest.mark.parametrize("kind", ["sync-context", "async-registered"])
def test_heals_from_sixteen_threads_each_in_its_own_loop_share_one_reconnect(kind, fails):
    """A threaded service (Flask/gunicorn threads) runs ``asyncio.run(...)`` per request:
    sixteen concurrent heals of one service ran sixteen reconnects (one per loop)."""
    registry = HealingRegistry()
    started = threading.Event()
    release = threading.Event()
    joined = threading.Barrier(THREADS)  # the fifteen joiners and this thread
    runs: list[int] = []

    def finish() -> None:
        if fails:
            raise ConnectionRefusedError("still down")

    def reconnect_sync() -> None:
        runs.append(threading.get_ident())
        started.set()
        assert release.wait(WAIT)  # a sync reconnect holds its thread (and loop) meanwhile
        finish()

    async def reconnect_async() -> None:
        runs.append(threading.get_ident())
        started.set()
        # bound to the leader's loop, which keeps running meanwhile
        assert await asyncio.to_thread(release.wait, WAIT)
        finish()

    context: dict[str, Any] | None = None
    if kind == "sync-context":
        context = {"reconnect": reconnect_sync}
    else:
        registry.register_reconnect("db", reconnect_async)

    def lead() -> HealingReport:
        return asyncio.run(_heal_db(registry, context))

    def release_once_all_joined() -> None:
        assert started.wait(WAIT)
        joined.wait(WAIT)
        release.set()

    def join() -> HealingReport:
        assert started.wait(WAIT)  # the leader is in its reconnect
        return asyncio.run(_join_then(registry, lambda: joined.wait(WAIT), context))

    leader, _, *others = _in_threads(lead, release_once_all_joined, *[join] * (THREADS - 1))
    reports = [leader, *others]

    assert len(runs) == 1, f"the reconnect ran {len(runs)} times for {THREADS} heals"
    expected = (
        HealResult("reconnect", "failed", "ConnectionRefusedError: still down")
        if fails
        else HealResult("reconnect", "success")
    )
    assert len(reports) == THREADS
    assert all(report.results == [expected] for report in reports)
    # once it has finished, the next failure reconnects again
    release.set()
    asyncio.run(_heal_db(registry, context))
    assert len(runs) == 2


def test_sixteen_threaded_recoveries_share_one_registered_reconnect(monkeypatch):
    """The reviewer's measurement, through ``recover_from_error``: 16 reconnects before."""
    recovery = ErrorRecoveryInteraction(store="memory://", telemetry=False)
    heal = recovery.healing.heal
    lock = threading.Lock()
    arrived = 0
    all_arrived = threading.Event()
    runs: list[int] = []

    async def counting_heal(*args: Any, **kwargs: Any) -> HealingReport:
        nonlocal arrived
        task = asyncio.ensure_future(heal(*args, **kwargs))
        await asyncio.sleep(0)  # its first step: it has joined the reconnect, or leads it
        with lock:
            arrived += 1
            if arrived == THREADS:
                all_arrived.set()
        return await task

    def reconnect() -> None:
        runs.append(threading.get_ident())
        assert all_arrived.wait(WAIT)

    monkeypatch.setattr(recovery.healing, "heal", counting_heal)
    recovery.healing.register_reconnect("db", reconnect)
    gate = threading.Barrier(THREADS)

    def request() -> dict:
        gate.wait(WAIT)
        return asyncio.run(
            recovery.recover_from_error(
                ConnectionResetError("connection reset by peer"),
                context={"service_id": "db", "retry_func": lambda: "ok"},
            )
        )

    outcomes = _in_threads(*[request] * THREADS)
    assert len(runs) == 1, f"the reconnect ran {len(runs)} times for {THREADS} recoveries"
    assert {o["recovery_status"] for o in outcomes} == {"success"}
    assert {o["strategy"] for o in outcomes} == {"self_heal"}


def test_a_waiter_cancelled_in_its_own_loop_leaves_the_shared_reconnect_to_the_others():
    registry = HealingRegistry()
    started = threading.Event()
    release = threading.Event()
    joined = threading.Barrier(2)
    runs = 0

    async def reconnect() -> None:
        nonlocal runs
        runs += 1
        started.set()
        assert await asyncio.to_thread(release.wait, WAIT)

    registry.register_reconnect("db", reconnect)

    async def cancelled_waiter() -> bool:
        task = asyncio.ensure_future(_heal_db(registry))
        await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return True

    def lead() -> HealingReport:
        return asyncio.run(_heal_db(registry))

    def cancel_one_then_release() -> bool:
        assert started.wait(WAIT)
        assert _in_threads(lambda: asyncio.run(cancelled_waiter())) == [True]
        joined.wait(WAIT)
        release.set()
        return True

    def join() -> HealingReport:
        assert started.wait(WAIT)
        return asyncio.run(_join_then(registry, lambda: joined.wait(WAIT)))

    leader, _, other = _in_threads(lead, cancel_one_then_release, join)
    assert runs == 1
    assert leader.results == other.results == [HealResult("reconnect", "success")]


def test_a_cancelled_leader_hands_the_reconnect_to_a_waiter_in_another_loop():
    """Waiters in its own loop and in another loop neither hang nor go without a reconnect:
    one of them takes it over, the other joins that run."""
    registry = HealingRegistry()
    started = threading.Event()
    joined = threading.Barrier(2)
    runs: list[int] = []

    async def reconnect() -> None:
        runs.append(threading.get_ident())
        if len(runs) == 1:
            started.set()
            await asyncio.sleep(WAIT)  # cancelled long before

    registry.register_reconnect("db", reconnect)

    async def lead_then_cancel() -> tuple[bool, HealingReport]:
        leading = asyncio.ensure_future(_heal_db(registry))
        await asyncio.sleep(0)
        same_loop = asyncio.ensure_future(_heal_db(registry))
        await asyncio.to_thread(started.wait, WAIT)
        await asyncio.to_thread(joined.wait, WAIT)
        leading.cancel()
        try:
            await leading
        except asyncio.CancelledError:
            return True, await same_loop
        return False, await same_loop

    def join() -> tuple[int, HealingReport]:
        assert started.wait(WAIT)
        report = asyncio.run(_join_then(registry, lambda: joined.wait(WAIT)))
        return threading.get_ident(), report

    (leader_cancelled, same_loop), (joiner, other) = _in_threads(
        lambda: asyncio.run(lead_then_cancel()), join
    )
    assert leader_cancelled
    assert same_loop.results == other.results == [HealResult("reconnect", "success")]
    # the cancelled run, then one taken over: shared, or once per loop when the first
    # takeover (instant here) was over before the other loop heard of the cancellation
    assert len(runs) in (2, 3)


def test_a_waiter_does_not_wait_for_a_leader_whose_loop_closed_unfinished():
    registry = HealingRegistry()
    started = threading.Event()
    joined = threading.Barrier(2)
    runs: list[int] = []

    async def reconnect() -> None:
        runs.append(threading.get_ident())
        if len(runs) == 1:
            started.set()
            await asyncio.Event().wait()  # never resumed: its loop is closed under it

    registry.register_reconnect("db", reconnect)

    def lead_then_close_the_loop() -> asyncio.Task:
        loop = asyncio.new_event_loop()
        task = loop.create_task(_heal_db(registry))
        loop.run_until_complete(asyncio.to_thread(joined.wait, WAIT))
        loop.close()  # as a thread that ends its own loop without cancelling its tasks
        return task

    def join() -> tuple[int, HealingReport]:
        assert started.wait(WAIT)
        report = asyncio.run(_join_then(registry, lambda: joined.wait(WAIT)))
        return threading.get_ident(), report

    abandoned, (joiner, report) = _in_threads(lead_then_close_the_loop, join)
    assert not abandoned.done()
    assert report.results == [HealResult("reconnect", "success")]
    assert len(runs) == 2 and runs[1] == joiner
    abandoned.get_coro().close()  # its cleanup finds the flight gone already


def test_a_forked_child_does_not_wait_for_a_reconnect_led_by_a_thread_it_lacks():
    """In a fork child only the forking thread exists: a heal it was waiting for, led by
    another thread, would never finish there. (The fork is simulated by calling the child
    hook in the would-be forking thread; ``_forksafe`` calls it in a real child.)"""
    registry = HealingRegistry()
    started = threading.Event()
    release = threading.Event()
    runs: list[int] = []

    async def reconnect() -> None:
        runs.append(threading.get_ident())
        if len(runs) == 1:
            started.set()
            assert await asyncio.to_thread(release.wait, WAIT)

    registry.register_reconnect("db", reconnect)

    def forked() -> tuple[int, HealingReport, HealingReport]:
        assert started.wait(WAIT)
        hook = registry._flights._after_fork_in_child
        waiting = asyncio.run(_join_then(registry, hook))
        fresh = asyncio.run(_heal_db(registry))
        release.set()
        return threading.get_ident(), waiting, fresh

    leader, (child, waiting, fresh) = _in_threads(lambda: asyncio.run(_heal_db(registry)), forked)
    assert [r.results for r in (leader, waiting, fresh)] == [
        [HealResult("reconnect", "success")]
    ] * 3
    assert runs[1:] == [child, child]


# -- a leader in another loop that is not making progress is taken over --------------------------

HEALED = HealResult("reconnect", "success")
BOUND = 3.0
"""How long a waiter below gives a leader that is not making progress: the code before these
tests waited forever, so they fail after this long instead."""


def test_a_waiter_takes_over_from_a_leader_parked_in_a_stopped_loop():
    """A thread that keeps one loop (``run_until_complete`` per request) parks a heal started
    fire-and-forget when its request returns: the loop is stopped, not closed. A heal of the
    same service in another thread waited for it until that thread's next request (forever,
    for an idle thread); now it reconnects itself within a couple of checks."""
    registry = HealingRegistry()
    runs: list[int] = []

    async def reconnect() -> None:
        runs.append(threading.get_ident())
        if len(runs) == 1:
            await asyncio.sleep(WAIT)  # a connect round trip, parked when its loop stops

    registry.register_reconnect("db", reconnect)
    loop = asyncio.new_event_loop()

    async def request() -> asyncio.Task:
        background = asyncio.ensure_future(_heal_db(registry))
        while not runs:  # the heal leads, and is in its reconnect
            await asyncio.sleep(0)
        return background

    parked = loop.run_until_complete(request())
    try:

        def other_thread() -> tuple[int, HealingReport]:
            heal = asyncio.wait_for(_heal_db(registry), BOUND)
            return threading.get_ident(), asyncio.run(heal)

        ((joiner, report),) = _in_threads(other_thread)
        assert report.results == [HEALED]
        assert len(runs) == 2 and runs[1] == joiner
        assert not parked.done()
    finally:
        parked.cancel()  # the thread's next request: the parked heal resumes (cancelled)
        loop.run_until_complete(asyncio.gather(parked, return_exceptions=True))
        loop.close()
    asyncio.run(_heal_db(registry))  # the parked leader's end left no flight behind
    assert len(runs) == 3


@pytest.mark.parametrize("block", ["run_coroutine_threadsafe", "thread_join"])
def test_a_leader_loop_held_by_code_waiting_for_another_loops_heal_does_not_deadlock(block):
    """Sync code in the leader's loop that waits for a heal of the same service in another
    loop held the leader, which that heal waited for: a deadlock (each loop ran its own
    reconnect before flights spanned loops). The loop held by something other than the
    reconnect is not progress: the other loop's heal reconnects itself."""
    registry = HealingRegistry()
    runs: list[int] = []

    async def reconnect() -> None:
        runs.append(threading.get_ident())
        started.set()
        await asyncio.sleep(0.01)  # a connect round trip: needs the loop to turn

    registry.register_reconnect("db", reconnect)
    started = asyncio.Event()
    other_loop = asyncio.new_event_loop()
    other_thread = threading.Thread(target=other_loop.run_forever, daemon=True)
    other_thread.start()

    def heal_elsewhere() -> tuple[int, HealingReport]:
        """Blocks until a heal of "db" in another loop is done (at most BOUND seconds)."""
        if block == "run_coroutine_threadsafe":
            heal = asyncio.wait_for(_heal_db(registry), BOUND)
            report = asyncio.run_coroutine_threadsafe(heal, other_loop).result(WAIT)
            return other_thread.ident or 0, report
        done: list[tuple[int, HealingReport]] = []

        def in_a_thread() -> None:
            heal = asyncio.wait_for(_heal_db(registry), BOUND)
            done.append((threading.get_ident(), asyncio.run(heal)))

        thread = threading.Thread(target=in_a_thread)
        thread.start()
        thread.join(WAIT)
        assert done, "the other loop's heal did not finish"
        return done[0]

    async def request() -> tuple[HealingReport, tuple[int, HealingReport]]:
        leader = asyncio.ensure_future(_heal_db(registry))
        await started.wait()  # the leader is in its reconnect
        elsewhere = heal_elsewhere()  # sync: holds this loop, and so the leader
        return await leader, elsewhere

    try:
        leader, (elsewhere, report) = asyncio.run(request())
    finally:
        other_loop.call_soon_threadsafe(other_loop.stop)
        other_thread.join(WAIT)
        other_loop.close()
    assert leader.results == report.results == [HEALED]
    assert len(runs) == 2 and runs[1] == elsewhere


def test_a_waiter_in_another_loop_waits_for_a_leader_at_most_max_timeout():
    """A leader still in its reconnect after the registry's ``max_timeout`` is presumed hung,
    even one that holds its loop (a sync reconnect is otherwise progress): a heal waiting in
    another loop reconnects itself."""
    registry = HealingRegistry(max_timeout=0.3)
    started = threading.Event()
    release = threading.Event()
    runs: list[int] = []

    def reconnect() -> None:
        runs.append(threading.get_ident())
        if len(runs) == 1:
            started.set()
            assert release.wait(WAIT)  # hung, as far as anyone can tell

    registry.register_reconnect("db", reconnect)

    def join() -> tuple[int, HealingReport]:
        assert started.wait(WAIT)
        try:
            heal = asyncio.wait_for(_heal_db(registry), BOUND)
            return threading.get_ident(), asyncio.run(heal)
        finally:
            release.set()

    leader, (joiner, report) = _in_threads(lambda: asyncio.run(_heal_db(registry)), join)
    assert leader.results == report.results == [HEALED]
    assert len(runs) == 2 and runs[1] == joiner


def test_a_sync_reconnect_holding_its_loop_is_progress_and_keeps_its_waiters(monkeypatch):
    """Only a loop held by something *other* than the reconnect counts as a stall: a sync
    reconnect (``engine.dispose()``) holding its loop for many checks is still shared."""
    monkeypatch.setattr(single_flight, "_HELD_POLLS", 2)
    registry = HealingRegistry()
    started = threading.Event()
    joined = threading.Barrier(2)
    runs: list[int] = []

    def reconnect() -> None:
        runs.append(threading.get_ident())
        started.set()
        joined.wait(WAIT)  # the other heal is waiting for this one
        time.sleep(5 * single_flight._POLL)  # holds the loop well past _HELD_POLLS checks

    registry.register_reconnect("db", reconnect)

    def join() -> HealingReport:
        assert started.wait(WAIT)
        return asyncio.run(_join_then(registry, lambda: joined.wait(WAIT)))

    leader, other = _in_threads(lambda: asyncio.run(_heal_db(registry)), join)
    assert len(runs) == 1
    assert leader.results == other.results == [HEALED]


async def test_a_cancelled_leader_hands_the_reconnect_to_waiters_in_its_own_loop():
    """One event loop (an aiohttp or FastAPI service): the request leading the reconnect is
    cancelled (its client went away). The other requests waiting on it were told the heal
    failed and retried through the dead connection; no reconnect ever finished."""
    registry = HealingRegistry()
    runs = 0
    connected = False

    async def reconnect() -> None:
        nonlocal runs, connected
        runs += 1
        await asyncio.sleep(0.05)
        connected = True

    registry.register_reconnect("db", reconnect)
    leader = asyncio.ensure_future(_heal_db(registry))
    await asyncio.sleep(0)
    waiters = [asyncio.ensure_future(_heal_db(registry)) for _ in range(4)]
    await asyncio.sleep(0.01)
    leader.cancel()
    reports = await asyncio.gather(*waiters)
    assert connected and runs == 2  # the cancelled run, then one taken over and shared
    assert {tuple(r.results) for r in reports} == {(HealResult("reconnect", "success"),)}


async def test_each_callers_own_reconnect_runs_for_its_own_connection():
    """``context["reconnect"]=conn.reconnect`` names the caller's connection: concurrent
    heals of one service with different connections ran only the first caller's, and told
    the others theirs was reconnected. The same callback is still shared."""
    registry = HealingRegistry()

    class Connection:
        def __init__(self) -> None:
            self.reconnects = 0

        async def reconnect(self) -> None:
            await asyncio.sleep(0.01)
            self.reconnects += 1

    connections = [Connection() for _ in range(3)]
    info = classify(ConnectionResetError("reset"))
    heals = [
        registry.heal(
            ConnectionResetError("reset"), info, service_id="db",
            context={"reconnect": c.reconnect},
        )
        for c in [*connections, connections[0]]  # the first one twice: shared
    ]  # fmt: skip
    reports = await asyncio.gather(*heals)
    assert [c.reconnects for c in connections] == [1, 1, 1]
    assert {r.results[0].outcome for r in reports} == {"success"}
