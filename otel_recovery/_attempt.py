"""Which attempt of a recovered call is running, for code below the driver to read.

The HTTP instrumentors' span processor stamps ``http.request.resend_count`` on the client span
of every resend from it; user code can log it. Set only by the drivers' retry loops (the
slow path): a first attempt costs nothing and reads as 1.
"""

from __future__ import annotations

import contextvars

__all__ = ["current_attempt"]

ATTEMPT: contextvars.ContextVar[int] = contextvars.ContextVar("otel_recovery_attempt", default=1)


def current_attempt() -> int:
    """1 for a first attempt (or outside any recovery), 2 for the first retry, and so on."""
    return ATTEMPT.get()
