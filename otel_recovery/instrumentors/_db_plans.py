"""How a Redis or PostgreSQL call runs (its :class:`Plan`), chosen once per call shape.

A plan is the target's policy for the call (``TargetPolicies.policy_for``), the span mode it
runs in, the policy's compiled runners, and what to say on contrib's span when a failure was
not retried (:func:`explain_no_retry`). Choosing the policy merges per-target settings, too
slow for every call; its answer for a given target, operation, retry rule and span mode
never changes, so :class:`PlanCache` asks once and answers from a dictionary after that.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from opentelemetry import trace

from otel_recovery._forksafe import new_lock
from otel_recovery._policy_core import AsyncRunner, Runner
from otel_recovery.instrumentors._guarded import GuardedPolicy
from otel_recovery.instrumentors._span_mode import SpanMode
from otel_recovery.instrumentors._target_retries import NeverRan
from otel_recovery.instrumentors._targets import TargetPolicies
from otel_recovery.policies.circuit_breaker import CircuitOpenError
from otel_recovery.recover import RecoveryPolicy
from otel_recovery.telemetry.attributes import REDIS_CLIENT_RETRIES, RETRY_DISALLOWED

__all__ = ["Plan", "PlanCache", "explain_no_retry"]


class Plan(NamedTuple):
    """How to run one call: the policy, and what to say on the span if it fails unretried."""

    policy: RecoveryPolicy
    span: SpanMode
    run: Runner
    """``policy.runner()``: the policy's compiled happy path, for sync calls."""
    arun: AsyncRunner
    """``policy.arunner()``, for coroutine functions."""
    disallowed: str | None = None
    """Why retrying is not allowed for this call (None: retrying is allowed)."""
    client_retried: tuple[type[BaseException], ...] = ()
    client_retries: int = 0


class PlanCache:
    """Plans by call shape, so the per-call cost is one dictionary lookup.

    ``TargetPolicies.policy_for`` merges per-target settings on every call; its answer for a
    given (target, operation, retry rule, span mode) never changes, so it is asked once.
    The cache is bounded: past ``limit`` shapes it starts over.
    """

    __slots__ = ("_cache", "_limit", "_lock", "targets")

    def __init__(self, targets: TargetPolicies, limit: int = 4096) -> None:
        self.targets = targets
        self._cache: dict[tuple[Any, ...], Plan] = {}
        self._limit = limit
        self._lock = new_lock()
        targets.on_forget(self.forget)

    def forget(self) -> None:
        """Drop every plan: the target table forgot a target (see ``on_forget``)."""
        with self._lock:
            self._cache.clear()

    def plan(
        self,
        host: str,
        port: int | None,
        operation: str | None,
        span: SpanMode,
        disallowed: str | None = None,
        client_retried: tuple[type[BaseException], ...] = (),
        client_retries: int = 0,
        timed: bool = True,
        rejection: type[CircuitOpenError] | None = None,
        never_ran: NeverRan | None = None,
        reads: bool = False,
    ) -> Plan:
        """The plan for a call; ``disallowed`` (a reason) forbids retrying it, except after
        the failures ``never_ran`` says prove it never ran; ``timed=False`` exempts it
        from the attempt time limit, ``rejection`` replaces the instrumentor's error for an
        open circuit, ``reads`` lets a fallback set for the target answer it (see
        ``TargetPolicies.policy_for``)."""
        key = (
            host, port, operation, span, disallowed, client_retried, client_retries, timed,
            rejection, never_ran, reads,
        )  # fmt: skip
        plan = self._cache.get(key)
        if plan is None:
            policy = self.targets.policy_for(
                host,
                port,
                operation,
                retry_allowed=disallowed is None,
                span=span,
                not_retried=client_retried if disallowed is None else (),
                repeats=client_retries if disallowed is None else 0,
                disallowed=disallowed,
                timed=timed,
                rejection=rejection,
                never_ran=never_ran,
                reads=reads,
            )
            plan = Plan(
                policy,
                span,
                policy.runner(),
                policy.arunner(),
                disallowed,
                client_retried,
                client_retries,
            )
            with self._lock:
                if len(self._cache) >= self._limit:
                    self._cache.clear()
                self._cache[key] = plan
        return plan


def explain_no_retry(plan: Plan, error: BaseException) -> None:
    """On contrib's span, say that redis-py's own retry already repeated a failed call.

    Only on the slow path, and only in ``current`` mode: our own span has already ended.
    A rejection by an open breaker never ran, so there is nothing to explain. A call that
    may not be retried at all says so through its policy's trace (``TargetPolicy``).
    """
    try:
        if plan.span != "current" or isinstance(error, CircuitOpenError):
            return
        policy = plan.policy
        if isinstance(policy, GuardedPolicy) and policy._is_clients_own(error):
            return  # never the client library's retry either: nothing reached the server
        span = trace.get_current_span()
        if not span.is_recording():
            return
        if (
            plan.disallowed is None
            and plan.client_retried
            and isinstance(error, plan.client_retried)
        ):
            span.set_attribute(RETRY_DISALLOWED, "client_retried")
            span.set_attribute(REDIS_CLIENT_RETRIES, plan.client_retries)
    except Exception:  # telemetry must never replace the caller's error
        return
