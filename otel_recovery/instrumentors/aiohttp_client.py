"""Inline recovery for the ``aiohttp`` client: ``ClientSession._request`` is wrapped.

``session.get()``/``post()``/``request()`` all return ``_RequestContextManager(self._request(
...))``, so ``_request`` is the one coroutine every request runs through (private, but
stable across aiohttp 3.x). The contrib instrumentation hooks ``ClientSession.__init__`` to
add a ``TraceConfig`` whose signals fire once per ``_request`` call, so retrying ``_request``
gives every attempt its own CLIENT span, whatever the load order, and resends carry
``http.request.resend_count``.

Only bodies held in memory (``data=`` str/bytes/dict/pairs, ``json=``) are replayable;
streams, async generators, file objects and ``FormData`` run once. With
``raise_for_status=True`` a retryable status arrives as ``ClientResponseError``, which the
classifier reads like the response itself. The shared rules live in :mod:`._http`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
from aiohttp.helpers import TimerNoop
from multidict import CIMultiDict, CIMultiDictProxy
from opentelemetry.instrumentation.utils import is_instrumentation_enabled
from yarl import URL

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
    run_async,
    target_of,
)
from otel_recovery.instrumentors._targets import TargetPolicies
from otel_recovery.instrumentors._wrapping import PatchSet, report_internal_error
from otel_recovery.policies.circuit_breaker import CircuitOpenError

__all__ = ["AioHttpCircuitOpenError", "AioHttpClientRecoveryInstrumentor"]

_SITE = "aiohttp"


class AioHttpCircuitOpenError(CircuitOpenError, aiohttp.ClientConnectionError):
    """The target's circuit is open, so the request was not sent.

    Also an ``aiohttp.ClientConnectionError``, so an application's existing
    ``except aiohttp.ClientError`` handling covers it.
    """


class AioHttpClientRecoveryInstrumentor(RecoveryInstrumentor):
    """Retries, breaks circuits and falls back for every ``aiohttp.ClientSession``."""

    library = "aiohttp"
    instruments = ("aiohttp >= 3.8",)
    span_mode = "own"
    fallback_on = (
        RetryableStatusError,
        CircuitOpenError,
        aiohttp.ClientConnectionError,
        asyncio.TimeoutError,
    )

    def _classifier(self, clock: Clock | None) -> Classifier | None:
        return ResponseClassifier(clock)

    def _install(self, patches: PatchSet, targets: TargetPolicies, kwargs: dict[str, Any]) -> None:
        install_resend_count(kwargs)
        patches.wrap(aiohttp.ClientSession, "_request", _wrapper(targets))


def _wrapper(targets: TargetPolicies) -> Callable[..., Any]:
    async def request(
        wrapped: Callable[..., Awaitable[aiohttp.ClientResponse]],
        instance: Any,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> aiohttp.ClientResponse:
        if not is_instrumentation_enabled():
            return await wrapped(*args, **kwargs)
        planned = _safe_plan(targets, instance, args, kwargs)
        if planned is None:
            return await wrapped(*args, **kwargs)
        call, method, url = planned
        adapter = Adapter(
            _SITE, "status", _release, _rejected, lambda v: _fallback_response(v, method, url)
        )
        return await run_async(call.policy, lambda: wrapped(*args, **kwargs), call, adapter)

    return request


def _safe_plan(
    targets: TargetPolicies, session: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> tuple[HttpCall, str, URL] | None:
    """The plan, or None to call the original untouched (also when planning itself fails)."""
    try:
        method = args[0] if args else kwargs.get("method")
        raw = args[1] if len(args) > 1 else kwargs.get("str_or_url")
        if not isinstance(method, str) or raw is None:
            return None
        url = raw if isinstance(raw, URL) else URL(str(raw))
        base = getattr(session, "_base_url", None)
        if not url.is_absolute() and isinstance(base, URL):
            url = base.join(url)
        target = target_of(url.scheme, url.host, url.port)
        if target is None:
            return None
        key = has_header(kwargs.get("headers"), IDEMPOTENCY_KEY) or has_header(
            getattr(session, "headers", None), IDEMPOTENCY_KEY
        )
        call = plan_call(
            targets,
            method,
            *target,
            url.path,
            idempotency_key=key,
            replayable=replayable_data(kwargs.get("data")),
        )
    except Exception as error:
        report_internal_error(f"{_SITE}: planning", error)
        return None
    return call, method.upper(), url


def _release(response: aiohttp.ClientResponse) -> object:
    return response.release()  # a no-op awaitable in aiohttp 3.x; awaited by the caller


def _rejected(error: CircuitOpenError) -> BaseException:
    return AioHttpCircuitOpenError(error.name, error.retry_after)


def _fallback_response(value: Any, method: str, url: URL) -> aiohttp.ClientResponse:
    """A 200 ``ClientResponse`` carrying the configured fallback value, marked with a header.

    aiohttp has no public way to build a response without a connection; its class-level
    defaults make an already-read, connectionless response from a few attributes. If a
    future aiohttp breaks this, the caller reports it and the real outcome stands.
    """
    body, content_type = fallback_body(value)
    headers = CIMultiDict(
        {"Content-Type": content_type, "Content-Length": str(len(body)), FALLBACK_HEADER: "value"}
    )
    response = aiohttp.ClientResponse.__new__(aiohttp.ClientResponse)
    response.method = method
    response.status, response.reason = 200, "OK"
    fields: dict[str, Any] = {
        "_real_url": url,
        "_url": url,
        "_body": body,
        "_headers": CIMultiDictProxy(headers),
        "_raw_headers": tuple((k.encode(), v.encode()) for k, v in headers.items()),
        "_cache": {},
        "_traces": [],
        "_loop": asyncio.get_running_loop(),
        "_request_info": aiohttp.RequestInfo(url, method, CIMultiDictProxy(CIMultiDict()), url),
    }
    for name, field in fields.items():
        setattr(response, name, field)
    response._timer = TimerNoop()
    return response
