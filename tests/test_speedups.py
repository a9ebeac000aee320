"""The compiled happy path (``otel_recovery._speedups``) against the Python code it mirrors.

The rest of the suite runs with the extension wherever it is built (CI builds it); the tests
here hold the two implementations side by side, check what only the compiled layer does
(reading remembered plans, noticing when they go stale), that it leaks nothing, and that
the package works without it.
"""

from __future__ import annotations

import logging
import os
import random
import sys
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from child_runs import started
from child_runs.no_extension import NoExtensionRun
from frames import ours_that_ran, ours_that_ran_steadily
from hypothesis import given, settings
from hypothesis import strategies as st
from runner_cases import (
    LEAK_STEPS,
    STEPS,
    Interrupted,
    attempt,
    bytes_kept,
    observed,
    passes_time,
    policy_for,
    raised,
)

from otel_recovery import _driver_sync
from otel_recovery._compiled import SPEEDUPS
from otel_recovery._fake_clock import FakeClock
from otel_recovery.policies.circuit_breaker import CircuitBreaker
from otel_recovery.policies.fallback import Fallback
from otel_recovery.policies.retry import Retry
from otel_recovery.recover import RecoveryPolicy

ROOT = Path(__file__).resolve().parent.parent
compiled_only = pytest.mark.skipif(SPEEDUPS is None, reason="otel_recovery._speedups not built")


def _play(run: Callable[..., Any], policy: RecoveryPolicy, clock: FakeClock, steps: list[str]):
    """Everything observable about running ``steps`` through ``run``, step by step."""
    seen: list[tuple[Any, ...]] = []
    for number, step in enumerate(steps):
        if passes_time(step, clock):
            continue
        calls = 0

        def work(value: int, *, step: str = step) -> Any:
            nonlocal calls
            calls += 1
            return attempt(step, value, calls)

        try:
            outcome: tuple[Any, ...] = ("returned", run(work, (number,), {"step": step}))
        except BaseException as error:  # the comparison is the point
            outcome = raised(error)
        seen.append(observed(step, outcome, calls, policy, clock))
    return seen


def _python_runner(policy: RecoveryPolicy, monkeypatch: pytest.MonkeyPatch) -> Any:
    with monkeypatch.context() as patch:
        patch.setattr(_driver_sync, "SPEEDUPS", None)
        return policy.runner()


@compiled_only
@pytest.mark.parametrize("kind", ["guarded", "rate", "last_known_good", "unguarded"])
@settings(max_examples=60, deadline=None)
@given(steps=st.lists(st.sampled_from(STEPS), max_size=40))
def test_the_compiled_runner_behaves_exactly_like_the_python_one(kind, steps):
    monkeypatch = pytest.MonkeyPatch()
    compiled_clock, python_clock = FakeClock(), FakeClock()
    compiled_policy, python_policy = (
        policy_for(kind, compiled_clock),
        policy_for(kind, python_clock),
    )
    compiled_run = compiled_policy.runner()
    python_run = _python_runner(python_policy, monkeypatch)
    assert type(compiled_run) is SPEEDUPS.Runner
    assert type(python_run) is not SPEEDUPS.Runner
    assert _play(compiled_run, compiled_policy, compiled_clock, steps) == _play(
        python_run, python_policy, python_clock, steps
    )


@compiled_only
def test_an_error_from_recovery_chains_to_the_call_error_as_in_python():
    """Inside ``recover`` the call's error is the one being handled, so a fallback that
    fails raises an error whose ``__context__`` is the call's."""

    def broken(error: BaseException) -> Any:
        raise KeyError("fallback failed")

    policy = RecoveryPolicy(retry=Retry(1), fallback=Fallback(func=broken), telemetry=False)
    run = policy.runner()

    def refuse() -> None:
        raise ConnectionError("refused")

    with pytest.raises(KeyError) as raised:
        run(refuse, (), {})
    assert isinstance(raised.value.__context__, ConnectionError)
    assert sys.exc_info() == (None, None, None)  # nothing left marked as being handled


@compiled_only
def test_a_runner_refuses_what_is_not_a_tuple_and_a_dict():
    run = RecoveryPolicy(retry=Retry(2), telemetry=False).runner()
    with pytest.raises(TypeError, match="args as a tuple and kwargs as a dict"):
        run(print, [1], {})
    with pytest.raises(TypeError, match=r"run\(fn, args, kwargs\)"):
        run(print, ())


@compiled_only
def test_the_compiled_paths_leak_nothing():
    """Every branch that builds or drops references, many times: successes, recovered
    failures, rejections by an open breaker, fallbacks and interrupts."""
    clock = FakeClock()
    policy = policy_for("guarded", clock)
    run = policy.runner()

    def cycle() -> None:
        _play(run, policy, clock, LEAK_STEPS * 50)
        clock.sleeps.clear()

    cycle()
    grown = bytes_kept(cycle, 10)
    assert grown < 64 * 1024, f"{grown} bytes kept after 4,500 calls"


def test_an_extension_built_for_another_interface_is_ignored_with_a_warning(caplog):
    """A checkout that kept an old build in place (its rebuild failed) must not call it
    with arguments it does not know: the Python paths run instead, and the log says why."""
    from otel_recovery import _compiled

    stale = types.ModuleType("otel_recovery._speedups")
    stale.__file__ = "/site-packages/otel_recovery/_speedups.so"
    with caplog.at_level(logging.WARNING, logger="otel_recovery"):
        assert not _compiled._matches(stale)  # built before the interface had a number
        stale.ABI = _compiled.ABI + 1  # type: ignore[attr-defined]
        assert not _compiled._matches(stale)
    assert [r.getMessage().split(";")[0] for r in caplog.records] == [
        "otel_recovery: ignoring /site-packages/otel_recovery/_speedups.so, built for "
        f"interface {built} where these sources expect {_compiled.ABI}"
        for built in (None, _compiled.ABI + 1)
    ]
    assert SPEEDUPS is None or _compiled._matches(SPEEDUPS)


@pytest.mark.skipif(os.environ.get("CI") != "true", reason="only CI promises a C compiler")
def test_ci_builds_the_extension():
    """The overhead figures in the README are measured with it; CI must not lose it silently."""
    assert SPEEDUPS is not None


@pytest.mark.slow
def test_the_package_behaves_the_same_without_the_extension(request, tmp_path):
    """The policy and instrumentor tests, again, with the extension switched off
    (``tests/child_runs/no_extension.py``, started when collection ends)."""
    run = started(request, NoExtensionRun, tmp_path)
    failure = run.failure()
    assert failure is None, failure
    assert " passed" in run.summary


def test_a_callee_that_pops_a_keyword_sees_every_attempt_whole():
    """``fn(*args, **kwargs)`` hands every attempt a fresh dict; so must the compiled runner,
    also to callees without vectorcall (a wrapt wrapper receives the dict itself)."""
    import wrapt

    seen: list[dict[str, Any]] = []
    failures = iter([ConnectionError("refused")])

    @wrapt.decorator
    def popping(wrapped, instance, args, kwargs):
        seen.append(dict(kwargs))
        kwargs.pop("timeout", None)
        return wrapped(*args, **kwargs)

    @popping
    def fetch(x: int, **options: Any) -> int:
        error = next(failures, None)
        if error is not None:
            raise error
        return x

    kwargs = {"timeout": 5, "x": 1}
    run = RecoveryPolicy(retry=Retry(2, rng=random.Random(1)), telemetry=False).runner()
    assert run(fetch, (), kwargs) == 1
    assert kwargs == {"timeout": 5, "x": 1}
    assert seen == [{"timeout": 5, "x": 1}] * 2


def test_recovering_inside_a_generator_leaves_its_callers_exception_outside_it():
    """Only the runner's own level of the exception stack holds the error it handles."""
    run = RecoveryPolicy(retry=Retry(1), fallback=Fallback("fallback"), telemetry=False).runner()

    def refuse() -> None:
        raise ConnectionError("refused")

    def steps():
        yield run(refuse, (), {})
        yield sys.exc_info()[1]

    generator = steps()
    try:
        raise KeyError("the caller's own")
    except KeyError:
        assert next(generator) == "fallback"  # recovered while the caller handles KeyError
    assert next(generator) is None  # resumed outside that handler: nothing is handled


def test_a_breaker_tally_that_is_not_an_iterator_raises_instead_of_crashing():
    breaker = CircuitBreaker(3)
    run = RecoveryPolicy(retry=Retry(1), breaker=breaker, telemetry=False).runner()
    breaker._tally = [0]  # type: ignore[assignment]
    with pytest.raises(TypeError, match="not an iterator"):
        run(lambda: 1, (), {})


@compiled_only
@pytest.mark.server
def test_a_client_made_from_a_url_runs_the_compiled_path():
    """``Redis.from_url`` pools have no ``retry`` key: absent reads as None, as ``.get`` does."""
    import redis
    from servers import REDIS_HOST, REDIS_PORT, require_redis

    from otel_recovery.instrumentors.redis import RedisRecoveryInstrumentor

    require_redis()
    redis_url = f"redis://{REDIS_HOST}:{REDIS_PORT}/0"
    instrumentor = RedisRecoveryInstrumentor()
    instrumentor.instrument()
    try:
        client = redis.Redis.from_url(redis_url)
        assert "retry" not in client.connection_pool.connection_kwargs
        client.get("otel-recovery:compiled")
        assert ours_that_ran_steadily(lambda: client.get("otel-recovery:compiled"))[1] == set()
    finally:
        instrumentor.uninstrument()


@compiled_only
@pytest.mark.server
def test_a_class_patched_after_plans_were_remembered_sends_the_next_call_to_python():
    """The compiled layer trusts its remembered plans only while the class attribute is the
    one the site saw. It rereads the class dict whenever the class's version tag moved; a
    patch on top of ours must send the next call to the Python layer, which sees the new
    chain and remembers again."""
    import redis
    import redis.client
    from servers import REDIS_HOST, REDIS_PORT, require_redis

    from otel_recovery.instrumentors.redis import RedisRecoveryInstrumentor

    require_redis()
    instrumentor = RedisRecoveryInstrumentor()
    instrumentor.instrument()
    ours = redis.client.Redis.__dict__["execute_command"]
    try:
        client = redis.Redis(host=REDIS_HOST, port=REDIS_PORT)
        client.get("otel-recovery:patched")
        assert ours_that_ran_steadily(lambda: client.get("otel-recovery:patched"))[1] == set()

        def someone_elses_patch(self: Any, *args: Any, **options: Any) -> Any:
            return ours(self, *args, **options)

        redis.client.Redis.execute_command = someone_elses_patch  # type: ignore[method-assign]
        assert "refresh" in ours_that_ran(lambda: client.get("otel-recovery:patched"))[1]
        assert ours_that_ran_steadily(lambda: client.get("otel-recovery:patched"))[1] == set()
    finally:
        redis.client.Redis.execute_command = ours  # type: ignore[method-assign]
        instrumentor.uninstrument()


@compiled_only
@pytest.mark.server
def test_a_remembered_psycopg_statement_runs_no_python_of_ours():
    """The compiled statement layer finds the plan on the connection (through the cursor's
    ``_conn`` slot where psycopg has one) and runs it without calling back into Python."""
    import psycopg
    from servers import PG_DSN, require_postgres

    from otel_recovery.instrumentors.psycopg import PsycopgRecoveryInstrumentor

    require_postgres()
    instrumentor = PsycopgRecoveryInstrumentor()
    instrumentor.instrument()
    try:
        with psycopg.connect(PG_DSN, autocommit=True) as connection:
            cursor = connection.cursor()
            cursor.execute("SELECT 1")
            assert ours_that_ran_steadily(lambda: cursor.execute("SELECT 2"))[1] == set()
            assert cursor.fetchone() == (2,)
    finally:
        instrumentor.uninstrument()


@pytest.mark.parametrize("layer", ["compiled", "python"])
def test_a_remembered_request_fails_like_a_new_one(layer, monkeypatch):
    """What the app sees when a remembered request fails is the Python layer's answer: the
    final error chains to the app's own handled exception (never to our first attempt's),
    and an interrupt while reading a response's status closes it and gives the breaker's
    permit back."""
    import io

    import requests
    from requests.models import Response

    from otel_recovery.instrumentors import _db
    from otel_recovery.instrumentors.requests import RequestsRecoveryInstrumentor

    if layer == "compiled" and SPEEDUPS is None:
        pytest.skip("otel_recovery._speedups not built")
    if layer == "python":
        monkeypatch.setattr(_db, "SPEEDUPS", None)
    closed: list[Response] = []
    released: list[CircuitBreaker] = []
    behaviour = {"kind": "ok"}

    class Tracked(Response):
        def close(self) -> None:
            closed.append(self)
            super().close()

    class Unreadable(Tracked):
        @property  # type: ignore[override]
        def status_code(self) -> int:
            raise Interrupted()

        @status_code.setter
        def status_code(self, value: int) -> None:
            pass

    def send(self: requests.Session, request: Any, **options: Any) -> Response:
        if behaviour["kind"] == "refused":
            raise requests.exceptions.ConnectionError("refused")
        response = Unreadable() if behaviour["kind"] == "unreadable" else Tracked()
        response.status_code = 200
        response.raw, response.url, response.request = io.BytesIO(b"ok"), request.url, request
        return response

    real_release = CircuitBreaker.release
    monkeypatch.setattr(requests.Session, "send", send)
    monkeypatch.setattr(
        CircuitBreaker, "release", lambda self: released.append(self) or real_release(self)
    )
    instrumentor = RequestsRecoveryInstrumentor()
    instrumentor.instrument(clock=FakeClock(), max_attempts=2, backoff_initial=0.01)
    try:
        compiled = type(requests.sessions.Session.__dict__["request"]).__name__ == "HttpLayer"
        assert compiled is (layer == "compiled")
        session = requests.Session()
        url = "http://service.invalid/prices"
        session.get(url)  # the plan is remembered from here on
        behaviour["kind"] = "refused"
        try:
            raise KeyError("the app's own")
        except KeyError:
            with pytest.raises(requests.exceptions.ConnectionError) as raised:
                session.get(url)
        assert isinstance(raised.value.__context__, KeyError)
        behaviour["kind"] = "unreadable"
        closed.clear()
        with pytest.raises(Interrupted):
            session.get(url)
        assert len(closed) == 1 and len(released) == 1
    finally:
        instrumentor.uninstrument()
