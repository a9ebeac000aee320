"""What the compiled-layer tests build a ``_speedups.Layer`` from.

``tests/test_compiled_layer.py`` (tables, suppression) and
``tests/test_compiled_attr_reader.py`` (the holder and key attributes) both make layers with
no site, served from ``args[0].pool.table`` under a token of their own, and count the calls
a layer hands to its Python layer.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from otel_recovery._compiled import SPEEDUPS
from otel_recovery.instrumentors._suppression import CONTEXT_VAR
from otel_recovery.telemetry._suppressed import LEGACY_SUPPRESS_KEY, SUPPRESS_KEY


def compiled_layer(token: object, **given: Any) -> Any:
    """A compiled Layer with no site: ``token``, holder ``args[0].pool``, table
    ``holder.table``, key ``args[1]``; ``given`` replaces any of those arguments."""
    arguments: dict[str, Any] = {
        "slow": print,
        "original": print,
        "patches": SimpleNamespace(enabled=True),
        "context_var": CONTEXT_VAR,
        "suppress_keys": (SUPPRESS_KEY, LEGACY_SUPPRESS_KEY),
        "site": None,
        "owner": None,
        "attribute": "",
        "token": token,
        "holder_attr": "pool",
        "table_attr": "table",
        "key_index": 1,
        "explain": lambda plan, error: None,
    }
    assert SPEEDUPS is not None
    return SPEEDUPS.Layer(**(arguments | given))


class CountingLayer:
    """A compiled Layer over ``original(client, key)`` that counts the calls it handed to
    its Python layer (``slow``), which it does whenever it cannot serve one itself."""

    def __init__(self, token: object, **given: Any) -> None:
        self.slow_calls = 0

        def original(client: object, key: str) -> str:
            return key

        def slow(client: object, key: str) -> str:
            self.slow_calls += 1
            return original(client, key)

        self.layer = compiled_layer(token, slow=slow, original=original, **given)

    def __call__(self, client: object, key: str = "GET") -> str:
        result: str = self.layer(client, key)
        return result
