"""Figures for the pooler (docs/scaling.md): pooled vs direct connect, 100 clients on one tenant, memory.

    .venv/bin/python -m tools.bench.pooler [--samples 200]

Starts its own embedded Postgres (tmpfs when there is one, fsync off) and
PgBouncer, prints a Markdown table, removes both. `make bench` runs it too
(its figures join the table and results.json). Not a test: figures vary
with the machine's load.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psycopg

from chalicelib import pooler, postgres, provisioning
from chalicelib.identifiers import tenant_name, tenant_password
from chalicelib.settings import TRIAL_PLAN, load
from tools.bench.common import Figure, table
from tools.dev import pgbouncer, pgserver


def _connect_select(url: str) -> float:
    started = time.perf_counter()
    with psycopg.connect(url, prepare_threshold=None) as conn:
        conn.execute("SELECT 1").fetchone()
    return (time.perf_counter() - started) * 1000


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def figures(samples: int = 200, idle_tenants: int = 1000) -> list[Figure]:
    """The pooler's figures, each with how it was measured (make bench adds them to its table)."""
    root = pgserver.private_dir("instapg-poolerbench-")
    server = pgserver.start(root / "pg", settings={"fsync": "off"})
    bouncer = pgbouncer.start(root / "pgbouncer")
    out: list[Figure] = []
    try:
        target = postgres.Target(
            "127.0.0.1", server.port, pgserver.ADMIN_ROLE, server.admin_password, "postgres", "disable"
        )
        plan = load({}).plan(TRIAL_PLAN)
        name, password = tenant_name("ipgbench"), tenant_password()
        verifier = postgres.scram_verifier(password)
        provisioning.create_tenant(target, name, name, password, plan, verifier=verifier)
        pool = bouncer.pooler()
        pool.publish(pooler.Tenant(name, name, verifier, plan.connections, "127.0.0.1", server.port))
        direct = postgres.connection_url("127.0.0.1", server.port, name, password, name, "disable")
        pooled = pool.pooled_url(name, password, name)
        for label, url in (("direct", direct), ("pooled", pooled)):
            _connect_select(url)
            times = [_connect_select(url) for _ in range(samples)]
            how = f"psycopg connect + SELECT 1 + close, {label} string, SCRAM, one tenant, serial"
            out.append(Figure(f"pooler: connect + SELECT 1, {label}, p50", round(statistics.median(times), 2), "ms", samples, how))
            out.append(Figure(f"pooler: connect + SELECT 1, {label}, p99", round(_pct(times, 0.99), 2), "ms", samples, how))
        errors: list[str] = []

        def one(_: int) -> float:
            try:
                return _connect_select(pooled)
            except psycopg.Error as exc:
                errors.append(exc.sqlstate or type(exc).__name__)
                return float("nan")

        with ThreadPoolExecutor(max_workers=100) as workers:
            times = [t for t in workers.map(one, range(100)) if t == t]
        how = f"100 threads at once, each connect + SELECT 1 on the pooled string; pool {plan.connections}, role limit {plan.connections}"
        out.append(Figure("pooler: 100 concurrent clients, p50", round(statistics.median(times), 2), "ms", 100, how))
        out.append(Figure("pooler: 100 concurrent clients, p99", round(_pct(times, 0.99), 2), "ms", 100, how))
        out.append(Figure("pooler: 100 concurrent clients, errors", len(errors), "count", 100, how))
        before = _rss_kb(bouncer.process.pid)
        fake = []
        for _ in range(idle_tenants):
            idle = tenant_name("ipgidle")
            fake.append(
                pooler.Tenant(idle, idle, postgres.scram_verifier(tenant_password()), 5, "127.0.0.1", server.port)
            )
        pool.publish(*fake)
        after = _rss_kb(bouncer.process.pid)
        out.append(
            Figure(
                f"pooler: PgBouncer RSS growth per {idle_tenants} idle tenants",
                round((after - before) / 1024, 1),
                "MiB",
                1,
                f"VmRSS before and after publishing {idle_tenants} tenants (2 entries each), {before / 1024:.1f} -> {after / 1024:.1f} MiB",
            )
        )
        return out
    finally:
        bouncer.stop()
        server.stop("immediate")
        shutil.rmtree(root, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=200)
    parser.add_argument("--idle-tenants", type=int, default=1000)
    args = parser.parse_args()
    print(table(figures(args.samples, args.idle_tenants)))


if __name__ == "__main__":
    main()
