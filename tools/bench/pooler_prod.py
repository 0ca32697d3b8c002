"""Figures for production's pooler path (docs/scaling.md): how long a publish and a revoke take.

    .venv/bin/python -m tools.bench.pooler_prod [--samples 50]

The local pooler's FileStore (the service writes PgBouncer's files and RELOADs)
against the TableStore (the service writes the host's tenant table; the sync
loop, tools/pooler/sync.py, is NOTIFYed, renders the files and SIGHUPs
PgBouncer; the service waits until the admin console shows the change
loaded). Starts its own embedded Postgres and Debian's PgBouncer; the sync
loop runs in a thread of this process. `make bench` runs it too.
"""

from __future__ import annotations

import argparse
import secrets
import shutil
import statistics
import threading
import time

from chalicelib import pooler, poolerstore, postgres, provisioning
from chalicelib.identifiers import tenant_name, tenant_password
from chalicelib.settings import TRIAL_PLAN, load
from tools.bench.common import Figure, pct, table
from tools.dev import pgbouncer, pgserver
from tools.pooler.sync import Sync


def _timed(call) -> float:
    started = time.perf_counter()
    call()
    return (time.perf_counter() - started) * 1000


def figures(samples: int = 50) -> list[Figure]:
    root = pgserver.private_dir("instapg-poolerprodbench-")
    server = pgserver.start(root / "pg", settings={"fsync": "off"})
    bouncer = pgbouncer.start(root / "pgbouncer")
    out: list[Figure] = []
    try:
        target = postgres.Target(
            "127.0.0.1", server.port, pgserver.ADMIN_ROLE, server.admin_password, "postgres", "disable"
        )
        sync_password = secrets.token_urlsafe(24)
        poolerstore.setup(target, sync_password)
        sync = Sync(bouncer.state_dir, bouncer.state_dir / "pgbouncer.pid", pgbouncer.ADMIN_USER, bouncer.admin_password)
        conninfo = postgres.connection_url(
            "127.0.0.1", server.port, poolerstore.SYNC_ROLE, sync_password, poolerstore.DBNAME, "disable"
        )
        threading.Thread(target=sync.run, kwargs={"poll_s": 30.0, "conninfo": conninfo}, daemon=True).start()
        file_pooler = bouncer.pooler()
        table_pooler = pooler.Pooler(
            "127.0.0.1",
            bouncer.port,
            pgbouncer.ADMIN_USER,
            bouncer.admin_password,
            poolerstore.TableStore(target),
        )
        plan = load({}).plan(TRIAL_PLAN)
        name, password = tenant_name("ipgbench"), tenant_password()
        verifier = postgres.scram_verifier(password)
        provisioning.create_tenant(target, name, name, password, plan, verifier=verifier)
        tenant = pooler.Tenant(name, name, verifier, plan.connections, "127.0.0.1", server.port)
        table_pooler.publish(tenant)  # the loop is up and has loaded the table once
        for label, pool in (("file store (RELOAD)", file_pooler), ("table store (sync loop)", table_pooler)):
            publish, revoke = [], []
            for _ in range(samples):
                publish.append(_timed(lambda pool=pool: pool.publish(tenant)))
                revoke.append(_timed(lambda pool=pool: pool.revoke(tenant.role, tenant.dbname)))
            for what, times in (("publish", publish), ("revoke", revoke)):
                how = (
                    f"{what} of one tenant until PgBouncer has it loaded (revoke: and its pools killed), "
                    f"{label}, serial"
                )
                out.append(Figure(f"pooler {what}, {label}, p50", round(statistics.median(times), 1), "ms", samples, how))
                out.append(Figure(f"pooler {what}, {label}, p99", round(pct(times, 99), 1), "ms", samples, how))
        return out
    finally:
        bouncer.stop()
        server.stop("immediate")
        shutil.rmtree(root, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=50)
    args = parser.parse_args()
    print(table(figures(args.samples)))


if __name__ == "__main__":
    main()
