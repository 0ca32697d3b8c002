"""`make bench`'s peers: how else a throwaway Postgres is had, measured in the same run as instapg's create.

- A fresh cluster, as a test container starts one: `initdb`, `pg_ctl start`,
  then the first `SELECT 1`, with the embedded wheel's binaries, on the same
  disk as the bench's servers.
- A plain `CREATE DATABASE` on a running server, as a naive provisioner does
  (no role, no hardening), on the bench's first host.

Both are printed as a ratio to the pooled create's p50 of the same run.
"""

from __future__ import annotations

import shutil
import statistics
import subprocess
import time

from tools.bench.common import ms, pct


class PeerFigures:
    """Part of `performance.Bench`: needs its `add`, `args`, `data_dir`, `service` and `figures`."""

    FRESH_CLUSTER_RUNS = 3

    def fresh_cluster(self) -> float:
        """Median seconds from `initdb` to the first answered `SELECT 1` on a new cluster."""
        import psycopg

        from tools.dev import pgserver

        user = pgserver._system_user()
        times = []
        for i in range(self.FRESH_CLUSTER_RUNS):
            data = pgserver._data_home(self.data_dir / f"peer-cluster-{i}", user)
            shutil.rmtree(data, ignore_errors=True)
            data.mkdir(mode=0o700, parents=True)
            pgserver._chown(data, user)
            port = pgserver.free_port()
            options = f"-c listen_addresses=127.0.0.1 -c port={port} -c unix_socket_directories=''"
            t = time.perf_counter()
            try:
                subprocess.run(
                    [pgserver._bin("initdb"), "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8",
                     "--locale=C"],
                    **pgserver._run_as(user), capture_output=True, check=True, timeout=300,
                )  # fmt: skip
                subprocess.run(
                    [pgserver._bin("pg_ctl"), "-D", str(data), "-w", "-t", "120", "-l", str(data / "server.log"),
                     "-o", options, "start"],
                    **pgserver._run_as(user), capture_output=True, check=True, timeout=180,
                )  # fmt: skip
                with psycopg.connect(host="127.0.0.1", port=port, user="postgres", dbname="postgres") as conn:
                    conn.execute("SELECT 1").fetchone()
                times.append(time.perf_counter() - t)
            finally:
                subprocess.run(
                    [pgserver._bin("pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop"],
                    **pgserver._run_as(user), capture_output=True, check=False, timeout=60,
                )  # fmt: skip
                shutil.rmtree(data, ignore_errors=True)
        median = statistics.median(times)
        self.add(
            "peer_fresh_cluster_p50",
            ms(median),
            "ms",
            len(times),
            "a fresh cluster as a test container makes one: initdb + pg_ctl start + first SELECT 1 "
            "(embedded wheel's binaries, data on the bench's disk)",
        )
        return median

    def plain_create_database(self) -> float:
        """p50 seconds of CREATE DATABASE on the first host's kept admin session."""
        from psycopg import sql

        from chalicelib import hosts

        n = max(5, self.args.samples // 5)
        target = hosts.target(self.service.hosts.get("bench-1"), self.service.settings)
        prefix = f"{self.service.settings.name_prefix}_peer"
        times = []
        with target.connect() as conn:
            for i in range(n):
                name = sql.Identifier(f"{prefix}_{i}")
                t = time.perf_counter()
                conn.execute(sql.SQL("CREATE DATABASE {}").format(name))
                times.append(time.perf_counter() - t)
            for i in range(n):
                conn.execute(sql.SQL("DROP DATABASE {}").format(sql.Identifier(f"{prefix}_{i}")))
        p50 = pct(times, 50)
        self.add(
            "peer_create_database_p50",
            ms(p50),
            "ms",
            n,
            "a plain CREATE DATABASE (from template1) on the first host, on an open admin connection",
        )
        return p50

    def peers(self) -> None:
        pooled = next((f.value for f in self.figures if f.name == "create_pooled_p50"), None)
        cluster = self.fresh_cluster()
        database = self.plain_create_database()
        if not pooled:
            return
        for name, peer, what in (
            ("fresh_cluster", cluster, "fresh cluster (initdb + start + SELECT 1)"),
            ("create_database", database, "plain CREATE DATABASE"),
        ):
            self.add(
                f"peer_{name}_over_pooled",
                round(ms(peer) / pooled, 1),
                "x",
                1,
                f"{what} p50 / pooled create p50, same run",
            )
