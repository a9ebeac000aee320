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


BUDGET_BUCKET_END = frozenset({"record_call", "_rotate", "peek"})
"""What a remembered call runs in Python, by design, when it is the first of a new second:
the retry budget's bucket moves on (``RetryBudget.record_call``)."""


def ours_that_ran_steadily(call: Callable[[], Any]) -> tuple[Any, set[str]]:
    """:func:`ours_that_ran` for a call that can be made again: one that happened to be the
    first of a new second ran the budget's step (:data:`BUDGET_BUCKET_END`) as it should,
    and is made once more, the next one being the answer. Rare on a normal build (a call
    takes about a millisecond), it is common under the sanitizers, which slow calls down."""
    result, ran = ours_that_ran(call)
    if "record_call" in ran and ran <= BUDGET_BUCKET_END | {"now"}:
        result, ran = ours_that_ran(call)
    return result, ran
