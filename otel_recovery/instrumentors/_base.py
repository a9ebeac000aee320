"""``RecoveryInstrumentor``: the lifecycle every client-library instrumentor shares.

Each instrumentor is an OpenTelemetry ``BaseInstrumentor`` registered under the
``opentelemetry_instrumentor`` entry-point group, so installing otel-recovery next to a
service run by ``opentelemetry-instrument`` switches recovery on. That is why the defaults are
conservative (see :mod:`._settings`) and why ``instrument()`` can be turned off three ways:
``OTEL_RECOVERY_ENABLED=false`` (or ``instrument(enabled=False)``),
``OTEL_PYTHON_DISABLED_INSTRUMENTATIONS=otel_recovery_<lib>`` (handled by the loader), or not
calling it.

It is also why a bad setting from the environment or the policy file never raises out of
``instrument()``: the auto-instrumentation loader re-raises an instrumentor's exception and
abandons its loop, so every instrumentation after ours (contrib's included) would be lost.
The error is logged once instead (:func:`._settings.report_off`: the setting, where it came
from, the accepted values) and nothing is patched. A bad keyword argument to
``instrument()`` is the program's own call, and raises :class:`._settings.SettingsError`.

An instrumentor that patched nothing (switched off, unusable settings, its library missing)
reports itself not instrumented, so a later ``instrument()``, once the switch is on or the
value fixed, installs it.

Subclasses name their library and version range and implement :meth:`_install`, which wraps
the library's methods through a :class:`PatchSet` using the per-target policies of a
:class:`TargetPolicies`. Uninstrumenting removes exactly our wrappers.
"""

from __future__ import annotations

import importlib.metadata
import logging
import os
from collections.abc import Callable, Collection
from typing import Any, ClassVar, Literal

from opentelemetry.instrumentation import dependencies
from opentelemetry.instrumentation.dependencies import get_dependency_conflicts
from opentelemetry.instrumentation.instrumentor import BaseInstrumentor  # type: ignore[attr-defined]

from otel_recovery._clock import SYSTEM_CLOCK, Clock
from otel_recovery._config import SWITCHES
from otel_recovery.checkpoint import max_size_from_env
from otel_recovery.classify import Classifier
from otel_recovery.instrumentors._setting_values import check_http_fallback
from otel_recovery.instrumentors._settings import (
    RecoverySettings,
    SettingsError,
    load_settings,
    report_off,
)
from otel_recovery.instrumentors._target_policy import AMend, Mend, TargetPolicy
from otel_recovery.instrumentors._targets import TargetPolicies
from otel_recovery.instrumentors._wrapping import PatchSet
from otel_recovery.learning.store import CheckpointLearnerStore
from otel_recovery.learning.strategy import StrategyLearner
from otel_recovery.policies.circuit_breaker import CircuitOpenError
from otel_recovery.stores import ENV_STORE_URL, StoreConfigError
from otel_recovery.stores._url import parse_store_url
from otel_recovery.telemetry import Telemetry

__all__ = ["RecoveryInstrumentor"]

_OWN_KWARGS = ("tracer_provider", "meter_provider", "clock")

_logger = logging.getLogger(__name__)


def _conflict_error() -> type[Exception] | None:
    """The loader's "skip this instrumentor" error, where the installed release has one.

    ``opentelemetry-instrumentation`` 0.53b0 added ``DependencyConflictError``, and its loader
    skips an instrumentor that raises it. Older loaders log any exception from an
    instrumentor and re-raise it, which stops every instrumentor after ours from loading:
    there a missing library must be a quiet skip instead.
    """
    error: type[Exception] | None = getattr(dependencies, "DependencyConflictError", None)
    return error


def _check_store_url() -> None:
    """``OTEL_RECOVERY_STORE_URL`` is read when the first target's breaker is made: a
    malformed one would fail every call's planning then, and leave recovery off for good
    behind one internal-error line. It is checked here, at start-up, as a bad setting, and
    so is ``OTEL_RECOVERY_CHECKPOINT_MAX_BYTES``, which the learner's store reads when it is
    built: raised from there it would stop the loader, contrib's instrumentors with it."""
    url = os.environ.get(ENV_STORE_URL)
    if not url:
        return
    try:
        parse_store_url(url, setting=ENV_STORE_URL)
        max_size_from_env()
    except StoreConfigError as error:
        raise SettingsError(str(error)) from error


class RecoveryInstrumentor(BaseInstrumentor):  # type: ignore[misc]
    """Base of the six instrumentors; see the module docstring."""

    library: ClassVar[str] = ""
    """Short name used in breaker names and settings, e.g. ``"redis"``."""
    instruments: ClassVar[tuple[str, ...]] = ()
    """Requirement strings of the supported library versions, e.g. ``("redis >= 4.2",)``."""
    span_mode: ClassVar[Literal["own", "current"]] = "own"
    """``"own"``: a ``recover`` span around the attempts (HTTP: per-attempt client spans
    nest inside it). ``"current"``: annotate the logical operation's span (DB, Redis)."""
    fallback_is_a_body: ClassVar[bool] = False
    """Whether a configured ``fallback_value`` becomes a response body (HTTP): then one from
    ``instrument()`` must be bytes, text or JSON (from the environment or the file it always
    must)."""
    fallback_on: ClassVar[tuple[type[BaseException], ...]] = (Exception,)
    """What a configured ``fallback_value`` answers for; narrow it to dependency failures so
    a programming error (a malformed URL) still surfaces."""
    rejection: ClassVar[type[CircuitOpenError]] = CircuitOpenError
    """What an open circuit raises: a ``CircuitOpenError`` that is also the library's own
    connection error (``PsycopgCircuitOpenError`` ...), so existing ``except`` clauses and
    frameworks built on the driver handle it. The HTTP layers make theirs per request."""

    attempt_timeout_error: ClassVar[type[Exception]] = TimeoutError
    """What an awaited attempt raises when ``attempt_timeout`` cancels it: a ``TimeoutError``
    that is also the library's own timeout error where the library has one
    (``PsycopgAttemptTimeoutError``, ``HTTPXAttemptTimeoutError``,
    ``AioHttpAttemptTimeoutError``), for the same reason as :attr:`rejection`."""

    policy_class: ClassVar[type[TargetPolicy]] = TargetPolicy
    """The class of this instrumentor's per-target policies. The Redis and PostgreSQL ones
    use ``_guarded.GuardedPolicy``: a bug of ours while a failed call is handled leaves the
    driver's own outcome to the application, and a failure of the client's own (waiting
    for its pool) is neither retried nor counted. The HTTP layers settle both themselves."""

    settings: RecoverySettings | None = None
    targets: TargetPolicies | None = None
    _patches: PatchSet | None = None

    def instrumentation_dependencies(self) -> Collection[str]:
        return self.instruments

    def instrument(self, **kwargs: Any) -> Any:
        """``BaseInstrumentor.instrument()``; when nothing was patched (switched off, bad
        settings from the environment or the policy file, the library missing) it reports
        itself not instrumented, so a later call, once that is put right, installs us."""
        result = super().instrument(**kwargs)
        if self._patches is None:
            self._is_instrumented_by_opentelemetry = False
        return result

    def _instrument(self, **kwargs: Any) -> None:
        # Auto-instrumentation skips the dependency check (skip_dep_check=True); do our own.
        conflict = get_dependency_conflicts(self.instruments)
        if conflict is not None:
            error = _conflict_error()
            if error is not None:
                raise error(conflict)
            _logger.debug("Skipping instrumentation otel_recovery_%s: %s", self.library, conflict)
            return
        options = {k: v for k, v in kwargs.items() if k not in _OWN_KWARGS}
        try:
            settings = load_settings(options)
            if self.fallback_is_a_body:
                check_http_fallback(settings.arguments)
            if not self.fallback_on and "fallback_value" in settings.arguments:
                raise SettingsError(
                    f"instrument(fallback_value=...) is not valid for the {self.library} "
                    "instrumentor: no value can stand in for a connection or a cursor, so "
                    "it uses no fallback; catch its errors in the application instead",
                    from_arguments=True,
                )
            _check_store_url()
        except SettingsError as error:
            if error.from_arguments:
                raise  # the program's own call: the mistake surfaces where it was made
            report_off(error)  # the deployment's: never stop the app or the loader's loop
            self.settings = None
            return
        self.settings = settings
        if not settings.enabled or not SWITCHES.active:
            _logger.debug("otel_recovery_%s is switched off: nothing patched", self.library)
            return
        clock = kwargs.get("clock")
        tracer_provider = kwargs.get("tracer_provider")
        meter_provider = kwargs.get("meter_provider")
        telemetry: Telemetry | bool = True  # follow the global providers
        mend, amend = self._mends(clock or SYSTEM_CLOCK)
        if tracer_provider is not None or meter_provider is not None:
            telemetry = Telemetry(tracer_provider, meter_provider)
        self.targets = TargetPolicies(
            self.library,
            settings,
            span=self.span_mode,
            clock=clock,
            classifier=self._classifier(clock),
            fallback_on=self.fallback_on,
            telemetry=telemetry,
            learner=self._learner(settings, clock),
            rejection=self.rejection,
            passes_refused=self._passes_refused,
            timeout=self.attempt_timeout_error,
            mend=mend,
            amend=amend,
            policy_class=self.policy_class,
        )
        patches = PatchSet(self.library)
        self._install(patches, self.targets, kwargs)
        patches.enabled = True
        self._patches = patches

    def _learner(self, settings: RecoverySettings, clock: Any) -> StrategyLearner | None:
        """One learner per instrumentor when learning is on; it persists through the store
        named by ``OTEL_RECOVERY_STORE_URL`` when that is set (else it lives in memory)."""
        if settings.learning == "off":
            return None
        store = None
        if os.environ.get("OTEL_RECOVERY_STORE_URL"):
            store = CheckpointLearnerStore(name=f"instrumentor.{self.library}")
        return StrategyLearner(clock=clock, store=store, shadow=settings.learning == "shadow")

    def _uninstrument(self, **kwargs: Any) -> None:
        patches = self._patches
        if patches is not None:
            patches.remove_all()
        self._patches = None
        targets, self.targets = self.targets, None
        learner = targets.learner if targets is not None else None
        if learner is not None:  # what it learned since its last periodic save
            try:
                learner.flush()
            except Exception as error:  # the store is down: uninstrumenting still completes
                _logger.warning(
                    "otel_recovery_%s: the learner's last save failed on uninstrument: %r",
                    self.library,
                    error,
                )

    def _install(self, patches: PatchSet, targets: TargetPolicies, kwargs: dict[str, Any]) -> None:
        raise NotImplementedError

    def _classifier(self, clock: Clock | None) -> Classifier | None:
        """A classifier for this library's policies; None uses the process-wide one."""
        return None

    def _mends(self, clock: Clock) -> tuple[Mend | None, AMend | None]:
        """``mend`` and ``amend`` for ``TargetPolicies``: what to repair after a failed
        attempt, sync and awaited (nothing by default)."""
        return None, None

    def _passes_refused(
        self, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Callable[..., Any] | None:
        """For a call an open circuit refuses that must be sent all the same, the function
        that sends it beneath our layer; None (the default) refuses every call."""
        return None

    @staticmethod
    def library_version(distribution: str) -> str | None:
        try:
            return importlib.metadata.version(distribution)
        except importlib.metadata.PackageNotFoundError:
            return None
