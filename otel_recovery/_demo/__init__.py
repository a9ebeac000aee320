"""The ``otel-recovery demo`` scenario: a flaky local dependency and a client that recovers.

Split by concern so each part stays readable: :mod:`.server` injects faults, :mod:`.scenario`
drives the calls through a :class:`~otel_recovery.RecoveryPolicy` and keeps the books,
:mod:`.report` draws the progress bar and the closing table, :mod:`.tracing` sets up the
OpenTelemetry SDK when it is installed. Only the standard library is needed to run it.
"""
