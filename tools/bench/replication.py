"""Figures for the replication gateway (docs/replication.md): what it adds to a login and to decoding.

    .venv/bin/python -m tools.bench.replication [--samples 50] [--rows 20000]

Starts its own embedded Postgres (tmpfs when there is one, fsync off) and
gateway, makes one tenant with logical replication, and compares the same
work through the gateway (TCP, then the Unix socket) with the companion role
logging in on the socket itself (what the gateway does on the client's
behalf): connect + IDENTIFY_SYSTEM, and pg_recvlogical decoding `--rows`
inserted rows to the end. Prints a Markdown table and removes everything.
`make bench` runs it too. Not a test: figures vary with the machine's load.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import time

import psycopg

from chalicelib import postgres, provisioning, replication
from chalicelib.identifiers import tenant_name, tenant_password
from chalicelib.settings import TRIAL_PLAN, load
from tools.bench.common import Figure, pct, table
from tools.dev import pgserver, replgateway


def _login(conninfo: str) -> float:
    started = time.perf_counter()
    with psycopg.connect(conninfo, autocommit=True, prepare_threshold=None) as conn:
        conn.execute("IDENTIFY_SYSTEM").fetchone()
    return (time.perf_counter() - started) * 1000


def _decode(conninfo: str, slot: str, end: str) -> float:
    started = time.perf_counter()
    done = subprocess.run(
        [pgserver._bin("pg_recvlogical"), "-d", conninfo, "--slot", slot, "--start", "--no-loop", "-f", "/dev/null",
         "--endpos", end, "-o", "proto_version=1", "-o", "publication_names=pub"],
        capture_output=True, timeout=600,
    )  # fmt: skip
    if done.returncode != 0:
        raise RuntimeError(done.stderr.decode(errors="replace"))
    return time.perf_counter() - started


def figures(samples: int = 50, rows: int = 20000) -> list[Figure]:
    root = pgserver.private_dir("instapg-replbench-")
    server = pgserver.start(root / "pg", settings={"fsync": "off"})
    gateway = replgateway.start(server.socket_dir, server.port, root / "gateway.log")
    out: list[Figure] = []
    try:
        target = postgres.Target("127.0.0.1", server.port, pgserver.ADMIN_ROLE, server.admin_password, "postgres", "disable")
        name, password = tenant_name("ipgbench"), tenant_password()
        provisioning.create_tenant(target, name, name, password, load({}).plan(TRIAL_PLAN), logical_replication=True)
        through = psycopg.conninfo.make_conninfo(
            host=gateway.host, port=gateway.port, user=name, password=password, dbname=name, replication="database"
        )
        # The companion on the socket: what the gateway itself opens (pg_hba.conf allows it there only).
        beside = psycopg.conninfo.make_conninfo(
            host=str(server.socket_dir), port=server.port, user=replication.companion(name), password=password,
            dbname=name, replication="database",
        )  # fmt: skip
        for label, conninfo in (("through the gateway", through), ("companion on the socket", beside)):
            _login(conninfo)
            times = [_login(conninfo) for _ in range(samples)]
            how = f"psycopg connect (SCRAM) + IDENTIFY_SYSTEM + close, replication=database, {label}, serial"
            out.append(Figure(f"replication: login, {label}, p50", round(statistics.median(times), 2), "ms", samples, how))
            out.append(Figure(f"replication: login, {label}, p99", round(pct(times, 99), 2), "ms", samples, how))
        direct = postgres.connection_url("127.0.0.1", server.port, name, password, name, "disable")
        with psycopg.connect(direct, autocommit=True) as conn:
            conn.execute("CREATE TABLE t (id int PRIMARY KEY, body text)")
            conn.execute("CREATE PUBLICATION pub FOR TABLE t")
        for slot, conninfo in (("via_gateway", through), ("via_socket", beside)):
            with psycopg.connect(conninfo, autocommit=True, prepare_threshold=None) as conn:
                conn.execute(f"CREATE_REPLICATION_SLOT {slot} LOGICAL pgoutput")
        with psycopg.connect(direct, autocommit=True) as conn:
            conn.execute("INSERT INTO t SELECT n, repeat('x', 100) FROM generate_series(1, %s) AS n", (rows,))
            end = conn.execute("SELECT pg_current_wal_lsn()::text").fetchone()[0]
        for label, slot, conninfo in (
            ("through the gateway", "via_gateway", through),
            ("companion on the socket", "via_socket", beside),
        ):
            seconds = _decode(conninfo, slot, end)
            how = f"pg_recvlogical --endpos, pgoutput, {rows} inserted rows of ~100 bytes, {label}"
            out.append(Figure(f"replication: decode {rows} rows, {label}", round(seconds, 2), "s", 1, how))
        return out
    finally:
        gateway.stop()
        server.stop("immediate")
        shutil.rmtree(root, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=50)
    parser.add_argument("--rows", type=int, default=20000)
    args = parser.parse_args()
    print(table(figures(args.samples, args.rows)))


if __name__ == "__main__":
    main()
