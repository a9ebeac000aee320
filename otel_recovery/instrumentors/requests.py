"""Inline recovery for ``requests``: ``Session.request`` is wrapped, above contrib's ``send``.

The contrib instrumentation replaces ``Session.send``; ``Session.request`` prepares the
request and calls ``self.send``, so wrapping ``request`` puts our retry loop *outside*
contrib whatever the load order: every attempt re-enters ``send`` and gets its own CLIENT
span, as the HTTP conventions ask, and resends carry ``http.request.resend_count``. Retrying
at this level also re-prepares the request each time (fresh auth headers, cookies, body).

What is retried, and how failing responses are returned unchanged, is shared with the other
HTTP instrumentors: see :mod:`otel_recovery.instrumentors._http`. A failure that urllib3's
``Retry`` (an adapter's ``max_retries``) already repeated is not repeated again: see
:mod:`otel_recovery.instrumentors._client_retries`.
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import io
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

import requests
import urllib3
from requests.exceptions import RequestException
from requests.structures import CaseInsensitiveDict
from urllib3.exceptions import (
    ConnectTimeoutError,
    MaxRetryError,
    NewConnectionError,
    ResponseError,
)
from urllib3.util.retry import Retry

from otel_recovery._clock import Clock
from otel_recovery.classify import Classifier
from otel_recovery.instrumentors._base import RecoveryInstrumentor
from otel_recovery.instrumentors._elsewhere import Server
from otel_recovery.instrumentors._http import (
    FALLBACK_HEADER,
    IDEMPOTENCY_KEY,
    ResponseClassifier,
    RetryableStatusError,
    fallback_body,
    install_resend_count,
    one_shot,
    plan_call,
    replayable_data,
    server_of_url,
    target_of,
)
from otel_recovery.instrumentors._http_layer import CompiledShapes, sync_layer
from otel_recovery.instrumentors._http_plans import HttpPlan, HttpPlans
from otel_recovery.instrumentors._http_site import HttpSite
from otel_recovery.instrumentors._targets import TargetPolicies
from otel_recovery.instrumentors._unsent import original_code, sending_frames, sources
from otel_recovery.instrumentors._wrapping import PatchSet
from otel_recovery.policies.circuit_breaker import CircuitOpenError

__all__ = ["RequestsCircuitOpenError", "RequestsRecoveryInstrumentor"]

_KEY = IDEMPOTENCY_KEY.lower()
_KEY_BYTES = _KEY.encode("ascii")
# Session.request's parameters in order (after self), to read positional arguments.
_PARAMS = ("method", "url", "params", "data", "headers", "cookies", "files", "auth", "timeout")


class RequestsCircuitOpenError(CircuitOpenError, requests.exceptions.ConnectionError):
    """The target's circuit is open, so the request was not sent.

    Also a ``requests.ConnectionError``, so an application's existing
    ``except requests.RequestException`` handling covers it without knowing about us.
    """


class RequestsRecoveryInstrumentor(RecoveryInstrumentor):
    """Retries, breaks circuits and falls back for every ``requests`` session."""

    library = "requests"
    instruments = ("requests >= 2.25",)
    span_mode = "own"
    fallback_is_a_body = True
    fallback_on = (
        RetryableStatusError,
        CircuitOpenError,
        requests.exceptions.ConnectionError,
        requests.exceptions.Timeout,
    )

    def _classifier(self, clock: Clock | None) -> Classifier | None:
        return ResponseClassifier(clock)

    def _install(self, patches: PatchSet, targets: TargetPolicies, kwargs: dict[str, Any]) -> None:
        install_resend_count(kwargs)
        plans = HttpPlans(targets)
        plan_of = _Planner(plans).plan
        # the planner's own rule: without data/files, (method, url) decides the plan
        compiled = CompiledShapes(plans.by_url, body_names=("data", "files"))
        build = sync_layer(patches, _Site, plan_of, compiled)
        patches.layer(requests.sessions.Session, "request", build)


class _Site(HttpSite[requests.Response]):
    site = "requests"
    status_attribute = "status_code"

    def close(self, response: requests.Response) -> None:
        response.close()

    def retried_status(self, response: requests.Response) -> int:
        # requests hands urllib3 the adapter's ``max_retries`` and records the adapter on
        # the response it builds (``response.connection``).
        retry = _urllib3_retry(getattr(response, "connection", None))
        request = response.request
        if retry is None or request is None or request.method is None:
            return 0
        retry_after = bool(response.headers.get("Retry-After"))  # as urllib3 reads it
        if not retry.is_retry(request.method, response.status_code, retry_after):
            return 0
        return _repeats(retry, request.method, request.url, response=response.raw)

    def retried_error(self, error: Exception, args: tuple[Any, ...], kwargs: dict[str, Any]) -> int:
        # requests raises urllib3's MaxRetryError wrapped, once urllib3's Retry gave up on it;
        # whether it repeated the failure before giving up is the adapter's Retry's to say.
        exhausted = error.args[0] if isinstance(error, RequestException) and error.args else None
        request = getattr(error, "request", None)
        if not isinstance(exhausted, MaxRetryError) or request is None or not args:
            return 0
        session = args[0]
        if not isinstance(session, requests.Session) or not request.url or not request.method:
            return 0
        retry = _urllib3_retry(session.get_adapter(request.url))
        if retry is None:
            return 0
        reason = exhausted.reason
        if isinstance(reason, ResponseError):  # statuses (``raise_on_status``): a RetryError
            answered = _Answered.of(reason)
            if answered is None:
                return 0
            return _repeats(retry, request.method, request.url, response=answered)
        return _repeats(retry, request.method, request.url, error=reason)

    def asked(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Server | None:
        target = _method_and_url(_bind(args, kwargs))
        if target is None:
            return None
        prepared = requests.PreparedRequest()  # as requests names the host (IDNA, case)
        prepared.prepare_url(target[1], None)
        return server_of_url(prepared.url)

    def failed_at(self, error: Exception) -> Server | None:
        # requests' errors carry the request that failed (a redirect's, once one was made)
        url = getattr(getattr(error, "request", None), "url", None)
        return server_of_url(url) if url else None

    def rejected(
        self, error: CircuitOpenError, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> BaseException:
        rejection = RequestsCircuitOpenError(error.name, error.retry_after)
        target = _method_and_url(_bind(args, kwargs))
        if target is not None:  # as requests' own ConnectionError carries it
            with contextlib.suppress(Exception):  # a request we cannot rebuild: None, as before
                rejection.request = requests.Request(target[0].upper(), target[1]).prepare()
        return rejection

    def fallback(
        self, value: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> requests.Response:
        target = _method_and_url(_bind(args, kwargs))
        if target is None:  # cannot happen: the request was planned
            raise ValueError("no method and URL to answer for")
        return _fallback_response(value, target[0].upper(), target[1])


class _Planner:
    """Finds the plan of a ``Session.request`` call.

    ``session.get(url)`` and friends call ``request(self, "GET", url, **options)``, and
    ``requests.get(url)`` calls ``session.request(method=..., url=...)``: without a body to
    judge (no ``data``/``files``; ``json=`` is always replayable), the method and URL as
    passed decide the plan unless an ``Idempotency-Key`` could matter, so it is remembered
    under them (:meth:`HttpPlans.recall`) and found again with one dictionary lookup.
    Anything else is planned afresh.
    """

    def __init__(self, plans: HttpPlans) -> None:
        self.plans = plans
        self.by_url = plans.by_url

    def plan(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> HttpPlan | None:
        if (
            ("data" in kwargs and kwargs["data"] is not None)
            or ("files" in kwargs and kwargs["files"] is not None)
            or (kwargs and one_shot(kwargs))
        ):  # a body to judge (session.post passes data=None), or an option sent once
            return self._plan(args, kwargs, None)
        count = len(args)
        if count == 3:  # session.get(url) and friends
            url, method = args[2], args[1]
        elif count == 1:  # requests.get(url)
            url, method = kwargs.get("url"), kwargs.get("method")
        else:
            return self._plan(args, kwargs, None)
        try:
            entry = self.by_url.get(url)
        except TypeError:  # an unhashable URL: requests will judge it
            return self._plan(args, kwargs, None)
        if entry is not None:
            if entry[0] is method:  # the usual case (HttpPlans.plan_in does the rest)
                plan: HttpPlan = entry[1]
                return plan
            found = self.plans.plan_in(entry, method)
            if found is not None:
                return found
        return self._plan(args, kwargs, (url, method))

    def _plan(
        self, args: tuple[Any, ...], kwargs: dict[str, Any], shape: tuple[Any, Any] | None
    ) -> HttpPlan | None:
        """Plan afresh; remember the plan under ``shape`` (URL, method) unless it is None."""
        bound = _bind(args, kwargs)
        target = _method_and_url(bound)
        where = None if target is None else _split(target[1])
        if target is None or where is None:
            return None  # let requests report its own error
        host, port, path = where
        session_headers = getattr(args[0], "headers", None) if args else None
        call = plan_call(
            self.plans.targets,
            target[0],
            host,
            port,
            path,
            has_key=lambda: _has_key(bound.get("headers"), session_headers),
            replayable=(
                replayable_data(bound.get("data"))
                and _replayable_files(bound.get("files"))
                and not one_shot(bound)
            ),
            unsent=_unsent,
        )
        plan = self.plans.compile(call)
        if shape is not None:
            self.plans.remember_by_url(*shape, plan)
        return plan


_LIBRARIES = sources(requests, urllib3)
_ENTRY = original_code(requests.Session, "request", _LIBRARIES)
"""requests' own ``Session.request``, the function our layer calls."""
_INCREMENT = original_code(Retry, "increment", _LIBRARIES)
"""Where urllib3 gives up (``MaxRetryError``), with the history of every try it made."""
_AFTER_A_RESPONSE = frozenset(
    {
        requests.sessions.SessionRedirectMixin.resolve_redirects.__code__,
        requests.hooks.dispatch_hook.__code__,
    }
)
"""Where requests sends again after a response: a redirect, or a response hook (digest
auth's answer to a 401 and any hook of the application's)."""
_NOT_CONNECTED = (NewConnectionError, ConnectTimeoutError)


def _unsent(error: BaseException) -> bool:
    """Whether the request never left the client: its connection could not be made
    (refused, unreachable, a name that did not resolve, a connect timeout) at every try
    urllib3 made, and it was the call's first request, sent by requests and urllib3
    alone (see :mod:`._unsent`).

    requests raises those as ``ConnectTimeout``, or as a ``ConnectionError`` around
    urllib3's ``MaxRetryError`` whose reason is a ``NewConnectionError``: urllib3 makes a
    new connection before it writes the request. That reason is only the last try's: an
    adapter's ``Retry`` may have sent it before (after a read error, a status, an SSL
    error), so every try in its history must have failed to connect. Any other connection
    error (a reset, a keep-alive connection the server had closed), a proxy's and a TLS
    one may come after the request was written."""
    if isinstance(error, CircuitOpenError) or not isinstance(
        error, requests.exceptions.ConnectionError
    ):
        return False
    if isinstance(error, (requests.exceptions.ProxyError, requests.exceptions.SSLError)):
        return False
    exhausted = error.args[0] if error.args else None
    if not isinstance(exhausted, MaxRetryError):
        return False
    if sending_frames(error, _ENTRY, _LIBRARIES, _AFTER_A_RESPONSE) is None:
        return False
    tries = sending_frames(exhausted, _INCREMENT, _LIBRARIES)  # caught by requests
    history = tries[0].f_locals.get("history") if tries else None
    return (
        isinstance(history, tuple)
        and bool(history)
        and all(isinstance(getattr(step, "error", None), _NOT_CONNECTED) for step in history)
    )


def _urllib3_retry(adapter: object) -> Retry | None:
    """The urllib3 ``Retry`` an adapter sends with (its ``max_retries``); None for an
    adapter of another kind."""
    retry = getattr(adapter, "max_retries", None)
    return retry if isinstance(retry, Retry) else None


class _Answered:
    """What ``Retry.increment`` reads of a response (its status, no redirect), rebuilt from
    the ``ResponseError`` urllib3 raised once the status had been repeated enough
    ("too many 503 error responses"): a ``RetryError`` keeps no response."""

    __slots__ = ("status",)

    def __init__(self, status: int) -> None:
        self.status = status

    @classmethod
    def of(cls, reason: ResponseError) -> _Answered | None:
        words = str(reason).split()
        if len(words) > 2 and words[:2] == ["too", "many"] and words[2].isdigit():
            return cls(int(words[2]))
        return None

    def get_redirect_location(self) -> bool:
        return False


_MOST_REPEATS = 100
"""Where counting a ``Retry``'s repeats stops (one without any limit never runs out)."""


def _repeats(retry: Retry, method: str, url: str | None, **failure: Any) -> int:
    """How many times ``retry`` sends a request again after ``failure`` (urllib3's
    ``increment`` arguments: ``error=`` or ``response=``), by asking it as urllib3 does,
    from the start: ``increment`` is pure and raises once the request may not be repeated."""
    repeats = 0
    while repeats < _MOST_REPEATS:
        try:
            retry = retry.increment(method, url, **failure)
        except Exception:  # MaxRetryError, or the failure itself: not (again)
            break
        repeats += 1
    return repeats


def _bind(args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
    """``Session.request``'s arguments by name (``args[0]`` is the session)."""
    bound = dict(zip(_PARAMS, args[1:], strict=False))
    bound.update(kwargs)
    return bound


def _method_and_url(bound: Mapping[str, Any]) -> tuple[str, str] | None:
    """The method and URL as text (requests takes bytes too); None if either is neither."""
    method, url = bound.get("method"), bound.get("url")
    if isinstance(method, bytes):
        method = method.decode("ascii")
    if isinstance(url, bytes):
        url = url.decode("utf-8")
    if not isinstance(method, str) or not isinstance(url, str):
        return None
    return method, url


@functools.lru_cache(maxsize=1024)
def _split(url: str) -> tuple[str, int | None, str] | None:
    """``(host, port, path)`` of a URL; cached, as services call the same URLs over and over.
    None for a URL that cannot be read (``http://[::1/x``, port 99999): the application's
    mistake, which requests reports in its own words; not an internal error of ours."""
    try:
        parts = urlsplit(url.strip())
        target = target_of(parts.scheme, parts.hostname, parts.port)
    except ValueError:
        return None
    return None if target is None else (*target, parts.path)


def _has_key(headers: object, session_headers: object) -> bool:
    """Whether requests will send an ``Idempotency-Key``: on the request, or on the session
    unless the request removes it (requests drops a session header that the request sets
    to None).

    Names and values may be str or bytes (``{b"Idempotency-Key": b"k"}`` is sent like its
    str spelling). requests merges the session's headers with the request's by
    ``name.lower()``, so a str and a bytes name are two headers: a None under one removes
    only the session's header spelt the same way, and the other is still sent.
    """
    merged = _keys_in(session_headers)
    merged.update(_keys_in(headers))
    return any(value is not None for value in merged.values())


def _keys_in(headers: object) -> dict[type, object]:
    """The value each spelling of the key (str, bytes; any case) last has in ``headers``,
    as requests' merge leaves it. Nothing for headers that are not a mapping: requests
    ignores such session headers, and fails on such request headers itself."""
    found: dict[type, object] = {}
    if isinstance(headers, Mapping) and headers:
        for name, value in headers.items():
            if isinstance(name, str) and name.lower() == _KEY:
                found[str] = value
            elif isinstance(name, bytes) and name.lower() == _KEY_BYTES:
                found[bytes] = value
    return found


def _replayable_files(files: object) -> bool:
    """``files=`` entries are ``content`` or ``(filename, content[, type[, headers]])``; file
    objects are read by the first attempt and would upload nothing the second time."""
    if files is None:
        return True
    if isinstance(files, Mapping):
        values = list(files.values())
    elif isinstance(files, (list, tuple)):
        values = [entry[1] if isinstance(entry, (list, tuple)) else entry for entry in files]
    else:
        return False
    for value in values:
        content = value[1] if isinstance(value, (list, tuple)) and len(value) > 1 else value
        if not isinstance(content, (str, bytes, bytearray)):
            return False
    return True


def _fallback_response(value: Any, method: str, url: str) -> requests.Response:
    """A 200 response carrying the configured fallback value, marked with a header."""
    body, content_type = fallback_body(value)
    response = requests.models.Response()
    response.status_code = 200
    response.reason = "OK"
    response._content = body
    response._content_consumed = True  # iter_content / iter_lines serve _content
    response.raw = io.BytesIO(body)  # for code that reads the raw stream itself
    response.elapsed = datetime.timedelta(0)
    response.headers = CaseInsensitiveDict(
        {"Content-Type": content_type, "Content-Length": str(len(body)), FALLBACK_HEADER: "value"}
    )
    response.url = url
    response.encoding = "utf-8"
    with contextlib.suppress(Exception):  # an exotic URL: usable without a request
        response.request = requests.Request(method, url).prepare()
    return response
