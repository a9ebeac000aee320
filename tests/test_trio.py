"""Recovery under trio, where nothing of asyncio runs.

httpx's ``AsyncClient`` and coroutines decorated with ``@recover`` run under trio as well as
asyncio. Until now every wait of ours called ``asyncio.sleep`` and every attempt time limit
``asyncio.timeout``: under trio both raise ``RuntimeError`` (no running event loop), so each
retry ended in our machinery. httpx then handed back the failed response, logged as an
internal error: no recovery at all. trio's own ``MockClock`` (``autojump_threshold=0``)
gives the decorator tests virtual time: ``trio.current_time()`` tells exactly how long we
slept, and only ``trio.sleep`` moves it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import httpx
import pytest
from instrumentors import http_faults as hf

from otel_recovery import Bulkhead, BulkheadFullError, FixedBackoff, Retry, recover
from otel_recovery._clock import MonotonicClock
from otel_recovery.instrumentors.httpx import HTTPXAttemptTimeoutError, HTTPXRecoveryInstrumentor
from otel_recovery.testing import FakeClock

trio = pytest.importorskip("trio")
from trio.testing import MockClock  # noqa: E402

server = pytest.fixture(scope="module")(hf.serve)
tel = pytest.fixture(hf.telemetry)


class TrioTime(MonotonicClock):
    """The system clock, but reading trio's (virtual) time: the attempt's limit, what is
    left of it when the scope opens, is then exactly what the scope waits."""

    __slots__ = ()
    now = staticmethod(lambda: trio.current_time())


def run_virtual(main: Any) -> Any:
    """``trio.run`` on a clock that jumps over every sleep at once."""
    return trio.run(main, clock=MockClock(autojump_threshold=0))


def test_a_coroutines_backoff_waits_with_trios_sleep() -> None:
    calls: list[float] = []

    @recover(retry=Retry(3, backoff=FixedBackoff(2.0)))
    async def flaky() -> str:
        calls.append(trio.current_time())
        if len(calls) < 3:
            raise ConnectionError("down")
        return "ok"

    async def main() -> tuple[str, float]:
        started = trio.current_time()
        result = await flaky()
        return result, trio.current_time() - started

    assert run_virtual(main) == ("ok", 4.0)  # two backoffs of 2 s, on trio's clock
    assert [b - a for a, b in zip(calls, calls[1:])] == [2.0, 2.0]


def test_an_attempt_time_limit_is_a_trio_cancel_scope() -> None:
    """The slow attempt is cut after its limit on trio's clock, the next one succeeds; an
    attempt that is always slow ends in the time-limit error, after every attempt."""
    calls: list[float] = []
    on_trios_clock = TrioTime()

    @recover(retry=Retry(2, backoff=FixedBackoff(0.5), attempt_timeout=1.0), clock=on_trios_clock)
    async def slow_once() -> str:
        calls.append(trio.current_time())
        if len(calls) == 1:
            await trio.sleep(60)
        return "ok"

    @recover(retry=Retry(2, backoff=FixedBackoff(0.5), attempt_timeout=1.0), clock=on_trios_clock)
    async def always_slow() -> str:
        await trio.sleep(60)
        return "never"

    async def main() -> tuple[str, float, BaseException | None]:
        started = trio.current_time()
        result = await slow_once()
        took = trio.current_time() - started
        try:
            await always_slow()
        except TimeoutError as error:
            return result, took, error
        return result, took, None

    result, took, error = run_virtual(main)
    assert (result, took) == ("ok", 1.5)  # cut at 1 s, 0.5 s backoff, then at once
    assert isinstance(error, TimeoutError) and "time limit" in str(error)


def test_an_outer_cancel_scope_stays_a_cancellation_during_a_backoff() -> None:
    calls: list[float] = []

    @recover(retry=Retry(5, backoff=FixedBackoff(10.0)))
    async def failing() -> None:
        calls.append(trio.current_time())
        raise ConnectionError("down")

    async def main() -> bool:
        with trio.move_on_after(15) as scope:
            await failing()
        return scope.cancelled_caught

    assert run_virtual(main) is True  # not a ConnectionError, nor a retry error
    assert calls == [0.0, 10.0]  # cancelled in the second backoff: no third attempt


def test_a_bulkhead_hands_slots_to_waiting_trio_tasks_and_rejects_after_max_wait() -> None:
    """One slot, calls of 1 s: the second waits and gets the slot the first gives back;
    the third waits 1.5 s and is rejected. A cancelled waiter takes no slot with it."""
    bulkhead = Bulkhead(1, max_wait=1.5)

    @recover(bulkhead=bulkhead, attempts=1)
    async def call(name: str) -> str:
        await trio.sleep(1)
        return name

    async def main() -> dict[str, Any]:
        ended: dict[str, Any] = {}

        async def one(name: str, delay: float) -> None:
            await trio.sleep(delay)
            try:
                ended[name] = (await call(name), trio.current_time())
            except BulkheadFullError:
                ended[name] = ("rejected", trio.current_time())

        async with trio.open_nursery() as nursery:
            for name, delay in (("a", 0), ("b", 0.1), ("c", 0.2)):
                nursery.start_soon(one, name, delay)
        with trio.move_on_after(0.5):  # the slot is free again: a waiter cancelled...
            async with trio.open_nursery() as nursery:
                nursery.start_soon(one, "d", 0)
                nursery.start_soon(one, "e", 0.1)
        ended["in_use"] = bulkhead.in_use  # ...gives nothing back twice, keeps nothing
        return ended

    ended = run_virtual(main)
    assert ended["a"] == ("a", 1.0)
    assert ended["b"] == ("b", 2.0)  # handed the slot at 1.0
    assert ended["c"] == ("rejected", pytest.approx(1.7))
    assert "d" not in ended and "e" not in ended and ended["in_use"] == 0


def test_the_asgi_middleware_retries_under_trio() -> None:
    """As under hypercorn's trio worker: a GET whose app fails once is retried after the
    backoff, on trio's clock."""
    from otel_recovery.middleware.asgi import RecoveryMiddleware

    attempts: list[float] = []

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        attempts.append(trio.current_time())
        if len(attempts) == 1:
            raise ConnectionError("connection reset while reading stock")
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    guarded = RecoveryMiddleware(app, retry=Retry(2, backoff=FixedBackoff(3.0)))

    async def main() -> httpx.Response:
        transport = httpx.ASGITransport(app=guarded)
        async with httpx.AsyncClient(transport=transport, base_url="http://svc") as client:
            return await client.get("/stock")

    response = run_virtual(main)
    assert (response.status_code, response.text) == (200, "ok")
    assert attempts == [0.0, 3.0]


def test_trio_as_a_guest_on_an_asyncio_loop_backs_off_with_trios_sleep() -> None:
    """trio's guest mode runs trio tasks on an asyncio host loop, in one thread: asyncio's
    running loop is there, yet a trio task must wait with ``trio.sleep`` (asyncio's raised
    ``TypeError`` in trio's scheduler when we asked asyncio first)."""
    calls: list[float] = []

    @recover(retry=Retry(3, backoff=FixedBackoff(0.05)))
    async def flaky() -> str:
        calls.append(trio.current_time())
        if len(calls) < 2:
            raise ConnectionError("down")
        return "ok"

    async def host() -> Any:
        loop = asyncio.get_running_loop()
        done: asyncio.Future[Any] = loop.create_future()
        trio.lowlevel.start_guest_run(
            flaky,
            run_sync_soon_threadsafe=loop.call_soon_threadsafe,
            done_callback=done.set_result,
            host_uses_signal_set_wakeup_fd=True,
        )
        return (await done).unwrap()

    assert asyncio.run(host()) == "ok"
    assert len(calls) == 2 and calls[1] - calls[0] >= 0.05


# -- httpx's AsyncClient under trio, against a real local server ----------------------------


@pytest.fixture
def instrument(tel: hf.Telemetry) -> Any:
    yield from hf.instrumenting(
        tel, FakeClock(wall_start=time.time()), HTTPXRecoveryInstrumentor, lambda: _NoContrib()
    )


class _NoContrib:
    def instrument(self, **_: Any) -> None:
        pass

    def uninstrument(self) -> None:
        pass


def get(url: str, timeout: float = 2.0) -> httpx.Response:
    async def main() -> httpx.Response:
        async with httpx.AsyncClient(timeout=timeout) as client:
            return await client.get(url)

    response: httpx.Response = trio.run(main)
    return response


def test_httpx_under_trio_retries_a_503(server: Any, instrument: Any, caplog: Any) -> None:
    instrument(contrib=False)
    url = server.script("/trio-503", hf.status(503), hf.retry_after(429, 0), hf.ok("fine"))
    with caplog.at_level(logging.ERROR, logger="otel_recovery"):
        response = get(url)
    assert (response.status_code, response.text) == (200, "fine")
    assert server.count("/trio-503") == 3
    assert "internal error" not in caplog.text


def test_httpx_under_trio_cuts_a_stalled_attempt_and_retries(
    server: Any, instrument: Any, caplog: Any
) -> None:
    # The first attempt is cut at the limit; the second, answered at once (a few ms on an
    # idle machine), must beat it, on a loaded machine too (0.5 s left it little margin).
    # httpx's own timeout is far beyond it.
    instrument(contrib=False, attempt_timeout=2.0)
    url = server.script("/trio-slow", hf.hold(), hf.ok("fine"))
    with caplog.at_level(logging.ERROR, logger="otel_recovery"):
        response = get(url, timeout=10.0)
    assert (response.status_code, response.text) == (200, "fine")
    assert server.count("/trio-slow") == 2
    assert "internal error" not in caplog.text


def test_httpx_under_trio_raises_its_timeout_error_when_every_attempt_is_cut(
    server: Any, instrument: Any, caplog: Any
) -> None:
    # Each attempt's request must reach the server within the limit to be counted (a few
    # ms on an idle machine; 0.5 s was tight on a loaded one); the hold outlasts the limit.
    instrument(contrib=False, attempt_timeout=1.0)
    stuck = server.script("/trio-stuck", *[hf.hold()] * 3)
    with caplog.at_level(logging.ERROR, logger="otel_recovery"):
        with pytest.raises(HTTPXAttemptTimeoutError) as raised:
            get(stuck, timeout=10.0)
    assert isinstance(raised.value, httpx.TimeoutException)
    assert server.count("/trio-stuck") == 3
    assert "internal error" not in caplog.text
