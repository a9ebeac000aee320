"""The demo's client: calls the flaky server through a ``RecoveryPolicy`` and keeps the books.

The client is plain ``urllib.request`` so the demo needs nothing beyond the standard library.
Each call's outcome is read from what the client can see, not from telemetry (which may be
off): how many attempts its function made, whether the answer belongs to this call (a
last-known-good fallback answers with an older call's body), and how long it spent outside
attempts (backoff and ``Retry-After`` sleeps). Calls are grouped by how the classifier
describes their first failure, so the table speaks the same vocabulary as the spans.
"""

from __future__ import annotations

import json
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode

from otel_recovery.classify import ErrorCategory, ErrorInfo, classify
from otel_recovery.policies import (
    CircuitBreaker,
    CircuitOpenError,
    ExponentialBackoff,
    Fallback,
    Retry,
    RetryBudget,
    StateTransition,
    Timeout,
    remaining_time,
)
from otel_recovery.recover import RecoveryPolicy

from .server import FaultServer

__all__ = ["CallRecord", "DependencyFallback", "Outcome", "Settings", "run_calls"]

NAME = "demo-dependency"


@dataclass(frozen=True, slots=True)
class Settings:
    """Timings of one run; ``short()`` scales them down for tests and quick looks."""

    calls: int = 200
    seed: int = 1
    interval: float = 0.05
    """Pause between calls: the dependency sees steady traffic, as in production."""
    attempt_timeout: float = 0.25
    stall_seconds: float = 0.75
    backoff_initial: float = 0.05
    breaker_timeout: float = 2.0
    outage_seconds: float = 2.0

    @classmethod
    def short(cls, calls: int, seed: int) -> Settings:
        """Scaled down, with margins a loaded machine keeps: a healthy call has 0.2 s, and
        the outage lasts 1 s, long enough for five failed calls to open the breaker even
        when each one takes 0.2 s (at 0.3 s, a loaded run once saw no breaker open)."""
        return cls(calls, seed, 0.02, 0.2, 0.6, 0.01, 0.25, 1.0)

    @property
    def outage_calls(self) -> int:
        """Calls from the outage's start until the breaker has probed and closed again."""
        return int(max(self.outage_seconds, self.breaker_timeout) / self.interval) + 10


class Outcome:
    OK = "ok first try"
    RECOVERED = "recovered by retry"
    FALLBACK = "answered by fallback"
    FAILED = "failed"


@dataclass(slots=True)
class CallRecord:
    """One logical call as the client saw it."""

    index: int
    outcome: str
    attempts: int
    rejected: bool
    waited: float
    info: ErrorInfo | None
    example: str = ""

    @property
    def group(self) -> str:
        if self.info is None:
            return "none"
        return f"{self.info.category.value} / {self.info.kind.value}"


class DependencyFallback(Fallback):
    """Last known good, except for the caller's own mistakes.

    A 400 says the request is wrong; answering it with yesterday's data would hide the bug,
    so errors the classifier calls ``invalid_request`` are raised instead. (``Fallback(on=...)``
    only takes exception types, and every urllib error is an ``HTTPError``/``OSError``.)
    """

    __slots__ = ()

    def handles(self, error: BaseException) -> bool:
        return super().handles(error) and classify(error).category is not (
            ErrorCategory.INVALID_REQUEST
        )


def _the_resource(url: str, seen: _Attempts) -> str:
    """The last-known-good key of a call to ``/resource``: the resource, not its query."""
    return "GET /resource"


def build_policy(settings: Settings, breaker: CircuitBreaker) -> RecoveryPolicy:
    """Retry with jittered backoff under a budget, behind a breaker, with a fallback."""
    return RecoveryPolicy(
        retry=Retry(
            3,
            backoff=ExponentialBackoff(initial=settings.backoff_initial, maximum=1.0),
            retry_after_jitter=0.05,
            retry_after_cap=5.0,
        ),
        budget=RetryBudget(ratio=0.2, min_per_second=2.0, ttl=5.0, name=NAME),
        breaker=breaker,
        # one resource, whatever the call's query: the last good answer stands for it
        fallback=DependencyFallback(last_known_good=True, key=_the_resource),
        timeout=Timeout(settings.attempt_timeout),
        name=NAME,
    )


@dataclass
class _Attempts:
    count: int = 0
    busy: float = 0.0
    first_error: BaseException | None = None


def _fetch(url: str, seen: _Attempts) -> dict[str, Any]:
    """One attempt of a call: one function for every call, so the policy's last-known-good
    result (kept per function) answers for all of them."""
    seen.count += 1
    started = time.monotonic()
    try:
        return _get(url)
    except Exception as error:
        if seen.first_error is None:
            seen.first_error = error
        raise
    finally:
        seen.busy += time.monotonic() - started


@dataclass
class RunResult:
    records: list[CallRecord]
    transitions: list[tuple[float, StateTransition]]
    budget_refused: int
    elapsed: float
    server_requests: dict[str, int] = field(default_factory=dict)


def _get(url: str) -> dict[str, Any]:
    # The attempt's deadline, published by the policy, becomes the socket timeout: that is how
    # a synchronous attempt honours Timeout (Python cannot interrupt a blocking call).
    left = remaining_time()
    timeout = 5.0 if left is None else max(left, 0.001)
    with urllib.request.urlopen(url, timeout=timeout) as response:
        body: dict[str, Any] = json.loads(response.read())
        return body


def _describe(error: BaseException, info: ErrorInfo) -> str:
    name = type(error).__name__
    return f"{name} {info.status_code}" if info.status_code is not None else name


def run_calls(
    settings: Settings,
    server: FaultServer,
    tracer: trace.Tracer,
    on_call: Callable[[CallRecord, CircuitBreaker], None],
) -> RunResult:
    """Make ``settings.calls`` paced calls; ``on_call`` sees each record (progress bar)."""
    breaker = CircuitBreaker(failure_threshold=5, timeout=settings.breaker_timeout, name=NAME)
    began = time.monotonic()
    transitions: list[tuple[float, StateTransition]] = []
    breaker.add_listener(lambda t: transitions.append((time.monotonic() - began, t)))
    policy = build_policy(settings, breaker)
    records: list[CallRecord] = []
    for index in range(settings.calls):
        record = _one_call(index, f"{server.url}?call={index}", policy, breaker, tracer)
        records.append(record)
        on_call(record, breaker)
        time.sleep(settings.interval)
    budget = policy.budget
    return RunResult(
        records=records,
        transitions=transitions,
        budget_refused=budget.snapshot().total_refused if budget is not None else 0,
        elapsed=time.monotonic() - began,
        server_requests=dict(server.requests),
    )


def _one_call(
    index: int, url: str, policy: RecoveryPolicy, breaker: CircuitBreaker, tracer: trace.Tracer
) -> CallRecord:
    seen = _Attempts()

    attributes = {"http.request.method": "GET", "url.full": url}
    with tracer.start_as_current_span(
        "GET /resource", kind=SpanKind.CLIENT, attributes=attributes, record_exception=False
    ) as span:
        started = time.monotonic()
        failed: BaseException | None = None
        body: dict[str, Any] | None = None
        try:
            body = policy.call(_fetch, url, seen)
        except Exception as error:
            failed = error
            span.set_status(Status(StatusCode.ERROR, type(error).__name__))
            span.set_attribute("error.type", type(error).__qualname__)
        elapsed = time.monotonic() - started
        if body is not None:
            span.set_attribute("http.response.status_code", int(body.get("status", 200)))

    rejected = seen.count == 0
    first = seen.first_error
    if first is None and rejected:
        first = failed or CircuitOpenError(breaker.name, breaker.retry_after())
    info = classify(first) if first is not None else None
    if failed is not None:
        outcome = Outcome.FAILED
    elif body is None or body.get("call") != index:
        outcome = Outcome.FALLBACK
    elif seen.count > 1:
        outcome = Outcome.RECOVERED
    else:
        outcome = Outcome.OK
    return CallRecord(
        index=index,
        outcome=outcome,
        attempts=seen.count,
        rejected=rejected,
        waited=max(0.0, elapsed - seen.busy) if seen.count > 1 else 0.0,
        info=info,
        example=_describe(first, info) if first is not None and info is not None else "",
    )
