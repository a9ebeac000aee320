"""``examples/service/compose.yaml`` agrees with the code it runs.

Why: no Docker runs here (nor in CI), so the compose file itself is never started; the app it
runs is (``test_end_to_end.py`` runs ``opentelemetry-instrument python app.py`` against real
faults). What can drift apart silently is the wiring between the two: the variables the app
reads, the services and ports they name, the downstream's command line, the extras the image
installs, the otel-recovery settings. Each test below reads the compose file as Docker
Compose would (YAML) and checks one of those against the code, so a rename on either side
fails here.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Any
from urllib.parse import urlsplit

import pytest

yaml = pytest.importorskip("yaml")

from otel_recovery.instrumentors._policy_file import _toml_loads  # noqa: E402
from otel_recovery.instrumentors._setting_values import convert  # noqa: E402
from otel_recovery.instrumentors._settings import (  # noqa: E402
    ENV_PREFIX,
    RecoverySettings,
    load_settings,
    unknown_variables,
)

ROOT = Path(__file__).resolve().parent.parent
SERVICE = ROOT / "examples" / "service"


def _load(name: str, path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load((SERVICE / "compose.yaml").read_text())
    return loaded


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, Any]:
    found: dict[str, Any] = compose["services"]
    return found


def _app_environment(services: dict[str, Any]) -> dict[str, str]:
    return {name: str(value) for name, value in services["app"]["environment"].items()}


def _published(service: dict[str, Any]) -> set[int]:
    """The container ports a service publishes (``"host:container"`` entries)."""
    return {int(str(entry).rsplit(":", 1)[-1]) for entry in service.get("ports", [])}


def test_every_service_a_service_depends_on_exists(services: dict[str, Any]) -> None:
    for name, service in services.items():
        for needed in service.get("depends_on", {}):
            assert needed in services, f"{name} depends on {needed}, which is not a service"


def test_the_app_reaches_each_dependency_by_its_service_name_and_port(
    services: dict[str, Any],
) -> None:
    app = _load("example_app_for_compose", SERVICE / "app.py")
    downstream = _load("example_downstream_for_compose", SERVICE / "downstream.py")
    settings = app.Settings(_app_environment(services))

    arguments = downstream.parse_args([str(a) for a in services["downstream"]["command"][2:]])
    downstream.parse_schedule(arguments.schedule)  # a schedule the server accepts
    called = urlsplit(settings.downstream_url)
    assert (called.hostname, called.port) == ("downstream", arguments.port)
    assert arguments.host == "0.0.0.0"  # reachable from the app's container

    redis_url = urlsplit(settings.redis_url)
    assert (redis_url.scheme, redis_url.hostname, redis_url.port) == ("redis", "redis", 6379)

    dsn = urlsplit(settings.pg_dsn)
    database = services["postgres"]["environment"]["POSTGRES_DB"]
    assert (dsn.hostname, dsn.port, dsn.path.lstrip("/")) == ("postgres", 5432, database)
    assert services["postgres"]["environment"]["POSTGRES_HOST_AUTH_METHOD"] == "trust"

    assert settings.host == "0.0.0.0" and settings.port in _published(services["app"])
    assert f"http://app:{settings.port}/work" in " ".join(services["load"]["command"])


def test_traces_go_to_the_port_jaeger_takes_otlp_on_for_the_chosen_protocol(
    services: dict[str, Any],
) -> None:
    env = _app_environment(services)
    jaeger = services["jaeger"]
    ports = {"http/protobuf": 4318, "grpc": 4317}
    endpoint = urlsplit(env["OTEL_EXPORTER_OTLP_ENDPOINT"])
    assert endpoint.hostname == "jaeger"
    assert endpoint.port == ports[env["OTEL_EXPORTER_OTLP_PROTOCOL"]]
    assert endpoint.port in _published(jaeger) and 16686 in _published(jaeger)  # OTLP, UI
    assert env["OTEL_TRACES_EXPORTER"] == "otlp"
    # Jaeger takes traces only: the other signals are switched off, not left to fail
    assert env["OTEL_METRICS_EXPORTER"] == env["OTEL_LOGS_EXPORTER"] == "none"
    assert services["app"]["command"][:2] == ["opentelemetry-instrument", "python"]
    assert (ROOT / services["app"]["command"][2]).is_file()


def test_the_otel_recovery_variables_are_settings_with_the_defaults_the_file_claims(
    services: dict[str, Any],
) -> None:
    env = _app_environment(services)
    ours = {name: value for name, value in env.items() if name.startswith(ENV_PREFIX)}
    assert ours, "the example shows at least one otel-recovery setting"
    assert unknown_variables(ours) == []
    load_settings(environ=ours)  # valid values: a bad one raises SettingsError
    defaults = RecoverySettings()
    for name, value in ours.items():  # compose.yaml: "all optional; these are the defaults"
        field = name.removeprefix(ENV_PREFIX).lower()
        default = getattr(defaults, field)
        assert convert(field, value, "env", default) == default, name


def test_the_image_installs_extras_that_exist_from_files_that_exist(
    services: dict[str, Any],
) -> None:
    build = services["app"]["build"]
    context = (SERVICE / build["context"]).resolve()
    assert context == ROOT
    lines = build["dockerfile_inline"].splitlines()
    for line in lines:
        if line.startswith("COPY "):
            *sources, _ = line.split()[1:]
            for source in sources:
                assert (context / source).exists(), f"COPY {source}: no such file"
    install = next(line for line in lines if "pip install" in line)
    extras = install.split("'.[", 1)[1].split("]", 1)[0].split(",")
    project = _toml_loads((ROOT / "pyproject.toml").read_text())["project"]
    known = project["optional-dependencies"]
    assert set(extras) <= set(known), f"unknown extras {set(extras) - set(known)}"
    # opentelemetry-instrument needs a configurator to set up the SDK from the environment,
    # and the exporters must come at the distro's own release (pyproject.toml says why)
    assert "sdk" in extras and "contrib" in extras
    assert any(r.startswith("opentelemetry-distro[otlp]") for r in known["sdk"])
    assert not any(r.startswith("opentelemetry-exporter-otlp") for r in known["sdk"])
