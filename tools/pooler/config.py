"""The production PgBouncer's configuration, rendered at container start (infra/pooler/entrypoint.sh).

    python -m tools.pooler.config      # writes pgbouncer.ini, pg_hba.conf and empty tenant files into the state dir

TLS is required from clients (`client_tls_sslmode = require`, certificate and
key as PEM text in INSTAPG_POOLER_TLS_CERT_PEM / INSTAPG_POOLER_TLS_KEY_PEM,
which ECS fills from a Secrets Manager secret, written here to 0600 files;
or as paths in INSTAPG_POOLER_TLS_CERT / INSTAPG_POOLER_TLS_KEY); PgBouncer verifies
the host's certificate (`server_tls_sslmode`, default verify-full against the
RDS CA bundle). PgBouncer listens on one port: the admin console (`pgbouncer`
database) is allowed by pg_hba.conf only from 127.0.0.1, which is where
tools/pooler/adminport.py forwards the admin port from; the NLB forwards the
public port only. Options newer than the running PgBouncer are left out
(`pgbouncer --version` decides), so the same file runs on Debian 12's 1.18 in
the tests and on the image's newer PgBouncer.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from chalicelib import pooler

INI = "pgbouncer.ini"
HBA = "pg_hba.conf"
PUBLIC_PORT = 5432
ADMIN_PORT = 6433  # tools/pooler/adminport.py; never a listener of the NLB
# The source address the forwarder connects from; the only one allowed into the admin console.
ADMIN_FROM = "127.0.0.1"


def version(binary: str = "pgbouncer") -> tuple[int, int]:
    """(major, minor) of the PgBouncer on PATH."""
    out = subprocess.run([binary, "--version"], capture_output=True, text=True, check=True).stdout
    found = re.search(r"PgBouncer (\d+)\.(\d+)", out)
    if not found:
        raise RuntimeError(f"cannot read PgBouncer's version from {out[:80]!r}")
    return int(found.group(1)), int(found.group(2))


def render_hba(admin_user: str, admin_from: str = ADMIN_FROM) -> str:
    """Admin console only from `admin_from` (the admin port's forwarder); tenants only over TLS, with SCRAM."""
    if not re.match(r"^[a-z_][a-z0-9_]*$", admin_user) or not re.match(r"^127\.\d+\.\d+\.\d+$", admin_from):
        raise ValueError("admin user must be a plain name, and the admin source a loopback address")
    return (
        f"hostssl pgbouncer {admin_user} {admin_from}/32 scram-sha-256\n"
        "host    pgbouncer all 0.0.0.0/0 reject\n"
        "host    pgbouncer all ::/0 reject\n"
        "hostssl all all 0.0.0.0/0 scram-sha-256\n"
        "hostssl all all ::/0 scram-sha-256\n"
    )


def render_ini(
    state_dir: Path,
    pgbouncer_version: tuple[int, int],
    *,
    admin_user: str,
    tls_cert: str,
    tls_key: str,
    listen_port: int = PUBLIC_PORT,
    server_tls_sslmode: str = "verify-full",
    server_tls_ca_file: str | None = None,
    max_client_conn: int = 10000,
    client_limit_per_tenant: int = 200,
) -> str:
    """pgbouncer.ini for the container; `state_dir` holds what the sync loop writes."""
    values = {
        "listen_addr": "0.0.0.0",
        "listen_port": str(listen_port),
        "unix_socket_dir": "",
        "auth_type": "hba",
        "auth_hba_file": str(state_dir / HBA),
        "auth_file": str(state_dir / pooler.AUTH_FILE),
        "admin_users": admin_user,
        "stats_users": admin_user,
        "pool_mode": "transaction",
        "default_pool_size": "5",
        "max_client_conn": str(max_client_conn),
        "query_wait_timeout": "30",
        "ignore_startup_parameters": "extra_float_digits,search_path",
        "server_reset_query": "DISCARD ALL",
        "client_tls_sslmode": "require",
        "client_tls_cert_file": tls_cert,
        "client_tls_key_file": tls_key,
        "client_tls_protocols": "tlsv1.2,tlsv1.3",
        "server_tls_sslmode": server_tls_sslmode,
        # Logs go to stderr (the container's log driver); the pidfile is how the sync loop reloads.
        "logfile": "",
        "pidfile": str(state_dir / "pgbouncer.pid"),
        "log_connections": "0",
        "log_disconnections": "0",
        "tcp_keepalive": "1",
    }
    if server_tls_ca_file:
        values["server_tls_ca_file"] = server_tls_ca_file
    if pgbouncer_version >= (1, 21):
        # Protocol-level prepared statements in transaction mode: drivers need no prepare_threshold setting.
        values["max_prepared_statements"] = "200"
    if pgbouncer_version >= (1, 24):
        # Each tenant's clients are bounded, not only the process's.
        values["max_user_client_connections"] = str(client_limit_per_tenant)
        values["max_db_client_connections"] = str(client_limit_per_tenant)
    body = "".join(f"{key} = {value}\n" for key, value in values.items())
    return f"[pgbouncer]\n{body}%include {state_dir / pooler.DATABASES_FILE}\n"


def write_all(state_dir: Path, env: dict[str, str], pgbouncer_version: tuple[int, int]) -> Path:
    """The ini, the hba file and empty tenant files (the sync loop fills them); returns the ini's path."""
    admin_user = env.get("INSTAPG_POOLER_ADMIN_USER", "instapg_pooler")
    state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    if env.get("INSTAPG_POOLER_TLS_CERT_PEM"):
        # The key is written 0600, owned as the folder is (PgBouncer's user), never logged.
        pooler._write(state_dir / "tls.crt", env["INSTAPG_POOLER_TLS_CERT_PEM"].strip() + "\n")
        pooler._write(state_dir / "tls.key", env["INSTAPG_POOLER_TLS_KEY_PEM"].strip() + "\n")
        env = {**env, "INSTAPG_POOLER_TLS_CERT": str(state_dir / "tls.crt"), "INSTAPG_POOLER_TLS_KEY": str(state_dir / "tls.key")}
    ini = render_ini(
        state_dir,
        pgbouncer_version,
        admin_user=admin_user,
        tls_cert=env["INSTAPG_POOLER_TLS_CERT"],
        tls_key=env["INSTAPG_POOLER_TLS_KEY"],
        listen_port=int(env.get("INSTAPG_POOLER_PORT", PUBLIC_PORT)),
        server_tls_sslmode=env.get("INSTAPG_POOLER_SERVER_TLS_SSLMODE", "verify-full"),
        server_tls_ca_file=env.get("INSTAPG_POOLER_SERVER_TLS_CA_FILE") or None,
    )
    pooler._write(state_dir / INI, ini)
    pooler._write(state_dir / HBA, render_hba(admin_user, env.get("INSTAPG_POOLER_ADMIN_FROM", ADMIN_FROM)))
    for name in (pooler.AUTH_FILE, pooler.DATABASES_FILE):
        if not (state_dir / name).exists():
            pooler._write(state_dir / name, "[databases]\n" if name == pooler.DATABASES_FILE else "")
    return state_dir / INI


def main() -> int:
    state_dir = Path(os.environ.get("INSTAPG_POOLER_STATE_DIR", "/var/run/instapg-pooler"))
    try:
        path = write_all(state_dir, dict(os.environ), version(os.environ.get("INSTAPG_PGBOUNCER", "pgbouncer")))
    except KeyError as exc:
        print(f"{exc.args[0]} is not set", file=sys.stderr)
        return 2
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
