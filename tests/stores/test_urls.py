"""Store URLs: validation at start-up, the SQLite default file, redaction, lazy client imports."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from otel_recovery.checkpoint import Checkpoints
from otel_recovery.stores import (
    MemoryStore,
    StoreConfigError,
    default_sqlite_path,
    default_store_url,
    open_store,
)


@pytest.mark.parametrize(
    "url",
    ["ftp://host/x", "mysql://u:pw@h/db", "redis", "", "sqlite://host/x.db", "memory://x"],
)
def test_bad_urls_fail_at_start_up_naming_the_setting_and_the_schemes(url, monkeypatch):
    with pytest.raises(StoreConfigError) as caught:
        open_store(url)
    assert "store" in str(caught.value)
    if not url:
        return  # an empty OTEL_RECOVERY_STORE_URL means "not set": the default applies
    monkeypatch.setenv("OTEL_RECOVERY_STORE_URL", url)
    with pytest.raises(StoreConfigError, match="OTEL_RECOVERY_STORE_URL") as caught:
        Checkpoints()
    if url.startswith(("ftp", "mysql", "redis")):
        assert "memory://" in str(caught.value) and "postgresql://" in str(caught.value)


def test_passwords_never_appear_in_errors_or_reprs():
    with pytest.raises(StoreConfigError) as caught:
        open_store("mysql://admin:hunter2@db/x")
    assert "hunter2" not in str(caught.value) and "***" in str(caught.value)
    redis_store = open_store("redis://:hunter2@127.0.0.1:1/0")
    postgres_store = open_store("postgresql://app:hunter2@127.0.0.1:1/db?table=t1")
    for store in (redis_store, postgres_store):
        assert "hunter2" not in store.url and "hunter2" not in repr(store)
    with pytest.raises(StoreConfigError, match="table") as caught:
        open_store("postgresql://app:hunter2@127.0.0.1/db?table=Robert');DROP")
    assert "hunter2" not in str(caught.value)


def test_options_are_parsed_and_checked():
    assert open_store("memory://?max_versions=3").max_versions == 3
    with pytest.raises(StoreConfigError, match="max_versions"):
        open_store("memory://?max_versions=zero")
    with pytest.raises(StoreConfigError, match="synchronous"):
        open_store("sqlite:///x.db?synchronous=sometimes")
    with pytest.raises(StoreConfigError, match="unknown SQLite option"):
        open_store("sqlite:///x.db?journal=off")
    assert open_store("redis://127.0.0.1/0?prefix=app:").prefix == "app:"


def test_sqlite_paths_follow_the_sqlalchemy_convention(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert open_store("sqlite:///rel/state.db").path == Path("rel/state.db")
    assert open_store(f"sqlite:///{tmp_path}/abs.db").path == tmp_path / "abs.db"
    assert open_store("sqlite:////tmp/x.db").path == Path("/tmp/x.db")


def test_the_default_is_the_sqlite_state_file_and_the_env_var_changes_it(tmp_path, monkeypatch):
    monkeypatch.delenv("OTEL_RECOVERY_STORE_URL", raising=False)
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    assert default_store_url() == "sqlite://"
    assert default_sqlite_path() == tmp_path / "state" / "otel-recovery" / "state.db"
    checkpoints = Checkpoints()
    checkpoints.save("survives", {"a": 1})
    assert (tmp_path / "state" / "otel-recovery" / "state.db").exists()
    checkpoints.close()
    assert Checkpoints().load("survives").state == {"a": 1}  # a new "process" sees it
    monkeypatch.setenv("XDG_STATE_HOME", "relative/ignored")  # the spec says: ignore it
    assert default_sqlite_path() == Path.home() / ".local/state/otel-recovery/state.db"
    monkeypatch.setenv("OTEL_RECOVERY_STORE_URL", "memory://")
    assert isinstance(Checkpoints().store, MemoryStore)


def test_opening_a_store_does_not_connect_and_imports_no_client_until_needed():
    code = (
        "import sys, otel_recovery, otel_recovery.stores as s\n"
        "s.open_store('memory://'); s.open_store('sqlite:///never-created.db')\n"
        "assert not {'redis', 'psycopg'} & set(sys.modules), sorted(sys.modules)\n"
        "s.open_store('redis://127.0.0.1:1/0'); s.open_store('postgresql://u@127.0.0.1:1/d')\n"
        "assert {'redis', 'psycopg'} <= set(sys.modules)\n"
        "import os; assert not os.path.exists('never-created.db')\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, check=False
    )
    assert done.returncode == 0, done.stderr
