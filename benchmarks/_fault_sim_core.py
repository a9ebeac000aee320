"""The discrete-event model behind ``benchmarks/fault_sim.py`` (research/adaptive.md section 3).

Virtual time only: a ``heapq`` of ``(time, seq, handler, arg)``, a FIFO server with ``c``
workers that does not know about client deadlines (it still serves requests whose client has
given up: the wasted work that makes metastable failure possible), open-loop Poisson clients,
and the fault profiles. The client's decisions are made by the library's real classes
(:func:`otel_recovery._engine.after_failure` with real ``Retry``/``RetryBudget``/
``CircuitBreaker``/``Classifier`` objects on a virtual :class:`SimClock`); this module only
moves requests around and counts.

Randomness is split into streams so that comparisons are paired (common random numbers):
every policy sees the same arrivals, the same first-attempt service times and the same
first-attempt faults for a given seed; only what a policy changes (retries) draws from the
per-policy streams.
"""

from __future__ import annotations

import heapq
import itertools
import math
import random
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, Protocol

from otel_recovery._engine import Action, after_failure
from otel_recovery.classify import Classifier, ErrorCategory, ErrorInfo
from otel_recovery.policies import CircuitBreaker, CircuitState, Retry, RetryBudget

RUN_SECONDS = 60.0
WORKERS = 8
SERVICE_MEAN = 0.020
ATTEMPT_TIMEOUT = 0.5
DEADLINE = 5.0
_OPEN = (CircuitState.OPEN, CircuitState.FORCED_OPEN)


@dataclass(frozen=True)
class Profile:
    """One fault scenario: 60 s of virtual time at ``rate`` calls/s with one kind of fault."""

    name: str
    rate: float
    window: tuple[float, float]  # the fault window (load and recovery are measured against it)
    blip_p: float = 0.0  # each attempt independently answers 503 after doing the work
    outage: bool = False  # connection refused in 1 ms during the window
    slowdown: float = 1.0  # service time factor during the window (capacity loss)
    quota: int = 0  # admitted per 1-s window during the window; the rest get 429 + Retry-After
    bad_calls: float = 0.0  # share of logical calls that always get 400 (deterministic)
    poisoned: float = 0.0  # share of logical calls that always get 500 (retryable, never heals)


class HTTPStatusError(Exception):
    """What an HTTP client raises for an error status (classified by status, as in httpx)."""

    def __init__(self, status: int, retry_after: float | None = None) -> None:
        super().__init__(f"HTTP {status}")
        self.status_code = status
        self.headers = {} if retry_after is None else {"Retry-After": f"{retry_after:.3f}"}


class SimClock:
    """The otel_recovery ``Clock`` protocol over simulated time (never sleeps: nothing blocks)."""

    __slots__ = ("t",)

    def __init__(self) -> None:
        self.t = 0.0

    def now(self) -> float:
        return self.t

    def wall(self) -> float:
        return 1_700_000_000.0 + self.t

    def sleep(self, seconds: float) -> None:
        raise RuntimeError("the simulation never blocks; schedule an event instead")

    async def asleep(self, seconds: float) -> None:
        raise RuntimeError("the simulation never blocks; schedule an event instead")


class Call:
    __slots__ = (
        "attempts",
        "bad",
        "delay",
        "first_blip",
        "first_service",
        "not_before",
        "ok",
        "plan",
        "poisoned",
        "retry",
        "start",
        "was_unretryable",
    )

    def __init__(self, start: float, bad: bool, first_service: float, first_blip: bool) -> None:
        self.start = start
        self.bad = bad
        self.first_service = first_service
        self.first_blip = first_blip
        self.attempts = 0
        self.delay = 0.0
        self.retry: Retry | None = None
        self.plan: Any = None  # what the policy decided at the first failure (its own data)
        self.not_before = 0.0  # earliest time the server allowed (Retry-After)
        self.ok = False
        self.poisoned = False
        self.was_unretryable = False


class Attempt:
    __slots__ = ("blip", "call", "done", "sent", "service")

    def __init__(self, call: Call, sent: float, service: float, blip: bool) -> None:
        self.call = call
        self.sent = sent
        self.service = service
        self.blip = blip
        self.done = False


class ClientPolicy(Protocol):
    """The system under test: real otel_recovery objects plus how the client wires them."""

    name: str
    breaker: CircuitBreaker | None
    budget: RetryBudget | None
    ignores_retry_after: bool

    def first_failure(self, call: Call, info: ErrorInfo) -> Retry | None: ...
    def finished(self, call: Call, info: ErrorInfo | None) -> None: ...
    def first_success(self) -> None: ...
    def attempt_done(self, latency: float, error: ErrorInfo | None) -> None: ...
    def tick(self, now: float) -> None: ...


@dataclass
class Metrics:
    calls: int = 0
    successes: int = 0
    attempts: int = 0
    retries: int = 0
    shed: int = 0
    window_calls: int = 0
    window_attempts: int = 0
    early_retries: int = 0  # sent before the server's Retry-After had passed
    unretryable_retries: int = 0
    bad_calls: int = 0
    bad_call_attempts: int = 0
    latencies: list[float] | None = None
    all_latencies: list[float] | None = None
    buckets: list[list[int]] | None = None  # per arrival second: [calls, successes]


class Simulation:
    """One run of one policy on one profile with one seed."""

    def __init__(
        self, profile: Profile, make_policy: Callable[[Simulation], ClientPolicy], seed: int
    ) -> None:
        self.profile = profile
        self.seed = seed
        self.clock = SimClock()
        self.classifier = Classifier(clock=self.clock)
        self._classified: dict[tuple[Any, ...], ErrorInfo] = {}
        self._heap: list[tuple[float, int, Callable[[Any], None], Any]] = []
        self._seq = itertools.count()
        self.arrivals = random.Random(seed * 7919 + 1)  # shared by every policy: paired runs
        self.retry_rng = random.Random(seed * 7919 + 2)  # per policy: retries' service and faults
        self.policy_rng = random.Random(seed * 7919 + 3)  # per policy: its own jitter, sampling
        self.busy = 0
        self.queue: deque[Attempt] = deque()
        self.quota_second = -1
        self.quota_used = 0
        self.m = Metrics(latencies=[], all_latencies=[], buckets=[[0, 0] for _ in range(61)])
        self.policy = make_policy(self)

    # -- event engine ----------------------------------------------------------------------

    def at(self, when: float, handler: Callable[[Any], None], arg: Any = None) -> None:
        heapq.heappush(self._heap, (when, next(self._seq), handler, arg))

    def run(self) -> Metrics:
        self.at(self.arrivals.expovariate(self.profile.rate), self._arrive)
        self.at(0.25, self._tick)
        heap, clock = self._heap, self.clock
        while heap:
            when, _, handler, arg = heapq.heappop(heap)
            clock.t = when
            handler(arg)
        return self.m

    def _tick(self, _: Any) -> None:
        self.policy.tick(self.clock.t)
        if self.clock.t < RUN_SECONDS + DEADLINE:
            self.at(self.clock.t + 0.25, self._tick)

    def in_window(self, t: float) -> bool:
        start, end = self.profile.window
        return start <= t < end

    # -- client ----------------------------------------------------------------------------

    def _arrive(self, _: Any) -> None:
        now, p, rng = self.clock.t, self.profile, self.arrivals
        call = Call(
            now,
            rng.random() < p.bad_calls,
            rng.expovariate(1.0 / SERVICE_MEAN),
            rng.random() < p.blip_p,
        )
        # drawn only where the profile has poison, so the other profiles' streams are unchanged
        call.poisoned = p.poisoned > 0 and rng.random() < p.poisoned
        nxt = now + rng.expovariate(p.rate)
        if nxt < RUN_SECONDS:
            self.at(nxt, self._arrive)
        m = self.m
        m.calls += 1
        m.bad_calls += call.bad
        m.window_calls += self.in_window(now)
        breaker = self.policy.breaker
        if breaker is not None and not breaker.can_execute():
            m.shed += 1
            self._finish(call, None, rejected=True)
            return
        budget = self.policy.budget
        if budget is not None:
            budget.record_call(now)
        self._send(call)

    def _send(self, call: Call) -> None:
        now, m = self.clock.t, self.m
        call.attempts += 1
        m.attempts += 1
        m.bad_call_attempts += call.bad
        m.window_attempts += self.in_window(now)
        if call.attempts == 1:
            attempt = Attempt(call, now, call.first_service, call.first_blip)
        else:
            m.retries += 1
            m.early_retries += now < call.not_before
            rng = self.retry_rng
            blip = rng.random() < self.profile.blip_p
            attempt = Attempt(call, now, rng.expovariate(1.0 / SERVICE_MEAN), blip)
        self.at(now + ATTEMPT_TIMEOUT, self._attempt_timeout, attempt)
        self._server_receive(attempt)

    def _attempt_timeout(self, attempt: Attempt) -> None:
        if not attempt.done:
            attempt.done = True
            self._failed(attempt, TimeoutError("attempt timed out"))

    def _respond(self, attempt: Attempt, error: BaseException | None) -> None:
        if attempt.done:
            return  # the client gave up on it already: the server's work was wasted
        attempt.done = True
        if error is None:
            self.policy.attempt_done(self.clock.t - attempt.sent, None)
            call = attempt.call
            if call.attempts == 1:
                self.policy.first_success()
            self._finish(call, None)
        else:
            self._failed(attempt, error)

    def _failed(self, attempt: Attempt, error: BaseException) -> None:
        now, call, policy = self.clock.t, attempt.call, self.policy
        info = self._classify(error)
        # Classified first, so a client can tell a 429 from a failing dependency.
        policy.attempt_done(now - attempt.sent, info)
        call.was_unretryable = not info.retryable
        if info.retry_after is not None:
            call.not_before = now + info.retry_after
            if policy.ignores_retry_after:  # tenacity has no notion of Retry-After
                info = replace(info, retry_after=None)
        if call.attempts == 1:
            call.retry = policy.first_failure(call, info)
        breaker = policy.breaker
        if breaker is not None and breaker.state in _OPEN:
            self._finish(call, info)  # another call opened the circuit: stop (as the drivers do)
            return
        decision = after_failure(
            retry=call.retry,
            budget=policy.budget,
            fallback=None,
            error=error,
            info=info,
            attempt=call.attempts,
            previous_delay=call.delay,
            started=call.start,
            now=now,
        )
        if decision.action is not Action.RETRY:
            self._finish(call, info)
            return
        call.delay = decision.delay
        if call.was_unretryable:
            self.m.unretryable_retries += 1
        self.at(now + decision.delay, self._send, call)

    def _classify(self, error: BaseException) -> ErrorInfo:
        """The real classifier's verdict, computed once per distinct error.

        The simulation raises a handful of error shapes tens of thousands of times; their
        classification is the same every time (only the repeat-severity escalation differs,
        which no decision here reads), so repeats are served from a cache.
        """
        key = (type(error), getattr(error, "status_code", None), str(getattr(error, "headers", "")))
        info = self._classified.get(key)
        if info is None:
            info = self._classified[key] = self.classifier.classify(error)
        return info

    def _finish(self, call: Call, info: ErrorInfo | None, *, rejected: bool = False) -> None:
        now, m = self.clock.t, self.m
        call.ok = info is None and not rejected
        breaker = self.policy.breaker
        if breaker is not None and not rejected:
            # The drivers' rule: a caller's mistake (4xx) says nothing about the dependency.
            if call.ok or (info is not None and info.category is ErrorCategory.INVALID_REQUEST):
                breaker.record_success()
            else:
                breaker.record_failure()
        self.policy.finished(call, info)
        bucket = m.buckets[min(60, int(call.start))]  # type: ignore[index]
        bucket[0] += 1
        took = now - call.start
        if call.ok:
            m.successes += 1
            bucket[1] += 1
            m.latencies.append(took)  # type: ignore[union-attr]
            m.all_latencies.append(took)  # type: ignore[union-attr]
        else:
            m.all_latencies.append(DEADLINE)  # type: ignore[union-attr]

    # -- server ----------------------------------------------------------------------------

    def _server_receive(self, attempt: Attempt) -> None:
        now, p = self.clock.t, self.profile
        if self.in_window(now):
            if p.outage:
                self.at(now + 0.001, self._refused, attempt)
                return
            if p.quota:
                second = math.floor(now)
                if second != self.quota_second:
                    self.quota_second, self.quota_used = second, 0
                if self.quota_used >= p.quota:
                    wait = second + 1.0 - now
                    self.at(now + 0.001, self._throttled, (attempt, wait))
                    return
                self.quota_used += 1
        if self.busy < WORKERS:
            self._start(attempt)
        else:
            self.queue.append(attempt)

    def _refused(self, attempt: Attempt) -> None:
        self._respond(attempt, ConnectionRefusedError("connection refused"))

    def _throttled(self, arg: tuple[Attempt, float]) -> None:
        attempt, wait = arg
        self._respond(attempt, HTTPStatusError(429, retry_after=max(0.0, wait - 0.001)))

    def _start(self, attempt: Attempt) -> None:
        self.busy += 1
        factor = self.profile.slowdown if self.in_window(self.clock.t) else 1.0
        self.at(self.clock.t + attempt.service * factor, self._served, attempt)

    def _served(self, attempt: Attempt) -> None:
        self.busy -= 1
        if attempt.call.bad:
            self._respond(attempt, HTTPStatusError(400))
        elif attempt.call.poisoned:
            self._respond(attempt, HTTPStatusError(500))
        elif attempt.blip:
            self._respond(attempt, HTTPStatusError(503))
        else:
            self._respond(attempt, None)
        queue = self.queue
        while queue and self.busy < WORKERS:
            self._start(queue.popleft())
