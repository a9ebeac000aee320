"""What the three HTTP instrumentors share: which requests may be repeated, and retrying on
*responses* as well as on exceptions (the per-request layer that does it is
:mod:`._http_layer`).

HTTP client libraries do not raise on a 503 or a 429: the failure arrives as an ordinary
response. The engine only knows exceptions, so each attempt runs through
:meth:`~._http_site.HttpSite.attempt`, which turns a response with a status in
``http_retry_statuses`` into :class:`RetryableStatusError`, an internal signal carrying the
response, its status and headers (so the classifier reads ``Retry-After``). The engine then
classifies, records, backs off and retries like any failure. Before the next attempt the
held response is closed, so no connection leaks. When the engine gives up, the signal comes
back out of the driver and the layer returns the final response unchanged: the application
sees exactly what it would have seen without us, never an exception of ours. The recovery
span's ``error.type`` is then the status code (``"503"``), as the HTTP conventions ask,
because :class:`ResponseClassifier` classifies the signal by status.

A wrapper error must never break the application, so the layers plan the call (parse the
URL, pick the policy) under ``try`` and call the original untouched if planning fails; once
the original has been called, an internal error may only surface the original's own outcome.
"""

from __future__ import annotations

import functools
import ipaddress
import json
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, replace
from typing import Any, TypeVar
from urllib.parse import urlsplit

from otel_recovery._clock import Clock
from otel_recovery._forksafe import new_lock
from otel_recovery._retry_after import header
from otel_recovery.classify import (
    Classifier,
    ErrorCategory,
    ErrorInfo,
    classify_on,
    get_default_classifier,
)
from otel_recovery.instrumentors._target_retries import NeverRan
from otel_recovery.instrumentors._targets import TargetPolicies
from otel_recovery.instrumentors._wrapping import report_internal_error
from otel_recovery.recover import RecoveryPolicy

__all__ = [
    "FALLBACK_HEADER",
    "IDEMPOTENCY_KEY",
    "HttpCall",
    "ResponseClassifier",
    "RetryableStatusError",
    "before_resend",
    "fallback_body",
    "has_header",
    "install_resend_count",
    "one_shot",
    "plan_call",
    "replayable_data",
    "status_of",
    "server_of_url",
    "target_of",
]

R = TypeVar("R")

IDEMPOTENCY_KEY = "Idempotency-Key"
FALLBACK_HEADER = "X-OTel-Recovery-Fallback"
"""Set on a response synthesised from a configured ``fallback_value``, so it can be told apart."""

_DEFAULT_PORTS = {"http": 80, "https": 443, "ws": 80, "wss": 443}
_WHOLE_BODIES = (str, bytes, bytearray)
_FORM_VALUES = (str, bytes, bytearray, int, float)


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
    the built-in table says otherwise (the setting is the user's explicit choice), and
    counts against the host's breaker even where the table calls it an answer (a 401).
    ``clock`` dates HTTP-date ``Retry-After`` values (the instrumentor's clock, for tests).
    """

    def __init__(self, clock: Clock | None = None) -> None:
        super().__init__(clock=clock)

    def classify(
        self,
        exc: BaseException,
        context: Mapping[str, Any] | None = None,
        *,
        clock: Clock | None = None,
    ) -> ErrorInfo:
        default = get_default_classifier()
        clock = clock or self.clock
        if isinstance(exc, RetryableStatusError):
            info = default.classify_status(exc.status_code, exc.headers, clock=clock)
            if info.retryable:
                return info
            # Listed although the table calls it an answer (a 401, a 409): the user says
            # this server fails with it, so it is transient, and the breaker counts it.
            return replace(info, retryable=True, category=ErrorCategory.TRANSIENT)
        return classify_on(default, exc, context, clock)


@dataclass(frozen=True, slots=True)
class HttpCall:
    """How to run one request: its policy and which response statuses count as failures."""

    policy: RecoveryPolicy
    statuses: frozenset[int]
    header_dependent: bool = False
    """Whether an ``Idempotency-Key`` header could change the answer (a replayable request
    whose method alone may not be retried): such a plan is never reused for another
    request of the same method and URL, whose headers may differ."""


def target_of(scheme: str, host: str | None, port: int | None) -> tuple[str, int | None] | None:
    """``(host, port)`` with the scheme's default port; None when there is no host. An
    IPv6 literal in its compressed spelling, as the policy file's keys are: ``[::1]`` and
    ``[0:0:0:0:0:0:0:1]`` are one server, one breaker, one section."""
    if not host:
        return None
    host = host.lower()
    if ":" in host:
        host = _compressed(host)
    return host, port if port is not None else _DEFAULT_PORTS.get(scheme.lower())


@functools.lru_cache(maxsize=256)
def _compressed(host: str) -> str:
    bracketed = host.startswith("[") and host.endswith("]")
    address, percent, zone = (host[1:-1] if bracketed else host).partition("%")
    try:
        text = str(ipaddress.IPv6Address(address)) + percent + zone
    except ValueError:
        return host
    return f"[{text}]" if bracketed else text


def server_of_url(url: object) -> tuple[str, int | None] | None:
    """:func:`target_of` an absolute URL of any library (``str()`` of an ``httpx.URL``, a
    ``yarl.URL`` or requests' ``str`` is the URL); None for a URL that names no host or
    cannot be read. For the failure path (:mod:`._elsewhere`), not the per-request one."""
    try:
        parts = urlsplit(str(url))
        return target_of(parts.scheme, parts.hostname, parts.port)
    except (ValueError, TypeError):  # a port that is not a number, an odd object
        return None


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

    Strings and bytes can, and so can a form (a mapping, or a list of name-value pairs)
    whose values are strings, bytes or numbers, or lists of them. Streams, generators,
    iterators and file objects are consumed by the first attempt, and so is a form that
    holds one (``data={"file": open(...)}``: aiohttp uploads it as multipart, requests
    iterates it), so repeating would send an empty or truncated body.
    """
    if data is None or isinstance(data, _WHOLE_BODIES):
        return True
    if isinstance(data, Mapping):
        values: Iterable[object] = data.values()
    elif isinstance(data, (list, tuple)):
        if not all(isinstance(pair, (list, tuple)) and len(pair) == 2 for pair in data):
            return False
        values = (pair[1] for pair in data)
    else:
        return False
    return all(_replayable_field(value) for value in values)


def one_shot(options: Mapping[str, object]) -> bool:
    """Whether a request option is an iterator (a generator, ``zip(...)``, a file): the
    first attempt consumes it, and a resend would go without it (``params=zip(names,
    values)``: a GET without its query string, answered for another resource). Such a
    request is sent once, as one with a streamed body is."""
    return any(isinstance(value, Iterator) for value in options.values())


def _replayable_field(value: object) -> bool:
    if value is None or isinstance(value, _FORM_VALUES):
        return True
    return isinstance(value, (list, tuple)) and all(
        item is None or isinstance(item, _FORM_VALUES) for item in value
    )


_READ_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "TRACE"})
"""Methods that only read: a fallback set for a host or the service answers their failures.
A PUT or a DELETE may be repeated, but a fallback would make a failed one look done."""

_NOT_SAFE = "non_idempotent_method"
_NOT_REPLAYABLE = "non_replayable_body"
"""Why a request is not retried, on its failure's trace (``otel_recovery.retry.disallowed``):
its method without an ``Idempotency-Key``, or a body the first attempt consumed."""


def plan_call(
    targets: TargetPolicies,
    method: str,
    host: str,
    port: int | None,
    path: str,
    *,
    has_key: Callable[[], bool],
    replayable: bool,
    unsent: NeverRan,
) -> HttpCall:
    """The policy for one request, applying the idempotency rules of DESIGN.md section 5.

    Retried: a replayable request whose method is in ``http_retry_methods``, or that carries
    an ``Idempotency-Key`` (unless ``http_retry_idempotency_key`` is off). Anything else runs
    under the same breaker and is sent again only after a failure ``unsent`` (the client
    library's) says kept it from leaving the client, a connection that could not be made
    (unless ``http_retry_unsent`` is off), as urllib3 repeats connect errors for any method;
    any other failure is classified, recorded and returned/re-raised. ``has_key`` looks for
    the header; it is only asked when the answer depends on it (a GET is retried whatever
    its headers).
    """
    method = method.upper()
    settings = targets.settings
    operation = None  # only per-operation sections need it: skip the string otherwise
    if settings.targets:
        operation = f"{method} {path or '/'}"
        settings = settings.for_target(host, port, operation)
    by_method = method in settings.http_retry_methods
    header_dependent = replayable and not by_method and settings.http_retry_idempotency_key
    retry_allowed = (replayable and by_method) or (header_dependent and has_key())
    never_ran = unsent if replayable and settings.http_retry_unsent else None
    disallowed = None if retry_allowed else _NOT_REPLAYABLE if not replayable else _NOT_SAFE
    policy = targets.policy_for(
        host,
        port,
        operation,
        retry_allowed=retry_allowed,
        disallowed=disallowed,
        never_ran=never_ran,
        reads=method in _READ_METHODS,
    )
    return HttpCall(policy, settings.http_retry_statuses, header_dependent)


def fallback_body(value: Any) -> tuple[bytes, str]:
    """The body and content type of a response answering with a configured fallback value:
    bytes as-is, text as text, anything else as JSON (``fallback_value = []`` reads as ``[]``).
    """
    if isinstance(value, (bytes, bytearray)):
        return bytes(value), "application/octet-stream"
    if isinstance(value, str):
        return value.encode("utf-8"), "text/plain; charset=utf-8"
    return json.dumps(value).encode("utf-8"), "application/json"


_resend_waiting: list[Any] = []
"""Tracer providers to get the resend-count processor at the first resend (None: the
global provider, whichever it is by then). Changed in place, under ``_resend_lock``."""
_resend_lock = new_lock()


def install_resend_count(kwargs: Mapping[str, Any]) -> None:
    """Stamp ``http.request.resend_count`` on contrib's client spans of resends.

    The processor joins the tracer provider (the one given to ``instrument()``, else the
    global one) just before the first resend, not now: until then it would only cost every
    span of the process three calls for nothing. That also covers a program that sets the
    SDK provider up after ``instrument()``. Without the SDK (API-only installs) there is
    nothing to stamp.
    """
    provider = kwargs.get("tracer_provider")
    with _resend_lock:
        if provider not in _resend_waiting:
            _resend_waiting.append(provider)


def _install_resend(provider: Any = None) -> bool:
    try:
        from opentelemetry import trace

        from otel_recovery.instrumentors._resend import install_resend_processor
    except ImportError:
        return False
    return install_resend_processor(provider or trace.get_tracer_provider())


def before_resend() -> None:
    """Slow path only (a resend is about to start): install the processor where it waits.

    A provider given explicitly that cannot take processors never will; the global one may
    still be the API's proxy and is tried again at the next resend.
    """
    if not _resend_waiting:
        return
    try:
        with _resend_lock:  # an instrument() appending meanwhile must not be lost
            waiting = _resend_waiting
            waiting[:] = [p for p in waiting if not _install_resend(p) and p is None]
    except Exception as error:  # never worth failing a request over
        report_internal_error("http: resend count", error)


def status_of(response: Any, attribute: str) -> int | None:
    status = getattr(response, attribute, None)
    return status if isinstance(status, int) and not isinstance(status, bool) else None
