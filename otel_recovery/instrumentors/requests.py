"""Inline recovery for ``requests``: ``Session.request`` is wrapped, above contrib's ``send``.

The contrib instrumentation replaces ``Session.send``; ``Session.request`` prepares the
request and calls ``self.send``, so wrapping ``request`` puts our retry loop *outside*
contrib whatever the load order: every attempt re-enters ``send`` and gets its own CLIENT
span, as the HTTP conventions ask, and resends carry ``http.request.resend_count``. Retrying
at this level also re-prepares the request each time (fresh auth headers, cookies, body).

What is retried, and how failing responses are returned unchanged, is shared with the other
HTTP instrumentors: see :mod:`otel_recovery.instrumentors._http`.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import urlsplit

import requests
from opentelemetry.instrumentation.utils import is_instrumentation_enabled
from requests.structures import CaseInsensitiveDict

from otel_recovery._clock import Clock
from otel_recovery.classify import Classifier
from otel_recovery.instrumentors._base import RecoveryInstrumentor
from otel_recovery.instrumentors._http import (
    FALLBACK_HEADER,
    IDEMPOTENCY_KEY,
    Adapter,
    HttpCall,
    ResponseClassifier,
    RetryableStatusError,
    fallback_body,
    has_header,
    install_resend_count,
    plan_call,
    replayable_data,
    run_sync,
    target_of,
)
from otel_recovery.instrumentors._targets import TargetPolicies
from otel_recovery.instrumentors._wrapping import PatchSet, report_internal_error
from otel_recovery.policies.circuit_breaker import CircuitOpenError

__all__ = ["RequestsCircuitOpenError", "RequestsRecoveryInstrumentor"]

_SITE = "requests"
_KEY = IDEMPOTENCY_KEY.lower()
# Session.request's parameters in order, to read positional arguments.
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
        patches.wrap(requests.sessions.Session, "request", _wrapper(targets))


def _wrapper(targets: TargetPolicies) -> Callable[..., Any]:
    def request(
        wrapped: Callable[..., Any], instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        if not is_instrumentation_enabled():  # the exporter's own traffic, or suppressed
            return wrapped(*args, **kwargs)
        try:
            planned = _plan(targets, instance, args, kwargs)
        except Exception as error:
            report_internal_error(f"{_SITE}: planning", error)
            planned = None
        if planned is None:
            return wrapped(*args, **kwargs)
        call, method, url = planned
        adapter = Adapter(
            _SITE, "status_code", _close, _rejected, lambda v: _fallback_response(v, method, url)
        )
        return run_sync(call.policy, lambda: wrapped(*args, **kwargs), call, adapter)

    return request


def _plan(
    targets: TargetPolicies, session: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> tuple[HttpCall, str, str] | None:
    bound = dict(zip(_PARAMS, args, strict=False))
    bound.update(kwargs)
    method, url = bound.get("method"), bound.get("url")
    if isinstance(method, bytes):
        method = method.decode("ascii")
    if isinstance(url, bytes):
        url = url.decode("utf-8")
    if not isinstance(method, str) or not isinstance(url, str):
        return None  # let requests report its own error
    where = _split(url)
    if where is None:
        return None
    host, port, path = where
    key = _has_key(bound.get("headers"), getattr(session, "headers", None))
    replayable = replayable_data(bound.get("data")) and _replayable_files(bound.get("files"))
    call = plan_call(targets, method, host, port, path, idempotency_key=key, replayable=replayable)
    return call, method.upper(), url


@functools.lru_cache(maxsize=1024)
def _split(url: str) -> tuple[str, int | None, str] | None:
    """``(host, port, path)`` of a URL; cached, as services call the same URLs over and over."""
    parts = urlsplit(url.strip())
    target = target_of(parts.scheme, parts.hostname, parts.port)
    return None if target is None else (*target, parts.path)


def _has_key(headers: object, session_headers: object) -> bool:
    """An ``Idempotency-Key`` on the request, or on the session unless the request removes
    it (requests drops a session header that the request sets to None)."""
    if isinstance(headers, Mapping) and headers:
        for name, value in headers.items():
            if isinstance(name, str) and name.lower() == _KEY:
                return value is not None
    if isinstance(session_headers, CaseInsensitiveDict):
        return IDEMPOTENCY_KEY in session_headers
    return has_header(session_headers, IDEMPOTENCY_KEY)


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


def _close(response: Any) -> None:
    response.close()


def _rejected(error: CircuitOpenError) -> BaseException:
    return RequestsCircuitOpenError(error.name, error.retry_after)


def _fallback_response(value: Any, method: str, url: str) -> Any:
    """A 200 response carrying the configured fallback value, marked with a header."""
    body, content_type = fallback_body(value)
    response = requests.models.Response()
    response.status_code = 200
    response.reason = "OK"
    response._content = body
    response.headers = CaseInsensitiveDict(
        {"Content-Type": content_type, "Content-Length": str(len(body)), FALLBACK_HEADER: "value"}
    )
    response.url = url
    response.encoding = "utf-8"
    with contextlib.suppress(Exception):  # an exotic URL: usable without a request
        response.request = requests.Request(method, url).prepare()
    return response
