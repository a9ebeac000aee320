"""ErrorRecoveryInteraction.recover_from_error: selection, execution, breakers, spans, stats."""

from __future__ import annotations

import asyncio

import pytest
from opentelemetry.trace import SpanKind, StatusCode

from otel_recovery import testing
from otel_recovery.classify import Classifier, ErrorCategory, Rule
from otel_recovery.interaction import ErrorRecoveryInteraction, RecoveryAction, RecoveryStrategy
from otel_recovery.policies import CircuitBreaker, CircuitState, ExponentialBackoff, FixedBackoff
from otel_recovery.stores import MemoryStore


class HTTPError(Exception):
    def __init__(self, status: int, retry_after: float | None = None) -> None:
        super().__init__(f"HTTP {status}")
        self.status_code = status
        self.headers = {} if retry_after is None else {"Retry-After": str(retry_after)}


class Flaky:
    """Raises the given errors in turn, then returns 'ok'; records every call."""

    def __init__(self, *errors: BaseException, result: object = "ok") -> None:
        self.errors = list(errors)
        self.calls: list[tuple] = []
        self.result = result

    def __call__(self, *args, **kwargs):
        self.calls.append((args, kwargs))
        if self.errors:
            raise self.errors.pop(0)
        return self.result


class AsyncFlaky(Flaky):
    async def __call__(self, *args, **kwargs):  # type: ignore[override]
        await asyncio.sleep(0)
        return super().__call__(*args, **kwargs)


def no_jitter(initial: float = 1.0) -> ExponentialBackoff:
    return ExponentialBackoff(initial, 2.0, 60.0, jitter="none")


@pytest.fixture(autouse=True)
def _checkpoints_in_memory(monkeypatch):
    # Checkpoints default to the SQLite file (they must outlive a restart); each test here
    # wants a fresh store.
    monkeypatch.setenv("OTEL_RECOVERY_STORE_URL", "memory://")


@pytest.fixture
def recovery(fake_clock) -> ErrorRecoveryInteraction:
    # A private classifier: the default one is process-wide and counts repeats across tests.
    return ErrorRecoveryInteraction(
        classifier=Classifier(clock=fake_clock),
        clock=fake_clock,
        telemetry=False,
        backoff=no_jitter(),
    )


# -- retrying -----------------------------------------------------------------------------------


async def test_retryable_error_is_retried_with_backoff_after_the_original_failure(
    recovery, fake_clock
):
    flaky = Flaky(HTTPError(503), HTTPError(503))
    result = await recovery.recover_from_error(
        HTTPError(503), context={"service_id": "inventory", "retry_func": flaky}
    )
    assert result["recovery_status"] == "success"
    assert result["strategy"] == "exponential_backoff"
    assert result["attempts"] == 3 and len(flaky.calls) == 3
    assert result["result"] == "ok"
    # the original failure was attempt zero: a wait comes before the very first call
    assert fake_clock.sleeps == [1.0, 2.0, 4.0]
    assert result["recovery_time"] == pytest.approx(7.0)
    assert result["category"] == "external_service" and result["severity"] == "medium"
    assert result["error_type"].endswith("HTTPError") and len(result["fingerprint"]) == 16
    assert "reason" not in result and "error" not in result


@pytest.mark.parametrize("kind", ["sync", "coroutine function", "lambda returning awaitable"])
async def test_every_shape_of_retry_func_works(recovery, kind):
    flaky = AsyncFlaky(HTTPError(503)) if kind != "sync" else Flaky(HTTPError(503))
    func = (lambda: flaky()) if kind == "lambda returning awaitable" else flaky
    result = await recovery.recover_from_error(HTTPError(503), context={"retry_func": func})
    assert (result["recovery_status"], result["attempts"], result["result"]) == ("success", 2, "ok")


async def test_retries_stop_at_max_attempts_and_report_the_final_error(fake_clock):
    recovery = ErrorRecoveryInteraction(
        clock=fake_clock, telemetry=False, max_attempts=2, backoff=FixedBackoff(0.5)
    )
    flaky = Flaky(HTTPError(503), HTTPError(502, None), ConnectionError("late"))
    result = await recovery.recover_from_error(HTTPError(503), context={"retry_func": flaky})
    assert result["recovery_status"] == "failed"
    assert result["attempts"] == 2 and len(flaky.calls) == 2
    assert result["reason"] == "retry_func failed 2 time(s)"
    assert result["error"] == "HTTPError: HTTP 502"
    assert fake_clock.sleeps == [0.5, 0.5]


async def test_rate_limited_waits_exactly_as_told(recovery, fake_clock):
    flaky = Flaky(HTTPError(429, retry_after=2))
    result = await recovery.recover_from_error(
        HTTPError(429, retry_after=3), context={"retry_func": flaky}
    )
    assert result["recovery_status"] == "success"
    assert result["strategy"] == "exponential_backoff" and result["category"] == "rate_limited"
    assert fake_clock.sleeps == [3.0, 2.0]


async def test_a_retry_after_beyond_the_cap_gives_up_without_calling(recovery, fake_clock):
    flaky = Flaky()
    result = await recovery.recover_from_error(
        HTTPError(429, retry_after=3600), context={"retry_func": flaky}
    )
    assert result["recovery_status"] == "failed" and flaky.calls == []
    assert "3600" in result["reason"] and fake_clock.sleeps == []


async def test_testing_mode_skips_waits(recovery, fake_clock):
    with testing.testing_mode(attempts=2):
        flaky = Flaky(HTTPError(503))
        result = await recovery.recover_from_error(HTTPError(503), context={"retry_func": flaky})
    assert result["attempts"] == 2 and fake_clock.sleeps == []


# -- failing fast ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("error", "category"),
    [
        (ValueError("bad input"), "invalid_request"),
        (HTTPError(400), "invalid_request"),
        (PermissionError("denied"), "configuration"),
        (RuntimeError("who knows"), "unknown"),
    ],
)
async def test_non_retryable_errors_fail_fast_without_calling(recovery, error, category):
    flaky = Flaky()
    result = await recovery.recover_from_error(error, context={"retry_func": flaky})
    assert result["recovery_status"] == "failed" and result["strategy"] == "fail_fast"
    assert result["attempts"] == 0 and flaky.calls == []
    assert result["category"] == category and result["reason"]


async def test_fail_fast_answers_with_the_fallback_when_given(recovery):
    result = await recovery.recover_from_error(
        ValueError("bad"),
        context={"retry_func": Flaky(), "fallback_func": lambda: "cached"},
    )
    assert result["recovery_status"] == "fallback" and result["strategy"] == "fallback"
    assert result["result"] == "cached" and result["attempts"] == 0
    assert result["reason"] == "invalid_request errors are not retried"


async def test_fallback_func_may_take_the_error_and_be_async(recovery):
    seen: list[BaseException] = []

    async def fallback(error: BaseException) -> str:
        seen.append(error)
        return "degraded"

    error = ValueError("bad")
    result = await recovery.recover_from_error(error, context={"fallback_func": fallback})
    assert result["result"] == "degraded" and seen == [error]


async def test_fallback_after_retries_are_exhausted(recovery):
    flaky = Flaky(*[HTTPError(503)] * 3)
    result = await recovery.recover_from_error(
        HTTPError(503), context={"retry_func": flaky, "fallback_func": lambda: "stale"}
    )
    assert result["recovery_status"] == "fallback" and result["result"] == "stale"
    assert result["attempts"] == 3 and result["strategy"] == "exponential_backoff"


async def test_a_failing_fallback_is_a_failure(recovery):
    def fallback() -> None:
        raise LookupError("cache empty")

    result = await recovery.recover_from_error(
        HTTPError(503),
        context={"retry_func": Flaky(*[HTTPError(503)] * 3), "fallback_func": fallback},
    )
    assert result["recovery_status"] == "failed" and result["reason"] == "fallback_func failed"
    assert result["error"] == "LookupError: cache empty"


async def test_without_retry_func_nothing_can_be_retried(recovery):
    result = await recovery.recover_from_error(HTTPError(503), context={"service_id": "x"})
    assert result["recovery_status"] == "failed" and result["attempts"] == 0
    assert result["reason"] == "no retry_func in context"
    fallback = await recovery.recover_from_error(
        HTTPError(503), context={"fallback_func": lambda: 1}
    )
    assert fallback["recovery_status"] == "fallback" and fallback["result"] == 1


async def test_user_classifier_rules_decide(fake_clock):
    classifier = Classifier(
        [Rule(on=RuntimeError, category=ErrorCategory.TRANSIENT, retryable=True)]
    )
    recovery = ErrorRecoveryInteraction(classifier=classifier, clock=fake_clock, telemetry=False)
    flaky = Flaky()
    result = await recovery.recover_from_error(RuntimeError("blip"), context={"retry_func": flaky})
    assert result["recovery_status"] == "success" and len(flaky.calls) == 1


# -- self-healing -------------------------------------------------------------------------------


async def test_connection_errors_reconnect_then_retry(recovery):
    order: list[str] = []
    flaky = Flaky()

    def retry() -> str:
        order.append("retry")
        return flaky()

    result = await recovery.recover_from_error(
        ConnectionResetError("reset by peer"),
        context={"retry_func": retry, "reconnect": lambda: order.append("reconnect")},
    )
    assert result["strategy"] == "self_heal" and result["recovery_status"] == "success"
    assert order == ["reconnect", "retry"]
    assert result["healing"] == [{"action": "reconnect", "outcome": "success", "detail": ""}]


async def test_timeouts_retry_with_a_raised_capped_timeout(recovery):
    seen: list[float] = []

    async def fetch(timeout: float = 1.0) -> str:
        seen.append(timeout)
        if len(seen) == 1:
            raise TimeoutError("still slow")
        return "done"

    result = await recovery.recover_from_error(
        TimeoutError("slow"), context={"retry_func": fetch, "timeout": 20}
    )
    assert result["recovery_status"] == "success" and seen == [30, 30]


async def test_timeout_is_not_passed_to_a_func_without_that_parameter(recovery):
    flaky = Flaky()
    await recovery.recover_from_error(
        TimeoutError(), context={"retry_func": lambda: flaky(), "timeout": 2}
    )
    assert flaky.calls == [((), {})]


async def test_memory_errors_clear_caches_and_get_one_more_try(recovery):
    cleared: list[bool] = []
    recovery.healing.register_cache_clearer(lambda: cleared.append(True))
    flaky = Flaky(MemoryError(), MemoryError())
    result = await recovery.recover_from_error(MemoryError(), context={"retry_func": flaky})
    assert result["strategy"] == "self_heal" and cleared == [True]
    # MemoryError is not retryable as such: healing buys exactly one more call
    assert result["recovery_status"] == "failed" and result["attempts"] == 1


async def test_a_failing_healing_action_does_not_hide_the_recovery(recovery):
    def reconnect() -> None:
        raise OSError("dns down")

    result = await recovery.recover_from_error(
        ConnectionError(), context={"retry_func": Flaky(), "reconnect": reconnect}
    )
    assert result["recovery_status"] == "success"
    assert result["healing"][0]["outcome"] == "failed"


# -- circuit breakers -----------------------------------------------------------------------------


async def test_five_failed_recoveries_open_the_services_breaker(recovery, fake_clock):
    for _ in range(5):
        failing = Flaky(*[HTTPError(503)] * 3)
        result = await recovery.recover_from_error(
            HTTPError(503), context={"service_id": "pay", "retry_func": failing}
        )
        assert result["recovery_status"] == "failed"
    assert recovery.get_circuit_breaker("pay").state is CircuitState.OPEN
    assert recovery.get_recovery_stats()["active_circuit_breakers"] == 1

    untouched = Flaky()
    result = await recovery.recover_from_error(
        HTTPError(503), context={"service_id": "pay", "retry_func": untouched}
    )
    assert result["recovery_status"] == "circuit_open" and result["strategy"] == "circuit_break"
    assert untouched.calls == [] and result["attempts"] == 0
    assert result["retry_after"] == pytest.approx(60.0)

    answered = await recovery.recover_from_error(
        HTTPError(503),
        context={"service_id": "pay", "retry_func": untouched, "fallback_func": lambda: "later"},
    )
    assert (answered["recovery_status"], answered["strategy"]) == ("fallback", "fallback")
    assert untouched.calls == []

    other = await recovery.recover_from_error(
        HTTPError(503), context={"service_id": "shipping", "retry_func": Flaky()}
    )
    assert other["recovery_status"] == "success"  # breakers are per service

    fake_clock.advance(60)
    probe = await recovery.recover_from_error(
        HTTPError(503), context={"service_id": "pay", "retry_func": untouched}
    )
    assert probe["recovery_status"] == "success"
    assert recovery.get_circuit_breaker("pay").state is CircuitState.CLOSED


async def test_zero_call_outcomes_leave_the_breaker_alone(recovery):
    for _ in range(10):
        await recovery.recover_from_error(ValueError("bad"), context={"service_id": "s"})
    assert recovery.get_circuit_breaker("s").state is CircuitState.CLOSED


async def test_breaker_factory_builds_the_per_service_breakers(fake_clock):
    made: list[str] = []

    def factory(service_id: str) -> CircuitBreaker:
        made.append(service_id)
        return CircuitBreaker(failure_threshold=1, timeout=5, name=service_id, clock=fake_clock)

    recovery = ErrorRecoveryInteraction(clock=fake_clock, telemetry=False, breaker_factory=factory)
    await recovery.recover_from_error(
        HTTPError(503), context={"service_id": "a", "retry_func": Flaky(*[HTTPError(503)] * 3)}
    )
    assert made == ["a"] and recovery.get_circuit_breaker("a").state is CircuitState.OPEN


# -- explicit strategies --------------------------------------------------------------------------


async def test_an_explicit_strategy_overrides_selection(recovery, fake_clock):
    flaky = Flaky(ValueError("x"), ValueError("y"))
    strategy = RecoveryStrategy(
        action=RecoveryAction.RETRY,
        max_attempts=5,
        backoff=FixedBackoff(0.25),
        params={"retry_on": ValueError},
    )
    result = await recovery.recover_from_error(
        ValueError("bad"), context={"retry_func": flaky, "strategy": strategy}
    )
    assert result["strategy"] == "retry" and result["recovery_status"] == "success"
    assert result["attempts"] == 3 and fake_clock.sleeps == [0.25, 0.25, 0.25]


@pytest.mark.parametrize("error", [ConnectionResetError("reset"), HTTPError(503), MemoryError()])
async def test_a_call_marked_not_idempotent_is_never_made_again(recovery, error):
    """``context["idempotent"] = False`` (a card charge) held only with a learner attached:
    without one, a reset connection healed and charged again."""
    charge = Flaky()
    result = await recovery.recover_from_error(
        error, context={"retry_func": charge, "idempotent": False}
    )
    assert (result["recovery_status"], result["strategy"]) == ("failed", "fail_fast")
    assert "context['idempotent'] is False" in result["reason"] and charge.calls == []


async def test_an_explicit_strategy_still_repeats_a_call_marked_not_idempotent(recovery):
    charge = Flaky()
    result = await recovery.recover_from_error(
        ConnectionResetError("reset"),
        context={"retry_func": charge, "idempotent": False, "strategy": RecoveryAction.RETRY},
    )
    assert result["recovery_status"] == "success" and len(charge.calls) == 1


class AppError(Exception):
    """An application's own error type: the classifier does not call it retryable."""


@pytest.mark.parametrize(
    "retry_on", [AppError, (KeyError, AppError), lambda error: "busy" in str(error)]
)
async def test_retry_on_decides_what_is_retried_without_a_strategy(recovery, retry_on):
    flaky = Flaky(AppError("busy"))
    result = await recovery.recover_from_error(
        AppError("busy"), context={"retry_func": flaky, "retry_on": retry_on}
    )
    assert (result["recovery_status"], result["strategy"]) == ("success", "exponential_backoff")
    assert result["attempts"] == 2


async def test_retry_on_overrides_the_category_both_ways(recovery):
    flaky = Flaky(ValueError("bad"))  # an invalid request for the classifier
    result = await recovery.recover_from_error(
        ValueError("bad"), context={"retry_func": flaky, "retry_on": ValueError}
    )
    assert result["recovery_status"] == "success" and result["attempts"] == 2
    unmatched = Flaky()
    refused = await recovery.recover_from_error(
        HTTPError(503), context={"retry_func": unmatched, "retry_on": KeyError}
    )
    assert (refused["recovery_status"], refused["strategy"]) == ("failed", "fail_fast")
    assert "not matched by context['retry_on']" in refused["reason"] and unmatched.calls == []


async def test_a_bad_retry_on_names_the_problem(recovery):
    with pytest.raises(TypeError, match=r"context\['retry_on'\] must be exception types"):
        await recovery.recover_from_error(ValueError("x"), context={"retry_on": "ValueError"})


async def test_explicit_circuit_break_isolates_until_reset(recovery):
    flaky = Flaky()
    result = await recovery.recover_from_error(
        HTTPError(503),
        context={"service_id": "s", "retry_func": flaky, "strategy": RecoveryAction.CIRCUIT_BREAK},
    )
    assert result["recovery_status"] == "circuit_open" and flaky.calls == []
    assert recovery.get_circuit_breaker("s").state is CircuitState.FORCED_OPEN
    again = await recovery.recover_from_error(
        HTTPError(503), context={"service_id": "s", "retry_func": flaky}
    )
    assert again["recovery_status"] == "circuit_open"
    recovery.reset_circuit("s")
    assert (
        await recovery.recover_from_error(
            HTTPError(503), context={"service_id": "s", "retry_func": flaky}
        )
    )["recovery_status"] == "success"


async def test_explicit_fallback_without_a_fallback_explains_itself(recovery):
    result = await recovery.recover_from_error(
        HTTPError(503), context={"strategy": RecoveryStrategy(action=RecoveryAction.FALLBACK)}
    )
    assert result["recovery_status"] == "failed" and "fallback_func" in result["reason"]
    strategy = RecoveryStrategy(action=RecoveryAction.FALLBACK, fallback=lambda: "from strategy")
    result = await recovery.recover_from_error(
        HTTPError(503), context={"strategy": strategy, "fallback_func": lambda: "from context"}
    )
    assert result["result"] == "from strategy"


def test_recovery_strategy_is_validated_and_frozen():
    with pytest.raises(ValueError, match="max_attempts"):
        RecoveryStrategy(action=RecoveryAction.RETRY, max_attempts=0)
    with pytest.raises(ValueError, match="RecoveryAction"):
        RecoveryStrategy(action="teleport")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="backoff"):
        RecoveryStrategy(action=RecoveryAction.RETRY, backoff=3)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="timeout"):
        RecoveryStrategy(action=RecoveryAction.RETRY, timeout=0)
    with pytest.raises(TypeError, match="fallback"):
        RecoveryStrategy(action=RecoveryAction.FALLBACK, fallback="x")  # type: ignore[arg-type]
    strategy = RecoveryStrategy(action="retry")  # type: ignore[arg-type]
    assert strategy.action is RecoveryAction.RETRY
    with pytest.raises(AttributeError):
        strategy.max_attempts = 9  # type: ignore[misc]
    with pytest.raises(TypeError):
        strategy.params["x"] = 1  # type: ignore[index]
    assert [a.value for a in RecoveryAction][:7] == [
        "retry", "exponential_backoff", "circuit_break", "fallback",
        "checkpoint_restore", "transaction_rollback", "self_heal",
    ]  # fmt: skip


async def test_context_is_validated(recovery):
    with pytest.raises(TypeError, match="retry_func"):
        await recovery.recover_from_error(ValueError(), context={"retry_func": 42})
    with pytest.raises(TypeError, match="strategy"):
        await recovery.recover_from_error(ValueError(), context={"strategy": 3.5})
    with pytest.raises(TypeError):
        await recovery.recover_from_error("not an exception")  # type: ignore[arg-type]


# -- checkpoints and rollback ----------------------------------------------------------------------


async def test_checkpoint_id_restores_and_hands_a_fresh_state_to_every_attempt(recovery):
    recovery.create_checkpoint("job", {"done": [1, 2]})
    seen: list[list[int]] = []

    def resume(state: dict) -> str:
        seen.append(list(state["done"]))
        state["done"].append(3)  # mutate, then fail: the next attempt must not see it
        if len(seen) == 1:
            raise ConnectionError("again")
        return "resumed"

    def blocking_load(*args: object) -> None:  # a store's round trip on the event loop
        raise AssertionError("the sync load blocks the event loop; use aload")

    recovery.checkpoints.load = blocking_load
    result = await recovery.recover_from_error(
        ConnectionError(), context={"retry_func": resume, "checkpoint_id": "job"}
    )
    assert result["strategy"] == "checkpoint_restore" and result["recovery_status"] == "success"
    assert seen == [[1, 2], [1, 2]]
    assert (result["checkpoint_id"], result["checkpoint_version"]) == ("job", 1)


async def test_checkpoint_restore_with_a_zero_argument_func_or_none(recovery):
    recovery.create_checkpoint("job", {"v": 1})
    flaky = Flaky()
    result = await recovery.recover_from_error(
        HTTPError(503), context={"retry_func": lambda: flaky(), "checkpoint_id": "job"}
    )
    assert result["result"] == "ok" and flaky.calls == [((), {})]
    only = await recovery.recover_from_error(HTTPError(503), context={"checkpoint_id": "job"})
    assert only["recovery_status"] == "success" and only["result"] == {"v": 1}
    assert only["attempts"] == 0


async def test_missing_checkpoint_fails_with_its_name(recovery):
    result = await recovery.recover_from_error(
        HTTPError(503), context={"retry_func": Flaky(), "checkpoint_id": "ghost"}
    )
    assert result["recovery_status"] == "failed"
    assert result["reason"] == "no checkpoint named 'ghost'" and result["attempts"] == 0


async def test_transaction_rollback_runs_compensations_newest_first(recovery, recovery_telemetry):
    undone: list[str] = []

    async def undo_payment() -> None:
        undone.append("payment")

    def undo_reservation() -> None:
        undone.append("reservation")

    recovery.telemetry = True
    result = await recovery.recover_from_error(
        HTTPError(503),
        context={
            "strategy": RecoveryAction.TRANSACTION_ROLLBACK,
            "compensations": [undo_reservation, undo_payment],
        },
    )
    assert result["recovery_status"] == "success" and undone == ["payment", "reservation"]
    assert result["compensations_run"] == 2
    span = recovery_telemetry.span("recover_from_error default")
    events = [e.attributes for e in span.events if e.name == "otel_recovery.compensation"]
    assert [e["otel_recovery.compensation.outcome"] for e in events] == ["success", "success"]


async def test_transaction_rollback_lists_every_undo_failure(recovery):
    undone: list[str] = []

    def first() -> None:
        raise RuntimeError("cannot unreserve")

    def second() -> None:
        undone.append("second")

    def third() -> None:
        raise OSError("refund api down")

    strategy = RecoveryStrategy(
        action=RecoveryAction.TRANSACTION_ROLLBACK, params={"compensations": [first, second, third]}
    )
    result = await recovery.recover_from_error(HTTPError(503), context={"strategy": strategy})
    assert result["recovery_status"] == "failed" and undone == ["second"]
    assert "2 of 3 compensations failed" in result["reason"]
    assert "refund api down" in result["reason"] and "cannot unreserve" in result["reason"]
    missing = await recovery.recover_from_error(
        HTTPError(503), context={"strategy": RecoveryAction.TRANSACTION_ROLLBACK}
    )
    assert missing["recovery_status"] == "failed" and "compensations" in missing["reason"]


# -- telemetry --------------------------------------------------------------------------------------


async def test_a_recovery_is_one_internal_span_with_the_engine_span_inside(
    recovery_telemetry, fake_clock
):
    recovery = ErrorRecoveryInteraction(
        classifier=Classifier(clock=fake_clock), clock=fake_clock, backoff=no_jitter()
    )
    result = await recovery.recover_from_error(
        HTTPError(503),
        context={
            "service_id": "inventory",
            "retry_func": Flaky(HTTPError(503)),
            "endpoint": "/items?api_key=s3cret",
            "tenant": "acme",
            "blob": "x" * 1000,
            "criticality": "high",
            "password": "hunter2",  # secrets by their key's name, not their text
            "db_api_key": "sk-live-123",
            "X-Auth-Token": "tok_abc",
        },
    )
    outer = recovery_telemetry.span("recover_from_error inventory")
    inner = recovery_telemetry.span("recover inventory")
    assert outer.kind is SpanKind.INTERNAL
    assert inner.parent is not None and inner.parent.span_id == outer.context.span_id
    assert result["trace_id"] == format(outer.context.trace_id, "032x")
    attrs = outer.attributes
    assert attrs["otel_recovery.service.id"] == "inventory"
    assert attrs["otel_recovery.strategy"] == "exponential_backoff"
    assert attrs["otel_recovery.outcome"] == "success"
    assert attrs["otel_recovery.error.category"] == "external_service"
    assert attrs["otel_recovery.error.severity"] == "high"  # criticality raised it
    assert attrs["otel_recovery.error.fingerprint"] == result["fingerprint"]
    assert attrs["otel_recovery.endpoint"] == "/items?api_key=***"
    assert attrs["otel_recovery.context.tenant"] == "acme"
    assert len(attrs["otel_recovery.context.blob"]) == 256
    assert attrs["otel_recovery.context.password"] == "***"
    assert attrs["otel_recovery.context.db_api_key"] == "***"
    assert attrs["otel_recovery.context.X-Auth-Token"] == "***"
    assert "error.type" not in attrs
    assert not any("retry_func" in key for key in attrs)
    assert outer.status.status_code is StatusCode.UNSET


async def test_context_secrets_are_masked_however_keyed_or_nested(recovery_telemetry, fake_clock):
    class Creds:
        def __repr__(self) -> str:
            return "Creds(user='svc', pw='OBJPW_1')"

    recovery = ErrorRecoveryInteraction(clock=fake_clock)
    await recovery.recover_from_error(
        ConnectionError("connect failed; cookie: sid=ERRPW_17"),
        context={
            "service_id": "payments",
            "endpoint": "https://api.example.com/v1/charge?key=ENDPOINTKEY_2&access_key=ACCKEY_3",
            "headers": {"Cookie": "sessionid=NESTEDCOOKIE_4", "Authorization": "Basic B64_5"},
            "header_list": [("Authorization", "Basic LISTBASIC_6"), ("X-Api-Key", "LISTKEY_7")],
            b"password": "BYTESKEYPW_8",
            ("db", "password"): "TUPLEKEYPW_9",
            "password ": "TRAILINGSPACEPW_10",
            "session_id": "SESSIONID_11",
            "creds": Creds(),
            "pw": "SHORTPW_12",
            "passcode": "PASSCODE_13",
            "db": {"host": "db.internal", "password": "NESTEDPW_14"},
            "aws_secret_access_key": "AWSSECRET_15",
            "tenant": "acme",
        },
    )
    span = recovery_telemetry.span("recover_from_error payments")
    shown = repr(dict(span.attributes)) + repr(span.status.description)
    for number in range(1, 18):
        assert f"_{number}'" not in shown and f'_{number}"' not in shown, shown
    assert span.attributes["otel_recovery.context.tenant"] == "acme"
    assert span.attributes["otel_recovery.context.password"] == "***"
    assert "db.internal" in span.attributes["otel_recovery.context.db"]
    assert span.attributes["otel_recovery.endpoint"].startswith("https://api.example.com/v1/")


async def test_a_failed_recovery_is_an_error_span(recovery_telemetry, fake_clock):
    recovery = ErrorRecoveryInteraction(clock=fake_clock)
    result = await recovery.recover_from_error(
        ValueError("bad token=abc"), context={"service_id": "s"}
    )
    span = recovery_telemetry.span("recover_from_error s")
    assert span.status.status_code is StatusCode.ERROR
    assert span.attributes["error.type"] == "ValueError"
    assert span.attributes["otel_recovery.outcome"] == "failure"  # the spans' word
    assert "abc" not in span.status.description and "abc" not in result["error"]


async def test_fallback_is_not_an_error_span(recovery_telemetry, fake_clock):
    recovery = ErrorRecoveryInteraction(clock=fake_clock)
    await recovery.recover_from_error(ValueError(), context={"fallback_func": lambda: 0})
    span = recovery_telemetry.span("recover_from_error default")
    assert span.status.status_code is StatusCode.UNSET
    assert span.attributes["otel_recovery.outcome"] == "fallback"
    assert [e.name for e in span.events] == ["otel_recovery.fallback"]


async def test_without_telemetry_there_is_no_span_and_no_trace_id(recovery_telemetry, recovery):
    result = await recovery.recover_from_error(HTTPError(503), context={"retry_func": Flaky()})
    assert result["trace_id"] is None and recovery_telemetry.spans() == []


async def test_cancellation_propagates_and_ends_the_span(recovery_telemetry, fake_clock):
    recovery = ErrorRecoveryInteraction(clock=fake_clock)

    async def hang() -> None:
        raise asyncio.CancelledError

    with pytest.raises(asyncio.CancelledError):
        await recovery.recover_from_error(HTTPError(503), context={"retry_func": hang})
    span = recovery_telemetry.span("recover_from_error default")
    assert span.attributes["otel_recovery.outcome"] == "cancelled"


# -- statistics --------------------------------------------------------------------------------------


async def test_stats_before_any_recovery(recovery):
    stats = recovery.get_recovery_stats()
    assert stats["success_rate"] == 0.0 and stats["avg_recovery_time"] == 0.0
    assert stats["total_recoveries"] == 0 and stats["active_circuit_breakers"] == 0


async def test_stats_count_by_status_strategy_and_category(recovery):
    await recovery.recover_from_error(HTTPError(503), context={"retry_func": Flaky()})  # 1 s wait
    await recovery.recover_from_error(HTTPError(503), context={"retry_func": Flaky(HTTPError(503))})
    await recovery.recover_from_error(ValueError(), context={"fallback_func": lambda: 1})
    await recovery.recover_from_error(PermissionError(), context={})
    stats = recovery.get_recovery_stats()
    assert stats["total_recoveries"] == 4 and stats["successful_recoveries"] == 2
    assert stats["success_rate"] == 0.5
    assert stats["avg_recovery_time"] == pytest.approx((1.0 + 3.0) / 4)
    assert stats["by_strategy"] == {
        "exponential_backoff": {"total": 2, "success": 2},
        "fallback": {"total": 1, "success": 0},
        "fail_fast": {"total": 1, "success": 0},
    }
    assert stats["by_category"] == {"external_service": 2, "invalid_request": 1, "configuration": 1}
    assert stats["by_status"] == {"success": 2, "fallback": 1, "failed": 1}
    recovery.reset_stats()
    assert recovery.get_recovery_stats()["total_recoveries"] == 0


async def test_concurrent_recoveries_are_counted_exactly(recovery):
    async def one(i: int) -> dict:
        error = HTTPError(503) if i % 2 else ValueError()
        return await recovery.recover_from_error(
            error, context={"service_id": f"s{i % 3}", "retry_func": AsyncFlaky()}
        )

    results = await asyncio.gather(*(one(i) for i in range(60)))
    stats = recovery.get_recovery_stats()
    assert stats["total_recoveries"] == 60
    assert stats["successful_recoveries"] == sum(r["recovery_status"] == "success" for r in results)
    assert stats["successful_recoveries"] == 30


async def test_closing_releases_the_store_it_made_and_leaves_a_given_one(monkeypatch):
    """``store="redis://..."`` makes a store, and its connections, that only the
    interaction can close; a store object passed in is the caller's to close."""
    closed: list[str] = []
    made = ErrorRecoveryInteraction(store="memory://")
    monkeypatch.setattr(made.checkpoints.store, "close", lambda: closed.append("made"))

    async def aclosed() -> None:
        closed.append("made async")

    monkeypatch.setattr(made.checkpoints.store, "aclose", aclosed)
    with made:
        made.create_checkpoint("run", {"cursor": 1})
    async with made:
        assert (await made.restore_checkpoint("run"))["state"] == {"cursor": 1}
    given = MemoryStore()
    monkeypatch.setattr(given, "close", lambda: closed.append("given"))
    with ErrorRecoveryInteraction(store=given):
        pass
    assert closed == ["made", "made async"]


def test_a_classifier_or_healing_registry_of_the_wrong_type_is_refused_at_construction():
    """Found where it is written, not at the first failure the service meets."""
    from otel_recovery.recover import RecoveryPolicy

    with pytest.raises(TypeError, match="classifier must be a Classifier"):
        ErrorRecoveryInteraction(classifier=lambda error: "transient")
    with pytest.raises(TypeError, match="healing must be a HealingRegistry"):
        ErrorRecoveryInteraction(healing={"db": lambda: None})
    with pytest.raises(TypeError, match="classifier must be a Classifier"):
        RecoveryPolicy(classifier="network")


async def test_a_context_that_is_not_a_mapping_is_refused_naming_the_fix(recovery):
    with pytest.raises(TypeError, match=r"takes the context as a mapping such as .*'service_id'"):
        await recovery.recover_from_error(ConnectionError("down"), "payments")


async def test_idempotent_must_be_a_bool_so_a_no_is_never_read_as_yes(recovery):
    """``"no"`` or ``0`` is "not False": read that way, a payment would be retried."""
    for value in ("no", 0, "false"):
        with pytest.raises(TypeError, match=r"context\['idempotent'\] must be True or False"):
            await recovery.recover_from_error(
                ConnectionError("reset"), {"idempotent": value, "retry_func": lambda: "paid"}
            )


async def test_an_optional_parameter_is_never_filled_with_the_state_or_the_error(recovery):
    """Only a parameter that must be given receives the restored state (or, for a fallback,
    the error): ``resume(timeout=5.0)`` got ``timeout=<the state>``, and
    ``partial(cache.get, key)`` was called as ``cache.get(key, error)``, so a cache miss
    "recovered" with the exception object as its result."""
    import functools

    recovery.create_checkpoint("job-1", {"cursor": 1200})
    got: list[object] = []

    async def resume(timeout: float = 5.0) -> str:
        got.append(timeout)
        return "resumed"

    outcome = await recovery.recover_from_error(
        ConnectionResetError("reset"),
        {"service_id": "job", "checkpoint_id": "job-1", "retry_func": resume},
    )
    assert outcome["recovery_status"] == "success" and got == [5.0]

    class BadRequest(Exception):
        status_code = 400

    cache = {"user:7": "cached"}
    outcome = await recovery.recover_from_error(
        BadRequest("bad request"),
        {"service_id": "api", "fallback_func": functools.partial(cache.get, "user:7")},
    )
    assert outcome["result"] == "cached"
    states: list[object] = []
    outcome = await recovery.recover_from_error(
        ConnectionResetError("reset"),
        {"service_id": "job", "checkpoint_id": "job-1", "retry_func": states.append},
    )
    assert states == [{"cursor": 1200}]  # a required parameter still gets the state


async def test_a_rollback_that_lost_the_race_records_no_internal_exception(
    recovery_telemetry, fake_clock
):
    """A second rollback of the same stack while the first runs is refused (nothing runs
    twice); that control flow showed up on its span as an ``exception`` event of our
    internal ``CompensationInProgressError``."""
    recovery = ErrorRecoveryInteraction(clock=fake_clock)  # on the captured telemetry
    gate = asyncio.Event()

    async def slow_undo() -> None:
        await gate.wait()

    undos = [slow_undo]
    strategy = RecoveryStrategy(RecoveryAction.TRANSACTION_ROLLBACK)
    first = asyncio.ensure_future(
        recovery.recover_from_error(
            RuntimeError("x"), {"service_id": "s", "strategy": strategy, "compensations": undos}
        )
    )
    await asyncio.sleep(0.01)  # the first has claimed the stack and waits in its undo
    second = await recovery.recover_from_error(
        RuntimeError("x"), {"service_id": "t", "strategy": strategy, "compensations": undos}
    )
    gate.set()
    assert (await first)["recovery_status"] == "success"
    assert second["recovery_status"] == "failed"
    events = [
        e.attributes.get("exception.type")
        for s in recovery_telemetry.spans()
        for e in s.events
        if e.name == "exception"
    ]
    assert recovery_telemetry.spans()  # the spans were captured
    assert not [t for t in events if "CompensationInProgressError" in str(t)]


@pytest.mark.parametrize(
    ("key", "value", "error", "message"),
    [
        ("timeout", "5s", TypeError, r"context\['timeout'\] must be a number of seconds"),
        ("timeout", -3, ValueError, r"context\['timeout'\] must be > 0 seconds, got -3"),
        ("timeout", float("nan"), ValueError, r"context\['timeout'\] must be > 0 seconds"),
        ("timeout", 0, ValueError, r"context\['timeout'\] must be > 0 seconds"),
        ("reconnect", "yes", TypeError, r"context\['reconnect'\] must be callable"),
    ],
)
async def test_a_timeout_or_reconnect_of_the_wrong_kind_is_refused(
    recovery, key, value, error, message
):
    """Both were only a failed heal, and ``retry_func(timeout="5s")`` was called all the
    same, three times."""
    calls: list[object] = []
    with pytest.raises(error, match=message):
        await recovery.recover_from_error(
            TimeoutError("slow"), {key: value, "retry_func": lambda **kw: calls.append(kw)}
        )
    assert calls == []
