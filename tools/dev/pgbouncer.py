"""A local PgBouncer in front of a local Postgres, for make dev and the tests.

Debian's `pgbouncer` package (tools/dev/install-pgbouncer.sh) provides the binary;
this starts one process on a free 127.0.0.1 port with SCRAM auth, an auth_file
and a databases file that chalicelib.pooler keeps, and an admin console for
the service's own admin user. PgBouncer refuses to run as root, so as root it
runs as the embedded Postgres' system user, which owns its folder.

    python -m tools.dev.pgbouncer --port 6432   # runs until Ctrl-C; publish tenants with chalicelib.pooler
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from chalicelib import pooler as pooler_mod
from chalicelib.postgres import scram_verifier
from tools.dev import pgserver, reaper

ADMIN_USER = "instapg_pooler"
INI = "pgbouncer.ini"


def binary() -> str | None:
    """The pgbouncer executable, or None when it is not installed."""
    return shutil.which("pgbouncer") or next(
        (path for path in ("/usr/sbin/pgbouncer", "/usr/bin/pgbouncer") if os.access(path, os.X_OK)), None
    )


def render_ini(state_dir: Path, port: int, settings: dict[str, str] | None = None) -> str:
    """The main config; the [databases] section comes from the pooler's include file."""
    values = {
        "listen_addr": "127.0.0.1",
        "listen_port": str(port),
        "unix_socket_dir": "",  # TCP only, as in production
        "auth_type": "scram-sha-256",
        "auth_file": str(state_dir / pooler_mod.AUTH_FILE),
        "admin_users": ADMIN_USER,
        "stats_users": ADMIN_USER,
        "pool_mode": "transaction",
        "default_pool_size": "5",
        "max_client_conn": "5000",
        # A client waiting for a server connection gets an error (08P01) after this, never hangs.
        "query_wait_timeout": "30",
        # What drivers send at startup that PgBouncer does not track.
        "ignore_startup_parameters": "extra_float_digits,search_path",
        "server_reset_query": "DISCARD ALL",
        "logfile": str(state_dir / "pgbouncer.log"),
        "pidfile": str(state_dir / "pgbouncer.pid"),
        "log_connections": "0",
        "log_disconnections": "0",
    }
    values.update(settings or {})
    body = "".join(f"{key} = {value}\n" for key, value in values.items())
    # %include must come last: the included file opens its own section.
    return f"[pgbouncer]\n{body}%include {state_dir / pooler_mod.DATABASES_FILE}\n"


@dataclass
class LocalPgBouncer:
    state_dir: Path
    port: int
    admin_password: str = field(repr=False)
    process: subprocess.Popen = field(repr=False)

    def pooler(self) -> pooler_mod.Pooler:
        return pooler_mod.Pooler(
            "127.0.0.1", self.port, ADMIN_USER, self.admin_password, pooler_mod.FileStore(self.state_dir)
        )

    def admin_json(self) -> str:
        """The admin console's credentials as a host record's `pooler_credentials` source reads them."""
        return json.dumps({"username": ADMIN_USER, "password": self.admin_password})

    def stop(self) -> None:
        if self.process.poll() is None:
            # SIGTERM is 1.18's immediate shutdown (SIGINT there is PAUSE first: it waits for the
            # clients, up to our timeout). Newer versions wait on SIGTERM, hence the short kill.
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=2)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def _wait_listening(process: subprocess.Popen, port: int, log: Path, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            tail = log.read_text()[-2000:] if log.exists() else ""
            raise RuntimeError(f"pgbouncer exited with {process.returncode}: {tail}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.02)
    process.kill()
    raise RuntimeError("pgbouncer did not listen in time")


def start(state_dir: Path, port: int | None = None, settings: dict[str, str] | None = None) -> LocalPgBouncer:
    """Start PgBouncer with an empty tenant list; `LocalPgBouncer.pooler()` publishes tenants."""
    exe = binary()
    if exe is None:
        raise RuntimeError("pgbouncer is not installed (make pgbouncer, or sh tools/dev/install-pgbouncer.sh)")
    reaper.reap_and_say("pgbouncer")
    state_dir = Path(state_dir).resolve()
    state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    # It runs in its own session (below), so it outlives a killed owner: the reaper stops it then.
    reaper.register(state_dir, remove=False)
    user = pgserver._system_user()
    pgserver._chown(state_dir, user)
    port = port or pgserver.free_port()
    password = secrets.token_urlsafe(24)
    # Files written as the folder's owner, 0600: the admin's verifier, never its password.
    pooler_mod._write(state_dir / pooler_mod.AUTH_FILE, pooler_mod.admin_entry(ADMIN_USER, scram_verifier(password)))
    pooler_mod._write(state_dir / pooler_mod.DATABASES_FILE, pooler_mod.render_databases({}))
    pooler_mod._write(state_dir / INI, render_ini(state_dir, port, settings))
    log = state_dir / "pgbouncer.log"
    process = subprocess.Popen(
        [exe, str(state_dir / INI)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # Ctrl-C in make dev reaches it through stop(), not twice
        **pgserver._run_as(user),
    )
    _wait_listening(process, port, log)
    return LocalPgBouncer(state_dir, port, password, process)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, default=None, help="state folder (default: a fresh private one)")
    parser.add_argument("--port", type=int, default=None)
    args = parser.parse_args()
    bouncer = start(args.dir or pgserver.private_dir("instapg-pgbouncer-"), args.port)
    print(f"pgbouncer on 127.0.0.1:{bouncer.port}, state in {bouncer.state_dir}", flush=True)
    try:
        bouncer.process.wait()
    except KeyboardInterrupt:
        pass
    finally:
        bouncer.stop()


if __name__ == "__main__":
    main()
