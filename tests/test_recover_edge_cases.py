"""Regression tests from the foundation review: cleanup, cancellation, deadlines, isolation."""

from __future__ import annotations

import asyncio
import random
import sys
from datetime import timedelta

import pytest
from opentelemetry import trace

from otel_recovery.learning import StrategyLearner
from otel_recovery.policies import (
    Bulkhead,
    BulkheadFullError,
    CircuitBreaker,
    CircuitState,
    Fallback,
    FixedBackoff,
    Retry,
    RetryBudget,
    Timeout,
    remaining_time,
)
from otel_recovery.policies.backoff import CustomBackoff, ExponentialBackoff
from otel_recovery.recover import RecoveryPolicy, recover
from otel_recovery.telemetry import attributes as names
from otel_recovery.testing import FakeClock


def half_open_breaker(clock):
    breaker = CircuitBreaker(failure_threshold=1, timeout=1, clock=clock)
    breaker.record_failure()
    clock.advance(2)
    return breaker


async def test_cancellation_during_backoff_gives_back_the_probe_and_ends_the_span(
    recovery_telemetry,
):
    """Real time here: the caller's wait_for cancels the task while it sleeps between attempts."""
    breaker = CircuitBreaker(failure_threshold=1, timeout=0.01)
    breaker.record_failure()
    await asyncio.sleep(0.02)
    policy = RecoveryPolicy(retry=Retry(3, backoff=FixedBackoff(10)), breaker=breaker, name="slow")

    async def failing():
        raise ConnectionError("down")

    with pytest.raises(asyncio.TimeoutError):
        await asyncio.wait_for(policy.acall(failing), 0.05)
    assert breaker.state is CircuitState.HALF_OPEN
    assert breaker.can_execute() is True  # the probe permit came back
    span = recovery_telemetry.span("recover slow")
    assert span.attributes[names.OUTCOME] == "cancelled"
    assert not trace.get_current_span().is_recording()  # context detached


def test_a_raising_retry_predicate_keeps_the_callers_error(fake_clock, recovery_telemetry):
    breaker = half_open_breaker(fake_clock)
    policy = RecoveryPolicy(
        retry=Retry(3, on=lambda e: e.response.status_code == 503),  # AttributeError on others
        breaker=breaker,
        clock=fake_clock,
        name="pred",
    )

    def failing():
        raise ConnectionError("refused")

    with pytest.raises(ConnectionError):
        policy.call(failing)
    assert breaker.state is CircuitState.OPEN  # the probe failure was recorded, not leaked
    assert recovery_telemetry.span("recover pred").attributes[names.OUTCOME] == "failure"
    assert not trace.get_current_span().is_recording()


def test_keyboard_interrupt_during_backoff_releases_the_probe(fake_clock):
    breaker = half_open_breaker(fake_clock)

    class InterruptingClock(FakeClock):
        def sleep(self, seconds):
            raise KeyboardInterrupt

    clock = InterruptingClock()
    breaker = CircuitBreaker(failure_threshold=1, timeout=1, clock=clock)
    breaker.record_failure()
    clock.advance(2)
    policy = RecoveryPolicy(
        retry=Retry(3, backoff=FixedBackoff(1)), breaker=breaker, clock=clock, telemetry=False
    )
    with pytest.raises(KeyboardInterrupt):
        policy.call(lambda: (_ for _ in ()).throw(ConnectionError()))
    assert breaker.can_execute() is True


async def test_cancelling_a_task_waiting_for_a_bulkhead_slot_stays_a_cancellation():
    bulkhead = Bulkhead(1, max_wait=5)
    policy = RecoveryPolicy(bulkhead=bulkhead, fallback=Fallback("cached"), telemetry=False)
    release = asyncio.Event()

    async def hold():
        await release.wait()
        return "held"

    holder = asyncio.create_task(policy.acall(hold))
    await asyncio.sleep(0)
    waiter = asyncio.create_task(policy.acall(hold))
    await asyncio.sleep(0.01)
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    release.set()
    assert await holder == "held"
    assert bulkhead.in_use == 0


@pytest.mark.parametrize("turns", range(6))
async def test_a_task_cancelled_as_its_bulkhead_slot_arrives_is_cancelled(turns):
    """The slot is handed over, and the task is cancelled before it resumes (its TaskGroup
    failed, an asyncio.timeout fired). asyncio.wait_for before Python 3.12 returned
    normally then, and the guarded call ran in a cancelled task."""
    bulkhead = Bulkhead(1, max_wait=5)
    policy = RecoveryPolicy(bulkhead=bulkhead, telemetry=False)
    release, ran = asyncio.Event(), []

    async def hold() -> str:
        await release.wait()
        return "held"

    async def work() -> str:
        ran.append(True)
        return "done"

    holder = asyncio.create_task(policy.acall(hold))
    await asyncio.sleep(0)
    waiter = asyncio.create_task(policy.acall(work))
    await asyncio.sleep(0.01)  # waiting for the slot
    release.set()  # the holder ends: its slot goes to the waiter
    for _ in range(turns):
        await asyncio.sleep(0)
    finished_first = waiter.done()
    waiter.cancel()
    if finished_first:  # it ran before the cancellation came: nothing to lose
        assert await waiter == "done"
    else:
        with pytest.raises(asyncio.CancelledError):
            await waiter
        assert not ran
    assert await holder == "held" and bulkhead.in_use == 0


async def test_bulkhead_timeout_is_still_a_rejection():
    bulkhead = Bulkhead(1, max_wait=0.01)
    policy = RecoveryPolicy(bulkhead=bulkhead, telemetry=False)
    gate = asyncio.Event()
    holder = asyncio.create_task(policy.acall(gate.wait))
    await asyncio.sleep(0)
    with pytest.raises(BulkheadFullError):
        await policy.acall(gate.wait)
    gate.set()
    await holder


@pytest.mark.parametrize("style", ["call", "decorated"])
def test_last_known_good_never_crosses_call_arguments(fake_clock, style):
    data = {"alice": {"name": "Alice"}}
    fallback = Fallback(last_known_good=True)
    policy = RecoveryPolicy(retry=Retry(1), fallback=fallback, clock=fake_clock, telemetry=False)

    def profile(user):
        if user not in data:
            raise ConnectionError("down")
        return data[user]

    run = policy.call if style == "call" else (lambda f, *a: policy(f)(*a))
    assert run(profile, "alice") == {"name": "Alice"}
    with pytest.raises(ConnectionError):
        run(profile, "bob")  # bob never succeeded: nothing to fall back on
    del data["alice"]
    assert run(profile, "alice") == {"name": "Alice"}  # alice's own last good value


def test_last_known_good_key_function_and_bound(fake_clock):
    fallback = Fallback(last_known_good=True, key=lambda user, **_: user, max_entries=2)
    policy = RecoveryPolicy(retry=Retry(1), fallback=fallback, clock=fake_clock, telemetry=False)
    down = False

    def lookup(u: str, verbose: bool = False) -> str:
        if down:
            raise ConnectionError()
        return u.upper()

    for user in ("a", "b", "c"):
        policy.call(lookup, user, verbose=True)
    down = True
    assert policy.call(lookup, "c", verbose=False) == "C"  # the key ignores verbose
    with pytest.raises(ConnectionError):  # "a" was evicted (max_entries=2)
        policy.call(lookup, "a")


def test_last_known_good_is_never_shared_between_functions(fake_clock):
    """One policy often serves several functions: what ``password_hash(42)`` returned must
    never answer for ``email(42)``, by ``call``, by a policy used as a decorator on both,
    sync or awaited, compiled or not."""
    policy = RecoveryPolicy(
        retry=Retry(1), fallback=Fallback(last_known_good=True), clock=fake_clock, telemetry=False
    )
    down = False

    def password_hash(user: int) -> str:
        if down:
            raise ConnectionError()
        return "secret-hash"

    def email(user: int) -> str:
        if down:
            raise ConnectionError()
        return "a@example.com"

    async def apassword_hash(user: int) -> str:
        return password_hash(user)

    async def aemail(user: int) -> str:
        return email(user)

    policy.call(password_hash, 42)
    asyncio.run(policy.acall(apassword_hash, 42))
    wrapped = policy.wrap(email)
    down = True
    with pytest.raises(ConnectionError):
        policy.call(email, 42)
    with pytest.raises(ConnectionError):
        wrapped(42)
    with pytest.raises(ConnectionError):
        asyncio.run(policy.acall(aemail, 42))
    assert policy.call(password_hash, 42) == "secret-hash"  # its own, still


async def test_retry_deadline_bounds_a_hanging_attempt():
    policy = RecoveryPolicy(retry=Retry(3, deadline=0.2, backoff=FixedBackoff(0)), telemetry=False)
    calls = 0

    async def first_fails_then_hangs():
        nonlocal calls
        calls += 1
        if calls == 1:
            raise ConnectionError()
        await asyncio.sleep(30)

    loop = asyncio.get_running_loop()
    start = loop.time()
    with pytest.raises(TimeoutError):
        await policy.acall(first_fails_then_hangs)
    assert loop.time() - start < 2.0
    assert calls == 2


def test_attempts_see_what_is_left_of_the_deadline(fake_clock):
    seen = []
    policy = RecoveryPolicy(
        retry=Retry(3, deadline=6.5, backoff=FixedBackoff(1)), clock=fake_clock, telemetry=False
    )

    def work():
        seen.append(remaining_time(fake_clock))
        fake_clock.advance(1.5)
        if len(seen) < 3:
            raise ConnectionError()

    policy.call(work)
    assert seen == [6.5, 4.0, 1.5]


async def test_async_callable_objects_are_decorated_as_async(fake_clock):
    class Client:
        def __init__(self):
            self.calls = 0

        async def __call__(self):
            self.calls += 1
            if self.calls < 3:
                raise ConnectionError()
            return "ok"

    client = Client()
    wrapped = recover(attempts=3, clock=fake_clock, telemetry=False)(client)
    assert await wrapped() == "ok" and client.calls == 3


def test_attempt_blocks_publish_the_deadline_and_hold_a_bulkhead_slot(fake_clock):
    bulkhead = Bulkhead(1)
    policy = RecoveryPolicy(
        retry=Retry(2), timeout=2.0, bulkhead=bulkhead, clock=fake_clock, telemetry=False
    )
    for attempt in policy.attempts():
        with attempt:
            assert remaining_time(fake_clock) == 2.0
            assert bulkhead.in_use == 1
    assert bulkhead.in_use == 0


def test_criticality_is_validated_when_the_policy_is_built():
    RecoveryPolicy(retry=Retry(2), context={"criticality": "medium"})
    with pytest.raises(
        ValueError, match="criticality'. must be one of low, normal, medium, high, critical"
    ):
        RecoveryPolicy(retry=Retry(2), context={"criticality": "urgent"})


def test_mismatched_clocks_are_refused():
    with pytest.raises(ValueError, match="budget and the policy read different clocks"):
        RecoveryPolicy(retry=Retry(2), budget=RetryBudget(), clock=FakeClock())


def test_a_failing_fallback_reports_its_own_error_type(fake_clock, recovery_telemetry):
    def broken(error):
        raise ValueError("fallback broke")

    policy = RecoveryPolicy(
        retry=Retry(1), fallback=Fallback(func=broken), clock=fake_clock, name="fb"
    )
    with pytest.raises(ValueError):
        policy.call(lambda: (_ for _ in ()).throw(ConnectionError()))
    assert recovery_telemetry.span("recover fb").attributes[names.ERROR_TYPE] == "ValueError"


async def test_an_attempt_whose_deadline_is_spent_is_not_started() -> None:
    """A backoff that overran the total deadline leaves the next attempt no time: it must
    not start at all (a client writes its command before its first await, so a started
    attempt cut at once would have sent it), as ``wait_for(..., 0)`` never started it."""

    class Overrunning(FakeClock):
        async def asleep(self, seconds: float) -> None:
            await super().asleep(seconds + 1.0)  # the event loop was busy elsewhere

    clock = Overrunning()
    calls = []

    @recover(
        RecoveryPolicy(
            retry=Retry(2, deadline=0.5, attempt_timeout=0.5, backoff=FixedBackoff(0.1)),
            clock=clock,
        )
    )
    async def send() -> None:
        calls.append(clock.now())
        raise ConnectionError("reset")

    with pytest.raises((TimeoutError, ConnectionError)):
        await send()
    assert len(calls) == 1


def test_a_bulkhead_full_error_survives_pickling_and_copying():
    """Raised in a process pool's worker, an error that cannot be pickled breaks the pool."""
    import copy
    import pickle

    from otel_recovery.policies.bulkhead import BulkheadFullError

    error = BulkheadFullError("reports", 4)
    for twin in (pickle.loads(pickle.dumps(error)), copy.copy(error), copy.deepcopy(error)):
        assert (type(twin), str(twin), twin.name, twin.max_concurrent) == (
            BulkheadFullError,
            str(error),
            "reports",
            4,
        )


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: CircuitBreaker(name="x", timeout=float("inf")), r"timeout must be at most 1e\+09"),
        (lambda: CircuitBreaker(name="x", timeout=1e17), r"timeout must be at most 1e\+09"),
        (lambda: FixedBackoff(seconds=1e12), r"seconds must be at most 1e\+09"),
        (lambda: Retry(attempt_timeout=float("inf")), r"attempt_timeout must be at most"),
        (lambda: RetryBudget(min_per_second=float("nan")), "min_per_second must be a finite"),
    ],
)
def test_a_duration_too_long_to_wait_is_refused_when_the_policy_is_built(build, message):
    """inf or 1e17 seconds once got through and came back as an OverflowError from
    ``time.sleep`` or ``math.ceil`` in the middle of a failure, hiding the caller's error."""
    with pytest.raises(ValueError, match=message):
        build()


def test_infinity_stays_the_spelling_of_no_bound_where_a_parameter_has_one():
    assert Retry(deadline=float("inf")).deadline is None
    assert Fallback(last_known_good=True, max_age=float("inf")).max_age is None
    assert Bulkhead(1, max_wait=float("inf")).max_wait == float("inf")
    assert (
        CircuitBreaker(name="x", timeout_multiplier=2, max_timeout=float("inf")).retry_after()
        is None
    )
    # the usual "forever" spellings too, wherever a parameter may mean no bound
    assert Bulkhead(1, max_wait=timedelta.max).max_wait > 1e9
    assert Retry(deadline=sys.maxsize, retry_after_cap=float("inf")).retry_after_cap > 1e9
    assert Timeout(float("inf")).seconds == float("inf")
    assert StrategyLearner(save_interval=float("inf"), half_life=float("inf")) is not None
    uncapped = ExponentialBackoff(initial=1, maximum=float("inf"), jitter="none")
    assert [uncapped.nominal(n) for n in (1, 2, 3)] == [1, 2, 4]
    assert uncapped.nominal(10_000) == 1e9  # still a time one can sleep
    assert CustomBackoff(lambda n, p: float("inf")).delay(1, 0.0, random.Random()) > 1e9


def test_a_clock_that_is_not_a_clock_is_refused_where_it_is_passed():
    """``clock=time.monotonic`` once got through and failed as an AttributeError on the
    first retry, when the policy asked it to sleep."""
    import time

    from otel_recovery.checkpoint import Checkpoints
    from otel_recovery.middleware import WSGIRecoveryMiddleware

    builds = [
        lambda: RecoveryPolicy(retry=Retry(2), clock=time.monotonic),
        lambda: RetryBudget(clock=time.monotonic),
        lambda: Checkpoints(clock=time.monotonic),
        lambda: WSGIRecoveryMiddleware(lambda environ, start: [], clock=time.monotonic),
    ]
    for build in builds:
        with pytest.raises(TypeError, match=r"clock must implement otel_recovery Clock"):
            build()
    clock = FakeClock()
    assert RecoveryPolicy(retry=Retry(2), clock=clock).clock is clock


@pytest.mark.parametrize(
    ("on", "error", "message"),
    [
        ((), ValueError, r"Fallback on=\(\) names no exception type"),
        (((),), ValueError, r"Fallback on=\(\) names no exception type"),
        ((ValueError, "Timeout"), TypeError, "Fallback on= tuple must hold exception types only"),
        (42, TypeError, "Fallback on= must be exception types or a predicate"),
    ],
)
def test_a_fallback_on_that_matches_nothing_or_cannot_match_is_refused(on, error, message):
    """A tuple holding a string raised TypeError from isinstance at the first failure,
    replacing the caller's error; an empty one quietly never answered."""
    with pytest.raises(error, match=message):
        Fallback(1, on=on)
    assert Fallback(1, on=(ValueError, (KeyError, IndexError))).handles(IndexError())


def test_a_context_that_is_not_a_mapping_is_refused_naming_it():
    with pytest.raises(TypeError, match="context must be a mapping of span attributes"):
        RecoveryPolicy(retry=Retry(2), context=["tenant", "acme"])


def test_remaining_time_reads_the_deadline_on_the_policys_own_clock(fake_clock):
    """A callee under a policy with a fake clock asks ``remaining_time()`` without naming
    the clock: it gets the time left on the policy's clock, not 0.0 (the fake deadline
    read against the monotonic clock)."""
    policy = RecoveryPolicy(retry=Retry(1), timeout=Timeout(5), clock=fake_clock, name="t")
    seen: list[float | None] = []

    def callee() -> None:
        fake_clock.advance(1.5)
        seen.append(remaining_time())

    policy.call(callee)
    for attempt in policy.attempts():
        with attempt:
            seen.append(remaining_time())
    assert seen == [3.5, 5.0]
    assert remaining_time() is None


def test_settings_of_the_wrong_kind_are_refused_naming_the_setting():
    """``telemetry="yes"`` used to switch telemetry on or off by truthiness at the first
    failure; ``timeout=-1`` was reported as "seconds must be >= 0"."""
    with pytest.raises(TypeError, match="telemetry must be True, False or a Telemetry"):
        recover(telemetry="yes")
    with pytest.raises(ValueError, match="^timeout must be >= 0 seconds, got -1"):
        recover(timeout=-1)
    with pytest.raises(ValueError, match="Timeout must be > 0 seconds"):
        recover(timeout=0)


def test_an_async_fallback_on_a_sync_function_is_refused_at_decoration(fake_clock):
    """Found where it is written, not at the first failure in production."""

    async def cached(error: BaseException) -> str:
        return "cached"

    def fetch() -> str:
        raise ConnectionError("down")

    with pytest.raises(TypeError, match="a synchronous call cannot await"):
        recover(fallback=Fallback(func=cached), clock=fake_clock)(fetch)

    async def afetch() -> str:
        raise ConnectionError("down")

    assert asyncio.run(recover(fallback=Fallback(func=cached), clock=fake_clock)(afetch)()) == (
        "cached"
    )


class _TrippingClock(FakeClock):
    """Another caller trips the breaker while this one sleeps between attempts."""

    breaker: CircuitBreaker | None = None

    def sleep(self, seconds: float) -> None:
        super().sleep(seconds)
        if self.breaker is not None:
            self.breaker.force_open()

    async def asleep(self, seconds: float) -> None:
        self.sleep(seconds)
        await asyncio.sleep(0)


def _run(policy: RecoveryPolicy, fn, style: str) -> None:
    """``fn`` under ``policy`` in one of the four ways a call can run."""

    async def afn() -> None:
        fn()

    async def blocks() -> None:
        async for attempt in policy.aattempts():
            with attempt:
                fn()

    if style == "call":
        policy.call(fn)
    elif style == "acall":
        asyncio.run(policy.acall(afn))
    elif style == "attempts":
        for attempt in policy.attempts():
            with attempt:
                fn()
    else:
        asyncio.run(blocks())


@pytest.mark.parametrize("style", ["call", "acall", "attempts", "aattempts"])
def test_a_circuit_opened_during_the_backoff_stops_the_retry(style):
    """The breaker was looked at before the wait only: one more request went out to a
    circuit someone else opened while this call slept."""
    clock = _TrippingClock()
    breaker = CircuitBreaker(failure_threshold=5, timeout=60, clock=clock, name="dep")
    clock.breaker = breaker
    policy = RecoveryPolicy(
        retry=Retry(3, backoff=FixedBackoff(1.0)), breaker=breaker, clock=clock, telemetry=False
    )
    sent: list[str] = []

    def fn() -> None:
        sent.append(breaker.state.value)
        raise ConnectionError("down")

    with pytest.raises(ConnectionError):
        _run(policy, fn, style)
    assert sent == ["closed"]


def test_a_straggler_does_not_retry_beside_the_half_open_probe():
    """A call admitted while the circuit was closed kept retrying once it went half-open
    (opened by others during its wait, then past its open timeout), sending requests
    beside the one probe the breaker allows."""

    class OpeningClock(FakeClock):
        breaker: CircuitBreaker | None = None

        def sleep(self, seconds: float) -> None:
            if self.breaker is not None:
                self.breaker.force_open()
                self.breaker.reset()
                self.breaker.record_failure()  # opened by another caller's failure...
            super().sleep(seconds)  # ...and half-open by the time this call wakes

    clock = OpeningClock()
    breaker = CircuitBreaker(failure_threshold=1, timeout=1, clock=clock)
    clock.breaker = breaker
    policy = RecoveryPolicy(
        retry=Retry(4, backoff=FixedBackoff(2.0)), breaker=breaker, clock=clock, telemetry=False
    )
    sent: list[str] = []

    def fn() -> None:
        sent.append(breaker.state.value)
        raise ConnectionError("down")

    with pytest.raises(ConnectionError):
        policy.call(fn)
    assert sent == ["closed"]


async def test_a_backoff_that_wakes_past_the_deadline_gives_up_with_the_real_failure():
    """A sleep wakes a little late; the deadline then was spent before the next attempt,
    which was refused unsent with a made-up TimeoutError in place of the real failure."""

    class LateClock(FakeClock):
        def sleep(self, seconds: float) -> None:
            super().sleep(seconds)
            self.advance(0.02)  # the OS wakes us 20 ms late

    calls: list[int] = []

    async def fetch() -> None:
        calls.append(1)
        raise ConnectionError("connection refused by db:5432")

    clock = LateClock()
    policy = RecoveryPolicy(
        retry=Retry(5, deadline=1.0, backoff=FixedBackoff(0.99)), clock=clock, telemetry=False
    )
    with pytest.raises(ConnectionError, match="refused by db"):
        await policy.acall(fetch)
    assert calls == [1]


@pytest.mark.parametrize("style", ["call", "attempts"])
def test_a_failure_after_retries_is_timed_on_its_last_attempt_not_our_waits(fake_clock, style):
    """A success after retries was timed on its last attempt, a failure on the whole call,
    backoff waits included: calls of 1 s attempts counted as slow and opened the circuit
    on ``slow_call_rate``."""
    breaker = CircuitBreaker(
        failure_rate_threshold=1.0, slow_call_duration=5, slow_call_rate_threshold=0.5,
        minimum_calls=2, window_size=2, clock=fake_clock,
    )  # fmt: skip
    policy = RecoveryPolicy(
        retry=Retry(2, backoff=FixedBackoff(10)), breaker=breaker, clock=fake_clock,
        telemetry=False,
    )  # fmt: skip

    def fails() -> None:
        fake_clock.advance(1.0)
        raise ConnectionError("x")

    for _ in range(2):
        with pytest.raises(ConnectionError):
            if style == "call":
                policy.call(fails)
            else:
                for attempt in policy.attempts():
                    with attempt:
                        fails()
    snapshot = breaker.snapshot()
    assert snapshot.slow_call_rate == 0.0


def test_a_custom_backoff_answering_infinity_gives_up(fake_clock):
    """Its own docstring reads inf as "give up"; the engine slept it: 31 years on the real
    clock, an infinite time on a fake one."""
    policy = RecoveryPolicy(
        retry=Retry(3, backoff=CustomBackoff(lambda attempt, previous: float("inf"))),
        clock=fake_clock, telemetry=False,
    )  # fmt: skip
    calls: list[int] = []

    def fn() -> None:
        calls.append(1)
        raise ConnectionError("down")

    with pytest.raises(ConnectionError):
        policy.call(fn)
    assert calls == [1] and fake_clock.sleeps == []


def test_last_known_good_answers_only_the_same_arguments(fake_clock):
    """``f(1)`` answered with ``f(1.0)``'s and ``f(True)``'s result; a keyword call could
    match a positional tuple."""
    failing = {"on": False}

    @recover(
        retry=Retry(1), fallback=Fallback(last_known_good=True), clock=fake_clock, telemetry=False
    )
    def price(*args, **kwargs) -> str:
        if failing["on"]:
            raise ConnectionError("down")
        return f"price for {args!r} {kwargs!r}"

    price(1.0)
    price((), (("x", 1),))
    failing["on"] = True
    for args, kwargs in (((1,), {}), ((True,), {}), ((), {"x": 1})):
        with pytest.raises(ConnectionError):
            price(*args, **kwargs)
    assert price(1.0) == "price for (1.0,) {}"


@pytest.mark.parametrize("style", ["call", "acall", "attempts", "aattempts"])
def test_a_retry_stopped_after_its_wait_is_not_counted_as_a_retry(style, recovery_telemetry):
    """The retry counter was added to when the retry was decided, before the wait: a retry
    the opened circuit then stopped counted as an attempt that never went out."""
    clock = _TrippingClock()
    breaker = CircuitBreaker(failure_threshold=5, timeout=60, clock=clock, name="dep")
    clock.breaker = breaker
    policy = RecoveryPolicy(
        retry=Retry(3, backoff=FixedBackoff(1.0)), breaker=breaker, clock=clock, name="dep"
    )

    def fn() -> None:
        raise ConnectionError("down")

    with pytest.raises(ConnectionError):
        _run(policy, fn, style)
    assert recovery_telemetry.metric_points(names.METRIC_RETRY_ATTEMPTS) == []
    span = recovery_telemetry.span("recover dep")
    assert names.EVENT_RETRY in [event.name for event in span.events]  # it was decided
    assert span.attributes[names.STOP_REASON] == "rejected"  # by the circuit, after the wait


@pytest.mark.parametrize("style", ["call", "acall", "attempts", "aattempts"])
def test_each_retry_that_goes_out_is_counted_once(style, recovery_telemetry, fake_clock):
    policy = RecoveryPolicy(retry=Retry(4, backoff=FixedBackoff(1.0)), clock=fake_clock, name="dep")
    failures = [ConnectionError("down")] * 2

    def fn() -> None:
        if failures:
            raise failures.pop()

    _run(policy, fn, style)
    points = recovery_telemetry.metric_points(names.METRIC_RETRY_ATTEMPTS)
    assert [value for _, value in points] == [2]


async def test_a_retry_cancelled_during_its_wait_is_not_counted(recovery_telemetry):
    """Cancelled while it slept between attempts (a client gone, a shutdown), the call
    never sent its retry: the counter said it had."""
    waiting = asyncio.Event()

    class StallingClock(FakeClock):
        async def asleep(self, seconds: float) -> None:
            waiting.set()
            await asyncio.Event().wait()  # until cancelled

    clock = StallingClock()
    policy = RecoveryPolicy(retry=Retry(3, backoff=FixedBackoff(1.0)), clock=clock, name="dep")

    async def fn() -> None:
        raise ConnectionError("down")

    task = asyncio.ensure_future(policy.acall(fn))
    await waiting.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert recovery_telemetry.metric_points(names.METRIC_RETRY_ATTEMPTS) == []
    span = recovery_telemetry.span("recover dep")
    assert span.attributes[names.OUTCOME] == "cancelled"
