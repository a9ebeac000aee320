"""An HTTP request's plan, found by the request's shape: what makes a request like an
earlier one cost a dictionary lookup.

Building a plan means asking the target table for the request's server and policy and
compiling that policy's runners; done per request, it would be most of what the layer costs
a request that succeeds first time. So each distinct :class:`HttpCall` is compiled once
(:class:`HttpPlan`), and the plan is remembered under the shape of the request that led to
it (:class:`HttpPlans`): its method and URL, or the library's own description of them. A
shape is remembered only where the plan holds for every request of that shape, and never
under a method that could compare equal to one needing another plan. The tables are bounded
and emptied when the target table forgets a target, so a plan never outlives its breaker.

The compiled layer (``_speedups.HttpLayer``) reads ``by_url`` and a plan's ``run`` and
``statuses`` slots itself: their layout is part of its contract.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from otel_recovery._forksafe import new_lock
from otel_recovery._policy_core import AsyncRunner, Runner
from otel_recovery.instrumentors._http import HttpCall
from otel_recovery.instrumentors._targets import TargetPolicies

__all__ = ["HttpPlan", "HttpPlans"]


class HttpPlan:
    """An :class:`HttpCall` compiled for the per-request path: its policy's runners, built
    once per policy (never per request)."""

    __slots__ = ("arun", "call", "recover", "run", "statuses")

    def __init__(self, call: HttpCall) -> None:
        self.call = call
        self.statuses = call.statuses
        self.run: Runner = call.policy.runner()
        self.arun: AsyncRunner = call.policy.arunner()
        # what ``run`` does after a first attempt fails; a compiled layer that made that
        # attempt itself goes on from there (see ``sync_layer``)
        self.recover: Callable[..., Any] = call.policy._recover


class HttpPlans:
    """One instrumentor's plans, by request shape, so a request like an earlier one costs
    one dictionary lookup.

    ``shapes`` maps a library's raw description of a request (for httpx, the method and
    the parsed URL) to its plan; the library's planner reads it inline and fills it with
    :meth:`remember`. ``by_url`` is the same for a ``(method, url)`` description, keyed by
    the URL first (:meth:`recall`, :meth:`remember_by_url`): what the compiled layer reads
    for ``requests`` (see :class:`~._http_layer.CompiledShapes`). Only plans that hold for
    every request of that shape are remembered: the body must be known replayable and the
    headers irrelevant. The dictionaries are bounded (a client calling URLs with ids in them
    must not grow memory): past ``limit`` entries they start over.
    """

    METHODS_PER_URL = 8
    """Methods remembered under one URL; past that the oldest goes."""

    def __init__(self, targets: TargetPolicies, limit: int = 1024) -> None:
        self.targets = targets
        self.shapes: dict[Any, HttpPlan] = {}
        self.by_url: dict[Any, tuple[Any, ...]] = {}
        self._compiled: dict[HttpCall, HttpPlan] = {}
        self._limit = limit
        self._lock = new_lock()
        targets.on_forget(self.forget)

    def forget(self) -> None:
        """Drop every remembered plan: the target table forgot a target, and a plan kept
        for it would hold a breaker the table no longer has (see ``on_forget``)."""
        with self._lock:
            self.shapes.clear()
            self.by_url.clear()
            self._compiled.clear()

    def compile(self, call: HttpCall) -> HttpPlan:
        """The plan running ``call``; one per distinct call, so runners are built once."""
        plan = self._compiled.get(call)
        if plan is None:
            plan = HttpPlan(call)
            with self._lock:
                if len(self._compiled) >= self._limit:
                    self._compiled.clear()
                plan = self._compiled.setdefault(call, plan)
        return plan

    def remember(self, shape: Any, plan: HttpPlan) -> HttpPlan:
        """Answer ``plan`` for every later request of ``shape`` (unless headers matter)."""
        if not plan.call.header_dependent:
            with self._lock:
                if len(self.shapes) >= self._limit:
                    self.shapes.clear()
                self.shapes[shape] = plan
        return plan

    def recall(self, url: Any, method: Any) -> HttpPlan | None:
        """The plan remembered for ``method`` under ``url``; ``TypeError`` for an unhashable
        URL. ``by_url`` holds ``(method, plan, method, plan, ...)`` per URL: methods are
        compared by identity first (they are nearly always the same interned str), so a
        request costs one lookup of the URL, whose hash the str keeps. Only an exact str or
        bytes method is remembered or compared by value: a subclass's ``__eq__`` could say
        yes to a method whose plan must differ (a POST answered with a GET's plan would be
        sent twice)."""
        entry = self.by_url.get(url)
        return None if entry is None else self.plan_in(entry, method)

    @staticmethod
    def plan_in(entry: tuple[Any, ...], method: Any) -> HttpPlan | None:
        """The plan a ``by_url`` entry holds for ``method``, or None (see :meth:`recall`)."""
        if type(method) not in _PLAIN_METHODS:
            return None
        for index in range(0, len(entry), 2):
            if _same_method(entry[index], method):
                plan: HttpPlan = entry[index + 1]
                return plan
        return None

    def remember_by_url(self, url: Any, method: Any, plan: HttpPlan) -> HttpPlan:
        """Answer ``plan`` for every later ``method`` request of ``url`` (unless headers
        matter, or the method is not an exact str or bytes, see :meth:`recall`)."""
        if plan.call.header_dependent or type(method) not in _PLAIN_METHODS:
            return plan
        with self._lock:
            entry = self.by_url.get(url)
            if entry is None:
                if len(self.by_url) >= self._limit:
                    self.by_url.clear()
                entry = ()
            kept = [
                (entry[index], entry[index + 1])
                for index in range(0, len(entry), 2)
                if not _same_method(entry[index], method)
            ]
            kept = kept[max(0, len(kept) - (self.METHODS_PER_URL - 1)) :]
            self.by_url[url] = (*(item for pair in kept for item in pair), method, plan)
        return plan


_PLAIN_METHODS = (str, bytes)
"""The types of method a plan is remembered for (:meth:`HttpPlans.recall`)."""


def _same_method(stored: Any, method: Any) -> bool:
    """``stored`` (a remembered method) is ``method``: the same object, or equal and of the
    same type (a str never compared with bytes, which would warn under ``python -b``)."""
    return stored is method or (type(stored) is type(method) and stored == method)
