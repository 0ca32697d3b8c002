"""Density: what a tenant database costs a host, and whether a full host is slower.

    .venv/bin/python -m tools.bench.density [--max 1000] [--samples 30] [--idle-seconds 10]

One embedded Postgres (tmpfs, fsync off: this measures the catalog and the
records, not the disk, which `make bench`'s purge and create figures do),
moto in-process, the API in-process (chalice.test.Client). At 0, max/2 and
max tenant databases on the host: p50 of an on-demand create, a pooled
create and a GET. Also the disk of an empty tenant database and of a pooled
one, and the server's idle CPU with no tenants and with `max` (autovacuum
visits every database once per `autovacuum_naptime`, a minute by default,
and that grows with the number of databases).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from concurrent.futures import ThreadPoolExecutor

from tools.bench import standalone
from tools.bench.common import Figure, ms, pct, say
from tools.bench.standalone import register, stack


def _tree_cpu_s(postmaster: int) -> float:
    """CPU seconds of a postmaster, its live children, and the children it has reaped."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            fields = open(f"/proc/{entry}/stat").read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        pid, ppid = int(entry), int(fields[1])
        if pid == postmaster:
            total += sum(int(x) for x in fields[11:15])  # utime stime cutime cstime
        elif ppid == postmaster:
            total += int(fields[11]) + int(fields[12])
    return total / tick


def _mem_available() -> int:
    for line in open("/proc/meminfo"):
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


def measure(args: argparse.Namespace) -> list[Figure]:
    import psycopg
    from chalice.test import Client

    from app import app
    from chalicelib import creation, pool
    from chalicelib.clock import Deadline
    from chalicelib.records import Requester
    from chalicelib.schemas import CreateDatabase
    from tools.dev import pgserver

    # tmpfs is memory: refuse rather than crowd out the machine (a shared one, for one).
    need = (args.max + 3 * args.samples + 50) * 7.5 * 2**20 * 1.3
    free = min(shutil.disk_usage("/dev/shm").free, _mem_available()) if os.path.isdir("/dev/shm") else 0
    if free < need:
        why = f"needs {need / 2**30:.1f} GiB of tmpfs and memory for {args.max} databases, {free / 2**30:.1f} GiB free"
        return [Figure("density", None, "", 0, f"not measured: {why}; lower --density")]
    root = pgserver.private_dir("instapg-density-")
    server = pgserver.start(root / "pg", settings={"fsync": "off"})
    postmaster = int((server.data_dir / "postmaster.pid").read_text().splitlines()[0])
    figures: list[Figure] = []

    def add(name: str, value, unit: str, samples: int, how: str) -> None:
        figures.append(Figure(name, value, unit, samples, how))
        say(f"{name}: {value} {unit}")

    def idle_cpu(label: str) -> None:
        before = _tree_cpu_s(postmaster)
        time.sleep(args.idle_seconds)
        share = (_tree_cpu_s(postmaster) - before) / args.idle_seconds
        add(
            f"density_idle_cpu_{label}",
            round(share * 100, 1),
            "% of a core",
            1,
            f"the idle server's CPU over {args.idle_seconds} s with {label} tenant databases (autovacuum's visits)",
        )

    try:
        with stack() as service, Client(app) as client:
            register(service, "density", server)
            body = json.dumps({"ref": "density"})
            headers = {"Content-Type": "application/json"}
            superuser = psycopg.connect(server.superuser_dsn, autocommit=True)

            def post() -> tuple[float, str]:
                t = time.perf_counter()
                response = client.http.post("/api/v1/database", body=body, headers=headers)
                elapsed = time.perf_counter() - t
                assert response.status_code == 201, response.body
                return elapsed, response.json_body["id"]

            def tenants() -> int:
                return superuser.execute("SELECT count(*) FROM pg_database WHERE datname LIKE 'ipgb\\_%'").fetchone()[0]

            idle_cpu("0")
            levels = sorted({0, args.max // 2, args.max})
            for level in levels:
                missing = level - tenants()
                if missing > 0:
                    t = time.perf_counter()
                    with ThreadPoolExecutor(max_workers=4) as executor:
                        list(
                            executor.map(
                                lambda i: creation.create(service, CreateDatabase(ref="fill"), Requester()),
                                range(missing),
                            )
                        )
                    say(f"density: {missing} databases added in {time.perf_counter() - t:.1f}s")
                at = tenants()
                on_demand = [post() for _ in range(args.samples)]
                pool.refill(service, Deadline.after(600), size=args.samples)
                pooled = [post() for _ in range(args.samples)]
                gets = []
                for _, database_id in on_demand + pooled:
                    t = time.perf_counter()
                    assert client.http.get(f"/api/v1/database/{database_id}").status_code == 200
                    gets.append(time.perf_counter() - t)
                how = f"through chalice.test.Client with {at} tenant databases on the host"
                add(
                    f"density_create_on_demand_p50_at_{level}",
                    ms(pct([t for t, _ in on_demand], 50)),
                    "ms",
                    args.samples,
                    "on-demand POST " + how,
                )
                add(
                    f"density_create_pooled_p50_at_{level}",
                    ms(pct([t for t, _ in pooled], 50)),
                    "ms",
                    args.samples,
                    "pooled POST " + how,
                )
                add(f"density_get_p50_at_{level}", ms(pct(gets, 50)), "ms", len(gets), "GET " + how)
                if level == levels[0]:
                    disk(service, superuser, server, add)
            idle_cpu(str(tenants()))
            superuser.close()
    finally:
        server.stop(mode="immediate")
        shutil.rmtree(root, ignore_errors=True)
    return figures


def disk(service, superuser, server, add) -> None:
    """Disk of one empty tenant database (on demand) and of one pooled database."""
    from chalicelib import pool
    from chalicelib.clock import Deadline
    from chalicelib.models import POOLED, DatabaseRecord

    def size(dbname: str) -> tuple[int, int]:
        oid, nbytes = superuser.execute(
            "SELECT oid, pg_database_size(oid) FROM pg_database WHERE datname = %s", (dbname,)
        ).fetchone()
        files = sum(len(f) for _, _, f in os.walk(server.data_dir / "base" / str(oid)))
        return nbytes, files

    unclaimed = next(r for r in DatabaseRecord.scan() if r.status == "UNCLAIMED")
    nbytes, files = size(unclaimed.db_name)
    add(
        "disk_per_empty_database",
        round(nbytes / 2**20, 2),
        "MiB",
        1,
        f"pg_database_size of a new tenant database ({files} files)",
    )
    pool.refill(service, Deadline.after(60), size=1)
    pooled = next(r for r in DatabaseRecord.scan() if r.status == POOLED)
    nbytes, files = size(pooled.db_name)
    add(
        "disk_per_pooled_database",
        round(nbytes / 2**20, 2),
        "MiB",
        1,
        f"pg_database_size of a pooled (NOLOGIN) database ({files} files)",
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.bench.density", description=__doc__.splitlines()[0])
    parser.add_argument("--max", type=int, default=1000, help="tenant databases at the last level (default 1000)")
    parser.add_argument("--samples", type=int, default=30, help="creates and GETs per level (default 30)")
    parser.add_argument("--idle-seconds", type=float, default=10, help="idle CPU window (default 10)")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON (what make bench reads)")
    return standalone.part_main(parser.parse_args(argv), measure)


if __name__ == "__main__":
    raise SystemExit(main())
