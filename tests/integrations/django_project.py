"""A tiny in-process Django project for ``test_django.py``: settings, one model, aliases.

Django is configured once per process (``settings.configure``); each test adds database
aliases of its own (:func:`add_alias`), pointing at the real PostgreSQL or at a
``PgFront`` port, and removes them again (:func:`remove_alias`), so every test starts
from fresh ``DatabaseWrapper`` objects made after the instrumentors were installed.
The model's table has a name no other test session uses; tests create and drop it with
Django's schema editor (:func:`create_table` / :func:`drop_table`).
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Iterator
from typing import Any

import django
from django.conf import settings
from servers import PG_HOST, PG_PORT, quiet, unique_table

if not settings.configured:
    settings.configure(
        DATABASES={
            "default": {
                "ENGINE": "django.db.backends.postgresql",
                "NAME": "test",
                "USER": "postgres",
                "HOST": PG_HOST,
                "PORT": str(PG_PORT),
            }
        },
        INSTALLED_APPS=[],
        USE_TZ=True,
        TIME_ZONE="UTC",
        DEFAULT_AUTO_FIELD="django.db.models.AutoField",
    )
    django.setup()

from django.core.signals import request_finished, request_started  # noqa: E402
from django.db import connections, models  # noqa: E402  (needs the settings above)
from django.db.backends.base.base import BaseDatabaseWrapper  # noqa: E402

TABLE = unique_table("django")


class Item(models.Model):
    """One integer per row; tests count rows and sum values to see what was applied."""

    v = models.IntegerField()

    class Meta:
        app_label = "otelrec_django"
        db_table = TABLE


def add_alias(port: int = PG_PORT, *, options: str = "", **settings_dict: Any) -> str:
    """A new database alias to ``127.0.0.1:port``; ``settings_dict`` overrides Django's
    defaults (``CONN_MAX_AGE``, ``CONN_HEALTH_CHECKS``, ``OPTIONS``...).

    Every session starts in UTC (libpq ``options``, plus any ``options`` given), Django's
    time zone: Django then sends no ``set_config('TimeZone')`` on a new connection, so a new
    connection costs exactly one connect and no statement, whatever the server's default.
    """
    alias = f"otelrec_{uuid.uuid4().hex[:8]}"
    settings_dict["OPTIONS"] = {
        **settings_dict.get("OPTIONS", {}),
        "options": f"-c TimeZone=UTC {options}".strip(),
    }
    entry = {
        "ENGINE": "django.db.backends.postgresql",
        "NAME": "test",
        "USER": "postgres",
        "HOST": PG_HOST,
        "PORT": str(port),
        **settings_dict,
    }
    configured = connections.configure_settings({"default": entry, alias: entry})
    connections.settings[alias] = configured[alias]
    return alias


def remove_alias(alias: str) -> None:
    """Close the alias's connection (and its pool) and forget it, even if closing failed."""
    try:
        wrapper: BaseDatabaseWrapper = connections[alias]
        with quiet():
            with contextlib.suppress(Exception):
                wrapper.close()
            if getattr(wrapper, "pool", None) is not None:
                wrapper.close_pool()
    finally:
        with contextlib.suppress(AttributeError, KeyError):
            del connections[alias]
        connections.settings.pop(alias, None)


def create_table() -> None:
    """Create the model's table with the schema editor, unobserved (``quiet``)."""
    alias = add_alias()
    try:
        with quiet(), connections[alias].schema_editor() as editor:
            editor.create_model(Item)
    finally:
        remove_alias(alias)


def drop_table() -> None:
    alias = add_alias()
    try:
        with quiet(), connections[alias].schema_editor() as editor:
            editor.delete_model(Item)
    finally:
        remove_alias(alias)


@contextlib.contextmanager
def request() -> Iterator[None]:
    """What Django's handlers do around a request: ``request_started`` (which runs
    ``close_old_connections``: health checks, CONN_MAX_AGE) and ``request_finished``."""
    request_started.send(sender=None)
    try:
        yield
    finally:
        request_finished.send(sender=None)


__all__ = [
    "Item",
    "TABLE",
    "add_alias",
    "create_table",
    "drop_table",
    "remove_alias",
    "request",
]
