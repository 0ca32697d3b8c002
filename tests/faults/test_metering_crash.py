"""Issue 14 §6: a metering run killed with SIGKILL between reading the pooler's
counters and writing them loses nothing and counts nothing twice.

The child process runs the real job against the same moto (over HTTP), the
embedded Postgres and the session's PgBouncer, and is killed at the
`metering_after_read` pause point: it has read every counter, written none.
"""

from __future__ import annotations

import base64
import os
import pickle
import signal
import subprocess
import sys

import psycopg

from tests.conftest import ADMIN_ENV

CHILD = """
import base64, os, pickle
from chalicelib import context, metering
from chalicelib.clock import Deadline
from chalicelib.context import Context
bouncer = pickle.loads(base64.b64decode(os.environ["TEST_METER_POOLER"]))  # the parent's Pooler, as it is
Context.pooler = lambda self, host: bouncer  # the getter the pooler's wiring provides
print(metering.run(context.get(), Deadline.after(60))["metered"], flush=True)
"""


def _child(bouncer, pause: str | None) -> str:
    """Run one metering pass in a child; SIGKILL it at `pause`; its last line."""
    from chalicelib.reliability import PAUSE_ENV

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = {**os.environ, "TEST_METER_POOLER": base64.b64encode(pickle.dumps(bouncer)).decode()}
    if pause:
        env[PAUSE_ENV] = pause
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD], cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
    )
    try:
        line = child.stdout.readline().strip()  # blocks until the child prints (or dies)
        if pause:
            assert line == f"paused at {pause}", line
            os.kill(child.pid, signal.SIGKILL)
            assert child.wait(timeout=30) == -signal.SIGKILL
        else:
            assert child.wait(timeout=60) == 0
        return line
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()


def test_a_run_killed_between_reading_and_writing_loses_and_doubles_nothing(moto_http, pg, pgbouncer, monkeypatch):
    from chalicelib import context, creation, hosts, metering, pooler
    from chalicelib.clock import Deadline
    from chalicelib.context import Context
    from chalicelib.models import DatabaseRecord
    from chalicelib.records import Requester
    from chalicelib.schemas import CreateDatabase

    service = context.get()
    hosts.register(service.settings, "local-1", pg.host, pg.port, f"env:{ADMIN_ENV}", capacity=50, sslmode="disable")
    made = creation.create(service, CreateDatabase(ref="metered"), Requester())
    role, dbname = made.record.role_name, made.record.db_name
    with psycopg.connect(pg.superuser_dsn) as conn:
        (verifier,) = conn.execute("SELECT rolpassword FROM pg_authid WHERE rolname = %s", (role,)).fetchone()
    bouncer = pgbouncer.pooler()
    bouncer.publish(pooler.Tenant(role, dbname, verifier, 5, pg.host, pg.port))
    monkeypatch.setattr(Context, "pooler", lambda self, host: bouncer)
    try:
        url = bouncer.pooled_url(role, made.password, dbname)
        with psycopg.connect(url, prepare_threshold=None, connect_timeout=10) as conn:
            conn.execute("SELECT repeat('x', 300000)").fetchone()

        _child(bouncer, "metering_after_read")
        record = DatabaseRecord.get(made.record.id, consistent_read=True)
        assert record.transfer_out_bytes is None and record.pooler_seen_out is None  # it died before writing

        summary = metering.run(service, Deadline.after(60))  # the next run
        counters = bouncer.stats()[dbname]
        record = DatabaseRecord.get(made.record.id, consistent_read=True)
        assert summary["metered"] == 1 and counters[1] >= 300000
        assert (int(record.transfer_in_bytes), int(record.transfer_out_bytes)) == counters  # nothing lost

        assert _child(bouncer, None) == "0"  # a whole run in another process: nothing new to add
        record = DatabaseRecord.get(made.record.id, consistent_read=True)
        assert (int(record.transfer_in_bytes), int(record.transfer_out_bytes)) == counters  # nothing doubled
    finally:
        bouncer.revoke(role, dbname)
