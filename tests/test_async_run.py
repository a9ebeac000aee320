"""The compiled async runner (``_speedups.AsyncRun``) against the coroutine it replaces.

``RecoveryPolicy.arunner()`` returns a compiled Runner where the extension is built; what
``run(fn, args, kwargs)`` returns is then an ``AsyncRun``, not a coroutine. These tests hold
it side by side with the Python closure (``_driver_async.py``, "guarded") and check that
asyncio and ``await`` cannot tell the difference: tasks, cancellation, close, throw, never
awaited, reuse, exception chaining, and that it leaks nothing.
"""

from __future__ import annotations

import asyncio
import collections.abc
import functools
import gc
import inspect
import random
import sys
import warnings
import weakref
from collections.abc import Callable
from typing import Any

import pytest
from frames import ours_that_ran, ours_that_ran_steadily
from hypothesis import given, settings
from hypothesis import strategies as st
from runner_cases import (
    LEAK_STEPS,
    STEPS,
    attempt,
    bytes_kept,
    observed,
    passes_time,
    policy_for,
    raised,
)
from servers import aclose

from otel_recovery import _driver_async
from otel_recovery._compiled import SPEEDUPS
from otel_recovery._fake_clock import FakeClock
from otel_recovery.policies.circuit_breaker import CircuitBreaker, CircuitOpenError
from otel_recovery.policies.fallback import Fallback
from otel_recovery.policies.retry import Retry
from otel_recovery.recover import RecoveryPolicy

pytestmark = pytest.mark.skipif(SPEEDUPS is None, reason="otel_recovery._speedups not built")

RUNNERS = ["compiled", "python"]


ASYNC_STEPS = (*STEPS, "plain")
"""And a function that returns a plain value, not a coroutine (``resolve`` passes it on)."""


def _arunner(policy: RecoveryPolicy, kind: str) -> Callable[..., Any]:
    if kind == "compiled":
        run = policy.arunner()
        assert type(run) is SPEEDUPS.Runner  # type: ignore[union-attr]
        return run
    patch = pytest.MonkeyPatch()
    try:
        patch.setattr(_driver_async, "SPEEDUPS", None)
        return policy.arunner()
    finally:
        patch.undo()


async def _play(run: Callable[..., Any], policy: RecoveryPolicy, clock: FakeClock, steps):
    """Everything observable about awaiting ``steps`` through ``run``, step by step."""
    seen: list[tuple[Any, ...]] = []
    for number, step in enumerate(steps):
        if passes_time(step, clock):
            continue
        calls = 0

        async def work(value: int, *, step: str = step) -> Any:
            nonlocal calls
            calls += 1
            await asyncio.sleep(0)  # suspends: the run is sent into more than once
            return attempt(step, value, calls)

        def plain(value: int, *, step: str = step) -> Any:
            nonlocal calls
            calls += 1
            return value * 3

        fn = plain if step == "plain" else work
        try:
            outcome: tuple[Any, ...] = ("returned", await run(fn, (number,), {"step": step}))
        except BaseException as error:  # the comparison is the point
            outcome = raised(error)
        seen.append(observed(step, outcome, calls, policy, clock))
    return seen


@pytest.mark.parametrize("kind", ["guarded", "last_known_good", "unguarded"])
@settings(max_examples=40, deadline=None)
@given(steps=st.lists(st.sampled_from(ASYNC_STEPS), max_size=30))
def test_the_compiled_async_runner_behaves_exactly_like_the_python_one(kind, steps):
    outcomes = []
    for runner in RUNNERS:
        clock = FakeClock()
        policy = policy_for(kind, clock)
        outcomes.append(asyncio.run(_play(_arunner(policy, runner), policy, clock, steps)))
    assert outcomes[0] == outcomes[1]


def test_a_run_is_a_coroutine_to_asyncio():
    run = RecoveryPolicy(retry=Retry(2), telemetry=False).arunner()

    async def double(x: int) -> int:
        await asyncio.sleep(0)
        return x * 2

    async def main() -> list[int]:
        pending = run(double, (1,), {})
        assert type(pending) is SPEEDUPS.AsyncRun  # type: ignore[union-attr]
        assert isinstance(pending, collections.abc.Coroutine)
        first = await asyncio.create_task(pending)
        second = await asyncio.wait_for(run(double, (2,), {}), 5)
        rest = await asyncio.gather(run(double, (3,), {}), run(double, (4,), {}))
        return [first, second, *rest]

    assert asyncio.run(main()) == [2, 4, 6, 8]


def _half_open(clock: FakeClock) -> RecoveryPolicy:
    """A policy whose breaker is HALF_OPEN with one trial permit: a permit that is never
    given back shows as the next call's rejection."""
    breaker = CircuitBreaker(1, timeout=10.0, clock=clock, half_open_max_calls=1)
    policy = RecoveryPolicy(retry=Retry(1), breaker=breaker, clock=clock, telemetry=False)
    breaker.record_failure()
    clock.advance(11.0)  # the next can_execute() moves it to HALF_OPEN and takes the permit
    return policy


async def _ok() -> str:
    return "ok"


@pytest.mark.parametrize("runner", RUNNERS)
def test_a_cancelled_call_gives_its_breaker_permit_back(runner):
    clock = FakeClock()
    policy = _half_open(clock)
    run = _arunner(policy, runner)

    async def main() -> str:
        started = asyncio.Event()

        async def hang() -> None:
            started.set()
            await asyncio.Event().wait()

        task = asyncio.create_task(run(hang, (), {}))
        await started.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        result: str = await run(_ok, (), {})  # rejected if the trial permit leaked
        return result

    assert asyncio.run(main()) == "ok"


@pytest.mark.parametrize("runner", RUNNERS)
def test_closing_a_suspended_run_gives_its_permit_back(runner):
    clock = FakeClock()
    policy = _half_open(clock)
    run = _arunner(policy, runner)
    closed: list[bool] = []

    async def hang() -> None:
        try:
            await asyncio.sleep(3600)
        finally:
            closed.append(True)

    async def main() -> str:
        pending = run(hang, (), {})
        pending.send(None)  # now suspended inside hang(), holding the trial permit
        pending.close()
        pending.close()  # a second close does nothing, as a coroutine's
        result: str = await run(_ok, (), {})
        return result

    assert asyncio.run(main()) == "ok"
    assert closed == [True]


def test_a_run_never_awaited_warns_and_takes_nothing():
    clock = FakeClock()
    policy = _half_open(clock)
    run = policy.arunner()
    called: list[bool] = []

    async def work() -> None:
        called.append(True)

    gc.collect()  # earlier tests' garbage (an unclosed client's ResourceWarning) goes first
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run(work, (), {})
        gc.collect()
    assert [str(w.message) for w in caught if w.category is RuntimeWarning] == [
        f"coroutine '{work.__qualname__}' was never awaited"
    ]
    assert called == []
    assert asyncio.run(run(_ok, (), {})) == "ok"  # the trial permit was never taken


def test_a_run_refuses_what_a_coroutine_refuses():
    run = RecoveryPolicy(retry=Retry(1), telemetry=False).arunner()

    pending = run(_ok, (), {})
    with pytest.raises(TypeError, match="non-None value to a just-started coroutine"):
        pending.send(1)
    with pytest.raises(StopIteration) as stopped:
        pending.send(None)
    assert stopped.value.value == "ok"
    with pytest.raises(RuntimeError, match="cannot reuse already awaited coroutine"):
        pending.send(None)
    with pytest.raises(RuntimeError, match="cannot reuse already awaited coroutine"):
        pending.throw(KeyError("late"))

    async def tuple_back() -> tuple[int, int]:
        return (1, 2)

    with pytest.raises(StopIteration) as stopped:
        run(tuple_back, (), {}).send(None)
    assert stopped.value.value == (1, 2)  # a tuple result is one value, as in StopIteration


async def _none() -> None:
    return None


def test_a_run_ends_as_a_coroutine_ends():
    """StopIteration carries the result (none for None), and the run names its function."""
    run = RecoveryPolicy(retry=Retry(1), telemetry=False).arunner()
    with pytest.raises(StopIteration) as stopped:
        run(_none, (), {}).send(None)
    assert stopped.value.args == ()
    pending = run(_ok, (), {})
    assert (pending.__name__, pending.__qualname__) == ("_ok", "_ok")
    asyncio.run(pending)


@pytest.mark.parametrize("runner", RUNNERS)
def test_a_second_await_of_a_suspended_run_is_refused(runner):
    run = _arunner(RecoveryPolicy(retry=Retry(1), telemetry=False), runner)

    async def slow() -> str:
        await asyncio.sleep(0.01)
        return "done"

    async def main() -> list[str]:
        pending = run(slow, (), {})

        async def wait(pending: Any) -> str:
            try:
                return str(await pending)
            except RuntimeError as error:
                return str(error)

        first = asyncio.create_task(wait(pending))
        await asyncio.sleep(0)  # the first await now drives it, suspended in slow()
        second = await wait(pending)
        return [await first, second]

    assert asyncio.run(main()) == ["done", "coroutine is being awaited already"]


class _RunsOutClock(FakeClock):
    """A test clock that, like an exhausted ``Mock(side_effect=[...])``, raises
    StopIteration."""

    def now(self) -> float:
        raise StopIteration


@pytest.mark.parametrize("runner", RUNNERS)
def test_a_stop_iteration_from_the_runs_own_steps_is_a_runtime_error(runner):
    """Left as it is, it would end the ``await`` as if the run had returned None."""
    policy = RecoveryPolicy(retry=Retry(2), clock=_RunsOutClock(), telemetry=False)
    with pytest.raises(RuntimeError, match="coroutine raised StopIteration") as raised:
        asyncio.run(_arunner(policy, runner)(_ok, (), {}))
    assert isinstance(raised.value.__cause__, StopIteration)


@pytest.mark.parametrize("runner", RUNNERS)
def test_an_exception_thrown_in_while_recovering_does_not_chain_to_the_call_error(runner):
    """Recovery runs outside any handler of the call's error (as tenacity's loop does), so
    what is thrown into it during the backoff comes back out as it was thrown, without the
    call's error as its ``__context__``: the same for a cancelled Task."""

    async def refuse() -> None:
        raise ConnectionError("refused")

    for thrown in (KeyError("thrown"), asyncio.CancelledError()):
        clock = FakeClock()
        policy = RecoveryPolicy(retry=Retry(3), clock=clock, telemetry=False)
        pending = _arunner(policy, runner)(refuse, (), {})
        pending.send(None)  # the call failed; recover now sleeps before the next attempt
        with pytest.raises(type(thrown)) as raised:
            pending.throw(thrown)
        assert raised.value is thrown and raised.value.__context__ is None, (runner, thrown)


@pytest.mark.parametrize("runner", RUNNERS)
def test_throwing_generator_exit_closes_the_call_and_gives_the_permit_back(runner):
    """As a coroutine does: what it awaits is closed (not thrown into), and GeneratorExit
    is raised where it awaited, never a success."""
    clock = FakeClock()
    policy = _half_open(clock)
    run = _arunner(policy, runner)
    closed: list[bool] = []

    async def hang() -> str:
        try:
            await asyncio.sleep(3600)
        except GeneratorExit:  # it ends quietly when closed: the run must not count that
            closed.append(True)
            return "swallowed"
        return "not reached"

    async def main() -> str:
        pending = run(hang, (), {})
        pending.send(None)
        with pytest.raises(GeneratorExit):
            pending.throw(GeneratorExit)
        result: str = await run(_ok, (), {})  # rejected if the trial permit leaked
        return result

    assert asyncio.run(main()) == "ok"
    assert closed == [True]


@pytest.mark.parametrize("runner", RUNNERS)
def test_a_finished_run_lets_go_of_its_arguments(runner):
    """As a finished coroutine's frame does: a Task that stays referenced must not keep a
    large payload alive."""
    run = _arunner(RecoveryPolicy(retry=Retry(1), telemetry=False), runner)

    class Payload:
        pass

    async def take(payload: Payload) -> str:
        return "taken"

    payload = Payload()
    gone = weakref.ref(payload)
    pending = run(take, (payload,), {})
    del payload
    assert asyncio.run(_await(pending)) == "taken"
    gc.collect()
    assert gone() is None
    del pending


async def _await(pending: Any) -> Any:
    return await pending


def test_the_never_awaited_warning_survives_a_strange_qualname():
    run = RecoveryPolicy(retry=Retry(1), telemetry=False).arunner()
    strange = functools.partial(_ok)
    strange.__qualname__ = 12345  # type: ignore[attr-defined]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run(strange, (), {})
        gc.collect()
    assert [str(w.message) for w in caught] == [f"coroutine '{strange!r}' was never awaited"]


def test_throwing_into_a_run_before_it_starts_runs_nothing():
    run = RecoveryPolicy(retry=Retry(3), telemetry=False).arunner()
    called: list[bool] = []

    async def work() -> None:
        called.append(True)

    pending = run(work, (), {})
    with pytest.raises(KeyError, match="thrown"):
        pending.throw(KeyError("thrown"))
    with pytest.raises(RuntimeError, match="cannot reuse"):
        pending.send(None)
    assert called == []
    refused = run(work, (), {})
    with pytest.raises(TypeError, match="deriving from BaseException"):
        refused.throw(42)
    assert called == []
    asyncio.run(refused)  # arguments it refused left it as it was, as a coroutine
    assert called == [True]


def test_an_exception_thrown_into_the_call_is_recovered_like_one_it_raised():
    """``await`` passes throw() on to what it awaits; an Exception that comes back out of the
    call is the call's failure, so it is retried, as in the Python closure."""
    attempts: list[int] = []

    async def work() -> str:
        attempts.append(1)
        if len(attempts) == 1:
            await asyncio.sleep(3600)
        return "second attempt"

    for runner in RUNNERS:
        attempts.clear()
        policy = RecoveryPolicy(
            retry=Retry(2, rng=random.Random(1)), clock=FakeClock(), telemetry=False
        )
        pending = _arunner(policy, runner)(work, (), {})

        async def main(pending: Any = pending) -> str:
            step = pending.send(None)  # the first attempt sleeps
            assert step is not None
            try:
                pending.throw(ConnectionError("reset while waiting"))
                for _ in range(10):  # the backoff's asyncio.sleep(0), then the retry
                    pending.send(None)
            except StopIteration as stop:
                return str(stop.value)
            raise AssertionError("the retry did not complete")

        assert asyncio.run(main()) == "second attempt", runner
        assert len(attempts) == 2


def test_an_error_from_recovery_chains_to_the_call_error_as_in_python():
    def broken(error: BaseException) -> Any:
        raise KeyError("fallback failed")

    policy = RecoveryPolicy(retry=Retry(1), fallback=Fallback(func=broken), telemetry=False)
    run = policy.arunner()

    async def refuse() -> None:
        await asyncio.sleep(0)
        raise ConnectionError("refused")

    with pytest.raises(KeyError) as raised:
        asyncio.run(run(refuse, (), {}))
    assert isinstance(raised.value.__context__, ConnectionError)
    assert sys.exc_info() == (None, None, None)


def test_an_open_breaker_rejects_an_async_run_without_calling():
    clock = FakeClock()
    breaker = CircuitBreaker(1, timeout=10.0, clock=clock)
    policy = RecoveryPolicy(retry=Retry(1), breaker=breaker, clock=clock, telemetry=False)
    breaker.record_failure()
    called: list[bool] = []

    async def work() -> None:
        called.append(True)

    with pytest.raises(CircuitOpenError):
        asyncio.run(policy.arunner()(work, (), {}))
    assert called == []


def test_the_async_runs_leak_nothing():
    clock = FakeClock()
    policy = policy_for("guarded", clock)
    run = policy.arunner()

    def cycle() -> None:
        asyncio.run(_play(run, policy, clock, LEAK_STEPS * 50))
        clock.sleeps.clear()

    cycle()
    grown = bytes_kept(cycle, 5)
    assert grown < 64 * 1024, f"{grown} bytes kept after 2,250 runs"


@pytest.mark.server
def test_remembered_async_redis_and_psycopg_calls_run_no_python_of_ours():
    """Once a call's plan is remembered, an asyncio Redis command and a psycopg async
    statement run compiled: the layer hands back an AsyncRun, and awaiting it runs none of
    otel_recovery's Python."""
    import psycopg
    import redis.asyncio
    from servers import PG_DSN, REDIS_HOST, REDIS_PORT, require_postgres, require_redis

    from otel_recovery.instrumentors.psycopg import PsycopgRecoveryInstrumentor
    from otel_recovery.instrumentors.redis import RedisRecoveryInstrumentor

    require_redis()
    require_postgres()
    instrumentors = [RedisRecoveryInstrumentor(), PsycopgRecoveryInstrumentor()]
    for instrumentor in instrumentors:
        instrumentor.instrument()
    loop = asyncio.new_event_loop()
    try:
        for method in (redis.asyncio.Redis.execute_command, psycopg.AsyncCursor.execute):
            assert type(method) is SPEEDUPS.Layer  # type: ignore[union-attr]
            # still a coroutine method to those who ask (inspect only knows from 3.12 on)
            assert asyncio.iscoroutinefunction(method)
            assert inspect.iscoroutinefunction(method) or sys.version_info < (3, 12)
        client = redis.asyncio.Redis(host=REDIS_HOST, port=REDIS_PORT)
        loop.run_until_complete(client.set("otel-recovery:async", "v"))
        loop.run_until_complete(client.get("otel-recovery:async"))  # GET's plan remembered
        pending = client.get("otel-recovery:async")
        assert type(pending) is SPEEDUPS.AsyncRun  # type: ignore[union-attr]
        assert loop.run_until_complete(pending) == b"v"
        fetched = ours_that_ran_steadily(
            lambda: loop.run_until_complete(client.get("otel-recovery:async"))
        )
        assert fetched == (b"v", set())

        async def many() -> None:
            for _ in range(500):
                await client.get("otel-recovery:async")

        loop.run_until_complete(many())
        grown = bytes_kept(lambda: loop.run_until_complete(many()), 4)
        assert grown < 64 * 1024, f"{grown} bytes kept after 2,000 compiled GETs"
        loop.run_until_complete(aclose(client))

        connection = loop.run_until_complete(
            psycopg.AsyncConnection.connect(PG_DSN, autocommit=True)
        )
        cursor = connection.cursor()
        loop.run_until_complete(cursor.execute("SELECT 1"))
        pending = cursor.execute("SELECT 2")
        assert type(pending) is SPEEDUPS.AsyncRun  # type: ignore[union-attr]
        assert loop.run_until_complete(pending) is cursor
        assert (
            ours_that_ran_steadily(lambda: loop.run_until_complete(cursor.execute("SELECT 3")))[1]
            == set()
        )
        assert loop.run_until_complete(cursor.fetchone()) == (3,)
        loop.run_until_complete(connection.close())
    finally:
        loop.close()
        for instrumentor in instrumentors:
            instrumentor.uninstrument()


@pytest.mark.server
def test_an_async_call_is_decided_when_first_awaited_as_an_async_def_layer_is():
    """The Python layer, an ``async def``, reads the suppression (and the rest) when it
    is first awaited; so does the compiled one, not when the command is called."""
    import redis.asyncio
    from opentelemetry.instrumentation.utils import suppress_instrumentation
    from servers import REDIS_HOST, REDIS_PORT, require_redis

    from otel_recovery.instrumentors.redis import RedisRecoveryInstrumentor

    require_redis()
    instrumentor = RedisRecoveryInstrumentor()
    instrumentor.instrument()
    loop = asyncio.new_event_loop()
    try:
        client = redis.asyncio.Redis(host=REDIS_HOST, port=REDIS_PORT)
        loop.run_until_complete(client.get("otel-recovery:decided"))  # GET's plan remembered

        pending = client.get("otel-recovery:decided")  # made outside, awaited inside
        with suppress_instrumentation():
            ran = ours_that_ran(lambda: loop.run_until_complete(pending))[1]
        assert "layer" in ran  # handed to the Python layer, which passes suppressed calls on

        def made_suppressed() -> Any:
            with suppress_instrumentation():  # made inside, awaited outside: ours, compiled
                return client.get("otel-recovery:decided")

        awaited = ours_that_ran_steadily(lambda: loop.run_until_complete(made_suppressed()))
        assert awaited[1] == set()
        loop.run_until_complete(aclose(client))
    finally:
        loop.close()
        instrumentor.uninstrument()


@pytest.mark.server
def test_a_remembered_asyncpg_statement_runs_compiled_and_uninstrument_takes_its_plans():
    """An asyncpg ``Connection`` has ``__slots__``: its plans are left on its class, keyed by
    its address, one table per method; uninstrumenting deletes them."""
    import asyncpg
    from servers import PG_URL, require_postgres

    from otel_recovery.instrumentors.asyncpg import AsyncPGRecoveryInstrumentor

    require_postgres()
    instrumentor = AsyncPGRecoveryInstrumentor()
    instrumentor.instrument()
    loop = asyncio.new_event_loop()
    try:
        connection = loop.run_until_complete(asyncpg.connect(PG_URL))
        assert loop.run_until_complete(connection.fetchval("SELECT 1")) == 1
        pending = connection.fetchval("SELECT 2")
        assert type(pending) is SPEEDUPS.AsyncRun  # type: ignore[union-attr]
        assert loop.run_until_complete(pending) == 2
        fetched = ours_that_ran_steadily(
            lambda: loop.run_until_complete(connection.fetchval("SELECT 3"))
        )
        assert fetched == (3, set())
        marks = [name for name in vars(type(connection)) if name.startswith("_otel_recovery")]
        assert marks == ["_otel_recovery_plans_fetchval"]
        loop.run_until_complete(connection.close())
    finally:
        instrumentor.uninstrument()
        loop.close()
    assert not [name for name in vars(asyncpg.Connection) if name.startswith("_otel_recovery")]


def test_a_run_passes_for_a_coroutine_under_contribs_asyncio_instrumentation():
    """``opentelemetry-bootstrap`` installs contrib's asyncio instrumentation in every
    service: it wraps ``create_task``, ``ensure_future``, ``gather``, ``wait_for`` and
    ``TaskGroup.create_task`` around each coroutine given to them, and names the coroutine
    in its metrics. A remembered redis.asyncio call, an ``AsyncRun`` where the extension is
    built, must go through all of them with its result, and be named after the command
    method as the coroutine it replaces would be."""
    import redis.asyncio
    from opentelemetry.instrumentation.asyncio import AsyncioInstrumentor
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader
    from servers import REDIS_HOST, REDIS_PORT, require_redis

    from otel_recovery.instrumentors.redis import RedisRecoveryInstrumentor

    require_redis()
    reader = InMemoryMetricReader()
    ours, contrib = RedisRecoveryInstrumentor(), AsyncioInstrumentor()
    ours.instrument()
    contrib.instrument(meter_provider=MeterProvider(metric_readers=[reader]))
    key = "otel-recovery:asyncio-contrib"

    async def main() -> list[object]:
        client = redis.asyncio.Redis(host=REDIS_HOST, port=REDIS_PORT)
        await client.set(key, "v")
        await client.get(key)  # GET's plan remembered
        pending = client.get(key)
        compiled = type(pending) is getattr(SPEEDUPS, "AsyncRun", None)
        assert compiled is (SPEEDUPS is not None)
        results = [await asyncio.create_task(pending), await asyncio.ensure_future(client.get(key))]
        results += await asyncio.gather(client.get(key), client.get(key))
        results.append(await asyncio.wait_for(client.get(key), timeout=5))
        if sys.version_info >= (3, 11):
            async with asyncio.TaskGroup() as group:
                task = group.create_task(client.get(key))
            results.append(task.result())
        await client.delete(key)
        await aclose(client)
        return results

    try:
        results = asyncio.run(main())
    finally:
        contrib.uninstrument()
        ours.uninstrument()
    assert results == [b"v"] * (6 if sys.version_info >= (3, 11) else 5)
    named = {
        point.attributes.get("name")
        for resource in reader.get_metrics_data().resource_metrics
        for scope in resource.scope_metrics
        for metric in scope.metrics
        for point in metric.data.data_points
    }
    assert "execute_command" in named, named
