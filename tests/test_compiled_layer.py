"""What the compiled layer (``_speedups.Layer``) decides before it runs a remembered plan.

It remembers the ``PlanTable`` it last read, and never serves from one its holder no longer
has: a table replaced (and retired), a table whose token or guard went stale, a holder that
died (its successor may reuse its address). It finds suppression keys in the current
Context by scanning it, which must find every key a dict lookup would."""

from __future__ import annotations

import gc
import sys
from types import SimpleNamespace
from typing import Any

import pytest
from compiled_layers import CountingLayer, compiled_layer
from opentelemetry import context as otel_context

from otel_recovery._compiled import SPEEDUPS
from otel_recovery._fake_clock import FakeClock
from otel_recovery.policies.circuit_breaker import CircuitBreaker
from otel_recovery.recover import RecoveryPolicy
from otel_recovery.telemetry._suppressed import LEGACY_SUPPRESS_KEY, SUPPRESS_KEY

pytestmark = pytest.mark.skipif(SPEEDUPS is None, reason="otel_recovery._speedups not built")

TOKEN = object()


class Pool:
    """A holder: where a client's table hangs (a Redis connection pool, say)."""


class Client:
    def __init__(self, pool: Pool) -> None:
        self.pool = pool


class Plans:
    """One plan per breaker, so a test can tell which table served a call."""

    def __init__(self) -> None:
        self.clock = FakeClock()

    def plan(self) -> tuple[Any, CircuitBreaker]:
        breaker = CircuitBreaker(3, timeout=10.0, clock=self.clock, store="memory://")
        policy = RecoveryPolicy(breaker=breaker, clock=self.clock, telemetry=False)
        return (policy, "own", policy.runner()), breaker


def _served() -> tuple[Harness, CircuitBreaker, Client]:
    """A layer, and a client whose pool's table has one plan for ``GET`` (with ``breaker``)."""
    plan, breaker = Plans().plan()
    pool = Pool()
    pool.table = _table(plan)  # type: ignore[attr-defined]
    return Harness(), breaker, Client(pool)


def _successes(breaker: CircuitBreaker) -> int:
    return breaker.snapshot().successful_calls


def _layer(**given: Any) -> Any:
    return compiled_layer(TOKEN, **given)


class Harness(CountingLayer):
    def __init__(self) -> None:
        super().__init__(TOKEN)

    def call(self, client: Client) -> str:
        return self(client)


def _table(plan: Any, token: object = TOKEN, **guard: Any) -> Any:
    return SPEEDUPS.PlanTable(token, {"GET": plan}, **guard)  # type: ignore[union-attr]


def test_a_retired_table_stops_serving_and_the_holders_new_one_does():
    plans, harness = Plans(), Harness()
    first, first_breaker = plans.plan()
    second, second_breaker = plans.plan()
    pool = Pool()
    pool.table = _table(first)  # type: ignore[attr-defined]
    client = Client(pool)
    harness.call(client)
    harness.call(client)
    assert _successes(first_breaker) == 2

    old = pool.table  # type: ignore[attr-defined]
    pool.table = _table(second)  # type: ignore[attr-defined]
    harness.call(client)  # not retired yet: the remembered table still serves
    assert (_successes(first_breaker), _successes(second_breaker)) == (3, 0)
    old.retire()
    assert old.retired
    harness.call(client)
    harness.call(client)
    assert (_successes(first_breaker), _successes(second_breaker)) == (3, 2)
    assert harness.slow_calls == 0


def test_a_remembered_table_whose_guard_went_stale_is_read_again():
    """The holder may have been given a current table without the old one being retired:
    a remembered table that no longer validates sends the layer back to the holder."""
    plans, harness = Plans(), Harness()
    first, first_breaker = plans.plan()
    second, second_breaker = plans.plan()
    first_retry, second_retry = object(), object()
    first_kwargs: dict[str, Any] = {"retry": first_retry}
    second_kwargs: dict[str, Any] = {"retry": second_retry}
    pool = Pool()
    pool.table = _table(  # type: ignore[attr-defined]
        first, guard_map=first_kwargs, guard_key="retry", guard_value=first_retry
    )
    client = Client(pool)
    harness.call(client)
    pool.table = _table(  # type: ignore[attr-defined]
        second, guard_map=second_kwargs, guard_key="retry", guard_value=second_retry
    )
    first_kwargs["retry"] = object()
    harness.call(client)
    harness.call(client)
    assert (_successes(first_breaker), _successes(second_breaker)) == (1, 2)
    assert harness.slow_calls == 0


def test_a_table_made_under_another_token_never_serves():
    plans, harness = Plans(), Harness()
    plan, breaker = plans.plan()
    pool = Pool()
    pool.table = _table(plan, token=object())  # type: ignore[attr-defined]
    client = Client(pool)
    harness.call(client)
    harness.call(client)
    assert (_successes(breaker), harness.slow_calls) == (0, 2)


def test_a_guard_that_no_longer_holds_sends_the_call_to_python():
    plans, harness = Plans(), Harness()
    plan, breaker = plans.plan()
    retry = object()
    kwargs: dict[str, Any] = {"retry": retry}
    pool = Pool()
    pool.table = _table(plan, guard_map=kwargs, guard_key="retry", guard_value=retry)  # type: ignore[attr-defined]
    client = Client(pool)
    harness.call(client)
    kwargs["retry"] = object()  # the user gave the pool another retry
    harness.call(client)
    assert (_successes(breaker), harness.slow_calls) == (1, 1)


def test_a_new_holder_at_a_dead_ones_address_does_not_inherit_its_table():
    """Same-size objects reuse freed addresses: the layer knows its holder by a weak
    reference, never by address. (No gc.collect() between the two: a Pool has no cycles,
    and a collection would keep the successor off the freed address.)"""
    plans, harness = Plans(), Harness()
    reused = 0
    for _ in range(20):
        dead_plan, dead_breaker = plans.plan()
        live_plan, live_breaker = plans.plan()
        live_table = _table(live_plan)
        pool = Pool()
        pool.table = _table(dead_plan)  # type: ignore[attr-defined]
        harness.call(Client(pool))
        address = id(pool)
        del pool
        successor = Pool()
        reused += id(successor) == address
        successor.table = live_table  # type: ignore[attr-defined]
        harness.call(Client(successor))
        assert (_successes(dead_breaker), _successes(live_breaker)) == (1, 1)
    assert reused > 0  # otherwise this test proves nothing


def test_a_dead_holders_table_does_not_serve_a_client_whose_holder_is_none():
    """A dead weak reference reads as None on 3.10 to 3.12: a holder that is None must not
    match it."""
    plans, harness = Plans(), Harness()
    plan, breaker = plans.plan()
    pool = Pool()
    pool.table = _table(plan)  # type: ignore[attr-defined]
    harness.call(Client(pool))
    del pool
    gc.collect()
    harness.call(Client(None))  # type: ignore[arg-type]
    assert (_successes(breaker), harness.slow_calls) == (1, 1)


def test_a_table_read_that_reenters_the_layer_leaks_nothing():
    """Reading a holder's table may run Python (a property) that calls the same layer,
    which remembers its own table meanwhile."""
    plans, harness = Plans(), Harness()
    inner_plan, _ = plans.plan()
    outer_plan, outer_breaker = plans.plan()
    inner_pool = Pool()
    inner_table = _table(inner_plan)
    inner_pool.table = inner_table  # type: ignore[attr-defined]
    outer_table = _table(outer_plan)

    class ReentrantPool:
        @property
        def table(self) -> Any:
            harness.call(Client(inner_pool))
            return outer_table

    before = sys.getrefcount(inner_table)
    harness.call(Client(ReentrantPool()))  # type: ignore[arg-type]
    assert _successes(outer_breaker) == 1
    del harness.layer
    gc.collect()
    assert sys.getrefcount(inner_table) == before


def test_a_holder_without_weak_references_is_read_on_every_call():
    class SlottedPool:
        __slots__ = ("table",)

    plans, harness = Plans(), Harness()
    first, first_breaker = plans.plan()
    second, second_breaker = plans.plan()
    pool = SlottedPool()
    pool.table = _table(first)
    client = Client(pool)  # type: ignore[arg-type]
    harness.call(client)
    pool.table = _table(second)  # not retired: only a fresh read can see it
    harness.call(client)
    assert (_successes(first_breaker), _successes(second_breaker), harness.slow_calls) == (
        1,
        1,
        0,
    )


def test_the_remembered_table_is_not_kept_past_the_layer():
    plans, harness = Plans(), Harness()
    plan, _ = plans.plan()
    pool = Pool()
    pool.table = _table(plan)  # type: ignore[attr-defined]
    harness.call(Client(pool))
    table = pool.table  # type: ignore[attr-defined]
    held = sys.getrefcount(table)
    del harness
    gc.collect()
    assert sys.getrefcount(table) == held - 1


def _call_in(context: otel_context.Context, harness: Any, client: Any) -> None:
    """One call with ``context`` as the current OpenTelemetry Context."""
    token = otel_context.attach(context)
    try:
        harness.call(client)
    finally:
        otel_context.detach(token)


def test_suppressed_instrumentation_goes_to_python_which_passes_it_through():
    harness, breaker, client = _served()
    for key in (SUPPRESS_KEY, LEGACY_SUPPRESS_KEY):
        _call_in(otel_context.set_value(key, True), harness, client)
    assert (_successes(breaker), harness.slow_calls) == (0, 2)
    harness.call(client)
    assert (_successes(breaker), harness.slow_calls) == (1, 2)


class _Key(str):
    """A str subclass: dict membership finds it under the str it equals."""


class _OddKey:
    """A key that is no str: the scan hands the context to dict lookups."""

    def __hash__(self) -> int:
        return 7

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _OddKey)


@pytest.mark.parametrize(
    "entries",
    [
        pytest.param(lambda key: {"".join(list(key)): True}, id="an equal str, another object"),
        pytest.param(lambda key: {_OddKey(): 1, key: True}, id="beside a key that is no str"),
        pytest.param(lambda key: {_Key(key): True}, id="a str subclass equal to it"),
        pytest.param(
            lambda key: {f"current-span-{n}": n for n in range(5)} | {key: True},
            id="after other keys",
        ),
    ],
)
def test_every_suppression_key_a_lookup_would_find_is_found(entries):
    harness, breaker, client = _served()
    for key in (SUPPRESS_KEY, LEGACY_SUPPRESS_KEY):
        _call_in(otel_context.Context(entries(key)), harness, client)
    assert (_successes(breaker), harness.slow_calls) == (0, 2)


def test_keys_like_a_suppression_key_do_not_suppress():
    harness, breaker, client = _served()
    near = {SUPPRESS_KEY[:-1] + "x": True, LEGACY_SUPPRESS_KEY.upper(): True, _OddKey(): 1}
    _call_in(otel_context.Context(near), harness, client)
    assert (_successes(breaker), harness.slow_calls) == (1, 0)


def test_suppression_keys_must_be_str():
    with pytest.raises(TypeError, match="suppress_keys must be a tuple of str"):
        _layer(suppress_keys=(SUPPRESS_KEY, 1))


class _Interrupted(BaseException):
    """Not an Exception: the runner releases the breaker's permit and lets it through."""


def test_a_base_exception_from_explain_replaces_the_error_chained_to_it():
    plans = Plans()
    plan, _ = plans.plan()
    pool = Pool()
    pool.table = _table(plan)  # type: ignore[attr-defined]

    def failing(client: Client, key: str) -> str:
        raise ValueError("the call failed")

    def explain(plan: Any, error: BaseException) -> None:
        raise _Interrupted("while explaining")

    layer = _layer(original=failing, explain=explain)
    with pytest.raises(_Interrupted) as raised:
        layer(Client(pool), "GET")
    assert isinstance(raised.value.__context__, ValueError)


def test_a_release_that_fails_raises_chained_to_what_the_call_raised(monkeypatch):
    plans = Plans()
    plan, breaker = plans.plan()
    pool = Pool()
    pool.table = _table(plan)  # type: ignore[attr-defined]

    def interrupted(client: Client, key: str) -> str:
        raise _Interrupted("the call was interrupted")

    def broken_release(self: CircuitBreaker) -> None:
        raise RuntimeError("release failed")

    monkeypatch.setattr(CircuitBreaker, "release", broken_release)
    layer = _layer(original=interrupted)
    with pytest.raises(RuntimeError, match="release failed") as raised:
        layer(Client(pool), "GET")
    assert isinstance(raised.value.__context__, _Interrupted)


@pytest.mark.filterwarnings("ignore:coroutine 'sleep' was never awaited")
def test_an_async_run_handed_back_to_the_original_awaits_it_as_await_would():
    """A run made while its layer was on, first awaited after it was switched off, awaits
    the original's result in its place: as ``await`` would, generator-based coroutines
    included and a broken ``__await__`` refused."""
    import asyncio
    import types

    @types.coroutine
    def generator_based(client: Client, key: str) -> Any:
        yield None
        return key

    class ReturnsACoroutine:
        def __await__(self) -> Any:
            return asyncio.sleep(0)  # a coroutine, not an iterator: await refuses it

    class NotAnIterator:
        def __await__(self) -> Any:
            return 42

    outcomes = []
    for original in (
        generator_based,
        lambda client, key: ReturnsACoroutine(),
        lambda client, key: NotAnIterator(),
    ):
        patches = SimpleNamespace(enabled=True)
        layer = _layer(original=original, patches=patches, awaits=True)
        pending = layer(Client(Pool()), "GET")
        patches.enabled = False  # switched off between the call and its first await
        try:
            outcomes.append(asyncio.run(_awaited(pending)))
        except TypeError as error:
            outcomes.append(str(error))
    assert outcomes == [
        "GET",
        "__await__() returned a coroutine",
        "__await__() returned non-iterator of type 'int'",
    ]


async def _awaited(pending: Any) -> Any:
    return await pending
