"""The embedded server's data directory: where it lives, how it is filled, how it ends.

    workdir(durable)        a fresh directory for one cluster: in memory (/dev/shm) for a
                            throwaway cluster when that has room, the temporary directory
                            otherwise and always for --durable
    in_memory(path)         whether a directory lies on a memory filesystem (said in describe())
    seed(pgdata, owner)     fill an empty data directory from the cached initdb template:
                            True, or False when there is none yet (pgserver then runs initdb)
    keep(pgdata)            right after initdb, before the first start: cache the directory as
                            the template of the next runs (best effort), and prune the cache
    prune(cache, current)   templates of other keys unused for STALE_TEMPLATE_S, and staging
                            directories a killed run left, older than STALE_STAGING_S
    stop_now(pid)           immediate shutdown of a throwaway cluster, waited for
    ensure_user(name)       as root, the system user pgserver runs the server as, created
                            once for the machine under a file lock (see its docstring)

Why: a cold `payrace run` spent 1-2 s of its 5 s budget in initdb (the bootstrap backend and
about a thousand files written through a journaling filesystem) and 0.5 s in stopping and
deleting the cluster. A copy of initdb's output into memory takes under 0.1 s.

The template is exactly what initdb wrote, before payrace's settings are appended to
postgresql.auto.conf (per run: they differ with --durable). It is keyed by everything
initdb's output depends on here: the PostgreSQL binaries, the arguments pgserver passes
(fixed in its version), the user the server runs as, and the locale and time zone it reads
from the environment. It lives in the user's cache directory (platformdirs: ~/.cache/payrace
on Linux), is written under a temporary name and renamed into place, so a run never sees
half of one and two runs building it at once both succeed. A template is touched each time a
run copies it; one of another key (an older pgserver, other binaries, another locale) that no
run has copied for a month is removed when a new template is cached, as is a staging directory
a killed run left behind (each template is about 40 MB).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path

# What a throwaway cluster needs in memory at most, with room to spare (initdb's output is
# ~40 MB, a run's data a few MB): below this, /dev/shm (Docker's default is 64 MB) is skipped.
_ROOM_BYTES = 512 * 1024 * 1024
_MEMORY = Path("/dev/shm")
_MEMORY_FS_TYPES = {"tmpfs", "ramfs"}
# Files of a started or running cluster, never part of what initdb wrote.
_NOT_TEMPLATE = ("postmaster.pid", "postmaster.opts", "log", ".handle_pids.json")
STALE_TEMPLATE_S = 30 * 24 * 3600.0
# Building a template copies ~40 MB: a staging directory an hour old belongs to a dead run.
STALE_STAGING_S = 3600.0


def workdir(durable: bool) -> Path:
    """A new, empty directory for one cluster (the caller deletes it)."""
    parent = None if durable or not _has_room(_MEMORY) else str(_MEMORY)
    return Path(tempfile.mkdtemp(prefix="payrace-pg-", dir=parent)).resolve()


def in_memory(path: Path) -> bool:
    return _filesystem(path) in _MEMORY_FS_TYPES


def seed(pgdata: Path, owner: str | None) -> bool:
    """Copy the template into the empty `pgdata`, owned by `owner` (the system user the
    server runs as, None for the current one); False when there is no template yet or it
    cannot be read (the caller then runs initdb as before)."""
    template = _template_path()
    if template is None or not (template / "PG_VERSION").is_file():
        return False
    try:
        shutil.copytree(template, pgdata, symlinks=True, dirs_exist_ok=True)
        with contextlib.suppress(OSError):  # in use: prune() keeps it
            os.utime(template)
        if owner is not None:
            _chown_tree(pgdata, owner)
    except OSError:
        # A half-copied directory would make pgserver skip initdb: empty it instead.
        for child in pgdata.iterdir():
            if child.is_dir():
                shutil.rmtree(child, ignore_errors=True)
            else:
                child.unlink(missing_ok=True)
        return False
    return True


def keep(pgdata: Path) -> None:
    """Cache `pgdata`, freshly initdb'ed and never started, as the template; a failure (a
    read-only home, a full disk) only means the next run runs initdb too."""
    template = _template_path()
    if template is None or template.exists():
        return
    with contextlib.suppress(OSError):
        template.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".building-", dir=template.parent))
        try:
            shutil.copytree(
                pgdata,
                staging / "pgdata",
                symlinks=True,
                ignore=shutil.ignore_patterns(*_NOT_TEMPLATE),
            )
            # Atomic: a concurrent run sees the whole template or none; if another run
            # renamed its copy first, this one is simply dropped.
            with contextlib.suppress(OSError):
                os.rename(staging / "pgdata", template)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    prune(template.parent, template)


def prune(cache: Path, current: Path, *, now: float | None = None) -> list[Path]:
    """Remove from `cache` the templates other than `current` that no run has copied for
    STALE_TEMPLATE_S and the staging directories older than STALE_STAGING_S; what was
    removed. Best effort: a directory that cannot be read or removed stays."""
    now = time.time() if now is None else now
    removed: list[Path] = []
    try:
        entries = list(cache.iterdir())
    except OSError:
        return removed
    for entry in entries:
        if entry == current or not entry.is_dir() or entry.is_symlink():
            continue
        if entry.name.startswith("pgdata-"):
            age_limit = STALE_TEMPLATE_S
        elif entry.name.startswith(".building-"):
            age_limit = STALE_STAGING_S
        else:
            continue  # not payrace's
        try:
            stale = now - entry.stat().st_mtime > age_limit
        except OSError:
            continue
        if stale:
            shutil.rmtree(entry, ignore_errors=True)
            if not entry.exists():
                removed.append(entry)
    return removed


def postmaster_pid(pgdata: Path) -> int | None:
    """The running postmaster's pid as its data directory records it (postmaster.pid's first
    line), or None when there is none."""
    try:
        return int((pgdata / "postmaster.pid").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def stop_now(pid: int, *, within_s: float = 30.0) -> bool:
    """PostgreSQL's immediate shutdown (SIGQUIT: every backend ends at once, no checkpoint),
    waited for until the postmaster has exited (True) or `within_s` passed (False): the data
    is thrown away next, so a fast shutdown's checkpoint and pg_ctl's 100 ms polling would
    buy nothing."""
    import psutil

    try:
        postmaster = psutil.Process(pid)
        postmaster.send_signal(signal.SIGQUIT)
        # The postmaster exits after its children. It is pg_ctl's child, not ours: once
        # exited it stays a zombie until init reaps it, which can take seconds in a
        # container, so its exit is read from its state instead of waited for.
        deadline = time.monotonic() + within_s
        delay = 0.001
        while postmaster.status() != psutil.STATUS_ZOMBIE:
            if time.monotonic() > deadline:
                return False
            time.sleep(delay)
            delay = min(delay * 2, 0.02)
    except psutil.NoSuchProcess:
        pass
    return True


def _template_path() -> Path | None:
    try:
        import platformdirs
        from pgserver._commands import POSTGRES_BIN_PATH
    except ImportError:
        return None
    try:
        initdb = (POSTGRES_BIN_PATH / "initdb").stat()
        version = metadata.version("pgserver")
    except (OSError, metadata.PackageNotFoundError):
        return None
    owner = "pgserver" if sys.platform != "win32" and os.geteuid() == 0 else "self"
    zone = os.path.realpath("/etc/localtime") if os.path.exists("/etc/localtime") else ""
    said = sorted(
        (k, v) for k, v in os.environ.items() if k in ("LANG", "LANGUAGE", "TZ") or k[:3] == "LC_"
    )
    key = repr(
        (version, str(POSTGRES_BIN_PATH), initdb.st_size, initdb.st_mtime_ns, owner, zone, said)
    )
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return platformdirs.user_cache_path("payrace") / f"pgdata-{version}-{digest}"


def ensure_user(name: str) -> None:
    """Create the system user `name` if it does not exist (root only), one process at a time.

    As root pgserver runs the server as its own `pgserver` user and creates it with useradd on
    first use, unguarded since payrace replaced pgserver's machine-wide lock (which serialized
    every start). On a fresh machine the test workers or parallel CI jobs all found the user
    missing at once and all but one useradd failed ("already in use", exit 9): their runs
    ended with no PostgreSQL. A file lock serializes only this one-time step; the re-check
    under the lock makes the later runs, and a user another program made meanwhile, a no-op.
    """
    import fcntl
    import pwd

    def exists() -> bool:
        try:
            pwd.getpwnam(name)
        except KeyError:
            return False
        return True

    if exists():
        return
    lock = Path(tempfile.gettempdir()) / "payrace-useradd.lock"
    with lock.open("a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        if exists():
            return
        made = subprocess.run(
            ["useradd", "-s", "/bin/bash", name], capture_output=True, text=True, check=False
        )
        if made.returncode != 0 and not exists():
            raise OSError(
                f"could not create the system user {name!r} the embedded server runs as "
                f"(useradd exit {made.returncode}: {made.stderr.strip()}); create it by hand "
                f"(`useradd {name}`) or run payrace as a user other than root"
            )


def _chown_tree(root: Path, owner: str) -> None:
    import pwd

    entry = pwd.getpwnam(owner)
    os.chown(root, entry.pw_uid, entry.pw_gid)
    for folder, dirs, files in os.walk(root):
        for name in (*dirs, *files):
            os.chown(os.path.join(folder, name), entry.pw_uid, entry.pw_gid, follow_symlinks=False)


def _has_room(path: Path) -> bool:
    if not in_memory(path):
        return False
    try:
        stats = os.statvfs(path)
    except OSError:
        return False
    return os.access(path, os.W_OK) and stats.f_bavail * stats.f_frsize >= _ROOM_BYTES


def _filesystem(path: Path) -> str | None:
    """The type of the filesystem `path` is on (Linux: the longest mount point above it)."""
    try:
        mounts = Path("/proc/self/mounts").read_text().splitlines()
    except OSError:
        return None
    target = str(path.resolve()) if path.exists() else str(path)
    best, kind = "", None
    for line in mounts:
        fields = line.split()
        if len(fields) < 3:
            continue
        point = fields[1].replace("\\040", " ")
        inside = target == point or target.startswith(point.rstrip("/") + "/")
        if inside and len(point) >= len(best):
            best, kind = point, fields[2]
    return kind


__all__ = ["in_memory", "keep", "prune", "seed", "stop_now", "workdir"]
