"""The example service: ``GET /work`` reads Redis, calls an HTTP dependency, queries PostgreSQL.

It contains no recovery code at all. That is the point: run it under
``opentelemetry-instrument`` with ``otel-recovery`` installed and its httpx, redis-py and
psycopg calls recover inline (retry with backoff and budgets, per-server circuit breakers),
with every decision on the trace. See README.md in this folder.

One request of ``/work?id=<id>`` does what a small service does:

1. ``GET`` a cached value from Redis (redis-py asyncio),
2. ``GET /quote?id=<id>`` from the downstream HTTP dependency (httpx, async),
3. ``SELECT`` from PostgreSQL on a fresh connection (psycopg 3, async),
4. ``SET`` the result back into Redis.

Each step's outcome is reported in the JSON answer (``ok`` or the error), so a failed dependency
degrades the answer (status 502) instead of crashing the handler.

Two deliberate choices, both so that failures reach otel-recovery instead of being hidden:

- redis-py >= 6 retries connection errors and timeouts itself (10 times by default) inside a
  single call, invisibly and without a budget. The client here is built with
  ``Retry(NoBackoff(), 0)`` so that otel-recovery's retries (budgeted, traced) are the only ones.
- PostgreSQL is reached through a new connection per request, so a refused or reset
  connection is a connection-phase failure, the one kind of SQL failure that is always safe to
  retry. A pool would do the same work behind its own reconnect logic.

It creates its own SERVER span per request (there is no aiohttp-server instrumentation in this
environment) with the OpenTelemetry *API* only: providers and exporters are
``opentelemetry-instrument``'s job, configured by ``OTEL_*`` variables. Setting a tracer
provider here as well would export every span twice.

Settings (environment): ``APP_HOST`` (127.0.0.1), ``APP_PORT`` (8080; 0 picks a free port),
``DOWNSTREAM_URL`` (http://127.0.0.1:8081), ``REDIS_URL`` (redis://127.0.0.1:6379/0),
``PG_DSN`` (postgresql://postgres@127.0.0.1:5432/test), ``REDIS_TIMEOUT`` (0.5 s),
``HTTP_TIMEOUT`` (5 s), ``APP_KEY_PREFIX`` (otel-recovery-example).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import httpx
import psycopg
from aiohttp import web
from opentelemetry import propagate, trace
from opentelemetry.trace import SpanKind, Status, StatusCode
from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

SERVICE = "otel-recovery-example"
REQUEST_ID_ATTRIBUTE = "app.request.id"
"""Set on the SERVER span, so a request's trace can be found by the id the caller chose."""

_tracer = trace.get_tracer("otel_recovery.examples.service")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class Settings:
    """The service's configuration, read once from the environment."""

    def __init__(self, env: dict[str, str] | None = None) -> None:
        env = dict(os.environ) if env is None else env
        self.host = env.get("APP_HOST", "127.0.0.1")
        self.port = int(env.get("APP_PORT", "8080"))
        self.downstream_url = env.get("DOWNSTREAM_URL", "http://127.0.0.1:8081").rstrip("/")
        self.redis_url = env.get("REDIS_URL", "redis://127.0.0.1:6379/0")
        self.pg_dsn = env.get("PG_DSN", "postgresql://postgres@127.0.0.1:5432/test")
        self.redis_timeout = float(env.get("REDIS_TIMEOUT", "0.5"))
        self.http_timeout = float(env.get("HTTP_TIMEOUT", "5"))
        self.key_prefix = env.get("APP_KEY_PREFIX", SERVICE)


@web.middleware
async def server_span(request: web.Request, handler: Handler) -> web.StreamResponse:
    """One SERVER span per request, continuing the caller's trace (W3C traceparent)."""
    resource = request.match_info.route.resource
    route = resource.canonical if resource is not None else request.path
    attributes: dict[str, Any] = {
        "http.request.method": request.method,
        "http.route": route,
        "url.path": request.path,
    }
    with _tracer.start_as_current_span(
        f"{request.method} {route}",
        context=propagate.extract(request.headers),
        kind=SpanKind.SERVER,
        attributes=attributes,
    ) as span:
        response = await handler(request)
        span.set_attribute("http.response.status_code", response.status)
        if response.status >= 500:
            span.set_status(Status(StatusCode.ERROR))
            span.set_attribute("error.type", str(response.status))
        return response


class Service:
    """The clients (created once, shared by all requests) and the ``/work`` handler."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.http = httpx.AsyncClient(timeout=settings.http_timeout)
        self.redis = Redis.from_url(
            settings.redis_url,
            socket_timeout=settings.redis_timeout,
            socket_connect_timeout=settings.redis_timeout,
            retry=Retry(NoBackoff(), 0),  # otel-recovery owns retries; see the module docstring
        )

    async def close(self) -> None:
        await self.http.aclose()
        await self.redis.aclose()

    async def work(self, request: web.Request) -> web.Response:
        request_id = request.query.get("id") or uuid.uuid4().hex[:12]
        trace.get_current_span().set_attribute(REQUEST_ID_ATTRIBUTE, request_id)
        started = time.monotonic()
        key = f"{self.settings.key_prefix}:last"
        results: dict[str, str] = {}
        body: dict[str, Any] = {"id": request_id, "results": results}

        cached = await _step(results, "redis_get", self.redis.get(key))
        body["previous"] = cached.decode() if isinstance(cached, bytes) else None
        quote = await _step(results, "downstream", self._quote(request_id))
        body["quote"] = quote
        row = await _step(results, "postgres", self._select(request_id))
        body["postgres"] = row
        record = json.dumps({"id": request_id, "quote": quote})
        await _step(results, "redis_set", self.redis.set(key, record, ex=300))

        body["seconds"] = round(time.monotonic() - started, 3)
        status = 200 if all(value == "ok" for value in results.values()) else 502
        return web.json_response(body, status=status)

    async def _quote(self, request_id: str) -> Any:
        response = await self.http.get(
            f"{self.settings.downstream_url}/quote", params={"id": request_id}
        )
        response.raise_for_status()
        return response.json()

    async def _select(self, request_id: str) -> list[Any]:
        async with await psycopg.AsyncConnection.connect(
            self.settings.pg_dsn, autocommit=True, connect_timeout=5
        ) as conn:
            cursor = await conn.execute(
                "SELECT %s::text AS id, now()::text AS at, pg_backend_pid() AS pid",
                (request_id,),
            )
            found = await cursor.fetchone()
            return list(found) if found is not None else []

    async def health(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})


async def _step(results: dict[str, str], name: str, call: Awaitable[Any]) -> Any:
    """Run one dependency call; record ``ok`` or the error, and never raise."""
    try:
        value = await call
    except Exception as error:
        first_line = str(error).partition("\n")[0]
        results[name] = f"{type(error).__name__}: {first_line}"[:300]
        return None
    results[name] = "ok"
    return value


def build_app(service: Service) -> web.Application:
    app = web.Application(middlewares=[server_span])
    app.router.add_get("/work", service.work)
    app.router.add_get("/healthz", service.health)
    return app


async def serve(settings: Settings) -> None:
    """Serve until SIGINT or SIGTERM; print the bound address once ready (tests wait for it)."""
    service = Service(settings)
    runner = web.AppRunner(build_app(service), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, settings.host, settings.port)
    await site.start()
    port = runner.addresses[0][1] if runner.addresses else settings.port  # APP_PORT=0
    print(f"{SERVICE} listening on http://{settings.host}:{port}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()
        await service.close()


def main() -> None:
    asyncio.run(serve(Settings()))


if __name__ == "__main__":
    main()
