"""Write the pins of the oldest releases otel-recovery says it supports, one file per Python.

Why: ``pyproject.toml`` promises ``redis>=4.5``, ``wrapt>=1.14``, ``opentelemetry-api>=...``
and so on, and pip installs the newest releases everywhere else, so nothing but this checks
the floors. ``tests/test_lowest_versions.py`` installs the file for the Python that runs it
and runs the tests that touch the libraries against those releases.

What is resolved: the project's runtime extras, every contrib instrumentation and the test
tools, each at the lowest release its requirement allows (``--resolution lowest-direct``),
and their own dependencies at the newest release that fits, as pip would pick for a user who
pinned our libraries low. Only wheels count (``--only-binary :all:``): a release with no wheel
for that Python is one its users cannot install either. The contrib packages that the test
extra pins to one release train are taken unpinned here, so that they follow the old
``opentelemetry-instrumentation`` down. The constraints below are not floors of ours but
conditions of those old releases.

Run it after changing a floor (needs ``uv``: ``pip install -e '.[maintain]'``)::

    python tests/lowest_versions/compile_pins.py            # 3.10 to 3.13
    python tests/lowest_versions/compile_pins.py 3.11       # one Python
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - the floor's own Python
    import tomli as tomllib

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
PYTHONS = ("3.10", "3.11", "3.12", "3.13")
EXTRAS = (
    "sdk",
    "anomaly",
    "requests",
    "httpx",
    "aiohttp",
    "redis",
    "psycopg",
    "asyncpg",
    "contrib",
)
"""The extras whose floors the pins test: all but the test tools, the peers and ``maintain``."""
NOT_RUN = {
    "ruff",
    "mypy",
    "sqlalchemy",
    "psycopg-pool",
    "django",
    "starlette",
    "uvicorn",
    "rq",
    "celery",
    "gunicorn",
    "gevent",
    "trio",
    "uv",
    "pytest-xdist",
}
"""Test-extra packages the lowest run does not use: lint runs once, tests/integrations (the
stacks around the clients) runs on the newest releases only, uv installs the pins, and the
run is one pytest process (only the main session has xdist workers)."""
CONSTRAINTS: list[str] = []
"""Conditions of old releases that their own requirements do not state (none at present)."""


def pins_path(python: str) -> Path:
    """Where the pins for ``python`` ("3.11") live."""
    return HERE / f"pins-py{python}.txt"


def requirements() -> list[str]:
    """Our package with its extras, then the test extra with release-train pins lifted."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = [f"-e {ROOT}[{','.join(EXTRAS)}]"]
    for requirement in project["optional-dependencies"]["test"]:
        name = requirement.split(";")[0].split("[")[0]
        for operator in ("==", ">=", "<", "~=", "!="):
            name = name.split(operator)[0]
        name = name.strip()
        if name == project["name"] or name in NOT_RUN:
            continue
        wanted.append(name if "==" in requirement else requirement)
    return wanted


def compile_pins(python: str, uv: str) -> Path:
    """Resolve for ``python`` and write its pins file (without our own package)."""
    with tempfile.TemporaryDirectory() as scratch:
        wanted = Path(scratch, "requirements.in")
        wanted.write_text("\n".join(requirements()) + "\n")
        limits = Path(scratch, "constraints.txt")
        limits.write_text("\n".join(CONSTRAINTS) + "\n")
        resolved = subprocess.run(
            [
                uv, "pip", "compile", str(wanted),
                "--constraint", str(limits),
                "--resolution", "lowest-direct",
                "--only-binary", ":all:",
                "--prerelease", "if-necessary-or-explicit",
                "--python-version", python,
                "--no-annotate", "--no-header", "--quiet",
            ],
            check=True, capture_output=True, text=True,
        ).stdout  # fmt: skip
    pins = [line for line in resolved.splitlines() if line and not line.startswith("-e ")]
    header = [
        f"# The oldest releases otel-recovery supports, resolved for Python {python}.",
        "# Written by tests/lowest_versions/compile_pins.py; installed and run by",
        "# tests/test_lowest_versions.py. Regenerate after changing a floor in pyproject.toml.",
    ]
    target = pins_path(python)
    target.write_text("\n".join(header + pins) + "\n")
    return target


def main(argv: list[str]) -> int:
    uv = shutil.which("uv")
    if uv is None:
        print("compile_pins needs uv: pip install -e '.[maintain]'", file=sys.stderr)
        return 2
    for python in argv or PYTHONS:
        print(compile_pins(python, uv))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
