"""harness/provider.py against real PostgreSQL servers: embedded, an outside DSN, Docker."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import psutil  # type: ignore[import-untyped]
import psycopg
import pytest
import sqlalchemy
from sqlalchemy.ext.asyncio import create_async_engine

from payrace.harness.infra import pgdata
from payrace.harness.infra.provider import (
    ENV_VAR,
    Database,
    ProviderError,
    connect_failure,
    docker_available,
    provide_postgres,
    refused_for_good,
)


@pytest.fixture(scope="module")
def embedded() -> Iterator[tuple[Database, list[str]]]:
    announced: list[str] = []
    with provide_postgres(prefer="embedded", announce=announced.append) as database:
        yield database, announced


@pytest.fixture(scope="module")
def outside(embedded: tuple[Database, list[str]]) -> str:
    # CI points this at a real server; elsewhere the embedded one plays the outside server,
    # so the DSN route is always exercised.
    return os.environ.get("PAYRACE_TEST_OUTSIDE_DSN") or embedded[0].url


def _show(url: str, setting: str) -> str:
    with psycopg.connect(url) as conn:
        row = conn.execute(f"SHOW {setting}").fetchone()
    assert row is not None
    return str(row[0])


def _databases(url: str) -> set[str]:
    with psycopg.connect(url) as conn:
        return {name for (name,) in conn.execute("SELECT datname FROM pg_database")}


def _postmaster(database: Database) -> tuple[Path, int]:
    data_dir = Path(_show(database.url, "data_directory"))
    return data_dir, int((data_dir / "postmaster.pid").read_text().split()[0])


def _gone(pid: int) -> bool:
    try:
        return bool(psutil.Process(pid).status() == psutil.STATUS_ZOMBIE)  # exited, unreaped
    except psutil.NoSuchProcess:
        return True


def test_embedded_route_answers_with_version_fast_settings_and_room_for_connections(
    embedded: tuple[Database, list[str]],
) -> None:
    database, announced = embedded
    assert database.route == "embedded"
    assert database.url.startswith("postgresql://postgres@/postgres?host=/")
    assert _show(database.url, "server_version").startswith(database.server_version)
    assert re.fullmatch(r"\d+\.\d+", database.server_version)
    assert database.fast
    assert _show(database.url, "fsync") == "off"
    assert _show(database.url, "synchronous_commit") == "off"
    assert int(_show(database.url, "max_connections")) >= 300
    assert database.describe().startswith(f"embedded PostgreSQL {database.server_version} (")
    assert "fsync off, synchronous_commit off" in database.describe()
    [line] = announced
    assert "embedded PostgreSQL" in line
    assert "changes durability, not locking; pass --durable" in line


def test_embedded_route_leaves_no_directory_and_no_postmaster_behind() -> None:
    with provide_postgres(prefer="embedded", announce=lambda _: None) as database:
        data_dir, pid = _postmaster(database)
        assert not _gone(pid)
    assert not data_dir.parent.exists()
    assert _gone(pid)


@pytest.mark.slow
def test_the_embedded_server_restarts_on_the_same_socket_and_the_new_one_is_stopped_after() -> None:
    """Cluster (the restart-postgres nemesis): halted, nothing connects; resumed, the same URL
    answers; the run's cleanup stops the new postmaster, not the one halted."""
    with provide_postgres(prefer="embedded", announce=lambda _: None) as database:
        assert database.cluster is not None
        data_dir, first = _postmaster(database)
        database.cluster.halt()
        assert _gone(first)
        with pytest.raises(psycopg.OperationalError):
            psycopg.connect(database.url, connect_timeout=2).close()
        database.cluster.resume()
        assert _show(database.url, "fsync") == "off"  # the same cluster, the same settings
        _, second = _postmaster(database)
        assert second != first and not _gone(second)
    assert not data_dir.parent.exists()
    assert _gone(second)


def test_only_the_embedded_route_hands_out_a_server_payrace_may_restart(outside: str) -> None:
    with provide_postgres(outside, announce=lambda _: None) as database:
        assert database.route == "dsn" and database.cluster is None


@pytest.mark.parametrize("interruption", [RuntimeError, KeyboardInterrupt])
def test_embedded_route_cleans_up_when_the_body_raises(interruption: type[BaseException]) -> None:
    with (
        pytest.raises(interruption),
        provide_postgres(prefer="embedded", announce=lambda _: None) as database,
    ):
        data_dir, pid = _postmaster(database)
        raise interruption("the run ended early")
    assert not data_dir.parent.exists()
    assert _gone(pid)


def test_a_cluster_restarted_by_hand_is_the_one_stopped_at_the_end() -> None:
    """pg_ctl stop and start behind the provider's back (a test, an operator): the new
    postmaster is the one the data directory names, and it is stopped with the data, not left
    running on a deleted directory until its lock-file check a minute later."""
    from pgserver._commands import POSTGRES_BIN_PATH

    user = "pgserver" if os.geteuid() == 0 else None
    with provide_postgres(prefer="embedded", announce=lambda _: None) as database:
        data_dir, first = _postmaster(database)
        socket_dir = parse_qs(urlsplit(database.url).query)["host"][0]
        pg_ctl = [str(POSTGRES_BIN_PATH / "pg_ctl"), "-D", str(data_dir), "-w"]
        for args in (
            ["-m", "fast", "stop"],
            ["-o", '-h ""', "-o", f"-k {socket_dir}", "-l", str(data_dir / "log"), "start"],
        ):
            subprocess.run([*pg_ctl, *args], user=user, check=True, capture_output=True, timeout=60)
        _, second = _postmaster(database)
        assert second != first and _gone(first)
    assert not data_dir.parent.exists()
    assert _gone(second)


def test_durable_keeps_fsync_and_synchronous_commit_on() -> None:
    announced: list[str] = []
    with provide_postgres(prefer="embedded", durable=True, announce=announced.append) as database:
        assert not database.fast
        assert _show(database.url, "fsync") == "on"
        assert _show(database.url, "synchronous_commit") == "on"
        assert int(_show(database.url, "max_connections")) >= 300
    assert "durability" not in announced[0]
    assert "durable settings" in database.describe()


def test_sqlalchemy_psycopg_url_reaches_the_server(embedded: tuple[Database, list[str]]) -> None:
    engine = sqlalchemy.create_engine(embedded[0].psycopg_url())
    try:
        with engine.connect() as conn:
            assert conn.execute(sqlalchemy.text("SELECT 41 + 1")).scalar() == 42
    finally:
        engine.dispose()


async def test_sqlalchemy_asyncpg_url_reaches_the_server(
    embedded: tuple[Database, list[str]],
) -> None:
    engine = create_async_engine(embedded[0].asyncpg_url())
    try:
        async with engine.connect() as conn:
            assert (await conn.execute(sqlalchemy.text("SELECT 41 + 1"))).scalar() == 42
    finally:
        await engine.dispose()


def test_dsn_route_creates_a_fresh_database_and_drops_it_after(outside: str) -> None:
    with provide_postgres(outside, announce=lambda _: None) as database:
        name = database.url.split("?")[0].rsplit("/", 1)[1]
        assert database.route == "dsn"
        assert re.fullmatch(r"payrace_\d{14}_[0-9a-f]{6}", name)
        assert name in _databases(outside)
        with psycopg.connect(database.url) as conn:
            assert conn.execute("SELECT current_database()").fetchone() == (name,)
            conn.execute("CREATE TABLE payments (id int PRIMARY KEY)")
            conn.execute("INSERT INTO payments VALUES (1)")
        assert name in database.describe()
    assert name not in _databases(outside)


def test_dsn_route_drops_the_database_when_the_body_raises(outside: str) -> None:
    with (
        pytest.raises(RuntimeError),
        provide_postgres(outside, announce=lambda _: None) as database,
    ):
        name = database.url.split("?")[0].rsplit("/", 1)[1]
        with psycopg.connect(database.url):  # an open session must not block the drop
            raise RuntimeError("the run ended early")
    assert name not in _databases(outside)


@pytest.mark.parametrize(
    "scheme", ["postgres://", "postgresql+asyncpg://", "postgresql+psycopg://"]
)
def test_dsn_route_accepts_other_schemes_and_the_env_var(
    outside: str, scheme: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(ENV_VAR, re.sub(r"^[\w+]+://", scheme, outside))
    with provide_postgres(announce=lambda _: None) as database:
        assert database.route == "dsn"
        assert database.url.startswith("postgresql://")
        assert _show(database.url, "server_version").startswith(database.server_version)


@pytest.mark.parametrize(
    ("dsn", "complaint"),
    [
        ("host=localhost dbname=app", "is not a PostgreSQL URL"),
        ("mysql://root@localhost/app", "is not a PostgreSQL URL"),
        ("postgresql://app:s3cret@localhost:port/app", "cannot be read"),
        ("postgresql://app@localhost/app?colour=blue", "cannot be read"),
    ],
)
def test_malformed_dsn_says_what_to_fix_without_leaking_the_password(
    dsn: str, complaint: str
) -> None:
    with pytest.raises(ProviderError) as raised, provide_postgres(dsn):
        pytest.fail("a malformed DSN must not yield a database")
    message = str(raised.value)
    assert complaint in message
    assert "expected postgresql://user[:password]@host[:port]/dbname" in message
    assert "s3cret" not in message


def test_docker_route_hands_out_a_throwaway_container() -> None:
    answers, reason = docker_available()
    if not answers:
        pytest.skip(reason)
    with provide_postgres(prefer="docker", announce=lambda _: None) as database:
        assert database.route == "docker"
        assert database.fast
        assert int(_show(database.url, "max_connections")) >= 300
        assert database.server_version.startswith("16.")


def test_forced_route_that_cannot_start_names_all_three_routes(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("DOCKER_HOST", f"unix://{tmp_path}/no-daemon.sock")
    answers, reason = docker_available()
    assert not answers
    assert "no-daemon.sock" in reason
    with pytest.raises(ProviderError) as raised, provide_postgres(prefer="docker"):
        pytest.fail("no Docker daemon, yet a database was yielded")
    message = str(raised.value)
    for route in ("dsn:", "docker:", "embedded:"):
        assert route in message
    for way in (ENV_VAR, "DOCKER_HOST", "pip install pgserver"):
        assert way in message


def test_prefer_dsn_without_any_dsn_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ENV_VAR, raising=False)
    with pytest.raises(ProviderError, match="no DSN given"), provide_postgres(prefer="dsn"):
        pytest.fail("no DSN, yet a database was yielded")


def test_a_wrong_password_is_said_as_such_and_never_retried() -> None:
    said = (
        'connection failed: connection to server at "db.example", port 5432 failed: FATAL:  '
        'password authentication failed for user "shop"'
    )
    assert refused_for_good(said)
    assert not refused_for_good("the database system is starting up")
    assert not refused_for_good("Connection refused")
    message = connect_failure("postgresql://shop:hunter2@db.example:5432/shop", said, "--dsn")
    assert message.startswith("authentication failed for user shop at db.example:5432")
    assert "hunter2" not in message and "--dsn" in message
    down = connect_failure(
        "postgresql://shop:hunter2@db.example:1/shop", "Connection refused", "--target-dsn"
    )
    assert down.startswith("cannot connect to --target-dsn postgresql://shop:***@db.example:1/shop")


def test_the_first_embedded_server_caches_initdb_and_the_next_ones_start_from_it(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    with provide_postgres(prefer="embedded", announce=lambda _: None) as database:
        assert int(_show(database.url, "max_connections")) >= 300
    [template] = (tmp_path / "payrace").iterdir()
    assert (template / "PG_VERSION").is_file()
    # What initdb wrote, nothing of the run: no pid file, no log, no payrace settings.
    assert not (template / "postmaster.pid").exists() and not (template / "log").exists()
    assert "max_connections" not in (template / "postgresql.auto.conf").read_text()
    (template / "payrace-test-marker").write_text("from the template")
    with provide_postgres(prefer="embedded", announce=lambda _: None) as database:
        data_dir, _ = _postmaster(database)
        assert (data_dir / "payrace-test-marker").read_text() == "from the template"
        assert int(_show(database.url, "max_connections")) >= 300
        assert _show(database.url, "fsync") == "off"


def test_a_throwaway_cluster_keeps_its_data_in_memory_and_a_durable_one_on_disk() -> None:
    if not pgdata.in_memory(Path("/dev/shm")):
        pytest.skip("no memory filesystem at /dev/shm on this machine")
    with provide_postgres(prefer="embedded", announce=lambda _: None) as database:
        data_dir, _ = _postmaster(database)
        assert pgdata.in_memory(data_dir)
        assert "data in memory" in database.describe()
    with provide_postgres(prefer="embedded", durable=True, announce=lambda _: None) as database:
        data_dir, _ = _postmaster(database)
        assert not pgdata.in_memory(data_dir)
        assert "data in memory" not in database.describe()


def test_the_template_cache_drops_what_no_run_uses_and_keeps_the_rest(tmp_path: Path) -> None:
    cache = tmp_path / "payrace"
    now = time.time()

    def made(name: str, age_s: float) -> Path:
        path = cache / name
        (path / "base").mkdir(parents=True)
        (path / "PG_VERSION").write_text("16\n")
        os.utime(path, (now - age_s, now - age_s))
        return path

    current = made("pgdata-0.1.4-current", 90 * 24 * 3600)  # in use: kept however old
    stale = made("pgdata-0.1.3-oldkey", pgdata.STALE_TEMPLATE_S + 60)
    recent = made("pgdata-0.1.4-otherlocale", 24 * 3600)  # another key, used yesterday
    dead_staging = made(".building-abc123", pgdata.STALE_STAGING_S + 60)
    live_staging = made(".building-def456", 30)  # a run building its copy right now
    foreign = made("somebody-elses", 365 * 24 * 3600)

    removed = pgdata.prune(cache, current, now=now)

    assert sorted(removed) == sorted([stale, dead_staging])
    assert not stale.exists() and not dead_staging.exists()
    for kept in (current, recent, live_staging, foreign):
        assert kept.is_dir(), kept
    assert pgdata.prune(cache / "missing", current) == []


def test_a_run_that_copies_a_template_marks_it_in_use(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    template = tmp_path / "cache" / "pgdata-0.1.4-key"
    template.mkdir(parents=True)
    (template / "PG_VERSION").write_text("16\n")
    month_ago = time.time() - pgdata.STALE_TEMPLATE_S - 60
    os.utime(template, (month_ago, month_ago))
    monkeypatch.setattr(pgdata, "_template_path", lambda: template)
    target = tmp_path / "data"
    target.mkdir()

    assert pgdata.seed(target, None)

    assert (target / "PG_VERSION").read_text() == "16\n"
    assert time.time() - template.stat().st_mtime < 60
    assert pgdata.prune(template.parent, tmp_path / "cache" / "pgdata-newer") == []


_ROOT_ONLY = pytest.mark.skipif(
    os.name != "posix" or os.geteuid() != 0, reason="creates a system user: needs root"
)


@_ROOT_ONLY
def test_processes_creating_the_servers_user_at_once_all_succeed() -> None:
    # The fresh-machine race: every test worker found pgserver's user missing at once and all
    # but one useradd failed. A throwaway name stands in for `pgserver`, which other test
    # workers' servers run as and which must not be deleted under them.
    name = f"payrace-t{os.getpid()}"
    code = (
        "import sys\nfrom payrace.harness.infra import pgdata\n"
        "pgdata.ensure_user(sys.argv[1])\nprint('made')\n"
    )
    try:
        procs = [
            subprocess.Popen(
                [sys.executable, "-c", code, name],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for _ in range(6)
        ]
        results = [p.communicate(timeout=60) for p in procs]
        assert [p.returncode for p in procs] == [0] * 6, [err for _, err in results]
        assert all(out.strip() == "made" for out, _ in results)
        import pwd

        assert pwd.getpwnam(name).pw_name == name
    finally:
        subprocess.run(["userdel", "-r", name], capture_output=True, check=False)


@_ROOT_ONLY
def test_a_user_that_cannot_be_created_is_an_error_that_says_what_to_do() -> None:
    with pytest.raises(OSError, match=r"could not create the system user 'bad name:x'.*useradd"):
        pgdata.ensure_user("bad name:x")


def test_an_initdb_that_fails_is_reported_with_initdb_s_own_words() -> None:
    # A locale the machine does not have: no template is cached for it, so initdb runs, and
    # refuses. pgserver only logs initdb's stderr; the error must carry it.
    code = (
        "from payrace.harness.infra.provider import provide_postgres\n"
        "with provide_postgres(None, prefer='embedded') as db:\n"
        "    print('started', db.url)\n"
    )
    env = {**os.environ, "LC_ALL": "xx_XX.UTF-8", "LANG": "xx_XX.UTF-8"}
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120
    )
    assert done.returncode != 0 and "started" not in done.stdout
    assert "embedded: pgserver could not start" in done.stderr
    assert "initdb: error: invalid locale settings" in done.stderr, done.stderr[-2000:]
