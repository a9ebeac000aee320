"""Server-side recovery for ASGI and WSGI apps: a circuit breaker per route, fallback
responses, and retries of requests that are safe to repeat.

``otel_recovery.middleware.asgi.RecoveryMiddleware`` and
``otel_recovery.middleware.wsgi.RecoveryMiddleware`` take the same options; both are
re-exported here under names that tell them apart.
"""

from __future__ import annotations

from otel_recovery.middleware._responses import Response
from otel_recovery.middleware.asgi import RecoveryMiddleware as ASGIRecoveryMiddleware
from otel_recovery.middleware.wsgi import RecoveryMiddleware as WSGIRecoveryMiddleware

__all__ = ["ASGIRecoveryMiddleware", "Response", "WSGIRecoveryMiddleware"]
