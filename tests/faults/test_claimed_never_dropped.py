"""Issue 12.1 and "no claimed database is dropped by any automatic path".

The table is made to lie the way a mistaken delete or a point-in-time
restore makes it lie (the record gone, or older than the database), and each
automatic path (stream, purge, reconciliation, quota job, drain) is run on
it: the claimed marker Postgres carries keeps the database, and the run says so.
"""

from __future__ import annotations

import json
import logging
import time
from datetime import UTC, datetime, timedelta

import psycopg
import pytest

from tests.streams import TTL_IDENTITY, image, stream_event

ACCOUNT = "acct-owner"


def reconfigure(instapg_env, **env):
    from chalicelib import context

    for name, value in env.items():
        instapg_env.setenv(name, str(value))
    context.reset()
    return context.get()


def create(service):
    from chalicelib import creation
    from chalicelib.records import Requester
    from chalicelib.schemas import CreateDatabase

    return creation.create(service, CreateDatabase(ref="faults"), Requester())


def claimed(service):
    """A database claimed through the service (the marker written as a claim writes it)."""
    from chalicelib import ownership
    from chalicelib.records import Requester

    db = create(service)
    ownership.claim(service, db.record.id, ACCOUNT, Requester())
    return db


def dsn(pg, db) -> str:
    r = db.record
    return (
        f"host={pg.host} port={pg.port} user={r.role_name} password={db.password} dbname={r.db_name} connect_timeout=5"
    )


def lives(pg, db) -> bool:
    """The owner's data is there: the tenant logs in and reads it back."""
    with psycopg.connect(dsn(pg, db)) as conn:
        return conn.execute("SELECT 1").fetchone() == (1,)


def exists(pg, name: str) -> bool:
    with psycopg.connect(pg.superuser_dsn) as conn:
        return conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone() is not None


def fresh(record):
    from chalicelib.models import DatabaseRecord

    return DatabaseRecord.get(record.id, consistent_read=True)


def restore_as_unclaimed(record) -> None:
    """The record as a restore from before the claim brings it back: UNCLAIMED, and expired by now."""
    from chalicelib.models import UNCLAIMED, DatabaseRecord

    past = datetime.now(UTC) - timedelta(hours=1)
    record.update(
        actions=[
            DatabaseRecord.status.set(UNCLAIMED),
            DatabaseRecord.plan.set("unclaimed"),
            DatabaseRecord.owner_id.remove(),
            DatabaseRecord.claimed_at.remove(),
            DatabaseRecord.expires_at.set(past),
            DatabaseRecord.due_bucket.set(UNCLAIMED),
            DatabaseRecord.due_at.set(int(past.timestamp())),
        ]
    )


def purge(service):
    from chalicelib import expiry
    from chalicelib.clock import Deadline

    return expiry.run_scheduled(service, Deadline.after(60))


def events(caplog, name: str) -> list[dict]:
    out = []
    for rec in caplog.records:
        try:
            line = json.loads(rec.getMessage())
        except ValueError:
            continue
        if isinstance(line, dict) and line.get("event") == name:
            out.append(line)
    return out


# -- the marker ----------------------------------------------------------------------


def test_a_claim_marks_the_role_and_no_tenant_can_remove_or_forge_the_marker(service, host, pg):
    from chalicelib.postgres import CLAIMED_MARKER

    mine = claimed(service)
    other = create(service)  # unclaimed: would like to look claimed
    with psycopg.connect(pg.superuser_dsn) as conn:
        marker = conn.execute(
            "SELECT shobj_description(oid, 'pg_authid') FROM pg_roles WHERE rolname = %s", (mine.record.role_name,)
        ).fetchone()[0]
    assert marker == CLAIMED_MARKER

    for db, comment in ((mine, None), (other, CLAIMED_MARKER)):
        with psycopg.connect(dsn(pg, db), autocommit=True) as conn:
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute(
                    psycopg.sql.SQL("COMMENT ON ROLE {} IS {}").format(
                        psycopg.sql.Identifier(db.record.role_name), psycopg.sql.Literal(comment)
                    )
                )


def test_the_owners_delete_still_drops_a_claimed_database(client, service, host, pg):
    from chalicelib import ownership
    from chalicelib.records import Requester

    db = claimed(service)
    ownership.delete(service, db.record.id, ACCOUNT, Requester())
    assert not exists(pg, db.record.db_name)


# -- each automatic path -------------------------------------------------------------


def test_stream_remove_of_a_record_restored_as_unclaimed_keeps_the_claimed_database(service, host, pg, caplog):
    from chalicelib import stream

    db = claimed(service)
    record = fresh(db.record)
    restore_as_unclaimed(record)
    old = image(fresh(record))
    record.delete()  # TTL removes the (restored, expired) item
    event = stream_event(service.settings, "REMOVE", record.id, old=old)
    event["userIdentity"] = TTL_IDENTITY

    with caplog.at_level(logging.INFO):
        summary = stream.handle_stream(service, [event])

    assert summary.claimed_kept == 1 and summary.dropped == 0
    assert lives(pg, db)
    assert fresh(record).due_bucket is None  # not retried forever
    (line,) = events(caplog, "claimed_database_kept")
    assert line["path"] == "stream" and line["name"] == db.record.db_name


def test_purge_of_a_record_restored_as_unclaimed_and_expired_keeps_the_claimed_database(service, host, pg, caplog):
    db = claimed(service)
    restore_as_unclaimed(fresh(db.record))

    with caplog.at_level(logging.INFO):
        summary = purge(service)

    assert summary.claimed_kept == 1 and summary.expired_dropped == 0
    assert lives(pg, db)
    record = fresh(db.record)
    assert record.due_bucket is None and record.failure.startswith("kept")
    assert events(caplog, "claimed_database_kept")[0]["path"] == "purge"
    again = purge(service)  # held: the next runs leave it alone, reconciliation lists it
    assert again.claimed_kept == 0 and again.claimed_orphans == 1
    assert lives(pg, db)


def test_reconciliation_keeps_a_claimed_database_whose_record_is_gone_and_lists_it(
    instapg_env, host, pg, caplog, capsys
):
    from tools.ops import hostctl as hosts_tool

    service = reconfigure(instapg_env, INSTAPG_ORPHAN_GRACE_SECONDS=0)
    kept = claimed(service)
    lost = create(service)  # unclaimed, record lost too: an ordinary orphan
    fresh(kept.record).delete()
    fresh(lost.record).delete()

    with caplog.at_level(logging.INFO):
        first = purge(service)
        second = purge(service)

    assert first.claimed_orphans == 1 and second.claimed_orphans == 1  # reported on every run
    assert first.orphans_dropped == 1 and not exists(pg, lost.record.db_name)  # grace 0 here
    assert second.orphans_dropped == 0
    assert lives(pg, kept)
    assert {line["name"] for line in events(caplog, "claimed_orphan")} == {kept.record.db_name}
    assert json.loads(caplog.records[-1].getMessage())["claimed_orphans"] == 1  # in the run's summary line
    capsys.readouterr()
    assert hosts_tool.main(["orphans"]) == 3
    out = capsys.readouterr().out
    assert kept.record.role_name in out and lost.record.role_name not in out


def test_unclaimed_orphans_wait_out_the_grace_before_they_are_dropped(instapg_env, host, pg):
    service = reconfigure(instapg_env, INSTAPG_ORPHAN_GRACE_SECONDS=3600)
    lost = create(service)
    fresh(lost.record).delete()
    summary = purge(service)
    assert summary.orphans_seen == 1 and summary.orphans_dropped == 0
    assert lives(pg, lost)  # a restore lagging behind the create still finds its database


def test_the_quota_job_never_drops_a_claimed_database(instapg_env, host, pg):
    from chalicelib import jobs
    from chalicelib.clock import Deadline

    # Every database is over this limit; the record restored as UNCLAIMED puts it under it.
    service = reconfigure(instapg_env, INSTAPG_UNCLAIMED_STORAGE_MB=0)
    db = claimed(service)
    restore_as_unclaimed(fresh(db.record))
    result = jobs.run(service, Deadline.after(60))  # purge, quotas, pool: the whole scheduled job
    assert result["purge"]["claimed_kept"] == 1
    assert exists(pg, db.record.db_name)


def test_drain_never_drops_a_claimed_database_its_record_calls_pooled(service, host, pg, caplog):
    from chalicelib import pool
    from chalicelib.clock import Deadline
    from chalicelib.models import POOLED, DatabaseRecord
    from tools.ops import hostctl as hosts_tool

    db = claimed(service)
    # A restore from before the database left the pool.
    fresh(db.record).update(
        actions=[
            DatabaseRecord.status.set(POOLED),
            DatabaseRecord.owner_id.remove(),
            DatabaseRecord.due_bucket.set(pool.bucket(host.id)),
            DatabaseRecord.due_at.set(int(time.time())),
        ]
    )
    assert hosts_tool.main(["drain", "--id", host.id]) == 0
    with caplog.at_level(logging.INFO):
        pool.refill(service, Deadline.after(60))  # a draining host's pool is emptied
    assert lives(pg, db)
    assert events(caplog, "claimed_database_kept")[0]["path"] == "pool"
    assert fresh(db.record).due_bucket is None


# -- point-in-time restore: the database missing for a live record ----------------------


def test_a_live_record_whose_database_is_missing_is_reported_and_left(instapg_env, host, pg, caplog):
    from chalicelib import context

    service = reconfigure(instapg_env, INSTAPG_ORPHAN_GRACE_SECONDS=0)
    db = claimed(service)
    with psycopg.connect(pg.superuser_dsn, autocommit=True) as conn:  # Postgres restored from before the create
        conn.execute(psycopg.sql.SQL("DROP DATABASE {}").format(psycopg.sql.Identifier(db.record.db_name)))
        conn.execute(psycopg.sql.SQL("DROP ROLE {}").format(psycopg.sql.Identifier(db.record.role_name)))
    context.close_sessions()
    with caplog.at_level(logging.INFO):
        summary = purge(service)
    assert summary.records_without_database == 1
    assert fresh(db.record).status == "CLAIMED"  # nothing automatic decides for the owner
    assert events(caplog, "record_without_database")[0]["database_id"] == db.record.id
