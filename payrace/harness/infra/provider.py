"""Hand every part of payrace a PostgreSQL DSN, wherever the user is.

    provide_postgres(dsn, durable=, prefer=, announce=)   context manager -> Database
    ├── 1. "dsn"       dsn argument or $PAYRACE_DSN: CREATE DATABASE payrace_<utc>_<hex>
    │                  on that server, DROP ... WITH (FORCE) after; server settings left alone
    ├── 2. "docker"    a Docker daemon answering a ping: testcontainers postgres:16-alpine
    └── 3. "embedded"  the pgserver wheel: a fresh directory (in memory when throwaway) filled
                       from a cached initdb template (infra.pgdata), started; stopped at once
    Database           url (libpq), route, server_version, fast; SQLAlchemy URLs; describe();
                       cluster: the embedded server's Cluster (None on the other routes)
    Cluster            halt() / resume() the embedded server payrace started (the
                       restart-postgres nemesis): pg_ctl stop -m fast, then pgserver's own start
    ProviderError      nothing could be provided: names all three routes and how to get each
    docker_available() (answers?, reason): the quick check behind route 2

Each route is configure -> start -> wait until `SELECT version()` answers -> yield, and its
`finally` stops and deletes what it started, also when the start fails or on Ctrl-C.
Throwaway clusters (docker, embedded) run with fsync and synchronous_commit off unless
durable=True: that changes durability, not locking, and the run says so.
"""

from __future__ import annotations

import gc
import logging
import os
import secrets
import shutil
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal
from urllib.parse import parse_qs, quote, urlsplit

import psycopg
from psycopg import sql

from payrace.harness.infra import env, watchdog
from payrace.harness.infra import pgdata as pgdata_files
from payrace.harness.infra.readiness import NotReady, wait_until_ready
from payrace.postgres import EXPECTED, DsnError, dialect_url, libpq_url, refused_for_good
from payrace.redact import redact

Route = Literal["dsn", "docker", "embedded"]

ENV_VAR = env.DSN  # (PAYRACE_DATABASE_URL, its old name, is read for one more release)
DOCKER_IMAGE = "postgres:16-alpine"
_FAST = {"fsync": "off", "synchronous_commit": "off"}
# A race opens many sessions at once (service pool + probes + admin); the default 100 runs out.
_ROOMY = {"max_connections": "300"}
_EXPECTED = (
    EXPECTED + f", or leave the DSN and ${ENV_VAR} out to let payrace start its own PostgreSQL"
)
_HOW_TO_GET: dict[Route, str] = {
    "dsn": f"pass --dsn postgresql://user@host:5432/postgres or set ${ENV_VAR}; payrace "
    "creates a database there for the run and drops it after (the user needs CREATEDB)",
    "docker": "start a Docker daemon (Docker Desktop, colima, `sudo systemctl start docker`) or "
    f"point DOCKER_HOST at one; payrace runs {DOCKER_IMAGE} through testcontainers",
    "embedded": "`pip install pgserver` (wheels for Linux and macOS; as root it runs the server "
    "as a `pgserver` system user); payrace runs it in a temporary directory",
}


class ProviderError(RuntimeError):
    """No PostgreSQL could be provided; the message says what happened and what to do."""


@dataclass(frozen=True)
class Database:
    url: str  # libpq URL: psql and psycopg take it as is
    route: Route
    server_version: str
    fast: bool  # fsync and synchronous_commit are both off on this server
    # The server itself, when payrace started it and can restart it (embedded only).
    cluster: Cluster | None = field(default=None, compare=False, repr=False)

    def asyncpg_url(self) -> str:
        return dialect_url(self.url, "asyncpg")

    def psycopg_url(self) -> str:
        return dialect_url(self.url, "psycopg")

    def describe(self) -> str:
        settings = "fsync off, synchronous_commit off" if self.fast else "durable settings"
        where = _where(self.url)
        if self.route == "embedded":
            if self.cluster is not None and pgdata_files.in_memory(self.cluster.server.pgdata):
                settings += ", data in memory"
            return f"embedded PostgreSQL {self.server_version} (pgserver, {where}, {settings})"
        if self.route == "docker":
            return (
                f"docker PostgreSQL {self.server_version} ({DOCKER_IMAGE} at {where}, {settings})"
            )
        database = urlsplit(self.url).path.lstrip("/")
        return (
            f"PostgreSQL {self.server_version} from the DSN ({where}, database {database} "
            f"dropped after the run, {settings})"
        )


@contextmanager
def provide_postgres(
    dsn: str | None = None,
    *,
    durable: bool = False,
    prefer: Route | None = None,
    announce: Callable[[str], None] | None = None,
) -> Iterator[Database]:
    """Yield a Database on the first route that works (or on `prefer`), clean up after."""
    say = announce or _print_to_stderr
    with ExitStack() as stack:
        # A deprecated name is said on stderr, not through `say`, which a caller may silence.
        dsn = dsn or env.read(ENV_VAR) or None
        database = _start_one(stack, dsn, durable, prefer, say)
        line = f"payrace: using {database.describe()}"
        if database.fast and database.route != "dsn":
            line += (
                "; fsync and synchronous_commit are off for this throwaway cluster: that "
                "changes durability, not locking; pass --durable to keep defaults"
            )
        say(line)
        yield database


def docker_available() -> tuple[bool, str]:
    """Whether a Docker daemon answers a ping within 2 s, and why (not)."""
    host = os.environ.get("DOCKER_HOST")
    where = host or "unix:///var/run/docker.sock"
    if not host and not Path("/var/run/docker.sock").exists():
        return False, "no Docker daemon: DOCKER_HOST is unset and /var/run/docker.sock is missing"
    try:
        import docker  # type: ignore[import-untyped]
    except ImportError:
        return False, "the docker Python package is not installed"
    with warnings.catch_warnings():
        # A refused connection leaves its socket to the garbage collector; that ResourceWarning
        # would turn into an error under pytest's filterwarnings=error, and says nothing new.
        warnings.simplefilter("ignore", ResourceWarning)
        try:
            client = docker.from_env(timeout=2)
            try:
                client.ping()
            finally:
                client.close()
            answer = (True, f"a Docker daemon answers at {where}")
        except Exception as exc:
            answer = (False, f"no Docker daemon answered at {where} within 2 s: {exc}")
        gc.collect()
    return answer


def _start_one(
    stack: ExitStack,
    dsn: str | None,
    durable: bool,
    prefer: Route | None,
    say: Callable[[str], None],
) -> Database:
    tried: dict[Route, str] = {}
    if prefer in (None, "dsn"):
        if dsn:
            # A server the user named is never silently swapped for another one.
            return stack.enter_context(_from_dsn(dsn, say))
        tried["dsn"] = f"no DSN given (dsn argument, --dsn or ${ENV_VAR})"
    if prefer in (None, "docker"):
        answers, reason = docker_available()
        if answers:
            try:
                return stack.enter_context(_from_docker(durable))
            except ProviderError as exc:
                reason = str(exc)
                if prefer is None:
                    say(f"payrace: docker route failed, trying embedded PostgreSQL: {reason}")
        tried["docker"] = reason
    if prefer in (None, "embedded"):
        try:
            return stack.enter_context(_from_pgserver(durable))
        except ProviderError as exc:
            tried["embedded"] = str(exc)
    lines = ["no PostgreSQL could be provided; each route, what happened, and how to get it:"]
    for route in ("dsn", "docker", "embedded"):
        lines.append(f"  {route}: {tried.get(route, f'not tried (prefer={prefer!r})')}")
        lines.append(f"    to get it: {_HOW_TO_GET[route]}")
    raise ProviderError("\n".join(lines))


@contextmanager
def _from_dsn(dsn: str, say: Callable[[str], None]) -> Iterator[Database]:
    admin_url = _normalise(dsn)
    hint = f"check the server is up and that `psql '{redact(admin_url)}'` connects"
    _wait_until_queries_answer(admin_url, within=5.0, hint=hint)
    name = f"payrace_{datetime.now(UTC):%Y%m%d%H%M%S}_{secrets.token_hex(3)}"
    try:
        _run_outside_a_transaction(
            admin_url, sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name))
        )
    except psycopg.Error as exc:
        raise ProviderError(
            f"dsn: could not create database {name} at {_where(admin_url)}: {exc}; "
            "the DSN's user needs the CREATEDB privilege"
        ) from exc
    # If payrace is killed outright (SIGKILL, the OOM killer), the guardian drops it.
    watchdog.guard_database(admin_url, name)
    try:
        url = _with_database(admin_url, name)
        version, fast = _wait_until_queries_answer(url, within=5.0, hint=hint)
        yield Database(url, "dsn", version, fast)
    finally:
        drop = sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
        try:
            _run_outside_a_transaction(admin_url, drop)
            watchdog.release_database(name)
        except psycopg.Error as exc:
            # Raising here would hide whatever ended the run; say it loudly instead (the
            # guardian tries again when payrace exits).
            say(f"payrace: could not drop database {name} at {_where(admin_url)}: {exc}")


@contextmanager
def _from_docker(durable: bool) -> Iterator[Database]:
    try:
        from testcontainers.community.postgres import PostgresContainer
    except ImportError:  # testcontainers before the community/ split
        from testcontainers.postgres import PostgresContainer
    settings = _ROOMY if durable else {**_ROOMY, **_FAST}
    command = ["postgres", *(arg for k, v in settings.items() for arg in ("-c", f"{k}={v}"))]
    container = PostgresContainer(
        DOCKER_IMAGE, username="postgres", password="payrace", dbname="postgres", driver=None
    ).with_command(command)
    with ExitStack() as stack:
        try:
            stack.enter_context(container)  # its __enter__ removes the container if start fails
        except Exception as exc:
            raise ProviderError(f"docker: could not start {DOCKER_IMAGE}: {exc}") from exc
        url = container.get_connection_url()
        hint = "`docker logs` of the postgres container; is the daemon short of memory?"
        version, fast = _wait_until_queries_answer(url, within=60.0, hint=hint)
        yield Database(url, "docker", version, fast)


class Cluster:
    """Stop and start the embedded server payrace started, on its data directory: the same
    socket, so every DSN handed out stays valid. Blocking; the nemesis runs it in a thread."""

    def __init__(self, server: Any, socket_dir: Path | None) -> None:
        self.server = server  # pgserver's PostgresServer
        self.socket_dir = socket_dir

    def halt(self) -> None:
        from pgserver._commands import POSTGRES_BIN_PATH

        # Fast shutdown: every session is ended (57P01) and new ones refused, as in a restart.
        # As root pg_ctl runs as pgserver's own user (it refuses root), as pgserver does.
        stop = [str(POSTGRES_BIN_PATH / "pg_ctl"), "-D", str(self.server.pgdata), "-w"]
        subprocess.run([*stop, "-m", "fast", "stop"], user=self.server.system_user,
                       capture_output=True, timeout=60, check=True)  # fmt: skip

    def resume(self) -> None:
        # pgserver's own start (its options, its socket directory), which also records the new
        # postmaster, so the run's cleanup stops this one and not the one halted.
        with self.server._lock:  # pgserver's own start holds it too
            self.server.ensure_postgres_running()
        now = self.server.get_postmaster_info().socket_dir
        if now != self.socket_dir:  # every URL payrace handed out names the old one
            raise ProviderError(
                f"embedded: restarted on socket {now}, not {self.socket_dir}; see "
                f"{self.server.pgdata / 'log'}"
            )


class _PgserverErrors(logging.Handler):
    """What pgserver logs at ERROR while a cluster starts: a failed initdb's stderr."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.said: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.said.append(record.getMessage().strip()[-1500:])


@contextmanager
def _from_pgserver(durable: bool) -> Iterator[Database]:
    try:
        with warnings.catch_warnings():
            # Root shells and CI have no XDG_RUNTIME_DIR; pgserver falls back to /tmp, harmlessly.
            warnings.simplefilter("ignore")
            from pgserver._commands import POSTGRES_BIN_PATH
            from pgserver.postgres_server import PostgresServer
    except ImportError as exc:
        raise ProviderError(f"embedded: pgserver is not importable ({exc})") from exc
    settings = _ROOMY if durable else {**_ROOMY, **_FAST}

    class TunedServer(PostgresServer):
        def __init__(self, pgdata: Path, *, cleanup_mode: str | None = "stop") -> None:
            # pgserver's lock is one file for every server of the machine's user, held
            # through initdb, start and stop: every other payrace run, test worker or
            # pgserver user waited for it (seconds on a busy machine). It guards servers that
            # processes share by data directory; payrace's directory is its own.
            self._lock = threading.Lock()
            if sys.platform != "win32" and os.geteuid() == 0:
                # What pgserver's lock also guarded: creating its system user (see there).
                pgdata_files.ensure_user("pgserver")
            super().__init__(pgdata, cleanup_mode=cleanup_mode)

        # max_connections takes effect only at server start, and pgserver starts the server in
        # its constructor right after initdb: this hook is the one moment between the two.
        def ensure_pgdata_inited(self) -> None:
            # With the cached template in place pgserver finds PG_VERSION and skips initdb.
            seeded = pgdata_files.seed(self.pgdata, self.system_user)
            super().ensure_pgdata_inited()
            if not seeded:
                pgdata_files.keep(self.pgdata)
            with (self.pgdata / "postgresql.auto.conf").open("a") as conf:
                conf.writelines(f"{key} = '{value}'\n" for key, value in settings.items())

    workdir = pgdata_files.workdir(durable)
    pgdata = workdir / "pgdata"
    pgdata.mkdir()
    server: TunedServer | None = None
    try:
        failed = _PgserverErrors()
        logging.getLogger("pgserver").addHandler(failed)
        try:
            server = TunedServer(pgdata, cleanup_mode="delete")
        except Exception as exc:
            log = pgdata / "log"
            tail = "".join(log.read_text().splitlines(True)[-15:]) if log.exists() else ""
            # A failed initdb says why only on its stderr, which pgserver logs, not raises.
            tail = "".join(f"{said}\n" for said in failed.said[-2:]) + tail
            raise ProviderError(
                f"embedded: pgserver could not start in {pgdata}: {exc}\n{tail}"
            ) from exc
        finally:
            logging.getLogger("pgserver").removeHandler(failed)
        socket_dir = server.get_postmaster_info().socket_dir
        url = (
            f"postgresql://postgres@/postgres?host={quote(str(socket_dir))}"
            if socket_dir is not None
            else _normalise(server.get_uri())  # Windows: TCP on 127.0.0.1
        )
        hint = f"read the server log at {pgdata / 'log'}"
        version, fast = _wait_until_queries_answer(url, within=30.0, hint=hint)
        # pg_ctl detached the postmaster: if payrace is killed outright, the guardian stops it.
        watchdog.guard_cluster(workdir)
        yield Database(url, "embedded", version, fast, Cluster(server, socket_dir))
    finally:
        if server is not None:
            # The data is thrown away: an immediate shutdown, waited for; pgserver's cleanup
            # then finds the postmaster gone and removes pgdata. The postmaster is the one the
            # data directory names: one restarted behind pgserver's back (pg_ctl by hand)
            # is not the one pgserver recorded, and would outlive its deleted directory.
            info = server._postmaster_info
            pid = pgdata_files.postmaster_pid(pgdata) or (info.pid if info is not None else None)
            if pid is not None and pgdata_files.stop_now(pid):
                # pgserver would see the exited postmaster as running until init reaps it
                # (psutil counts a zombie as running), and wait for that.
                server._postmaster_info = None
            server.cleanup()
        elif (pgdata / "postmaster.pid").exists():
            # Interrupted between pg_ctl start and pgserver handing back a handle.
            pg_ctl = str(POSTGRES_BIN_PATH / "pg_ctl")
            stop = [pg_ctl, "-D", str(pgdata), "-m", "immediate", "stop"]
            owner = "pgserver" if os.geteuid() == 0 else None  # pgserver's user when run as root
            subprocess.run(stop, user=owner, capture_output=True, timeout=30, check=False)
        # An interrupted initdb leaves its bootstrap postgres writing for a moment: retry.
        deadline = time.monotonic() + 5.0
        while True:
            shutil.rmtree(workdir, ignore_errors=True)
            if not workdir.exists() or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        watchdog.release_cluster(workdir)


def _wait_until_queries_answer(url: str, *, within: float, hint: str) -> tuple[str, bool]:
    """Poll until a real query answers; return (server version, fsync+synchronous_commit off)."""

    def answers() -> tuple[str, bool]:
        try:
            with psycopg.connect(url, autocommit=True, connect_timeout=2) as conn:
                conn.execute("SELECT version()").fetchone()
                row = conn.execute(
                    "SELECT current_setting('fsync') = 'off'"
                    " AND current_setting('synchronous_commit') = 'off'"
                ).fetchone()
                number = conn.info.server_version
                return f"{number // 10000}.{number % 10000}", bool(row and row[0])
        except psycopg.OperationalError as exc:
            said = " ".join(str(exc).split())
            if refused_for_good(said):  # waiting would only repeat it: a wrong password
                raise ProviderError(connect_failure(url, said, "the DSN")) from None
            raise NotReady(said) from None

    def timed_out(last_seen: str) -> ProviderError:
        return ProviderError(
            f"PostgreSQL at {_where(url)} did not answer SELECT version() within "
            f"{within:.0f} s; last seen: {last_seen}\nTry: {hint}"
        )

    return wait_until_ready(answers, timeout_s=within, timed_out=timed_out)


def connect_failure(url: str, message: str, what: str) -> str:
    """Why `url` cannot be used, said once for --dsn and --target-dsn: the user and server
    named, the password never."""
    user = urlsplit(url).username or "(default user)"
    said = redact(" ".join(message.split()))
    if "authentication failed" in said.lower() or ("role" in said and "does not exist" in said):
        return (
            f"authentication failed for user {user} at {_where(url)} ({said}); check the "
            f"user and password in {what}"
        )
    return f"cannot connect to {what} {redact(url)} ({said}); check the server is up"


def _run_outside_a_transaction(url: str, statement: sql.Composed) -> None:
    # CREATE/DROP DATABASE refuse to run inside a transaction block, hence autocommit.
    with psycopg.connect(url, autocommit=True, connect_timeout=5) as conn:
        conn.execute(statement)


def _normalise(dsn: str) -> str:
    text = dsn.strip()
    try:
        url = libpq_url(text)
    except DsnError:
        raise ProviderError(f"DSN {redact(text)!r} is not a PostgreSQL URL: {_EXPECTED}") from None
    try:
        _ = urlsplit(url).port  # a non-numeric port or broken IPv6 host surfaces only here
        psycopg.conninfo.conninfo_to_dict(url)
    except (ValueError, psycopg.Error) as exc:
        raise ProviderError(f"DSN {redact(text)!r} cannot be read ({exc}): {_EXPECTED}") from None
    return url


def _with_database(url: str, name: str) -> str:
    # Not urlunsplit: it drops the "//" of an empty host (postgresql:///db?host=/socket/dir).
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}/{name}" + (f"?{parts.query}" if parts.query else "")


def _where(url: str) -> str:
    parts = urlsplit(url)
    host = parse_qs(parts.query).get("host", [parts.hostname or "localhost"])[0]
    return f"socket {host}" if host.startswith("/") else f"{host}:{parts.port or 5432}"


def _print_to_stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)
