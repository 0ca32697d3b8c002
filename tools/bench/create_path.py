"""`make bench`'s create-path figures: latency on demand and pooled, each step's share, ALTER ROLE's cost."""

from __future__ import annotations

import json
import statistics
import time

from tools.bench.common import ms, pct, timed

# Every step of a pooled create that costs more than ~0.5 ms, timed inside the pooled run:
# name -> (module, attribute, what it is). Whatever the request spends outside them is `part_rest`.
POOLED_PARTS = {
    "take_write": (
        "chalicelib.records",
        "take_pooled",
        "pooled: records.take_pooled, one TransactWriteItems (the conditional put POOLED -> UNCLAIMED, "
        "the audit event, the per-IP count with its limits as condition, the dashboard's per-hour count)",
    ),
    "alter_role": (
        "chalicelib.provisioning",
        "open_tenant",
        "pooled: provisioning.open_tenant (ALTER ROLE ... LOGIN CONNECTION LIMIT n on a kept admin session; "
        "the password was set at refill)",
    ),
    "unseal": ("chalicelib.records", "password", "pooled: records.password, unsealing the password (AES-GCM)"),
    "candidates": (
        "chalicelib.pooled",
        "candidates",
        "pooled: pooled.candidates, one index Query for 25 pooled records (per process, once per 25 takes)",
    ),
    "hosts": ("chalicelib.hosts", "HostCache.all", "pooled: the host list (a Scan when older than 30 s)"),
    "cap": (
        "chalicelib.abuse",
        "Guard.open_hosts",
        "pooled: abuse.Guard.open_hosts (no read while every host's allocated is under the unclaimed cap)",
    ),
    "view": ("chalicelib.views", "database", "pooled: views.database, the response body"),
}


def _owner(module: str, attribute: str) -> tuple[object, str]:
    import importlib

    owner: object = importlib.import_module(module)
    *path, name = attribute.split(".")
    for part in path:
        owner = getattr(owner, part)
    return owner, name


class CreatePathFigures:
    """Part of `performance.Bench`: needs its `add`, `args`, `service` and `refill`."""

    def create_latency(self) -> None:
        from contextlib import ExitStack

        from chalice.test import Client

        from app import app

        n = self.args.samples
        body = json.dumps({"ref": "bench"})
        headers = {"Content-Type": "application/json"}
        parts: dict[str, list[float]] = {name: [] for name in (*POOLED_PARTS, "ddl")}

        def run(each: list[float] | None = None) -> list[float]:
            """`n` creates; with `each`, what every create spent outside the pooled parts (its `rest`)."""
            times = []
            with Client(app) as client:
                for _ in range(n):
                    before = sum(sum(parts[name]) for name in POOLED_PARTS)
                    t = time.perf_counter()
                    response = client.http.post("/api/v1/database", body=body, headers=headers)
                    times.append(time.perf_counter() - t)
                    assert response.status_code == 201, response.body
                    if each is not None:
                        each.append(times[-1] - (sum(sum(parts[name]) for name in POOLED_PARTS) - before))
            return times

        from chalicelib import provisioning

        self.refill(0)
        with timed(provisioning, "create_tenant", parts["ddl"]):
            on_demand = run()
        self.refill(n + 3)
        with Client(app) as client:  # warm-up: opens the kept admin session, fills the candidate cache
            for _ in range(3):
                client.http.post("/api/v1/database", body=body, headers=headers)
        rest: list[float] = []
        with ExitStack() as stack:
            for name, (module, attribute, _) in POOLED_PARTS.items():
                stack.enter_context(timed(*_owner(module, attribute), parts[name]))
            pooled = run(rest)
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
        # Where a create's time goes, measured inside the runs above. A part's p50 is over its
        # calls; one not called on every create also gets its mean per create.
        self.add(
            "part_ddl_p50",
            ms(pct(parts["ddl"], 50)),
            "ms",
            len(parts["ddl"]),
            "on demand: provisioning.create_tenant (connect, CREATE ROLE, CREATE DATABASE, REVOKE, ALTER ROLE SET)",
        )
        for name, (_, _, what) in POOLED_PARTS.items():
            times = parts[name]
            self.add(f"part_{name}_p50", ms(pct(times, 50)) if times else None, "ms", len(times), what)
            if len(times) < len(pooled):  # not on every create: what it adds to one, on average
                self.add(
                    f"part_{name}_per_create",
                    ms(sum(times) / len(pooled)),
                    "ms",
                    len(pooled),
                    f"part_{name}'s time over all pooled creates / their number",
                )
        self.add(
            "part_rest_p50",
            ms(pct(rest, 50)),
            "ms",
            len(rest),
            "pooled: the rest of each create (chalice routing and middleware, the body's parsing, the creator "
            "token, host order, metrics), its time minus the parts above",
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
