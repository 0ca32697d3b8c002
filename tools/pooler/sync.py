"""The sync loop beside a production PgBouncer: the host's tenant table -> PgBouncer's files -> reload.

    python -m tools.pooler.sync          # runs until stopped; the container's entrypoint starts it
    python -m tools.pooler.sync --once   # render the files once (before PgBouncer starts); exit 1 if unreachable

It logs in to the host's `instapg_pooler` database as `instapg_pooler_sync`
(read-only on that table, nothing else) with libpq's environment (PGHOST,
PGPORT, PGUSER, PGPASSWORD, PGDATABASE, PGSSLMODE, PGSSLROOTCERT), LISTENs
for the service's writes, and on each change renders `userlist.txt` (the
service's admin user + every tenant's SCRAM verifier) and `databases.ini` (two
entries per tenant + the generation marker) with chalicelib.pooler's render
functions, then sends PgBouncer SIGHUP (reload: it needs no admin password).
It also re-reads every INSTAPG_POOLER_SYNC_POLL_S (30) seconds, in case a
notification was lost with a connection.

If the host is unreachable the files stay as they are (PgBouncer keeps serving
the tenants it has; Postgres is down for them anyway) and the loop reconnects
with backoff. Environment besides libpq's:

    INSTAPG_POOLER_STATE_DIR        where userlist.txt and databases.ini go (PgBouncer's %include)
    INSTAPG_POOLER_PIDFILE          PgBouncer's pidfile, the process to SIGHUP (default: in the state dir)
    INSTAPG_POOLER_ADMIN_USER       the service's admin-console user (default instapg_pooler)
    INSTAPG_POOLER_ADMIN_PASSWORD   its password; only its SCRAM verifier is written
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from chalicelib import pooler, poolerstore
from chalicelib.postgres import scram_verifier

log = logging.getLogger("instapg.pooler.sync")
DEFAULT_ADMIN_USER = "instapg_pooler"


@dataclass
class Rendered:
    auth: str
    databases: str


def render(admin_user: str, admin_verifier: str, generation: int, tenants: list[pooler.Tenant]) -> Rendered:
    """PgBouncer's two files for one snapshot of the table; the admin user cannot be taken over by a tenant row."""
    entries = {t.role: t.verifier for t in tenants if t.role != admin_user}
    entries[admin_user] = admin_verifier
    databases = pooler.render_databases({t.dbname: t for t in tenants})
    return Rendered(pooler.render_auth(entries), databases + poolerstore.generation_entry(generation))


class Sync:
    def __init__(self, state_dir: Path, pidfile: Path, admin_user: str, admin_password: str) -> None:
        self.state_dir = state_dir
        self.pidfile = pidfile
        self.admin_user = admin_user
        # One verifier for the process's life: the file changes only when tenants do.
        self.admin_verifier = scram_verifier(admin_password)
        self.applied: int | None = None
        self.last: Rendered | None = None

    def apply(self, generation: int, tenants: list[pooler.Tenant]) -> bool:
        """Write the files if they changed and reload PgBouncer; True when it was reloaded."""
        rendered = render(self.admin_user, self.admin_verifier, generation, tenants)
        if rendered == self.last:
            return False
        # Auth first: a new tenant's entry is never there before its verifier.
        pooler._write(self.state_dir / pooler.AUTH_FILE, rendered.auth)
        pooler._write(self.state_dir / pooler.DATABASES_FILE, rendered.databases)
        self.reload()
        self.last, self.applied = rendered, generation
        return True

    def reload(self) -> None:
        """SIGHUP: PgBouncer reloads its config. Before it has started there is nothing to tell."""
        try:
            pid = int(self.pidfile.read_text().split()[0])
        except (FileNotFoundError, ValueError, IndexError):
            return
        os.kill(pid, signal.SIGHUP)

    def run_once(self, conn, poll_s: float) -> None:
        """Apply the table now, then wait for a NOTIFY (or the poll interval)."""
        generation, tenants = poolerstore.read(conn)
        if self.apply(generation, tenants):
            log.info("loaded generation %s: %s tenant(s)", generation, len(tenants))
        for _ in conn.notifies(timeout=poll_s, stop_after=1):
            pass

    def run(self, poll_s: float = 30.0, conninfo: str = "") -> None:
        """Until the process is stopped: connect (libpq's environment, or `conninfo`), LISTEN, apply on every change."""
        import psycopg

        backoff = 0.5
        while True:
            try:
                with psycopg.connect(
                    conninfo, autocommit=True, connect_timeout=5, application_name="instapg-pooler-sync"
                ) as conn:
                    conn.execute(f"LISTEN {poolerstore.CHANNEL}")
                    backoff = 0.5
                    while True:
                        self.run_once(conn, poll_s)
            except psycopg.Error as exc:
                # The files stay: PgBouncer keeps what it has until the table is readable again.
                # libpq's first line names the problem (never a password).
                reason = (str(exc).splitlines() or [""])[0][:200]
                log.warning("tenant table unreachable (%s: %s); retrying in %.1f s", type(exc).__name__, reason, backoff)
                time.sleep(backoff)
                backoff = min(backoff * 2, 10.0)


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    env = os.environ
    password = env.get("INSTAPG_POOLER_ADMIN_PASSWORD")
    if not password:
        print("INSTAPG_POOLER_ADMIN_PASSWORD is not set", file=sys.stderr)
        return 2
    state_dir = Path(env.get("INSTAPG_POOLER_STATE_DIR", "/var/run/instapg-pooler"))
    sync = Sync(
        state_dir,
        Path(env.get("INSTAPG_POOLER_PIDFILE", state_dir / "pgbouncer.pid")),
        env.get("INSTAPG_POOLER_ADMIN_USER", DEFAULT_ADMIN_USER),
        password,
    )
    if sys.argv[1:] == ["--once"]:
        import psycopg

        try:
            with psycopg.connect(autocommit=True, connect_timeout=5, application_name="instapg-pooler-sync") as conn:
                generation, tenants = poolerstore.read(conn)
        except psycopg.Error as exc:
            print(f"tenant table unreachable ({type(exc).__name__}): starting with no tenants", file=sys.stderr)
            return 1
        sync.apply(generation, tenants)
        return 0
    def _stop(*_: object) -> None:
        raise SystemExit(0)  # interrupts the wait for a notification: the task stops within ECS's StopTimeout

    signal.signal(signal.SIGTERM, _stop)
    try:
        sync.run(float(env.get("INSTAPG_POOLER_SYNC_POLL_S", "30")))
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
