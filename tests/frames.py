"""Which of otel_recovery's Python functions a call ran: how tests show that a compiled
layer served a call without calling back into Python."""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable
from typing import Any


def ours_that_ran(call: Callable[[], Any]) -> tuple[Any, set[str]]:
    """``call()``'s result and the names of the otel_recovery functions it ran (in this
    thread: a test server's threads are not the call)."""
    ran: set[str] = set()
    me = threading.get_ident()

    def profile(frame: Any, event: str, arg: object) -> None:
        if event == "call" and threading.get_ident() == me:
            if "otel_recovery" in frame.f_code.co_filename:
                ran.add(frame.f_code.co_name)

    sys.setprofile(profile)
    try:
        result = call()
    finally:
        sys.setprofile(None)
    return result, ran
