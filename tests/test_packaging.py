"""The public surface and the import-time promises of DESIGN.md section 2."""

from __future__ import annotations

import json
import subprocess
import sys

import otel_recovery

OPTIONAL = ["httpx", "requests", "aiohttp", "redis", "psycopg", "asyncpg", "statsmodels"]


def test_all_is_sorted_unique_and_importable():
    names = otel_recovery.__all__
    assert names == sorted(names, key=lambda n: (n.startswith("_"), n)) or names == sorted(names)
    assert len(set(names)) == len(names)
    for name in names:
        assert getattr(otel_recovery, name) is not None


def test_import_loads_no_optional_library():
    code = (
        "import json, sys; import otel_recovery; "
        f"print(json.dumps([m for m in {OPTIONAL!r} if m in sys.modules]))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert json.loads(out) == []


def test_importing_learning_loads_no_statsmodels():
    """Subscribers (adaptive thresholds, the learner) must not pay for the anomaly extra."""
    code = (
        "import json, sys; import otel_recovery.learning; "
        "print(json.dumps([m for m in ('statsmodels', 'scipy', 'opentelemetry.sdk') "
        "if m in sys.modules]))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert json.loads(out) == []


def test_import_does_not_need_the_sdk():
    code = "import sys; import otel_recovery; print('opentelemetry.sdk' in sys.modules)"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == "False"


def test_py_typed_marker_ships():
    from importlib.resources import files

    assert files("otel_recovery").joinpath("py.typed").is_file()


def test_version_matches_metadata():
    from importlib.metadata import version

    assert otel_recovery.__version__ == version("otel-recovery")


def test_the_license_ships_with_the_distribution():
    """The licence is an SPDX expression and its text is in the distribution: packagers and
    compliance scanners read both, and setuptools stops accepting the old table form. An
    editable install also leaves ``otel_recovery.egg-info`` in the checkout, which comes
    first on the path and holds no licence files: the installed ``.dist-info`` is read."""
    from importlib.metadata import distributions

    ours = [d for d in distributions() if d.metadata["Name"] == "otel-recovery"]
    assert ours and all(d.metadata["License-Expression"] == "Apache-2.0" for d in ours)
    installed = [d for d in ours if d.read_text("RECORD") is not None]
    assert len(installed) == 1
    assert installed[0].metadata.get_all("License-File") == ["LICENSE"]
    text = installed[0].read_text("licenses/LICENSE")
    assert text is not None and "Apache License" in text and "Version 2.0" in text
