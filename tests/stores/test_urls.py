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


# -- every part of a URL is checked at start-up, not at the first call ------------------------

BAD_URLS = [
    ("redis://127.0.0.1:notaport/0", ["port 'notaport'", "from 1 to 65535"]),
    ("redis://127.0.0.1:6379/0?socket_timeout=abc", ["socket_timeout='abc'", "seconds > 0"]),
    ("redis://127.0.0.1:6379/0?socket_timeout=nan", ["socket_timeout='nan'", "seconds > 0"]),
    ("redis://127.0.0.1:6379/0?frobnicate=1", ["Redis option(s) 'frobnicate'", "socket_timeout"]),
    (
        "postgresql://postgres@127.0.0.1:5432/test?frobnicate=1",
        ["PostgreSQL option(s) 'frobnicate'", "sslmode", "table", "libpq-connect"],
    ),
    ("postgresql://postgres@127.0.0.1:99999/test", ["port '99999'", "from 1 to 65535"]),
    ("postgresql://u@h1:5432,h2:x5/db", ["port 'x5'"]),
    ("postgresql://u@h/db?port=5432,0", ["port='5432,0'", "1 to 65535"]),
    ("redis://127.0.0.1:6379/notadb", ["database number", "'notadb'"]),
    ("redis://127.0.0.1:0/0", ["port '0'"]),
    ("postgresql://u@h/db?sslmode=REQUIRE", ["sslmode='REQUIRE'", "verify-full"]),
    ("postgresql://u@h/db?sslmod=require", ["'sslmod'", "did you mean 'sslmode'"]),
    ("postgresql://u@h/db?connect_timeout=soon", ["connect_timeout='soon'", "integer >= 0"]),
    ("postgresql://u@h/db?target_session_attrs=rw", ["read-write", "prefer-standby"]),
    ("postgresql://u@h/db?replication=database", ["replication", "cannot run"]),
    ("postgresql://u@h/db?table=Bad-Name", ["table='Bad-Name'", "lower-case SQL identifier"]),
    ("postgresql://u@h/db?operation_timeout=soon", ["operation_timeout='soon'", "seconds > 0"]),
    ("redis://h/0?operation_timeout=2", ["'operation_timeout'", "did you mean 'socket_timeout'"]),
    ("redis://h/0?decode_responses=true", ["decode_responses", "raw bytes"]),
    ("redis://h/0?retry_on_timeout=true", ["retry_on_timeout", "twice"]),
    ("redis://h/0?ssl_cert_reqs=none", ["ssl_cert_reqs", "only to rediss://"]),
    ("unix:///run/redis.sock?socket_keepalive=1", ["socket_keepalive", "not unix://"]),
    ("redis://h/0?socket_keepalive=maybe", ["socket_keepalive='maybe'", "true, false"]),
    ("redis://h/0?max_versions=0", ["max_versions='0'", "integer >= 1"]),
    ("redis://h/0?db=1&db=2", ["db given more than once"]),
    ("redis://h1,h2/0", ["one host"]),
    ("redis://[not-v6]:6379/0", ["IPv6"]),
    ("unix://", ["socket's path"]),
    ("sqlite:///x.db?busy_timeout=-1", ["busy_timeout='-1'", "integer >= 0"]),
    ("memory://?max_versions=many", ["max_versions='many'"]),
]


@pytest.mark.parametrize(("url", "says"), BAD_URLS)
def test_a_bad_url_fails_at_start_up_naming_the_bad_part_and_what_is_accepted(
    url, says, monkeypatch
):
    with pytest.raises(StoreConfigError) as caught:
        open_store(url)  # parsing only: no server is contacted for any of these
    message = str(caught.value)
    assert message.startswith(f"store={url!r}"), message  # the setting and the URL
    for fragment in says:
        assert fragment in message, message
    monkeypatch.setenv("OTEL_RECOVERY_STORE_URL", url)
    with pytest.raises(StoreConfigError, match="OTEL_RECOVERY_STORE_URL"):
        Checkpoints()


def test_url_errors_never_show_a_password_even_a_badly_written_one():
    with pytest.raises(StoreConfigError) as caught:
        open_store("redis://:hunter2@127.0.0.1:notaport/0")
    assert "hunter2" not in str(caught.value) and "'notaport'" in str(caught.value)
    # An unencoded "/" in the password cuts the URL's host part short: the "port" found
    # there is a piece of the password, and is not quoted.
    with pytest.raises(StoreConfigError) as caught:
        open_store("redis://app:hun/ter2@127.0.0.1:6379/0")
    assert "hun" not in str(caught.value) and "ter2" not in str(caught.value)
    with pytest.raises(StoreConfigError) as caught:
        open_store("postgresql://app:hunter2@h/db?sslpassword=s3cret&sslmode=bogus")
    assert "hunter2" not in str(caught.value) and "s3cret" not in str(caught.value)


def test_every_libpq_parameter_is_accepted_and_only_those():
    pq = pytest.importorskip("psycopg").pq
    for option in pq.Conninfo.get_defaults():
        name = option.keyword.decode()
        if (b"D" in option.dispchar and name != "sslkeylogfile") or name == "replication":
            continue  # libpq's debug options (undocumented) and replication: refused
        try:
            open_store(f"postgresql://u@h/db?{name}=x")
        except StoreConfigError as error:  # a typed one refuses "x", by value, not by name
            assert "unknown" not in str(error) and f"{name}='x'" in str(error), str(error)


@pytest.mark.parametrize(
    ("url", "target"),
    [
        ("unix:///run/redis.sock?db=1&prefix=a:", "unix:///run/redis.sock?db=1"),
        (
            "postgresql:///test?host=127.0.0.1&user=postgres&table=t1",
            "postgresql:///test?host=127.0.0.1&user=postgres",
        ),
        (
            "postgresql://u@h/db?options=-c%20statement_timeout%3D5000",
            "postgresql://u@h/db?options=-c%20statement_timeout%3D5000",
        ),
        (
            "postgresql://u@h1:5432,h2:5433/db?ssl=true",
            "postgresql://u@h1:5432,h2:5433/db?ssl=true",
        ),
        ("postgresql://u@[::1]:5432/db", "postgresql://u@[::1]:5432/db"),
        (  # read by PostgresStore itself, so it stays in what the store is given
            "postgresql://u@h/db?operation_timeout=2.5&table=t1",
            "postgresql://u@h/db?operation_timeout=2.5",
        ),
        ("rediss://h:6380/2?ssl_cert_reqs=required", "rediss://h:6380/2?ssl_cert_reqs=required"),
    ],
)
def test_good_urls_reach_the_client_intact(url, target):
    from otel_recovery.stores import parse_store_url

    assert parse_store_url(url).target == target


def test_client_options_in_the_url_reach_the_real_servers(durable):
    from .conftest import POSTGRES_URL, REDIS_URL

    tag = f"otr url {durable.name}"
    options = {
        "sqlite": "busy_timeout=3&synchronous=FULL",
        "redis": f"socket_timeout=2&client_name={tag.replace(' ', '-')}&health_check_interval=0",
        "postgres": f"application_name={tag.replace(' ', '%20')}&sslmode=disable"
        "&connect_timeout=3&options=-c%20statement_timeout%3D4321",
    }[durable.kind]
    store = durable.open(options)
    store.put("k", b"{}")
    assert store.get("k") is not None
    if durable.kind == "redis":
        import redis

        admin = redis.Redis.from_url(REDIS_URL)
        assert tag.replace(" ", "-") in {c.get("name") for c in admin.client_list()}
        admin.close()
    elif durable.kind == "postgres":
        import psycopg

        with psycopg.connect(POSTGRES_URL, autocommit=True) as admin:
            rows = admin.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s", (tag,)
            ).fetchone()
        assert rows is not None and rows[0] >= 1  # the space survived, unlike "+"
