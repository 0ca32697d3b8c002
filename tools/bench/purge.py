"""`make bench`'s purge figures (issue 15): the parallel purge against a serial baseline, and what a DROP costs.

Both purges run on host bench-1 (data on disk, fsync on). Before each, a
CHECKPOINT: in production an expired database was created 72 hours earlier
and long since checkpointed, while here it was created a minute ago, and the
first drop's checkpoint would otherwise pay for flushing every create.

Alone: `python -m tools.bench --only-purge --purge N` (no other part runs).
The floor beside the purge: the same number of sessions dropping empty
databases with nothing else around them (`drop_parallel_per_db`).
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta

from tools.bench.common import ms, pct, say


class PurgeFigures:
    """Part of `performance.Bench`: needs its `add`, `args`, `service`, `servers`, `data_dir` and `refill`."""

    def _expired(self, count: int, ref: str) -> list:
        from chalicelib import creation
        from chalicelib.records import Requester
        from chalicelib.schemas import CreateDatabase

        with ThreadPoolExecutor(max_workers=8) as executor:
            made = list(
                executor.map(
                    lambda i: creation.create(self.service, CreateDatabase(ref=f"{ref}{i}"), Requester()).record,
                    range(count),
                )
            )
        return made

    def _age(self, records: list) -> None:
        from chalicelib.models import UNCLAIMED, DatabaseRecord

        past = datetime.now(UTC) - timedelta(minutes=5)
        for record in records:
            record.update(
                actions=[DatabaseRecord.expires_at.set(past), DatabaseRecord.due_at.set(int(past.timestamp()))],
                condition=DatabaseRecord.status == UNCLAIMED,
            )

    def _checkpoint(self, server) -> None:
        import psycopg

        with psycopg.connect(server.superuser_dsn, autocommit=True) as conn:
            conn.execute("CHECKPOINT")

    def _timed_purge(self, sessions: int):
        from chalicelib import expiry
        from chalicelib.clock import Deadline

        settings = self.service.settings
        self.service.settings = dataclasses.replace(settings, purge_sessions_per_host=sessions)
        try:
            t = time.perf_counter()
            summary = expiry.run_scheduled(self.service, Deadline.after(600))
            return time.perf_counter() - t, summary
        finally:
            self.service.settings = settings

    def _only_host(self, host_id: str | None) -> None:
        """Every other registered host DRAINING (no new databases, its drops still run); None: all ACTIVE again."""
        from chalicelib.models import HOST_ACTIVE, HOST_DRAINING, HostRecord

        for host in HostRecord.scan():
            status = HOST_ACTIVE if host_id in (None, host.id) else HOST_DRAINING
            host.update(actions=[HostRecord.status.set(status)])
        self.service.hosts.invalidate()

    def purge(self) -> None:
        n, serial = self.args.purge, self.args.purge_serial
        sessions = self.service.settings.purge_sessions_per_host
        self.refill(0)
        self._only_host("bench-1")  # "on one host"
        try:
            self._purge(n, serial, sessions)
        finally:
            self._only_host(None)

    def _purge(self, n: int, serial: int, sessions: int) -> None:
        t = time.perf_counter()
        baseline, batch = self._expired(serial, "ps"), self._expired(n, "p")
        say(f"purge: {serial + n} databases created on bench-1 in {time.perf_counter() - t:.1f}s")

        self._age(baseline)
        for server in self.servers:
            self._checkpoint(server)
        elapsed_serial, summary = self._timed_purge(1)
        per_drop_serial = elapsed_serial / max(summary.expired_dropped, 1)
        self.add(
            "purge_serial_per_db",
            ms(per_drop_serial),
            "ms",
            serial,
            f"one run over {serial} expired databases with INSTAPG_PURGE_SESSIONS_PER_HOST=1 (one after another, "
            f"as before issue 15), per database; dropped {summary.expired_dropped}",
        )

        self._age(batch)
        for server in self.servers:
            self._checkpoint(server)
        before = self._counters(self.servers[0])
        elapsed, summary = self._timed_purge(sessions)
        after = self._counters(self.servers[0])
        self.add(
            "purge_500_expired",
            round(elapsed, 1),
            "s",
            n,
            f"one expiry.run_scheduled over {n} expired UNCLAIMED databases on one host, {sessions} sessions "
            f"(the default); dropped {summary.expired_dropped}, failed {summary.failed}",
        )
        self.add(
            "purge_parallel_per_db",
            ms(elapsed / max(summary.expired_dropped, 1)),
            "ms",
            n,
            f"the same run, per database ({sessions} sessions)",
        )
        self.add(
            "purge_speedup",
            round(per_drop_serial / (elapsed / max(summary.expired_dropped, 1)), 1),
            "x",
            n,
            "serial time per database / parallel time per database, same run",
        )
        dropped = max(summary.expired_dropped, 1)
        for i, (name, what) in enumerate(
            (
                ("purge_checkpoints_per_db", "checkpoints completed (pg_stat_checkpointer.num_done)"),
                ("purge_wal_fsyncs_per_db", "WAL fsyncs (pg_stat_io, object wal)"),
                ("purge_fsyncs_per_db", "fsyncs of every kind (pg_stat_io)"),
            )
        ):
            self.add(name, round((after[i] - before[i]) / dropped, 2), "per db", n, f"{what} during the parallel run")

    def _counters(self, server) -> tuple[int, int, int]:
        """(checkpoints done, WAL fsyncs, all fsyncs) since the server started."""
        import psycopg

        time.sleep(1)  # backends report their I/O counters when idle, at most once a second
        with psycopg.connect(server.superuser_dsn, autocommit=True) as conn:
            return conn.execute(
                "SELECT (SELECT num_done FROM pg_stat_checkpointer), "
                "(SELECT coalesce(sum(fsyncs), 0)::bigint FROM pg_stat_io WHERE object = 'wal'), "
                "(SELECT coalesce(sum(fsyncs), 0)::bigint FROM pg_stat_io)"
            ).fetchone()

    def _parallel_drops(self, server, k: int, sessions: int) -> float:
        """Seconds per database for `k` empty databases dropped on `sessions` connections at once."""
        import psycopg

        names = [f"dropfloor_{i}" for i in range(k)]
        with psycopg.connect(server.superuser_dsn, autocommit=True) as conn:
            _create_empty(conn, names)
            conn.execute("CHECKPOINT")

        def drop_all(part: list[str]) -> None:
            with psycopg.connect(server.superuser_dsn, autocommit=True) as conn:
                for name in part:
                    conn.execute(f'DROP DATABASE "{name}"')

        t = time.perf_counter()
        with ThreadPoolExecutor(max_workers=sessions) as executor:
            list(executor.map(drop_all, [names[i::sessions] for i in range(sessions)]))
        return (time.perf_counter() - t) / k

    def drop_costs(self) -> None:
        """What one DROP DATABASE costs on this disk: the forced checkpoint, fsync, the files it removes."""
        from tools.dev import pgserver

        k = self.args.drop_samples
        sessions = self.service.settings.purge_sessions_per_host
        floor_k = max(2 * sessions, self.args.purge // 5)
        self.add(
            "drop_parallel_per_db",
            ms(self._parallel_drops(self.servers[0], floor_k, sessions)),
            "ms",
            floor_k,
            f"{floor_k} empty databases dropped on {sessions} superuser sessions at once, nothing else "
            "(the purge's floor on this disk), per database",
        )
        on_disk = self._drop_cost(self.servers[0], k, "fsync on")
        self.add(
            "db_files_per_empty_database", on_disk["files"], "files", 1, "files in base/<oid> of a new empty database"
        )
        self.add(
            "checkpoint_alone_p50", on_disk["checkpoint"], "ms", k, "CHECKPOINT with nothing to write, disk, fsync on"
        )
        self.add(
            "drop_database_p50",
            on_disk["drop"],
            "ms",
            k,
            "DROP DATABASE of an empty database, one at a time, as superuser, disk, fsync on",
        )
        self.add(
            "drop_checkpoints_per_drop",
            on_disk["checkpoints_per_drop"],
            "checkpoints",
            k,
            "checkpoints requested per DROP DATABASE (pg_stat_checkpointer.num_requested): each drop forces one",
        )
        root = self.data_dir / "nofsync"
        shutil.rmtree(root, ignore_errors=True)
        root.mkdir()
        server = pgserver.start(root / "pg", settings={"fsync": "off"})
        try:
            off = self._drop_cost(server, k, "fsync off")
        finally:
            server.stop(mode="immediate")
            shutil.rmtree(root, ignore_errors=True)
        self.add("drop_database_fsync_off_p50", off["drop"], "ms", k, "the same DROP DATABASE, same disk, fsync off")
        self.add("checkpoint_fsync_off_p50", off["checkpoint"], "ms", k, "CHECKPOINT alone, same disk, fsync off")

    def _drop_cost(self, server, k: int, label: str) -> dict:
        import psycopg

        with psycopg.connect(server.superuser_dsn, autocommit=True) as conn:
            names = [f"dropcost_{i}" for i in range(k)]
            _create_empty(conn, names)
            oid = conn.execute("SELECT oid FROM pg_database WHERE datname = %s", (names[0],)).fetchone()[0]
            files = sum(len(f) for _, _, f in os.walk(server.data_dir / "base" / str(oid)))
            conn.execute("CHECKPOINT")
            checkpoints = []
            for _ in range(k):
                t = time.perf_counter()
                conn.execute("CHECKPOINT")
                checkpoints.append(time.perf_counter() - t)
            before = conn.execute("SELECT num_requested FROM pg_stat_checkpointer").fetchone()[0]
            drops = []
            for name in names:
                t = time.perf_counter()
                conn.execute(f'DROP DATABASE "{name}"')
                drops.append(time.perf_counter() - t)
            after = conn.execute("SELECT num_requested FROM pg_stat_checkpointer").fetchone()[0]
        say(f"drop cost ({label}): drop p50 {ms(pct(drops, 50))} ms, checkpoint p50 {ms(pct(checkpoints, 50))} ms")
        return {
            "files": files,
            "checkpoint": ms(pct(checkpoints, 50)),
            "drop": ms(pct(drops, 50)),
            "checkpoints_per_drop": round((after - before) / k, 2),
        }


def _create_empty(conn, names: list[str]) -> None:
    for name in names:
        conn.execute(f'CREATE DATABASE "{name}"')
