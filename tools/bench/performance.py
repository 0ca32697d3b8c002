"""`make bench`: where instapg's time goes, on this machine, in one run.

Starts its own stack: two embedded Postgres servers with their data ON DISK
(INSTAPG_BENCH_DIR, default .local/bench; not tmpfs, so CREATE DATABASE costs
what it costs a user), DynamoDB from moto in this process, and the API on
chalice's local server. Then measures, in this order:

  1. create latency in-process (chalice.test.Client), on demand and from the warm pool,
     and what an ALTER ROLE ... PASSWORD costs inside Postgres; the peers (a fresh
     cluster, a plain CREATE DATABASE) as ratios to the pooled create (tools/bench/peers.py)
  2. time to first query over HTTP: POST, connect with the returned string, SELECT 1;
     cold start and memory of fresh API processes (tools/bench/coldstart.py)
  3. GET latency over HTTP
  4. throughput: 16 concurrent HTTP clients, 200 creates, one host then two hosts
  5. purge: 500 expired databases in parallel against a one-session baseline, and what one
     DROP DATABASE costs (checkpoint, fsync, files) (tools/bench/purge.py)
  6. cold import of `app` in a fresh interpreter, and the `chalice package` zip size
  7. in processes of their own: scaling with a CPU quota per host (tools/bench/scaling.py) and
     density at 0, 500 and 1,000 tenant databases (tools/bench/density.py)
  8. copies (tools/bench/copies.py): a 100 MB database copied and reset, STRATEGY FILE_COPY and WAL_LOG

Prints a table and writes every figure, with what it measured and on how many
samples, to results.json in the bench folder. Timings are reported, never
asserted.

    python -m tools.bench [--samples N] [--throughput N] [--purge N] [--no-package] [--scaling N] [--density N]
                          [--copy-mb N] [--copy-samples N] [--only-copies | --only-purge | --only-create-path]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path

from tools.bench.coldstart import ColdStartFigures
from tools.bench.common import Figure, bench_environment, machine_info, ms, pct, post_json, say, table
from tools.bench.copies import CopyFigures
from tools.bench.create_path import CreatePathFigures
from tools.bench.peers import PeerFigures
from tools.bench.purge import PurgeFigures

ROOT = Path(__file__).resolve().parents[2]
ADMIN_ENVS = ("INSTAPG_BENCH_HOST_ADMIN_1", "INSTAPG_BENCH_HOST_ADMIN_2")


class Bench(CreatePathFigures, PurgeFigures, PeerFigures, ColdStartFigures, CopyFigures):
    def __init__(self, data_dir: Path, args: argparse.Namespace) -> None:
        self.data_dir = data_dir
        self.args = args
        self.figures: list[Figure] = []
        self.servers = []
        self.http = None
        self.base = ""

    def add(self, name: str, value: float | None, unit: str, samples: int, how: str) -> None:
        self.figures.append(Figure(name, value, unit, samples, how))
        shown = "not measured" if value is None else f"{value} {unit}"
        say(f"{name}: {shown}")

    # -- the stack ---------------------------------------------------------------

    def start(self) -> None:
        from tools.dev import pgserver

        shutil.rmtree(self.data_dir, ignore_errors=True)
        self.data_dir.mkdir(parents=True)
        for i in (1, 2):
            server = pgserver.start(self.data_dir / f"pg{i}", grant_temp_file_limit=True)
            self.servers.append(server)
            os.environ[ADMIN_ENVS[i - 1]] = server.admin_credentials_json
        os.environ.update(bench_environment())
        os.environ.pop("INSTAPG_DYNAMODB_ENDPOINT", None)

        from moto import mock_aws

        from tools.dev import motoatomic

        motoatomic.install()
        # moto in this process: a DynamoDB call is a function call, not an HTTP hop.
        self.mock = mock_aws()
        self.mock.start()

        from chalicelib import context, models

        context.reset()
        self.service = context.get()
        models.configure(self.service.settings)
        models.create_tables()
        self.register(1)

        from tools.dev.localserver import InstapgRequestHandler, create_server
        from tools.dev.pgserver import free_port

        InstapgRequestHandler.log_message = lambda *args: None  # no access log line per request

        port = free_port()
        self.http = create_server(ROOT, "127.0.0.1", port)
        threading.Thread(target=self.http.server.serve_forever, name="api", daemon=True).start()
        self.base = f"http://127.0.0.1:{port}"
        say(f"stack up: postgres on disk at {self.data_dir}, moto in-process, api {self.base}")

    def register(self, i: int) -> None:
        from chalicelib import hosts

        server = self.servers[i - 1]
        hosts.register(
            self.service.settings,
            f"bench-{i}",
            "127.0.0.1",
            server.port,
            f"env:{ADMIN_ENVS[i - 1]}",
            capacity=100_000,
            sslmode="disable",
        )
        self.service.hosts.invalidate()

    def stop(self) -> None:
        if self.http is not None:
            self.http.shutdown()
        from chalicelib import context

        context.close_sessions()
        for server in self.servers:
            server.stop(mode="immediate")  # the data is thrown away: no shutdown checkpoint
            shutil.rmtree(server.data_dir, ignore_errors=True)
        if getattr(self, "mock", None) is not None:
            self.mock.stop()

    def refill(self, size: int) -> None:
        from chalicelib import pool
        from chalicelib.clock import Deadline

        started = time.monotonic()
        summary = pool.refill(self.service, Deadline.after(600), size=size)
        say(f"pool refilled: {summary.added} added in {time.monotonic() - started:.1f}s")

    # -- measurements ---------------------------------------------------------------

    def dynamodb_baseline(self) -> None:
        from chalicelib.models import HostRecord

        times = []
        for _ in range(200):
            t = time.perf_counter()
            HostRecord.get("bench-1", consistent_read=True)
            times.append(time.perf_counter() - t)
        self.add(
            "dynamodb_getitem_p50", ms(pct(times, 50)), "ms", 200, "one GetItem through pynamodb to moto in-process"
        )

    def time_to_first_query(self) -> None:
        import psycopg

        n = self.args.samples
        self.refill(n)
        times, gets, ids = [], [], []
        steps: dict[str, list[float]] = {"post": [], "connect": [], "select": []}
        for _ in range(n):
            t = time.perf_counter()
            status, body = post_json(self.base + "/api/v1/database", {"ref": "ttfq"})
            posted = time.perf_counter()
            with psycopg.connect(body["connection_string"], connect_timeout=10) as conn:
                connected = time.perf_counter()
                conn.execute("SELECT 1").fetchone()
                selected = time.perf_counter()
            times.append(time.perf_counter() - t)
            for step, took in (("post", posted - t), ("connect", connected - posted), ("select", selected - connected)):
                steps[step].append(took)
            ids.append(body["id"])
        for database_id in ids:
            t = time.perf_counter()
            with urllib.request.urlopen(f"{self.base}/api/v1/database/{database_id}", timeout=30) as resp:
                resp.read()
            gets.append(time.perf_counter() - t)
        how = "HTTP POST to chalice local, then psycopg connect + SELECT 1 on the returned connection_string; pooled"
        self.add("ttfq_p50", ms(pct(times, 50)), "ms", n, how)
        self.add("ttfq_p95", ms(pct(times, 95)), "ms", n, how)
        for step, what in (
            ("post", "the HTTP POST alone: local server, the pooled create, the JSON answer"),
            ("connect", "psycopg.connect on the returned string: TCP, SCRAM (4096 rounds on each side), backend start"),
            ("select", "SELECT 1 on the new session"),
        ):
            self.add(f"ttfq_{step}_p50", ms(pct(steps[step], 50)), "ms", n, f"time to first query, {what}")
        self.add("get_p50", ms(pct(gets, 50)), "ms", n, "HTTP GET /api/v1/database/{id} on chalice local")

    def throughput(self, hosts: int) -> None:
        n = self.args.throughput
        if hosts == 2:
            self.register(2)
        self.refill(0)  # on demand: what the hosts sustain once the pool is empty

        def one(i: int) -> tuple[int, dict]:
            try:
                return post_json(self.base + "/api/v1/database", {"ref": f"tp{i}"})
            except OSError as exc:  # counted as a failed create, not the end of the bench
                return 0, {"error": type(exc).__name__}

        t = time.perf_counter()
        with ThreadPoolExecutor(max_workers=16) as executor:
            answers = list(executor.map(one, range(n)))
        elapsed = time.perf_counter() - t
        ok = sum(1 for status, _ in answers if status == 201)
        for status, body in answers:
            if status != 201:
                say(f"throughput: a create answered {status}: {body.get('error')}")
        self.add(
            f"throughput_{hosts}_host{'s' if hosts > 1 else ''}",
            round(ok / elapsed, 1),
            "creates/s",
            n,
            f"{n} on-demand HTTP creates from 16 concurrent clients, {hosts} host(s); {ok} answered 201",
        )

    def cold_import(self) -> None:
        code = "import time; t = time.perf_counter(); import app; print(time.perf_counter() - t)"
        times = []
        for _ in range(7):
            out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
            times.append(float(out.stdout.strip().splitlines()[-1]))
        heavy = subprocess.run(
            [
                sys.executable,
                "-c",
                "import sys, app; print(','.join(m for m in ('boto3','botocore','pynamodb','psycopg','cryptography')"
                " if m in sys.modules) or 'none')",
            ],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        self.add(
            "cold_import_app",
            ms(statistics.median(times)),
            "ms",
            7,
            f"median `import app` in a fresh interpreter; heavy modules loaded by it: {heavy}",
        )

    def package_size(self) -> None:
        if self.args.no_package:
            self.add("lambda_zip_size", None, "MB", 0, "not measured: --no-package")
            return
        # A copy of what ships (app.py, chalicelib/, requirements.txt) with a
        # generated IAM policy: the policy does not change the zip, and the
        # deploy's policy files are not needed to measure it.
        project = self.data_dir / "package-src"
        shutil.rmtree(project, ignore_errors=True)
        (project / ".chalice").mkdir(parents=True)
        shutil.copy(ROOT / "app.py", project)
        shutil.copy(ROOT / "requirements.txt", project)
        shutil.copytree(ROOT / "chalicelib", project / "chalicelib", ignore=shutil.ignore_patterns("__pycache__"))
        config = {"version": "2.0", "app_name": "instapg", "stages": {"bench": {"autogen_policy": True}}}
        (project / ".chalice" / "config.json").write_text(json.dumps(config))
        out = self.data_dir / "package"
        env = {**os.environ, "AWS_DEFAULT_REGION": "us-east-2"}
        chalice = str(Path(sys.executable).with_name("chalice"))
        try:
            subprocess.run(
                [chalice, "package", "--stage", "bench", str(out)],
                cwd=project,
                env=env,
                capture_output=True,
                text=True,
                check=True,
                timeout=300,
            )
        except (subprocess.SubprocessError, OSError) as exc:
            self.add("lambda_zip_size", None, "MB", 0, f"not measured: chalice package failed ({type(exc).__name__})")
            return
        from tools.deploy.package import add_bytecode

        add_bytecode(out / "deployment.zip", out / "sam.json")  # as `make package` ships it
        size = (out / "deployment.zip").stat().st_size
        self.add(
            "lambda_zip_size",
            round(size / 1e6, 1),
            "MB",
            1,
            "deployment.zip from `chalice package` (app.py, chalicelib/, requirements.txt; Linux wheels) "
            "with the bytecode `make package` adds",
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.bench")
    parser.add_argument("--samples", type=int, default=100, help="samples per latency figure (default 100)")
    parser.add_argument("--throughput", type=int, default=200, help="creates per throughput run (default 200)")
    parser.add_argument("--purge", type=int, default=500, help="expired databases to purge (default 500)")
    parser.add_argument(
        "--purge-serial", type=int, default=20, help="expired databases of the one-session baseline (default 20)"
    )
    parser.add_argument("--drop-samples", type=int, default=10, help="DROP DATABASE samples per server (default 10)")
    parser.add_argument("--no-package", action="store_true", help="skip `chalice package`")
    parser.add_argument("--copy-mb", type=int, default=100, help="size of the database copied (default 100 MB)")
    parser.add_argument("--copy-samples", type=int, default=3, help="copies timed per strategy (default 3)")
    only = parser.add_mutually_exclusive_group()
    only.add_argument("--only-copies", action="store_true", help="measure only the copy figures")
    only.add_argument(
        "--only-purge", action="store_true", help="measure only the purge and DROP figures (with --purge N)"
    )
    only.add_argument(
        "--only-create-path",
        action="store_true",
        help="measure only the create path: GetItem baseline, creates and their parts, time to first query, cold start",
    )
    parser.add_argument(
        "--scaling",
        type=int,
        default=24,
        help="creates per host in the CPU-budget scaling run (default 24; 0 skips it)",
    )
    parser.add_argument("--scaling-cpu", type=float, default=0.1, help="CPU quota per host in cores (default 0.1)")
    parser.add_argument(
        "--density", type=int, default=1000, help="tenant databases at density's last level (default 1000; 0 skips it)"
    )
    parser.add_argument(
        "--density-samples", type=int, default=30, help="creates and GETs per density level (default 30)"
    )
    args = parser.parse_args(argv)

    import logging

    logging.getLogger("chalicelib").setLevel(logging.WARNING)  # one line per create would drown the table
    logging.getLogger("chalicelib").propagate = False

    data_dir = Path(os.environ.get("INSTAPG_BENCH_DIR", ROOT / ".local" / "bench")).resolve()
    started = time.monotonic()
    machine = machine_info()
    bench = Bench(data_dir, args)
    try:
        bench.start()
        everything = not (args.only_copies or args.only_purge or args.only_create_path)
        if args.only_create_path:
            bench.dynamodb_baseline()
            bench.create_latency()
            bench.time_to_first_query()
            bench.cold_start()
        elif everything:
            bench.dynamodb_baseline()
            bench.create_latency()
            bench.password_statement()
            bench.peers()
            bench.time_to_first_query()
            bench.cold_start()
            bench.throughput(1)
            bench.throughput(2)
        if everything or args.only_purge:
            bench.purge()
            bench.drop_costs()
        if everything or args.only_copies:
            bench.copy_time()
    finally:
        bench.stop()
    if everything:
        bench.cold_import()
        bench.package_size()
        # In processes of their own: their servers, records and settings stay out of the figures above.
        from tools.bench import standalone

        if args.scaling > 0:
            bench.figures += standalone.run("scaling", ["--creates", str(args.scaling), "--cpu", str(args.scaling_cpu)])
        if args.density > 0:
            bench.figures += standalone.run(
                "density", ["--max", str(args.density), "--samples", str(args.density_samples)]
            )

    if not (args.only_purge or args.only_create_path):
        from tools.bench import pooler

        say("pooler: its own Postgres and PgBouncer")
        bench.figures.extend(pooler.figures(samples=max(args.samples, 20)))
        from tools.bench import pooler_prod

        say("pooler, production's table store: its own Postgres, PgBouncer and sync loop")
        bench.figures.extend(pooler_prod.figures(samples=max(args.samples // 2, 20)))
        from tools.bench import replication

        say("replication gateway: its own Postgres and gateway")
        bench.figures.extend(replication.figures(samples=max(args.samples // 2, 20)))

    result = {
        "taken_at": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine,
        "duration_s": round(time.monotonic() - started, 1),
        "postgres_data": str(data_dir),
        "figures": [asdict(f) for f in bench.figures],
    }
    out = data_dir / "results.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\ninstapg bench, {result['taken_at']}, {machine['cpu']} ({machine['cores']} cores), "
          f"load at start {machine['load_average_at_start']}, {result['duration_s']} s\n")  # fmt: skip
    print(table(bench.figures))
    print(f"\nJSON: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
