"""The per-request layer of the HTTP instrumentors: plans by request shape, attempts that
retry on responses, and settling what the application gets back.

The happy path (a request that succeeds first time) is what every service pays on every
call, so it is kept to four Python frames and no object of ours: the layer (a plain
function, see :meth:`PatchSet.layer`), the library's planner (one dictionary lookup of the
plan by the request's shape, see :class:`HttpPlans`), the policy's compiled runner, and one
attempt (:meth:`HttpSite.attempt`). The request's whole state is one list
(:data:`Outcomes`). Everything else (retries, fallbacks, rejections, internal errors) is
decided after the runner returns or raises, off the happy path. Which requests may be
repeated, and why a retryable status becomes an exception, is in :mod:`._http`.
"""

from __future__ import annotations

import asyncio
import inspect
from asyncio import CancelledError
from collections.abc import Callable
from typing import Any, ClassVar, Generic, NamedTuple, TypeVar

from otel_recovery._compiled import SPEEDUPS
from otel_recovery._forksafe import new_lock
from otel_recovery._policy_core import AsyncRunner, Runner
from otel_recovery._reraise import reraise
from otel_recovery._trio import is_trio_cancellation
from otel_recovery.instrumentors._attempt_site import AttemptSite, is_call_limit
from otel_recovery.instrumentors._client_retries import mark
from otel_recovery.instrumentors._db import compiles
from otel_recovery.instrumentors._elsewhere import Server, mark_elsewhere
from otel_recovery.instrumentors._http import (
    HttpCall,
    RetryableStatusError,
    before_resend,
    server_of_url,
    status_of,
)
from otel_recovery.instrumentors._suppression import (
    CONTEXT_VAR,
    instrumentation_enabled,
    read_context,
)
from otel_recovery.instrumentors._targets import TargetPolicies
from otel_recovery.instrumentors._wrapping import PatchSet, report_internal_error
from otel_recovery.policies.circuit_breaker import CircuitOpenError
from otel_recovery.telemetry._suppressed import LEGACY_SUPPRESS_KEY, SUPPRESS_KEY

__all__ = [
    "CompiledShapes",
    "HttpPlan",
    "HttpPlans",
    "HttpSite",
    "Outcomes",
    "PlanOf",
    "async_layer",
    "sync_layer",
]

R = TypeVar("R")


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
    for ``requests`` (see :class:`CompiledShapes`). Only plans that hold for every request
    of that shape are remembered: the body must be known replayable and the headers
    irrelevant. The dictionaries are bounded (a client calling URLs with ids in them must
    not grow memory): past ``limit`` entries they start over.
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


_TIMEOUTS = (TimeoutError, asyncio.TimeoutError)
"""What an attempt cut by ``attempt_timeout`` ends with (distinct types before Python 3.11)."""


def _cancelled(outcome: object) -> bool:
    """An attempt's outcome that a cancellation ended (asyncio's, or trio's scope)."""
    return isinstance(outcome, CancelledError) or (
        isinstance(outcome, BaseException) and is_trio_cancellation(outcome)
    )


PlanOf = Callable[[tuple[Any, ...], dict[str, Any]], HttpPlan | None]
"""A library's planner: ``plan_of(args, kwargs)`` for the patched method's arguments (the
client first); None to call the original untouched."""


_NO_KWARGS: dict[str, Any] = {}
"""The runner's keyword arguments for an attempt (it has none); never mutated."""

Outcomes = list[Any]
"""What the latest attempt of one request ended with: the response it got, or the exception
the original raised. The whole per-request state: a list costs a request far less than an
object with an ``__init__`` (about 300 instructions against 2,000), and every other fact
follows from it. Attempts were made if it is not empty; the outcome in it is what the app
gets if the engine gives up on it.

The list is in every attempt's frame, and an exception's traceback holds the frames it
passed through, so an exception kept in the list makes a reference cycle that only the
garbage collector frees (with every frame of the request and what their locals hold). So a
resend drops the earlier outcome (its response closed), delivering empties the list, and no
frame keeps the exception it raises in a local."""


class HttpSite(AttemptSite, Generic[R]):
    """One patched method that sends a request (``Session.request``, ``Client.send``...):
    how its requests are attempted, and what the application gets back in the end.

    The layer runs :meth:`attempt` (or :meth:`aattempt`) under the plan's compiled runner;
    whatever else happened is settled by :meth:`after_error`/:meth:`after_result` and
    :meth:`deliver`: every decision about what the application gets back is made here, once.
    A library subclasses it to say how its responses are read (``status_attribute``),
    released (:meth:`close`) and faked (:meth:`rejected`, :meth:`fallback`); those run only
    on the slow paths and read the request from the patched method's ``args``/``kwargs``.
    """

    site: ClassVar[str] = "http"
    """Names the library in internal error reports."""
    status_attribute: ClassVar[str] = "status_code"

    def __init__(self, original: Callable[..., Any]) -> None:
        self.original = original

    # -- what a library provides ----------------------------------------------------------

    def close(self, response: R) -> object:
        """Release a response that will not be returned (may return an awaitable)."""
        raise NotImplementedError

    def rejected(
        self, error: CircuitOpenError, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> BaseException:
        """The breaker's rejection as the library's own connection error, so an application's
        existing ``except`` clauses catch it."""
        raise NotImplementedError

    def fallback(self, value: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> R:
        """A library response carrying a configured fallback value."""
        raise NotImplementedError

    def timed_out(
        self, error: Exception, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> BaseException:
        """What the app gets when ``attempt_timeout`` cut the last attempt: the policy's
        timeout error (the instrumentor's ``attempt_timeout_error``), completed with what
        the library's own timeout errors carry (httpx's ``request``)."""
        return error

    def retried_status(self, response: R) -> int:
        """How many times the client library's own retry repeats a request answered like
        ``response`` (urllib3's ``Retry`` under requests); 0 if it does not. Asked only
        for a response with a failing status: see :mod:`._client_retries`."""
        return 0

    def retried_error(self, error: Exception, args: tuple[Any, ...], kwargs: dict[str, Any]) -> int:
        """How many times the client library's own retry repeats a request that failed with
        ``error`` (urllib3's ``Retry``, httpx's transport ``retries``); 0 if it does not."""
        return 0

    def asked(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Server | None:
        """The server the call was planned for: its URL's, as :func:`server_of_url` names it
        (None: unknown, and no failure counts as another server's)."""
        return None

    def failed_at(self, error: Exception) -> Server | None:
        """The server ``error`` was met at, where it names one (the request it carries:
        a redirect's, if one took the call elsewhere); None if it does not say."""
        return None

    # -- attempts -------------------------------------------------------------------------
    # The two attempt methods are the per-request hot path (the first attempt runs on every
    # request), so they differ only where async must await and inline the status check: a
    # shared helper would cost every request one more Python call.

    def attempt(
        self,
        outcomes: Outcomes,
        statuses: frozenset[int],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> R:
        """Send once; return a good response, raise the signal for a retryable one."""
        if outcomes:
            self._close(self._retried(outcomes))  # let_go closed it, unless it was not asked
            outcomes.clear()  # see Outcomes: only the latest attempt's is kept
            before_resend()
        try:
            response: R = self.original(*args, **kwargs)
        except BaseException as error:
            outcomes.append(error)
            self.note_failure(error, args, kwargs)
            raise
        outcomes.append(response)
        try:
            failed = getattr(response, self.status_attribute, None) in statuses
        except Exception as error:  # an unhashable status: the app's to judge
            failed = self._unreadable(error)
        if failed and (signal := self._signal(response)) is not None:
            try:
                raise signal
            finally:
                del signal  # see Outcomes: no frame -> signal -> traceback -> frame cycle
        return response

    async def aattempt(
        self,
        outcomes: Outcomes,
        statuses: frozenset[int],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> R:
        """The asyncio twin of :meth:`attempt`."""
        if outcomes:
            await self._aclose(self._retried(outcomes))
            outcomes.clear()  # see Outcomes: only the latest attempt's is kept
            before_resend()
        try:
            response: R = await self.original(*args, **kwargs)
        except BaseException as error:
            outcomes.append(error)
            self.note_failure(error, args, kwargs)
            raise
        outcomes.append(response)
        try:
            failed = getattr(response, self.status_attribute, None) in statuses
        except Exception as error:
            failed = self._unreadable(error)
        if failed and (signal := self._signal(response)) is not None:
            try:
                raise signal
            finally:
                del signal  # see Outcomes: no frame -> signal -> traceback -> frame cycle
        return response

    def _signal(self, response: R) -> RetryableStatusError | None:
        """The signal for a failed response; None if it turns out not to be one (a status
        that is not an int) or cannot be read."""
        try:
            status = status_of(response, self.status_attribute)
            headers = getattr(response, "headers", None) if status is not None else None
        except Exception as error:  # a response we cannot read is the app's to judge
            self._unreadable(error)
            return None
        if status is None:
            return None
        signal = RetryableStatusError(response, status, headers)
        try:
            mark(signal, self.retried_status(response))
        except Exception as error:  # the client's retry unreadable: ours decides alone
            report_internal_error(f"{self.site}: reading the client's own retry", error)
        try:
            history = getattr(response, "history", None)
            if history:  # redirected (or an auth round): the first request's server asked
                mark_elsewhere(
                    signal,
                    server_of_url(history[0].url),
                    server_of_url(getattr(response, "url", None)),
                )
        except Exception as error:
            report_internal_error(f"{self.site}: reading where the request failed", error)
        return signal

    def note_failure(
        self, error: BaseException, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> None:
        """Mark ``error`` (an attempt's own failure) if the client library's retry already
        repeated it, so ours does not again (see :mod:`._client_retries`), or if it was met
        at another server than the call's own (see :mod:`._elsewhere`)."""
        if not isinstance(error, Exception) or isinstance(error, RetryableStatusError):
            return
        try:
            mark(error, self.retried_error(error, args, kwargs))
        except Exception as failure:
            report_internal_error(f"{self.site}: reading the client's own retry", failure)
        try:
            mark_elsewhere(error, self.asked(args, kwargs), self.failed_at(error))
        except Exception as failure:
            report_internal_error(f"{self.site}: reading where the request failed", failure)

    def _unreadable(self, error: Exception) -> bool:
        report_internal_error(f"{self.site}: reading the response", error)
        return False

    @staticmethod
    def _held(outcomes: Outcomes) -> R | None:
        """The failed response the last attempt ended with, if any: still open."""
        last = outcomes[-1] if outcomes else None
        return None if isinstance(last, BaseException) else last

    def _retried(self, outcomes: Outcomes) -> R | None:
        """What the last attempt holds open, now that it is repeated: its failed response,
        or the response its error carries (requests' ``HTTPError`` raised by a response
        hook's ``raise_for_status``, httpx's ``HTTPStatusError``), whose connection the
        application, which only ever sees the last attempt's outcome, could not release."""
        last = outcomes[-1] if outcomes else None
        if not isinstance(last, BaseException):
            return last
        response = getattr(last, "response", None)
        return response if hasattr(response, self.status_attribute) else None

    def let_go(self, args: tuple[Any, ...]) -> None:
        """Before the backoff, close the response of the attempt to be repeated (closing
        twice does nothing, so the next attempt's close stays as a backstop)."""
        self._close(self._retried(args[0]))

    async def alet_go(self, args: tuple[Any, ...]) -> None:
        await self._aclose(self._retried(args[0]))

    # -- settling -------------------------------------------------------------------------

    def after_error(
        self,
        outcomes: Outcomes,
        error: BaseException,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> R | BaseException | None:
        """The runner raised: the app gets the final response, the original's own exception
        unchanged, or the library-typed rejection; if our machinery failed, the real
        outcome so far. None: nothing was sent yet, call the original."""
        site = self.site
        if isinstance(error, RetryableStatusError):
            response: R = error.response
            return response
        if (outcomes and error is outcomes[-1]) or not isinstance(error, Exception):
            return error  # the original's own failure, or cancellation: never ours to eat
        if outcomes and _cancelled(outcomes[-1]) and isinstance(error, _TIMEOUTS):
            return self.timed_out(error, args, kwargs)  # our attempt_timeout cut the last one
        if is_call_limit(error):  # the call's own limit passed: in an attempt, or a backoff
            return self.timed_out(error, args, kwargs)
        if isinstance(error, CircuitOpenError) and not outcomes:
            try:
                return self.rejected(error, args, kwargs)
            except Exception as failure:
                report_internal_error(f"{site}: rejection", failure)
                return error
        report_internal_error(f"{site}: recovery", error)
        return self._real_outcome(outcomes)

    def after_result(
        self, outcomes: Outcomes, result: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> R | BaseException | None:
        """The runner returned something other than an attempt's response: a fallback value
        to wrap. If the fallback cannot be built, the real outcome stands; None: call the
        original."""
        try:
            return self.fallback(result, args, kwargs)
        except Exception as error:
            report_internal_error(f"{self.site}: building the fallback response", error)
        return self._real_outcome(outcomes)

    @staticmethod
    def _real_outcome(outcomes: Outcomes) -> R | BaseException | None:
        """What the original did last, whatever our machinery made of it (None: nothing)."""
        last: R | BaseException | None = outcomes[-1] if outcomes else None
        return last

    def deliver(
        self,
        outcomes: Outcomes,
        outcome: R | BaseException | None,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> R:
        """Hand the outcome to the app: release the response it does not get, then return
        or raise (outside any handler, so the original's own exception stays unchanged)."""
        self._close(self._held(outcomes), keep=outcome)
        if outcome is None:
            result: R = self.original(*args, **kwargs)  # failed before sending
            return result
        outcomes.clear()  # see Outcomes
        if isinstance(outcome, BaseException):
            try:
                reraise(outcome)  # with the context its library gave it
            finally:
                del outcome
        return outcome

    async def adeliver(
        self,
        outcomes: Outcomes,
        outcome: R | BaseException | None,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> R:
        """The asyncio twin of :meth:`deliver`."""
        await self._aclose(self._held(outcomes), keep=outcome)
        if outcome is None:
            result: R = await self.original(*args, **kwargs)
            return result
        outcomes.clear()  # see Outcomes
        if isinstance(outcome, BaseException):
            try:
                reraise(outcome)  # with the context its library gave it
            finally:
                del outcome
        return outcome

    def _close(self, response: R | None, keep: object = None) -> None:
        if response is None or response is keep:
            return
        try:
            self.close(response)
        except Exception as error:
            report_internal_error(f"{self.site}: closing a retried response", error)

    async def _aclose(self, response: R | None, keep: object = None) -> None:
        if response is None or response is keep:
            return
        try:
            result = self.close(response)
            if inspect.isawaitable(result):
                await result
        except Exception as error:
            report_internal_error(f"{self.site}: closing a retried response", error)


Build = Callable[[Callable[..., Any]], Callable[..., Any]]
"""What :meth:`PatchSet.layer` takes: the original method in, our layer out."""


class CompiledShapes(NamedTuple):
    """How a compiled layer finds the plan of a ``(self, method, url, **options)`` or
    ``(self, method=..., url=..., **options)`` request: in ``by_url`` under the URL, then
    the method, as :meth:`HttpPlans.recall` does (None for one not given), unless an option
    in ``body_names`` is set. The library's planner must remember plans by the same rule."""

    by_url: dict[Any, tuple[Any, ...]]
    body_names: tuple[str, ...]


def sync_layer(
    patches: PatchSet,
    library: type[HttpSite[Any]],
    plan_of: PlanOf,
    compiled: CompiledShapes | None = None,
) -> Build:
    """The layer of a synchronous method that sends one request (``Session.request``,
    ``Client.send``): finds the request's plan with ``plan_of`` and runs it.

    With ``compiled`` and the extension built, a request whose plan is remembered makes its
    first attempt compiled (``_speedups.HttpLayer``); if that attempt fails, ``resume``
    below goes on exactly as this layer would have after it.
    """
    planning = f"{library.site}: planning"

    def build(original: Callable[..., Any]) -> Callable[..., Any]:
        site = library(original)
        attempt, after_error, after_result, deliver = (
            site.attempt,
            site.after_error,
            site.after_result,
            site.deliver,
        )

        def layer(*args: Any, **kwargs: Any) -> Any:
            # The per-request hot path, inlined (see the module docstring): the suppression
            # test reads the context directly, the site's methods are bound once, and a
            # successful first attempt returns straight from the runner's result.
            if not patches.enabled:
                return original(*args, **kwargs)
            context = read_context()  # suppressed (the exporter's own traffic)?
            if (SUPPRESS_KEY in context or LEGACY_SUPPRESS_KEY in context) and not (
                instrumentation_enabled()
            ):
                return original(*args, **kwargs)
            try:
                plan = plan_of(args, kwargs)
            except Exception as error:
                report_internal_error(planning, error)
                plan = None
            if plan is None:
                return original(*args, **kwargs)
            outcomes: Outcomes = []
            try:
                result = plan.run(attempt, (outcomes, plan.statuses, args, kwargs), _NO_KWARGS)
            except BaseException as error:
                outcome = after_error(outcomes, error, args, kwargs)
            else:
                if outcomes and outcomes[-1] is result:
                    return result
                outcome = after_result(outcomes, result, args, kwargs)
            try:
                return deliver(outcomes, outcome, args, kwargs)
            finally:
                del outcome  # see Outcomes

        if compiled is None or not compiles():
            return layer
        note_failure = site.note_failure

        def resume(
            plan: HttpPlan,
            outcomes: Outcomes,
            error: BaseException,
            started: float,
            took: float,
            args: tuple[Any, ...],
            kwargs: dict[str, Any],
        ) -> Any:
            """What the runner does after a first attempt that ended in ``error`` (the
            original's exception, or the signal for a response to retry on); the compiled
            layer calls it with ``error`` being handled, as the runner's ``except`` does."""
            note_failure(error, args, kwargs)
            try:
                return plan.recover(
                    attempt,
                    (outcomes, plan.statuses, args, kwargs),
                    _NO_KWARGS,
                    error,
                    started,
                    took,
                )
            finally:
                del error  # see Outcomes

        def settle(
            outcomes: Outcomes,
            raised: bool,
            value: Any,
            args: tuple[Any, ...],
            kwargs: dict[str, Any],
        ) -> Any:
            """The rest of ``layer`` once the runner returned ``value`` or raised it; the
            compiled layer calls it outside any handler of its own, as ``layer`` runs it."""
            if raised:
                outcome = after_error(outcomes, value, args, kwargs)
            else:
                if outcomes and outcomes[-1] is value:
                    return value
                outcome = after_result(outcomes, value, args, kwargs)
            try:
                return deliver(outcomes, outcome, args, kwargs)
            finally:
                del outcome, value  # see Outcomes

        fast: Callable[..., Any] = SPEEDUPS.HttpLayer(  # type: ignore[union-attr]
            slow=layer,
            original=original,
            patches=patches,
            context_var=CONTEXT_VAR,
            suppress_keys=(SUPPRESS_KEY, LEGACY_SUPPRESS_KEY),
            by_url=compiled.by_url,
            plan_type=HttpPlan,
            body_names=compiled.body_names,
            status_attribute=library.status_attribute,
            signal=site._signal,
            unreadable=site._unreadable,
            resume=resume,
            settle=settle,
        )
        return fast

    return build


def async_layer(patches: PatchSet, library: type[HttpSite[Any]], plan_of: PlanOf) -> Build:
    """The asyncio twin of :func:`sync_layer` (``AsyncClient.send``, aiohttp's
    ``ClientSession._request``)."""
    planning = f"{library.site}: planning"

    def build(original: Callable[..., Any]) -> Callable[..., Any]:
        site = library(original)
        attempt, after_error, after_result, deliver = (
            site.aattempt,
            site.after_error,
            site.after_result,
            site.adeliver,
        )

        async def layer(*args: Any, **kwargs: Any) -> Any:
            if not patches.enabled:
                return await original(*args, **kwargs)
            context = read_context()
            if (SUPPRESS_KEY in context or LEGACY_SUPPRESS_KEY in context) and not (
                instrumentation_enabled()
            ):
                return await original(*args, **kwargs)
            try:
                plan = plan_of(args, kwargs)
            except Exception as error:
                report_internal_error(planning, error)
                plan = None
            if plan is None:
                return await original(*args, **kwargs)
            outcomes: Outcomes = []
            try:
                result = await plan.arun(
                    attempt, (outcomes, plan.statuses, args, kwargs), _NO_KWARGS
                )
            except BaseException as error:  # includes cancellation during a backoff sleep
                outcome = after_error(outcomes, error, args, kwargs)
            else:
                if outcomes and outcomes[-1] is result:
                    return result
                outcome = after_result(outcomes, result, args, kwargs)
            try:
                return await deliver(outcomes, outcome, args, kwargs)
            finally:
                del outcome  # see Outcomes

        return layer

    return build
