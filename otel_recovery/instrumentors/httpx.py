"""Inline recovery for ``httpx``: ``Client.send`` and ``AsyncClient.send`` are wrapped.

The contrib instrumentation patches the transports (``HTTPTransport.handle_request`` and its
async twin), which ``send`` reaches through auth and redirect handling; wrapping ``send``
puts our retry loop *above* contrib whatever the load order, so every attempt gets its own
CLIENT span and resends carry ``http.request.resend_count``. ``send`` is also what
``get``/``post``/``request``/``stream`` all end in, so every way of issuing a request is
covered, including clients with custom transports or mounts that contrib cannot see.

A request is re-sent as the same ``httpx.Request`` object; only a body held in memory
(``httpx.ByteStream``: ``content=bytes``, ``data=``, ``json=``) is replayable. Streaming and
multipart bodies run once. What is retried, and how failing responses are returned
unchanged, is shared with the other HTTP instrumentors (:mod:`._http`).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import httpx
from opentelemetry.instrumentation.utils import is_instrumentation_enabled

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
    install_resend_count,
    plan_call,
    run_async,
    run_sync,
    target_of,
)
from otel_recovery.instrumentors._targets import TargetPolicies
from otel_recovery.instrumentors._wrapping import PatchSet, report_internal_error
from otel_recovery.policies.circuit_breaker import CircuitOpenError

__all__ = ["HTTPXCircuitOpenError", "HTTPXRecoveryInstrumentor"]

_SITE = "httpx"


class HTTPXCircuitOpenError(CircuitOpenError, httpx.ConnectError):
    """The target's circuit is open, so the request was not sent.

    Also an ``httpx.ConnectError`` (a ``TransportError``), so an application's existing
    ``except httpx.HTTPError`` / ``except httpx.TransportError`` handling covers it.
    """


class HTTPXRecoveryInstrumentor(RecoveryInstrumentor):
    """Retries, breaks circuits and falls back for every ``httpx`` client, sync and async."""

    library = "httpx"
    instruments = ("httpx >= 0.23",)
    span_mode = "own"
    fallback_on = (
        RetryableStatusError,
        CircuitOpenError,
        httpx.TimeoutException,
        httpx.NetworkError,
        httpx.RemoteProtocolError,
        httpx.ProxyError,
    )

    def _classifier(self, clock: Clock | None) -> Classifier | None:
        return ResponseClassifier(clock)

    def _install(self, patches: PatchSet, targets: TargetPolicies, kwargs: dict[str, Any]) -> None:
        install_resend_count(kwargs)
        patches.wrap(httpx.Client, "send", _sync_wrapper(targets))
        patches.wrap(httpx.AsyncClient, "send", _async_wrapper(targets))


def _sync_wrapper(targets: TargetPolicies) -> Callable[..., Any]:
    def send(
        wrapped: Callable[..., httpx.Response],
        instance: Any,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> httpx.Response:
        if not is_instrumentation_enabled():
            return wrapped(*args, **kwargs)
        planned = _safe_plan(targets, args, kwargs)
        if planned is None:
            return wrapped(*args, **kwargs)
        call, request = planned
        return run_sync(
            call.policy, lambda: wrapped(*args, **kwargs), call, _adapter(request, _close)
        )

    return send


def _async_wrapper(targets: TargetPolicies) -> Callable[..., Any]:
    async def send(
        wrapped: Callable[..., Awaitable[httpx.Response]],
        instance: Any,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> httpx.Response:
        if not is_instrumentation_enabled():
            return await wrapped(*args, **kwargs)
        planned = _safe_plan(targets, args, kwargs)
        if planned is None:
            return await wrapped(*args, **kwargs)
        call, request = planned
        return await run_async(
            call.policy, lambda: wrapped(*args, **kwargs), call, _adapter(request, _aclose)
        )

    return send


def _safe_plan(
    targets: TargetPolicies, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> tuple[HttpCall, httpx.Request] | None:
    """The plan, or None to call the original untouched (also when planning itself fails)."""
    try:
        request = args[0] if args else kwargs.get("request")
        if not isinstance(request, httpx.Request):
            return None
        url = request.url
        target = target_of(url.scheme, url.host, url.port)
        if target is None:
            return None
        call = plan_call(
            targets,
            request.method,
            *target,
            url.path,
            idempotency_key=IDEMPOTENCY_KEY in request.headers,
            replayable=isinstance(request.stream, httpx.ByteStream),
        )
    except Exception as error:
        report_internal_error(f"{_SITE}: planning", error)
        return None
    return call, request


def _adapter(
    request: httpx.Request, close: Callable[[httpx.Response], object]
) -> Adapter[httpx.Response]:
    return Adapter(
        _SITE,
        "status_code",
        close,
        lambda error: _rejected(error, request),
        lambda value: _fallback_response(value, request),
    )


def _close(response: httpx.Response) -> None:
    response.close()


def _aclose(response: httpx.Response) -> Awaitable[None]:
    return response.aclose()


def _rejected(error: CircuitOpenError, request: httpx.Request) -> BaseException:
    rejection = HTTPXCircuitOpenError(error.name, error.retry_after)
    rejection.request = request
    return rejection


def _fallback_response(value: Any, request: httpx.Request) -> httpx.Response:
    """A 200 response carrying the configured fallback value, marked with a header."""
    body, content_type = fallback_body(value)
    return httpx.Response(
        200,
        headers={"Content-Type": content_type, FALLBACK_HEADER: "value"},
        content=body,
        request=request,
    )
