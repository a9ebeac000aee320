"""What the three HTTP instrumentors share: which requests may be repeated, and retrying on
*responses* as well as on exceptions.

HTTP client libraries do not raise on a 503 or a 429: the failure arrives as an ordinary
response. The engine only knows exceptions, so each attempt runs through an attempt object
that turns a response with a status in ``http_retry_statuses`` into :class:`RetryableStatusError`,
an internal signal carrying the response, its status and headers (so the classifier reads
``Retry-After``). The engine then classifies, records, backs off and retries like any failure.
Before the next attempt the held response is closed, so no connection leaks. When the engine
gives up, the signal comes back out of the driver and the wrapper returns the final response
unchanged: the application sees exactly what it would have seen without us, never an
exception of ours. The recovery span's ``error.type`` is then the status code (``"503"``), as
the HTTP conventions ask, because :class:`ResponseClassifier` classifies the signal by status.

A wrapper error must never break the application, so the wrappers plan the call (parse the
URL, pick the policy) under ``try`` and call the original untouched if planning fails; once
the original has been called, an internal error may only surface the original's own outcome.
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any, Generic, TypeVar

from otel_recovery._clock import Clock
from otel_recovery._retry_after import header
from otel_recovery.classify import Classifier, ErrorInfo, get_default_classifier
from otel_recovery.instrumentors._targets import TargetPolicies
from otel_recovery.instrumentors._wrapping import report_internal_error
from otel_recovery.policies.circuit_breaker import CircuitOpenError
from otel_recovery.recover import RecoveryPolicy

__all__ = [
    "FALLBACK_HEADER",
    "IDEMPOTENCY_KEY",
    "HttpCall",
    "ResponseClassifier",
    "RetryableStatusError",
    "fallback_body",
    "has_header",
    "install_resend_count",
    "plan_call",
    "Adapter",
    "replayable_data",
    "run_async",
    "run_sync",
    "target_of",
]

R = TypeVar("R")

IDEMPOTENCY_KEY = "Idempotency-Key"
FALLBACK_HEADER = "X-OTel-Recovery-Fallback"
"""Set on a response synthesised from a configured ``fallback_value``, so it can be told apart."""

_DEFAULT_PORTS = {"http": 80, "https": 443, "ws": 80, "wss": 443}
_REPLAYABLE_DATA = (str, bytes, bytearray, Mapping, list, tuple)


class RetryableStatusError(Exception):
    """Internal signal: an attempt answered with a status worth retrying.

    It never reaches the application: the wrapper unwraps it and returns ``response``.
    ``status_code`` and ``headers`` are what the classifier reads (status, Retry-After).
    """

    def __init__(self, response: Any, status_code: int, headers: Any) -> None:
        super().__init__(f"HTTP {status_code}")
        self.response = response
        self.status_code = status_code
        self.headers = headers


class ResponseClassifier(Classifier):
    """Classifies :class:`RetryableStatusError` by its status; everything else as usual.

    Delegates to the process-wide classifier at each call, so user rules and the repeat
    memory apply. A status the user listed in ``http_retry_statuses`` is retryable even if
    the built-in table says otherwise (the setting is the user's explicit choice).
    ``clock`` dates HTTP-date ``Retry-After`` values (the instrumentor's clock, for tests).
    """

    def __init__(self, clock: Clock | None = None) -> None:
        super().__init__(clock=clock)

    def classify(self, exc: BaseException, context: Mapping[str, Any] | None = None) -> ErrorInfo:
        default = get_default_classifier()
        if isinstance(exc, RetryableStatusError):
            info = default.classify_status(exc.status_code, exc.headers, clock=self.clock)
            return info if info.retryable else replace(info, retryable=True)
        return default.classify(exc, context)


@dataclass(frozen=True, slots=True)
class HttpCall:
    """How to run one request: its policy and which response statuses count as failures."""

    policy: RecoveryPolicy
    statuses: frozenset[int]


def target_of(scheme: str, host: str | None, port: int | None) -> tuple[str, int | None] | None:
    """``(host, port)`` with the scheme's default port; None when there is no host."""
    if not host:
        return None
    return host.lower(), port if port is not None else _DEFAULT_PORTS.get(scheme.lower())


def has_header(headers: object, name: str) -> bool:
    """Case-insensitive presence test over dicts, CaseInsensitiveDict, httpx/aiohttp headers
    and lists of pairs."""
    if headers is None:
        return False
    if isinstance(headers, (list, tuple)):
        wanted = name.lower()
        return any(
            isinstance(pair, (list, tuple)) and len(pair) == 2 and str(pair[0]).lower() == wanted
            for pair in headers
        )
    return header(headers, name) is not None


def replayable_data(data: object) -> bool:
    """Whether a request body can be sent again byte for byte.

    Strings, bytes and form mappings can; streams, generators, iterators and file objects are
    consumed by the first attempt, so repeating would send an empty or truncated body.
    """
    return data is None or isinstance(data, _REPLAYABLE_DATA)


def plan_call(
    targets: TargetPolicies,
    method: str,
    host: str,
    port: int | None,
    path: str,
    *,
    idempotency_key: bool,
    replayable: bool,
) -> HttpCall:
    """The policy for one request, applying the idempotency rules of DESIGN.md section 5.

    Retried: a replayable request whose method is in ``http_retry_methods``, or that carries
    an ``Idempotency-Key`` (unless ``http_retry_idempotency_key`` is off). Anything else runs
    once under the same breaker: its failure is classified, recorded and returned/re-raised.
    """
    method = method.upper()
    settings = targets.settings
    operation = None  # only per-operation sections need it: skip the string otherwise
    if settings.targets:
        operation = f"{method} {path or '/'}"
        settings = settings.for_target(host, port, operation)
    retry_allowed = replayable and (
        method in settings.http_retry_methods
        or (idempotency_key and settings.http_retry_idempotency_key)
    )
    policy = targets.policy_for(host, port, operation, retry_allowed=retry_allowed)
    return HttpCall(policy, settings.http_retry_statuses)


def fallback_body(value: Any) -> tuple[bytes, str]:
    """The body and content type of a response answering with a configured fallback value:
    bytes as-is, text as text, anything else as JSON (``fallback_value = []`` reads as ``[]``).
    """
    if isinstance(value, (bytes, bytearray)):
        return bytes(value), "application/octet-stream"
    if isinstance(value, str):
        return value.encode("utf-8"), "text/plain; charset=utf-8"
    return json.dumps(value).encode("utf-8"), "application/json"


_resend_pending = False  # the global provider could not take the processor yet


def install_resend_count(kwargs: Mapping[str, Any]) -> None:
    """Stamp ``http.request.resend_count`` on contrib's client spans of resends.

    The processor needs the SDK; without it (API-only installs) there is nothing to stamp.
    Under ``opentelemetry-instrument`` the SDK provider is global before instrumentors run;
    a program that sets it up after ``instrument()`` gets it at its first resend instead.
    """
    global _resend_pending
    explicit = kwargs.get("tracer_provider")
    _resend_pending = not _install_resend(explicit) and explicit is None


def _install_resend(provider: Any = None) -> bool:
    try:
        from opentelemetry import trace

        from otel_recovery.instrumentors._resend import install_resend_processor
    except ImportError:
        return False
    return install_resend_processor(provider or trace.get_tracer_provider())


def _before_resend() -> None:
    """Slow path only (a resend is about to start): install the processor late if needed."""
    global _resend_pending
    if _resend_pending and _install_resend():
        _resend_pending = False


def _status(response: Any, attribute: str) -> int | None:
    status = getattr(response, attribute, None)
    return status if isinstance(status, int) and not isinstance(status, bool) else None


@dataclass
class Adapter(Generic[R]):
    """What a library contributes to :func:`run_sync` / :func:`run_async`.

    ``close`` releases a response that will not be returned (may return an awaitable in
    async code); ``rejected`` turns a breaker rejection into the library's own connection
    error type, so an application's existing ``except`` clauses catch it; ``fallback``
    builds a library response from a configured fallback value.
    """

    site: str
    status_attribute: str
    close: Callable[[R], object]
    rejected: Callable[[CircuitOpenError], BaseException]
    fallback: Callable[[Any], R]


class _Attempts(Generic[R]):
    """One call's attempts: what was sent, returned, raised, or is held for closing.

    The sync and async runners differ only in how they call, await and close; every
    decision about what the application gets back is made here, once.
    """

    def __init__(self, call: HttpCall, adapter: Adapter[R]) -> None:
        self.statuses = call.statuses
        self.adapter = adapter
        self.calls = 0
        self.pending: R | None = None  # a failed response held until the next attempt
        self.returned: R | None = None  # the response handed back as a success
        self.succeeded = False
        self.raised: BaseException | None = None  # the last exception of the original

    def check(self, response: R) -> R:
        """Return a good response; raise the signal for a retryable one (and hold it)."""
        adapter = self.adapter
        try:
            status = _status(response, adapter.status_attribute)
            failed = status is not None and status in self.statuses
            headers = getattr(response, "headers", None) if failed else None
        except Exception as error:  # a response we cannot read is the app's to judge
            report_internal_error(f"{adapter.site}: reading the response", error)
            failed, status, headers = False, None, None
        if failed and status is not None:
            self.pending = response
            raise RetryableStatusError(response, status, headers)
        self.returned, self.succeeded = response, True
        return response

    def take_pending(self) -> R | None:
        held, self.pending = self.pending, None
        return held

    def after_error(self, error: BaseException) -> R | BaseException | None:
        """The driver raised: the app gets the final response, the original's own exception
        unchanged, or the library-typed rejection; if our machinery failed, the real
        outcome so far. None: nothing was sent yet, call the original."""
        site = self.adapter.site
        if isinstance(error, RetryableStatusError):
            response: R = error.response
            if self.pending is response:
                self.pending = None  # the app's now: not ours to close
            return response
        if error is self.raised or not isinstance(error, Exception):
            return error  # the original's own failure, or cancellation: never ours to eat
        if isinstance(error, CircuitOpenError) and self.calls == 0:
            try:
                return self.adapter.rejected(error)
            except Exception as failure:
                report_internal_error(f"{site}: rejection", failure)
                return error
        report_internal_error(f"{site}: recovery", error)
        return self.real_outcome(error)

    def after_result(self, result: Any) -> R | None:
        """The driver returned: the original's response, or a fallback value to wrap. If the
        fallback cannot be built, the real outcome stands; None: call the original."""
        if self.succeeded:
            response: R = result
            return response
        try:
            return self.adapter.fallback(result)
        except Exception as error:
            report_internal_error(f"{self.adapter.site}: building the fallback response", error)
        outcome = self.real_outcome(None)
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome

    def real_outcome(self, error: BaseException | None) -> R | BaseException | None:
        if self.calls == 0:
            return None
        held = self.take_pending()
        if held is not None:
            return held
        if self.succeeded:
            return self.returned
        return self.raised if self.raised is not None else error


def run_sync(
    policy: RecoveryPolicy, send: Callable[[], R], call: HttpCall, adapter: Adapter[R]
) -> R:
    """Run ``send`` under ``policy``, retrying exceptions and retryable responses."""
    attempts = _Attempts(call, adapter)

    def attempt() -> R:
        if attempts.calls:
            _close(adapter, attempts.take_pending())
            _before_resend()
        attempts.calls += 1
        try:
            response = send()
        except BaseException as error:
            attempts.raised = error
            raise
        return attempts.check(response)

    try:
        result: Any = policy.call(attempt)
    except BaseException as error:
        outcome = attempts.after_error(error)
    else:
        outcome = attempts.after_result(result)
    _close(adapter, attempts.take_pending(), keep=outcome)
    if outcome is None:
        return send()  # our machinery failed before anything was sent
    if isinstance(outcome, BaseException):
        raise outcome  # outside any handler: the original's own exception stays unchanged
    return outcome


async def run_async(
    policy: RecoveryPolicy, send: Callable[[], Awaitable[R]], call: HttpCall, adapter: Adapter[R]
) -> R:
    """The asyncio twin of :func:`run_sync`."""
    attempts = _Attempts(call, adapter)

    async def attempt() -> R:
        if attempts.calls:
            await _aclose(adapter, attempts.take_pending())
            _before_resend()
        attempts.calls += 1
        try:
            response = await send()
        except BaseException as error:
            attempts.raised = error
            raise
        return attempts.check(response)

    try:
        result: Any = await policy.acall(attempt)
    except BaseException as error:  # includes cancellation during a backoff sleep
        outcome = attempts.after_error(error)
    else:
        outcome = attempts.after_result(result)
    await _aclose(adapter, attempts.take_pending(), keep=outcome)
    if outcome is None:
        return await send()
    if isinstance(outcome, BaseException):
        raise outcome
    return outcome


def _close(adapter: Adapter[R], response: R | None, keep: object = None) -> None:
    if response is None or response is keep:
        return
    try:
        adapter.close(response)
    except Exception as error:
        report_internal_error(f"{adapter.site}: closing a retried response", error)


async def _aclose(adapter: Adapter[R], response: R | None, keep: object = None) -> None:
    if response is None or response is keep:
        return
    try:
        result = adapter.close(response)
        if inspect.isawaitable(result):
            await result
    except Exception as error:
        report_internal_error(f"{adapter.site}: closing a retried response", error)
