"""`make dev`: the whole service on this machine, on embedded defaults.

Starts an embedded Postgres (127.0.0.1, scram-sha-256, a non-superuser admin
as on RDS), PgBouncer in front of it (Debian's, on its own port, run as the
Postgres system user: it refuses root), the replication gateway on its Unix
socket (INSTAPG_LOCAL_LOGICAL_REPLICATION), DynamoDB from moto's server, creates the tables, registers the
host, and serves the API with chalice's local server. Ctrl-C (or SIGTERM)
stops everything it started.

moto keeps no state between runs, so each run starts empty: the data folder
(INSTAPG_DEV_DIR, default .local/) is wiped at start. A second `make dev` on
the same folder while the first runs stops at once instead (a lock file beside
the folder says who holds it); give it another INSTAPG_DEV_DIR and PORT.

Environment: PORT (API port, default 8000), INSTAPG_DEV_DIR. Any INSTAPG_*
variable set before `make dev` is passed on to the app.
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
HOST_ID = "local"
ADMIN_ENV = "INSTAPG_LOCAL_HOST_ADMIN"
POOLER_ENV = "INSTAPG_LOCAL_POOLER_ADMIN"


def _say(message: str) -> None:
    print(f"[instapg] {message}", flush=True)


class DevStack:
    def __init__(self, data_dir: Path, port: int, pool_refill: bool = True) -> None:
        self.data_dir = data_dir
        self.port = port
        self.pool_refill = pool_refill
        self.pg = None
        self.bouncer = None
        self.bouncer_root: Path | None = None
        self.gateway = None
        self.gateway_root: Path | None = None
        self.moto = None
        self.server = None
        self.operator_key = ""
        self.background: list[threading.Thread] = []
        self.stopping = threading.Event()

    def start(self) -> None:
        import logging

        from moto.server import ThreadedMotoServer

        from tools.dev import motoatomic

        motoatomic.install()  # the API serves requests from many threads

        logging.getLogger("werkzeug").setLevel(logging.ERROR)  # moto's per-request lines

        from chalicelib.crypto import new_key_spec
        from tools.dev import pgserver, reaper

        # A killed run's servers and folders (this folder's too: we hold its lock, so whoever ran in
        # it is gone, even a run from before owners were registered) go before anything starts.
        reaper.reap_and_say("instapg")
        reaper.stop_servers(self.data_dir)
        shutil.rmtree(self.data_dir, ignore_errors=True)
        self.data_dir.mkdir(parents=True)
        reaper.register(self.data_dir, remove=False)

        self.pg = pgserver.start(self.data_dir / "pg", grant_temp_file_limit=True)
        _say(f"postgres  127.0.0.1:{self.pg.port} (embedded, scram-sha-256, admin role {pgserver.ADMIN_ROLE})")

        from tools.dev import pgbouncer

        # Its own private folder, owned by the Postgres system user it runs as.
        self.bouncer_root = pgserver.private_dir("instapg-dev-pgbouncer-")
        self.bouncer = pgbouncer.start(self.bouncer_root / "pgbouncer")
        _say(f"pgbouncer 127.0.0.1:{self.bouncer.port} (connection_string: transaction pooling; direct string: Postgres)")

        moto_port = pgserver.free_port()
        self.moto = ThreadedMotoServer(ip_address="127.0.0.1", port=moto_port, verbose=False)
        self.moto.start()
        _say(f"dynamodb  http://127.0.0.1:{moto_port} (moto server)")

        env = {
            "AWS_ACCESS_KEY_ID": "local",
            "AWS_SECRET_ACCESS_KEY": "local",
            "AWS_DEFAULT_REGION": "us-east-2",
            "AWS_REGION": "us-east-2",
            "AWS_ACCOUNT_ID_ENDPOINT_MODE": "disabled",
            "INSTAPG_STAGE": "dev",
            "INSTAPG_TABLE_PREFIX": "instapg-dev",
            "INSTAPG_DYNAMODB_ENDPOINT": f"http://127.0.0.1:{moto_port}",
            "INSTAPG_KEYRING": new_key_spec("local1"),
            ADMIN_ENV: self.pg.admin_credentials_json,
            POOLER_ENV: self.bouncer.admin_json(),
        }
        for key, value in env.items():
            if key.startswith("INSTAPG_") and key not in (ADMIN_ENV, POOLER_ENV, "INSTAPG_DYNAMODB_ENDPOINT"):
                os.environ.setdefault(key, value)
            else:
                os.environ[key] = value

        from chalicelib import context, hosts, models

        context.reset()
        settings = context.get().settings
        if settings.local_logical_replication:
            from tools.dev import replgateway

            # Tenants stream through it; their companion roles may log in only on the socket it uses.
            self.gateway_root = pgserver.private_dir("instapg-dev-gateway-")
            self.gateway = replgateway.start(self.pg.socket_dir, self.pg.port, self.gateway_root / "gateway.log")
            _say(
                f"gateway   127.0.0.1:{self.gateway.port} (replication_connection_string: logical replication, "
                "physical commands refused)"
            )
        models.configure(settings)
        models.create_tables()
        _, warnings = hosts.register(settings, HOST_ID, "127.0.0.1", self.pg.port, f"env:{ADMIN_ENV}", **self.host_options())
        for warning in warnings:
            _say(f"host warning: {warning}")
        offers = "logical replication" if settings.local_logical_replication else "no logical replication"
        _say(f"host      '{HOST_ID}' registered (capacity 1000, {offers})")

        from chalicelib import operators

        # The dashboard needs an operator key; this stack's data lives one run, so does the key.
        self.operator_key = operators.create("make-dev").key

        # moto never expires items and chalice local runs no stream handlers:
        # emulate TTL deletion and deliver the stream to drop_removed.
        from tools.dev.ttlstream import LocalStream

        self.ttl_every = settings.local_ttl_sweep_s
        local_stream = LocalStream(settings)
        thread = threading.Thread(
            target=local_stream.run_forever, args=(self.stopping, self.ttl_every), name="ttl-stream", daemon=True
        )
        thread.start()
        self.background.append(thread)

        if self.pool_refill:
            # `chalice local` runs no schedules: top the warm pool up on a timer.
            thread = threading.Thread(target=self._refill_pool, name="pool-refill", daemon=True)
            thread.start()
            self.background.append(thread)
            _say(f"pool      {settings.pool_size} ready database(s) kept on each host (INSTAPG_POOL_SIZE)")

        from tools.dev.localserver import create_server

        self.server = create_server(ROOT, "127.0.0.1", self.port)
        thread = threading.Thread(target=self.server.server.serve_forever, name="api", daemon=True)
        thread.start()
        self.background.append(thread)

        # chalice local runs no schedules: run the scheduled job here, on a timer.
        self.interval = settings.local_purge_interval_s
        timer = threading.Thread(target=self._scheduled_loop, name="scheduled", daemon=True)
        timer.start()
        self.background.append(timer)

    def host_options(self) -> dict:
        """hosts.register's arguments for the local host: its PgBouncer (written through its files), its gateway."""
        return {
            "capacity": 1000,
            "sslmode": "disable",
            # The embedded server runs wal_level=logical; tenants stream through the replication gateway.
            "logical_replication": self.gateway is not None,
            "replication_endpoint": (self.gateway.host, self.gateway.port) if self.gateway is not None else None,
            "pooler_hostname": "127.0.0.1",
            "pooler_port": self.bouncer.port,
            "pooler_credentials": f"env:{POOLER_ENV}",
            "pooler_store": f"file:{self.bouncer.state_dir}",
        }

    def _scheduled_loop(self) -> None:
        from chalicelib import context, jobs
        from chalicelib.clock import Deadline

        while not self.stopping.wait(self.interval):
            try:
                jobs.run(context.get(), Deadline.after(self.interval * 0.8))
            except Exception as exc:  # keep the timer alive; each part logged its summary
                _say(f"scheduled run failed: {type(exc).__name__}")

    def _refill_pool(self, every_s: float = 5.0, budget_s: float = 20.0) -> None:
        from chalicelib import context, pool
        from chalicelib.clock import Deadline

        while not self.stopping.is_set():
            try:
                pool.refill(context.get(), Deadline.after(budget_s))
            except Exception as exc:  # keep the timer alive; the next round retries
                _say(f"pool refill failed: {type(exc).__name__}")
            self.stopping.wait(every_s)

    def banner(self) -> None:
        url = f"http://127.0.0.1:{self.port}"
        _say(f"api       {url} (chalice local)")
        _say(f"dashboard {url}/admin with the operator key {self.operator_key} (this run only)")
        _say(
            f"purge     every {self.interval}s: expiry, reconciliation, quotas (the scheduled job, run by this "
            "stack: chalice local runs no schedules)"
        )
        _say(
            f"ttl       every {self.ttl_every}s: expired items deleted as DynamoDB's TTL does; the table's stream "
            "goes to drop_removed, as in production"
        )
        _say("ready. Try:")
        print(
            f"\n  curl -X POST {url}/api/v1/database -H 'Content-Type: application/json' -d '{{\"ref\":\"readme\"}}'\n",
            flush=True,
        )
        _say("Ctrl-C stops everything.")

    def stop(self) -> None:
        self.stopping.set()
        if self.server is not None:
            self.server.shutdown()
        if self.moto is not None:
            self.moto.stop()
        if self.gateway is not None:
            self.gateway.stop()
        if self.gateway_root is not None:
            shutil.rmtree(self.gateway_root, ignore_errors=True)
        if self.bouncer is not None:
            self.bouncer.stop()
        if self.bouncer_root is not None:
            shutil.rmtree(self.bouncer_root, ignore_errors=True)
        if self.pg is not None:
            self.pg.stop()
        _say("stopped.")


def _lock(data_dir: Path):
    """An exclusive lock on `<data_dir>.lock`, held until the process ends; None when another holds it.

    The lock lives beside the folder, not in it, because start() wipes the folder.
    """
    import fcntl

    data_dir.parent.mkdir(parents=True, exist_ok=True)
    handle = open(data_dir.with_name(data_dir.name + ".lock"), "a")  # noqa: SIM115 - held for the process's life
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        return None
    return handle


def main() -> int:
    import logging

    logging.basicConfig(level=logging.WARNING, format="[instapg] %(asctime)s %(name)s %(message)s", datefmt="%H:%M:%S")
    port = int(os.environ.get("PORT", "8000"))
    data_dir = Path(os.environ.get("INSTAPG_DEV_DIR", ROOT / ".local")).resolve()
    lock = _lock(data_dir)
    if lock is None:
        print(
            f"[instapg] another `make dev` is using {data_dir}: stop it, or run this one with "
            "INSTAPG_DEV_DIR=<another folder> PORT=<another port>",
            file=sys.stderr,
        )
        return 1
    stack = DevStack(data_dir, port)

    def on_signal(signum, frame):  # noqa: ARG001 - signal handler signature
        raise KeyboardInterrupt

    # Set both explicitly: a shell starts background jobs with SIGINT ignored.
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        stack.start()
        stack.banner()
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        stack.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
