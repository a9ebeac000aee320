"""Retrying a block of code with ``policy.attempts()`` / ``aattempts()``."""

from __future__ import annotations

import pytest

from otel_recovery import testing
from otel_recovery.policies import CircuitBreaker, CircuitOpenError, FixedBackoff, Retry
from otel_recovery.recover import RecoveryPolicy
from otel_recovery.telemetry import attributes as names


def test_block_is_retried_until_it_succeeds(fake_clock):
    policy = RecoveryPolicy(retry=Retry(3, backoff=FixedBackoff(0.5)), clock=fake_clock)
    seen = []
    for attempt in policy.attempts():
        with attempt:
            seen.append(attempt.number)
            if len(seen) < 3:
                raise ConnectionError("refused")
            result = "done"
    assert result == "done" and seen == [1, 2, 3] and fake_clock.sleeps == [0.5, 0.5]


def test_give_up_reraises_the_original_exception(fake_clock):
    policy = RecoveryPolicy(retry=Retry(2, backoff=FixedBackoff(0)), clock=fake_clock)
    errors = [ConnectionError("a"), ConnectionError("b")]
    with pytest.raises(ConnectionError) as caught:
        for attempt in policy.attempts():
            with attempt:
                raise errors.pop(0)
    assert str(caught.value) == "b"


def test_non_retryable_errors_propagate_at_once(fake_clock):
    policy = RecoveryPolicy(retry=Retry(5), clock=fake_clock)
    runs = 0
    with pytest.raises(ValueError):
        for attempt in policy.attempts():
            with attempt:
                runs += 1
                raise ValueError("bad")
    assert runs == 1


def test_breaker_is_consulted_once_and_rejects_when_open(fake_clock):
    breaker = CircuitBreaker(failure_threshold=1, timeout=30, clock=fake_clock)
    policy = RecoveryPolicy(
        retry=Retry(3, backoff=FixedBackoff(0)), breaker=breaker, clock=fake_clock
    )
    with pytest.raises(ConnectionError):
        for attempt in policy.attempts():
            with attempt:
                raise ConnectionError()
    assert breaker.snapshot().failed_calls == 1
    with pytest.raises(CircuitOpenError):
        for attempt in policy.attempts():
            with attempt:
                pytest.fail("must not run while the circuit is open")


def test_forgetting_with_is_an_error_not_a_hang(fake_clock):
    policy = RecoveryPolicy(retry=Retry(3), clock=fake_clock)
    with pytest.raises(RuntimeError, match="with attempt"):
        for _attempt in policy.attempts():
            pass


def test_block_recovery_is_traced(recovery_telemetry, fake_clock):
    policy = RecoveryPolicy(retry=Retry(2, backoff=FixedBackoff(0)), name="block", clock=fake_clock)
    first = True
    for attempt in policy.attempts():
        with attempt:
            if first:
                first = False
                raise TimeoutError()
    span = recovery_telemetry.span("recover block")
    assert span.attributes[names.OUTCOME] == "success" and span.attributes[names.ATTEMPTS] == 2


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_a_blocks_retries_run_under_its_recovery_span(recovery_telemetry, fake_clock, kind):
    """As with ``call()``, the retries' spans are the recovery span's children; a block's
    retries were siblings of it, under the caller's span."""
    import asyncio

    tracer = recovery_telemetry.tracer_provider.get_tracer("app")
    policy = RecoveryPolicy(retry=Retry(3, backoff=FixedBackoff(0)), name="block", clock=fake_clock)

    def body(attempt) -> None:
        with attempt, tracer.start_as_current_span(f"query#{attempt.number}"):
            if attempt.number < 3:
                raise ConnectionError()

    async def run_async() -> None:
        async for attempt in policy.aattempts():
            body(attempt)

    with tracer.start_as_current_span("root"):
        if kind == "sync":
            for attempt in policy.attempts():
                body(attempt)
        else:
            asyncio.run(run_async())
    spans = {span.name: span for span in recovery_telemetry.spans()}
    recovery = spans["recover block"]
    assert spans["query#1"].parent.span_id == spans["root"].context.span_id
    for name in ("query#2", "query#3"):
        assert spans[name].parent.span_id == recovery.context.span_id
    assert recovery.parent.span_id == spans["root"].context.span_id


async def test_async_block(fake_clock):
    policy = RecoveryPolicy(retry=Retry(3, backoff=FixedBackoff(0.1)), clock=fake_clock)
    seen = []
    async for attempt in policy.aattempts():
        with attempt:
            seen.append(attempt.number)
            if len(seen) < 2:
                raise ConnectionError()
    assert seen == [1, 2] and fake_clock.sleeps == [0.1]


def test_testing_mode_caps_blocks_too(fake_clock):
    policy = RecoveryPolicy(retry=Retry(5, backoff=FixedBackoff(3)), clock=fake_clock)
    runs = 0
    with testing.testing_mode(attempts=2), pytest.raises(ConnectionError):
        for attempt in policy.attempts():
            with attempt:
                runs += 1
                raise ConnectionError()
    assert runs == 2 and fake_clock.sleeps == []
