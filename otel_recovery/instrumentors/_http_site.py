"""One patched HTTP method as a place requests are attempted from, and where what the
application gets back is decided.

Every HTTP library needs the same things of an attempt: send once, judge the response's
status, turn a retryable one into the signal the policy retries on, note what the client's
own retry already repeated and which server a failure was met at, and release any response
the application will not get. And every request ends the same way: the application gets the
last attempt's own response or exception, a fallback, or the breaker's rejection in the
library's own type, never something our machinery made of it by mistake.
:class:`HttpSite` makes those decisions once for every library; a library's subclass only
says how its responses are read, released and faked. The layer (:mod:`._http_layer`) calls
it, and its compiled twin reads its ``status_attribute`` and calls its ``_signal`` and
``_unreadable``.

A request's whole state is one list, :data:`Outcomes`: see there why it is a list, and why
no frame may keep an exception in it.
"""

from __future__ import annotations

import asyncio
import inspect
from asyncio import CancelledError
from collections.abc import Callable
from typing import Any, ClassVar, Generic, TypeVar

from otel_recovery._reraise import reraise
from otel_recovery._trio import is_trio_cancellation
from otel_recovery.instrumentors._attempt_site import AttemptSite, is_call_limit
from otel_recovery.instrumentors._client_retries import mark
from otel_recovery.instrumentors._elsewhere import Server, mark_elsewhere
from otel_recovery.instrumentors._http import (
    RetryableStatusError,
    before_resend,
    server_of_url,
    status_of,
)
from otel_recovery.instrumentors._wrapping import report_internal_error
from otel_recovery.policies.circuit_breaker import CircuitOpenError

__all__ = ["HttpSite", "Outcomes"]

R = TypeVar("R")

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

_TIMEOUTS = (TimeoutError, asyncio.TimeoutError)
"""What an attempt cut by ``attempt_timeout`` ends with (distinct types before Python 3.11)."""


def _cancelled(outcome: object) -> bool:
    """An attempt's outcome that a cancellation ended (asyncio's, or trio's scope)."""
    return isinstance(outcome, CancelledError) or (
        isinstance(outcome, BaseException) and is_trio_cancellation(outcome)
    )


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
