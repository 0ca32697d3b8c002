"""`make bench`'s create-path figures: latency on demand and pooled, each step's share, ALTER ROLE's cost."""

from __future__ import annotations

import json
import statistics
import time

from tools.bench.common import ms, pct, timed


class CreatePathFigures:
    """Part of `performance.Bench`: needs its `add`, `args`, `service` and `refill`."""

    def create_latency(self) -> None:
        from chalice.test import Client

        from app import app

        n = self.args.samples
        body = json.dumps({"ref": "bench"})
        headers = {"Content-Type": "application/json"}

        def run(label: str) -> list[float]:
            times = []
            with Client(app) as client:
                for _ in range(n):
                    t = time.perf_counter()
                    response = client.http.post("/api/v1/database", body=body, headers=headers)
                    times.append(time.perf_counter() - t)
                    assert response.status_code == 201, response.body
            return times

        from chalicelib import provisioning, records
        from chalicelib.abuse import Guard

        parts: dict[str, list[float]] = {name: [] for name in ("ddl", "take_write", "alter_role", "cap")}
        self.refill(0)
        with timed(provisioning, "create_tenant", parts["ddl"]):
            on_demand = run("on demand")
        self.refill(n + 3)
        with Client(app) as client:  # warm-up: opens the kept admin session, fills the candidate cache
            for _ in range(3):
                client.http.post("/api/v1/database", body=body, headers=headers)
        with (
            timed(records, "take_pooled", parts["take_write"]),
            timed(provisioning, "open_tenant", parts["alter_role"]),
            timed(Guard, "open_hosts", parts["cap"]),
        ):
            pooled = run("pooled")
        unclaimed = sum(Guard(self.service.settings).unclaimed_counts().values())
        how = "POST /api/v1/database through chalice.test.Client, sequential"
        for label, times in (("on_demand", on_demand), ("pooled", pooled)):
            for p in (50, 95, 99):
                self.add(f"create_{label}_p{p}", ms(pct(times, p)), "ms", n, f"{how}, {label.replace('_', ' ')}")
        ratio = statistics.median(on_demand) / statistics.median(pooled)
        self.add("create_p50_ratio", round(ratio, 1), "x", n, "on-demand p50 / pooled p50, same run")
        getitem = next((f.value for f in self.figures if f.name == "dynamodb_getitem_p50"), None)
        if getitem:
            # The shared machine's load moves every figure; this one moves much less.
            self.add(
                "create_pooled_in_getitems",
                round(ms(statistics.median(pooled)) / getitem, 1),
                "x",
                n,
                "pooled create p50 / dynamodb_getitem_p50 of the same run: the create in GetItems",
            )
        # Where a create's time goes, measured inside the runs above.
        self.add(
            "part_ddl_p50",
            ms(pct(parts["ddl"], 50)),
            "ms",
            len(parts["ddl"]),
            "on demand: provisioning.create_tenant (connect, CREATE ROLE, CREATE DATABASE, REVOKE, ALTER ROLE SET)",
        )
        self.add(
            "part_take_write_p50",
            ms(pct(parts["take_write"], 50)),
            "ms",
            len(parts["take_write"]),
            "pooled: records.take_pooled, one TransactWriteItems (the conditional put POOLED -> UNCLAIMED, "
            "the audit event, the per-IP count with its limits as condition)",
        )
        self.add(
            "part_alter_role_p50",
            ms(pct(parts["alter_role"], 50)),
            "ms",
            len(parts["alter_role"]),
            "pooled: provisioning.open_tenant (ALTER ROLE ... LOGIN CONNECTION LIMIT n on a kept admin session; "
            "the password was set at refill)",
        )
        self.add(
            "part_host_cap_p50",
            ms(pct(parts["cap"], 50)),
            "ms",
            len(parts["cap"]),
            f"pooled: abuse.Guard.open_hosts (reads every UNCLAIMED/PROVISIONING record; {unclaimed} at the end)",
        )

    def password_statement(self) -> None:
        """What setting a password costs inside Postgres, against a statement that changes nothing else."""
        from psycopg import sql

        from chalicelib import hosts, postgres
        from chalicelib.identifiers import tenant_password

        n = self.args.samples
        target = hosts.target(self.service.hosts.get("bench-1"), self.service.settings)
        role = sql.Identifier(f"{self.service.settings.name_prefix}_bench_role")
        verifier = sql.Literal(postgres.scram_verifier(tenant_password()))
        statements = {
            "password": sql.SQL("ALTER ROLE {} PASSWORD {}").format(role, verifier),
            "limit": sql.SQL("ALTER ROLE {} CONNECTION LIMIT 5").format(role),
        }
        times: dict[str, list[float]] = {name: [] for name in statements}
        with target.session() as conn:
            conn.execute(sql.SQL("CREATE ROLE {} NOLOGIN").format(role))
            try:
                for _ in range(n):
                    for name, statement in statements.items():
                        t = time.perf_counter()
                        conn.execute(statement)
                        times[name].append(time.perf_counter() - t)
            finally:
                conn.execute(sql.SQL("DROP ROLE {}").format(role))
        self.add(
            "alter_role_password_p50",
            ms(pct(times["password"], 50)),
            "ms",
            n,
            "ALTER ROLE ... PASSWORD '<SCRAM verifier>' on a kept admin session (the server checks the "
            "verifier against the empty password: 4096 rounds of PBKDF2)",
        )
        self.add(
            "alter_role_other_p50",
            ms(pct(times["limit"], 50)),
            "ms",
            n,
            "ALTER ROLE ... CONNECTION LIMIT 5 on the same session: the round trip and catalog write alone",
        )
