"""`make bench`'s copy figures (issue 18 §2): copying and resetting a 100 MB database, both strategies.

A claimed database on the bench's on-disk Postgres is filled to `--copy-mb`
(a table of random text, so it does not compress away), then copied with
`copies.create` under INSTAPG_COPY_STRATEGY=file_copy (the default) and =wal_log, and a
copy is reset. The source refuses connections for the whole of each copy:
the copy time is the source's downtime. The copy deadline is lifted here, so
the figure is the copy's time even where the API's INSTAPG_COPY_DEADLINE_SECONDS
would cut it short. docs/copies.md quotes the figures.
"""

from __future__ import annotations

import os
import statistics
import time

from tools.bench.common import say


class CopyFigures:
    """Part of `performance.Bench`: needs its `add`, `args` and `service`."""

    def copy_time(self) -> None:
        import psycopg

        from chalicelib import accounts, context, copies, creation, ownership, records
        from chalicelib.records import Requester
        from chalicelib.schemas import CreateDatabase

        mb = self.args.copy_mb
        samples = self.args.copy_samples
        requester = Requester(ip="127.0.0.1")
        os.environ["INSTAPG_DATABASES_PER_ACCOUNT"] = str(4 * samples + 2)
        # Measure how long a copy takes, not whether it fits the API's deadline (docs/copies.md compares).
        os.environ["INSTAPG_COPY_DEADLINE_SECONDS"] = "600"
        context.reset()
        service = context.get()
        made = creation.create(service, CreateDatabase(ref="bench-copy"), requester)
        account = accounts.create("bench@example.com").account
        claimed = ownership.claim(service, made.record.id, account.id, requester)
        source = claimed.record
        password = records.password(service, source)
        host = service.hosts.get(source.host_id)
        conninfo = dict(
            host=host.hostname, port=int(host.port), user=source.role_name, password=password, dbname=source.db_name
        )
        with psycopg.connect(**conninfo, autocommit=True) as conn:
            conn.execute("SET statement_timeout = 0")
            conn.execute("CREATE TABLE filler (id bigint PRIMARY KEY, body text)")
            size = 0
            while size < mb * 1_000_000:
                # ~1 kB of md5 hex a row: random enough that TOAST does not compress it away.
                conn.execute(
                    "INSERT INTO filler SELECT g, repeat(md5(random()::text), 32) "
                    "FROM generate_series(coalesce((SELECT max(id) FROM filler), 0) + 1, "
                    "coalesce((SELECT max(id) FROM filler), 0) + 10000) g"
                )
                size = conn.execute("SELECT pg_database_size(current_database())").fetchone()[0]
            conn.execute("VACUUM ANALYZE filler")
            size = conn.execute("SELECT pg_database_size(current_database())").fetchone()[0]
        say(f"copy source filled: {size / 1e6:.0f} MB")
        for strategy in ("file_copy", "wal_log"):
            os.environ["INSTAPG_COPY_STRATEGY"] = strategy
            context.reset()
            service = context.get()
            times = []
            made_copies = []
            for _ in range(samples):
                t = time.perf_counter()
                made_copies.append(copies.create(service, source.id, account.id, requester).record)
                times.append(time.perf_counter() - t)
            self.add(
                f"copy_{mb}mb_{strategy}_median",
                round(statistics.median(times), 2),
                "s",
                samples,
                f"POST .../copies of a {size / 1e6:.0f} MB claimed database in-process, STRATEGY {strategy.upper()}, "
                "data on disk (fsync on); the source refuses connections for this long",
            )
            t = time.perf_counter()
            copies.reset(service, made_copies[0].id, account.id, requester)
            self.add(
                f"copy_reset_{mb}mb_{strategy}",
                round(time.perf_counter() - t, 2),
                "s",
                1,
                f"POST .../reset of a copy of the {size / 1e6:.0f} MB database (drop the copy, copy again)",
            )
            for copy in made_copies:
                ownership.delete(service, copy.id, account.id, requester)
        os.environ.pop("INSTAPG_COPY_STRATEGY", None)
        os.environ.pop("INSTAPG_DATABASES_PER_ACCOUNT", None)
        os.environ.pop("INSTAPG_COPY_DEADLINE_SECONDS", None)
        ownership.delete(service, source.id, account.id, requester)
        context.reset()
