"""The call's own time limit (:mod:`otel_recovery.instrumentors._attempt_site`), alone:
the cut, what it raises, and a cancellation from elsewhere that comes as well."""

from __future__ import annotations

import asyncio
import sys

import pytest

from otel_recovery.instrumentors._attempt_site import (
    is_call_limit,
    past_call_limit,
    within_call_limit,
)


async def fails_at_the_cut(error: BaseException, left: object) -> None:
    """``answer``: the call gives up at its limit, with what it was left (nothing here)."""
    assert left is None
    raise error


async def test_the_cut_raises_the_marked_error_and_leaves_the_task_uncancelled() -> None:
    async def stalls() -> None:
        await asyncio.sleep(10)

    with pytest.raises(TimeoutError) as raised:
        await within_call_limit(
            0.0, 0.05, 0.0, stalls(), lambda: TimeoutError("cut"), fails_at_the_cut
        )
    assert is_call_limit(raised.value) and str(raised.value) == "cut"
    task = asyncio.current_task()
    assert task is not None and getattr(task, "cancelling", lambda: 0)() == 0
    assert raised.value.__context__ is None  # the cut's cancellation was our own doing
    await asyncio.sleep(0)  # the task goes on: not cancelled


async def test_a_cut_call_is_answered_by_answer() -> None:
    async def stalls() -> None:
        await asyncio.sleep(10)

    async def falls_back(error: BaseException, left: object) -> str:
        assert is_call_limit(error) and left is None
        await asyncio.sleep(0.1)  # past the limit: nothing cuts the answer
        return "fallback"

    cut = lambda: TimeoutError("cut")  # noqa: E731
    assert await within_call_limit(0.0, 0.05, 0.0, stalls(), cut, falls_back) == "fallback"


async def test_a_recovery_that_ends_in_time_is_not_cut() -> None:
    async def answers() -> str:
        assert past_call_limit(1.0, 1.0, 0.5) is False and past_call_limit(1.0, 1.0, 2.0)
        assert past_call_limit(2.0, 1.0, 2.0) is False  # another call's start: not ours
        return "ok"

    answered = await within_call_limit(
        1.0, 3.0, 1.0, answers(), lambda: TimeoutError(), fails_at_the_cut
    )
    assert answered == "ok"
    assert past_call_limit(1.0, 1.0, 5.0) is False  # the limit is over with the recovery
    await asyncio.sleep(0.1)  # the cut was cancelled: it never fires


@pytest.mark.skipif(sys.version_info < (3, 11), reason="3.10 does not count cancellations")
async def test_a_cancellation_from_elsewhere_that_comes_as_well_wins() -> None:
    """A shutdown or a task group cancelling the task at the moment of the cut must not
    be turned into a timeout the application could catch and carry on from."""

    async def call() -> None:
        task = asyncio.current_task()
        assert task is not None

        async def stalls() -> None:
            try:
                await asyncio.sleep(10)
            except asyncio.CancelledError:
                task.cancel()  # the outer cancellation, arriving with the cut
                raise

        await within_call_limit(
            0.0, 0.05, 0.0, stalls(), lambda: TimeoutError("cut"), fails_at_the_cut
        )

    running = asyncio.ensure_future(call())
    with pytest.raises(asyncio.CancelledError):
        await running
    assert running.cancelled()
