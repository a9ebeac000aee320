"""A tiny WSGI app for ``test_fork.py``'s gunicorn run: a Redis GET and a PostgreSQL SELECT.

Served by ``opentelemetry-instrument gunicorn --preload``: this module is imported by the
master, which therefore makes the first Redis and PostgreSQL calls (and builds the per-target
breakers, budgets and plans, and the connection pool) before forking the workers.
``?sleep=S`` holds the request for S seconds first (so concurrent requests reach different
workers). Every response and server span says which worker served it.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterable
from typing import Any
from urllib.parse import parse_qs

import psycopg
import redis
from opentelemetry import trace
from opentelemetry.instrumentation.wsgi import OpenTelemetryMiddleware
from redis.backoff import NoBackoff
from redis.retry import Retry

KEY = os.environ["APP_KEY"]
PG_DSN = os.environ["PG_DSN"]
CACHE = redis.Redis.from_url(
    os.environ["REDIS_URL"],
    socket_timeout=float(os.environ["REDIS_TIMEOUT"]),
    retry=Retry(NoBackoff(), 0),  # one retry layer: ours
)

# In the master, before any worker exists (--preload).
CACHE.set(KEY, "cached")
with psycopg.connect(PG_DSN, autocommit=True) as _conn:
    _conn.execute("SELECT 1")


def _work(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    trace.get_current_span().set_attribute("app.worker.pid", os.getpid())
    query = parse_qs(environ.get("QUERY_STRING", ""))
    time.sleep(float(query.get("sleep", ["0"])[0]))
    value = CACHE.get(KEY)
    with psycopg.connect(PG_DSN, autocommit=True) as conn:
        row = conn.execute("SELECT 41 + 1").fetchone()
    body = json.dumps(
        {
            "pid": os.getpid(),
            "cache": value.decode() if value else None,
            "row": row[0] if row else None,
        }
    ).encode()
    start_response(
        "200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(body)))]
    )
    return [body]


app = OpenTelemetryMiddleware(_work)
