"""Exceptions that refuse attribute writes reach the application as they were raised.

A frozen dataclass (or ``attrs`` frozen class) deriving from ``Exception`` has a
``__setattr__`` that raises ``FrozenInstanceError`` for every attribute, the
``BaseException`` slots ``__context__`` and ``__traceback__`` included. Recovery puts an
error's ``__context__`` back after raising it again (``_reraise``) and chains a failing
fallback to the error it answered: written as plain attribute assignments, both would
replace the application's error with a ``FrozenInstanceError`` about our own write.
"""

from __future__ import annotations

import dataclasses

import pytest

from otel_recovery.policies import Fallback, FixedBackoff, Retry
from otel_recovery.recover import RecoveryPolicy, recover


@dataclasses.dataclass(frozen=True)
class OrderRejected(Exception):
    """A domain error written the way many codebases write them: a frozen dataclass."""

    order_id: int


@dataclasses.dataclass(frozen=True)
class FallbackBroke(Exception):
    reason: str


def test_a_frozen_error_raised_again_keeps_its_type_and_context(fake_clock):
    @recover(retry=Retry(2, backoff=FixedBackoff(0), on=(OrderRejected,)), clock=fake_clock)
    def place() -> None:
        raise OrderRejected(7)

    try:
        raise KeyError("the application's own, being handled")
    except KeyError:
        with pytest.raises(OrderRejected) as caught:
            place()
    assert caught.value.order_id == 7
    # what the same call without recovery gives: raised inside the caller's handler
    assert isinstance(caught.value.__context__, KeyError)


async def test_a_frozen_error_raised_again_by_an_async_call_keeps_its_type(fake_clock):
    @recover(retry=Retry(2, backoff=FixedBackoff(0), on=(OrderRejected,)), clock=fake_clock)
    async def place() -> None:
        raise OrderRejected(8)

    try:
        raise KeyError("the application's own, being handled")
    except KeyError:
        with pytest.raises(OrderRejected) as caught:
            await place()
    assert caught.value.order_id == 8
    assert isinstance(caught.value.__context__, KeyError)


def test_a_policy_call_raises_a_frozen_error_again_unchanged(fake_clock):
    policy = RecoveryPolicy(retry=Retry(2, backoff=FixedBackoff(0)), clock=fake_clock, name="p")

    def place() -> None:
        raise OrderRejected(9)

    try:
        raise KeyError("the application's own, being handled")
    except KeyError:
        with pytest.raises(OrderRejected) as caught:
            policy.call(place)
    assert caught.value.order_id == 9


def test_a_frozen_error_from_a_fallback_is_chained_to_the_error_it_answered(fake_clock):
    def answer(error: BaseException) -> str:
        raise FallbackBroke("cache empty")

    @recover(retry=Retry(1), fallback=Fallback(func=answer), clock=fake_clock)
    def fetch() -> str:
        raise ConnectionError("down")

    with pytest.raises(FallbackBroke) as caught:
        fetch()
    assert isinstance(caught.value.__context__, ConnectionError)


async def test_an_async_fallbacks_frozen_error_is_chained_to_the_error_it_answered(fake_clock):
    def answer(error: BaseException) -> str:
        raise FallbackBroke("cache empty")

    @recover(retry=Retry(1), fallback=Fallback(func=answer), clock=fake_clock)
    async def fetch() -> str:
        raise ConnectionError("down")

    with pytest.raises(FallbackBroke) as caught:
        await fetch()
    assert isinstance(caught.value.__context__, ConnectionError)
