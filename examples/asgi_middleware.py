"""The ASGI RecoveryMiddleware on a minimal app, driven in-process (no server needed).

    python examples/asgi_middleware.py

/orders fails (its database is "down"): after five failures its breaker opens and requests
get 503 with Retry-After at once, while /health keeps answering. /stock fails once and is
retried (a GET, no body). Under ``opentelemetry-instrument`` with an ASGI server, put it
inside OpenTelemetry's ASGI middleware and these decisions land on the server spans.
"""

from __future__ import annotations

import asyncio
from typing import Any

import httpx

from otel_recovery import Retry
from otel_recovery.middleware.asgi import RecoveryMiddleware
from otel_recovery.policies.backoff import FixedBackoff

calls = {"/stock": 0}


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    path = scope["path"]
    if path == "/orders":
        raise ConnectionError("could not connect to the orders database")
    if path == "/stock":
        calls["/stock"] += 1
        if calls["/stock"] == 1:
            raise ConnectionError("connection reset while reading stock")
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"ok"})


def served(inner: Any) -> Any:
    """What an ASGI server does with an app's exception: answer 500 (httpx's in-process
    transport re-raises it instead in older releases, even when told not to)."""

    async def serve(scope: dict[str, Any], receive: Any, send: Any) -> None:
        started = False

        async def tracked(message: dict[str, Any]) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await inner(scope, receive, tracked)
        except Exception:
            if started:
                raise
            await send({"type": "http.response.start", "status": 500, "headers": []})
            await send({"type": "http.response.body", "body": b""})

    return serve


async def main() -> None:
    guarded = RecoveryMiddleware(app, retry=Retry(2, backoff=FixedBackoff(0.05)))
    transport = httpx.ASGITransport(app=served(guarded))
    async with httpx.AsyncClient(transport=transport, base_url="http://example") as client:
        for number in range(1, 8):
            response = await client.get("/orders")
            retry_after = response.headers.get("retry-after", "-")
            print(f"GET /orders #{number}: {response.status_code}, Retry-After {retry_after}")
        print(f"GET /health: {(await client.get('/health')).status_code}")
        response = await client.get("/stock")
        print(f"GET /stock: {response.status_code} after {calls['/stock']} attempts")


if __name__ == "__main__":
    asyncio.run(main())
