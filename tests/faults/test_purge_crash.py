"""Issue 15: the parallel purge, killed with SIGKILL in the middle of a batch, loses nothing.

The child process drops on three sessions and is killed right after one of
its drops, while the others are under way and before any record of the
batch is finished. The next run (in this process) finishes every one.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta

import psycopg

from tests.conftest import ADMIN_ENV

CHILD = """
from chalicelib import context, expiry, tombstones
from chalicelib.clock import Deadline
tombstones.LEASE_S = 2  # so the test waits 2 s for the leases to end, not a minute
expiry.run_scheduled(context.get(), Deadline.after(120))
print("finished", flush=True)
"""

EXPIRED, LIVE = 8, 2


def _names(pg, prefix: str) -> set[str]:
    with psycopg.connect(pg.superuser_dsn) as conn:
        rows = conn.execute(
            "SELECT datname FROM pg_database WHERE starts_with(datname, %(p)s) "
            "UNION SELECT rolname FROM pg_roles WHERE starts_with(rolname, %(p)s)",
            {"p": prefix + "_"},
        ).fetchall()
    return {name for (name,) in rows}


def _kill_mid_purge(point: str = "purge_after_drop") -> None:
    from chalicelib.reliability import PAUSE_ENV

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD],
        cwd=root,
        env={**os.environ, PAUSE_ENV: point},
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        line = child.stdout.readline()  # blocks until the child prints (or dies)
        # Workers that pause at once may print on one line: the first is what counts.
        assert line.startswith(f"paused at {point}"), line
        os.kill(child.pid, signal.SIGKILL)
        assert child.wait(timeout=30) == -signal.SIGKILL
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()


def test_a_purge_killed_mid_batch_is_finished_by_the_next_run(moto_http, pg, instapg_env):
    from chalicelib import audit, context, creation, expiry, hosts
    from chalicelib.clock import Deadline
    from chalicelib.models import DatabaseRecord, HostRecord
    from chalicelib.records import Requester
    from chalicelib.schemas import CreateDatabase

    instapg_env.setenv("INSTAPG_PURGE_SESSIONS_PER_HOST", "3")
    context.reset()
    service = context.get()
    hosts.register(service.settings, "local-1", pg.host, pg.port, f"env:{ADMIN_ENV}", capacity=50, sslmode="disable")
    # An earlier test of this session may have left the host's count above 0 (register keeps it).
    base = int(HostRecord.get("local-1", consistent_read=True).allocated or 0)
    made = [creation.create(service, CreateDatabase(ref="crash"), Requester()).record for _ in range(EXPIRED + LIVE)]
    expired, live = made[:EXPIRED], made[EXPIRED:]
    past = datetime.now(UTC) - timedelta(minutes=1)
    for record in expired:
        record.update(actions=[DatabaseRecord.expires_at.set(past), DatabaseRecord.due_at.set(int(past.timestamp()))])

    _kill_mid_purge()

    prefix = service.settings.name_prefix
    left = _names(pg, prefix)
    states = [DatabaseRecord.get(r.id, consistent_read=True) for r in expired]
    taken = [r for r in states if r.status == "EXPIRED"]
    print(f"figure: killed with {len(taken)} of {EXPIRED} taken, {sum(r.db_name not in left for r in expired)} dropped")
    assert taken, "the child took records before it was killed"
    assert all(r.due_bucket is not None for r in states)  # none finished: the batch was cut in the middle
    assert any(r.db_name not in left for r in expired)  # and at least one drop had happened
    assert int(HostRecord.get("local-1", consistent_read=True).allocated) == base + EXPIRED + LIVE  # none given back

    time.sleep(2.5)  # the child's leases end
    context.reset()
    summary = expiry.run_scheduled(context.get(), Deadline.after(60))

    assert summary.expired_dropped + summary.leftovers_dropped == EXPIRED, summary
    assert summary.failed == 0 and summary.stopped_early is False
    assert _names(pg, prefix) == {r.db_name for r in live} | {r.role_name for r in live}
    for record in expired:
        now = DatabaseRecord.get(record.id, consistent_read=True)
        assert now.status == "EXPIRED" and now.due_bucket is None
        assert any(e.action == audit.PURGED for e in audit.page(record.id).events)
    for record in live:
        assert DatabaseRecord.get(record.id, consistent_read=True).status == "UNCLAIMED"
    assert int(HostRecord.get("local-1", consistent_read=True).allocated) == base + LIVE


def test_a_worker_whose_kept_connection_was_ended_drops_on_a_new_one(moto_http, pg, instapg_env):
    from chalicelib import context, creation, hosts
    from chalicelib.droppers import Droppers
    from chalicelib.records import Requester
    from chalicelib.schemas import CreateDatabase

    context.reset()
    service = context.get()
    hosts.register(service.settings, "local-1", pg.host, pg.port, f"env:{ADMIN_ENV}", capacity=50, sslmode="disable")
    first, second = (creation.create(service, CreateDatabase(ref="kept"), Requester()).record for _ in range(2))
    droppers = Droppers(service, 1)  # one worker: the second drop uses the first one's kept connection
    try:
        assert droppers.submit("local-1", lambda: droppers.drop(first)).result(timeout=60) is True
        with psycopg.connect(pg.superuser_dsn, autocommit=True) as su:
            ended = su.execute(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                "WHERE application_name = 'instapg' AND usename = %s AND pid <> pg_backend_pid()",
                (pg.admin_user,),
            ).fetchone()[0]
        assert ended >= 1  # the worker's kept connection, ended under it (as a restart would)
        assert droppers.submit("local-1", lambda: droppers.drop(second)).result(timeout=60) is True
    finally:
        droppers.close()
    names = _names(pg, service.settings.name_prefix)
    assert first.db_name not in names and second.db_name not in names


def test_a_purge_killed_after_its_batched_final_writes_leaves_each_event_once(moto_http, pg, instapg_env):
    """Killed after a page's TransactWriteItems and before its slot release: every record is
    finished with exactly one `purged` event; the next run's recount gives the slots back."""
    from chalicelib import audit, context, creation, expiry, hosts
    from chalicelib.clock import Deadline
    from chalicelib.models import DatabaseRecord, HostRecord
    from chalicelib.records import Requester
    from chalicelib.schemas import CreateDatabase

    instapg_env.setenv("INSTAPG_PURGE_SESSIONS_PER_HOST", "3")
    context.reset()
    service = context.get()
    hosts.register(service.settings, "local-1", pg.host, pg.port, f"env:{ADMIN_ENV}", capacity=50, sslmode="disable")
    made = [creation.create(service, CreateDatabase(ref="crash"), Requester()).record for _ in range(4)]
    past = datetime.now(UTC) - timedelta(minutes=1)
    for record in made:
        record.update(actions=[DatabaseRecord.expires_at.set(past), DatabaseRecord.due_at.set(int(past.timestamp()))])
    before = int(HostRecord.get("local-1", consistent_read=True).allocated or 0)

    _kill_mid_purge("purge_after_finish")

    def purged(record) -> int:
        return sum(e.action == audit.PURGED for e in audit.page(record.id).events)

    for record in made:
        now = DatabaseRecord.get(record.id, consistent_read=True)
        assert now.status == "EXPIRED" and now.due_bucket is None and purged(record) == 1
    assert int(HostRecord.get("local-1", consistent_read=True).allocated) == before  # not given back yet

    context.reset()
    summary = expiry.run_scheduled(context.get(), Deadline.after(60))

    assert summary.expired_dropped == 0 and summary.failed == 0 and summary.slots_corrected >= 1, summary
    assert int(HostRecord.get("local-1", consistent_read=True).allocated) == before - 4
    assert all(purged(record) == 1 for record in made)
