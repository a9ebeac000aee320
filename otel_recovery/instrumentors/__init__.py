"""OpenTelemetry instrumentors that make client calls recover inline.

One module per client library, each importing its library at the top (so a missing library
makes the ``opentelemetry-instrument`` loader skip only that instrumentor), registered under
the ``opentelemetry_instrumentor`` entry-point group (module: class -> entry point):

- ``requests``: ``RequestsRecoveryInstrumentor`` -> ``otel_recovery_requests``
- ``httpx``: ``HTTPXRecoveryInstrumentor`` -> ``otel_recovery_httpx``
- ``aiohttp_client``: ``AioHttpClientRecoveryInstrumentor`` -> ``otel_recovery_aiohttp_client``
- ``redis``: ``RedisRecoveryInstrumentor`` -> ``otel_recovery_redis``
- ``psycopg``: ``PsycopgRecoveryInstrumentor`` -> ``otel_recovery_psycopg``
- ``asyncpg``: ``AsyncPGRecoveryInstrumentor`` -> ``otel_recovery_asyncpg``

This package itself imports none of the libraries. It exports the two names a program needs
beside the instrumentors: :class:`SettingsError`, what ``instrument(**kwargs)`` raises for a
bad keyword argument (a ``ValueError``; the message names the setting and the fix), and
:func:`suppress_recovery`, a block whose client calls our instrumentors leave untouched (a
health check's probe must see the server as it is).
"""

from otel_recovery.instrumentors._setting_values import SettingsError
from otel_recovery.instrumentors._suppression import suppress_recovery

__all__ = ["SettingsError", "suppress_recovery"]
