"""Issue 3: expiry and cleanup, on the real Postgres and moto.

Records are made through the service (real databases), then aged by editing
`expires_at`/`due_at`, so nothing waits for the clock except where the test
is about the clock.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from datetime import UTC, datetime, timedelta

import psycopg
import pytest
from psycopg import sql

from tests.streams import TTL_IDENTITY, image, stream_event

# -- helpers ---------------------------------------------------------------------


def reconfigure(instapg_env, **env):
    """New settings for this test; returns the rebuilt service."""
    from chalicelib import context

    for name, value in env.items():
        instapg_env.setenv(name, str(value))
    context.reset()
    return context.get()


def create(service, n: int = 1):
    from chalicelib import creation
    from chalicelib.records import Requester
    from chalicelib.schemas import CreateDatabase

    return [creation.create(service, CreateDatabase(ref="test"), Requester()) for _ in range(n)]


def age(record, seconds: int = 60) -> None:
    """Move an UNCLAIMED record's expiry into the past."""
    from chalicelib.models import DatabaseRecord

    past = datetime.now(UTC) - timedelta(seconds=seconds)
    record.update(actions=[DatabaseRecord.expires_at.set(past), DatabaseRecord.due_at.set(int(past.timestamp()))])


def claim(record) -> None:
    """What the claim flow (built in parallel) does, minus the limits; plus a stale due entry and expiry
    left on purpose, so the purge's own checks are what protects it."""
    from chalicelib.models import CLAIMED, DatabaseRecord

    record.update(actions=[DatabaseRecord.status.set(CLAIMED)])


def catalog(pg, name: str) -> tuple[bool, bool]:
    """(role exists, database exists), read as superuser."""
    with psycopg.connect(pg.superuser_dsn) as conn:
        role = conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (name,)).fetchone() is not None
        db = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone() is not None
    return role, db


def url(service, provisioned) -> str:
    from chalicelib import postgres

    host = service.hosts.get(provisioned.record.host_id)
    record = provisioned.record
    return postgres.connection_url(
        host.hostname, host.port, record.role_name, provisioned.password, record.db_name, "disable"
    )


def works(dsn: str) -> bool:
    with psycopg.connect(dsn, connect_timeout=5) as conn:
        return conn.execute("SELECT 1").fetchone() == (1,)


def assert_login_fails(dsn: str) -> None:
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(dsn, connect_timeout=5).close()


def assert_gone(pg, service, provisioned) -> None:
    assert catalog(pg, provisioned.record.db_name) == (False, False)
    assert_login_fails(url(service, provisioned))


def allocated(host_id: str = "local-1") -> int:
    from chalicelib.models import HostRecord

    return int(HostRecord.get(host_id, consistent_read=True).allocated)


def fresh(record):
    from chalicelib.models import DatabaseRecord

    return DatabaseRecord.get(record.id, consistent_read=True)


def remove_event(settings, record, ttl: bool = True, name: str = "REMOVE", old_image: dict | None = None) -> dict:
    event = stream_event(settings, name, record.id, old=image(record) if old_image is None else old_image)
    if ttl:
        event["userIdentity"] = TTL_IDENTITY
    return event


def invoke_stream(client, *events):
    return client.lambda_.invoke("drop_removed", {"Records": list(events)})


def purge(service, **kwargs):
    from chalicelib import expiry
    from chalicelib.clock import Deadline

    return expiry.run_scheduled(service, Deadline.after(kwargs.pop("budget_s", 120)), **kwargs)


# -- the stream handler ----------------------------------------------------------


def test_ttl_remove_drops_the_database_and_leaves_a_410_tombstone(client, service, pg):
    (db,) = create(service)
    dsn = url(service, db)
    assert works(dsn)
    before = allocated()
    age(db.record)
    record = fresh(db.record)
    record.delete()  # what DynamoDB's TTL does

    invoke_stream(client, remove_event(service.settings, record))

    assert_gone(pg, service, db)
    assert allocated() == before - 1
    response = client.http.get(f"/api/v1/database/{db.record.id}")
    assert response.status_code == 410
    assert response.json_body["error"] == "Database expired"
    assert response.json_body["expired_at"]
    tombstone = fresh(db.record)
    assert tombstone.status == "EXPIRED" and tombstone.due_bucket is None and tombstone.secret is None


def test_manual_remove_of_a_provisioning_record_drops_its_leftovers(client, service, pg):
    (db,) = create(service)
    from chalicelib.models import PROVISIONING, DatabaseRecord

    record = fresh(db.record)
    record.update(actions=[DatabaseRecord.status.set(PROVISIONING)])
    record.delete()

    invoke_stream(client, remove_event(service.settings, record, ttl=False))

    assert_gone(pg, service, db)
    assert fresh(db.record).status == "FAILED"


def test_remove_of_a_tombstone_is_skipped(client, service, pg, caplog):
    (db,) = create(service)
    from chalicelib.models import EXPIRED, DatabaseRecord

    record = fresh(db.record)
    # A tombstone whose drop is done; the database is kept here only to prove nothing is dropped.
    record.update(actions=[DatabaseRecord.status.set(EXPIRED), DatabaseRecord.due_bucket.remove()])
    record.delete()
    before = allocated()

    invoke_stream(client, remove_event(service.settings, record))

    assert works(url(service, db))
    assert allocated() == before
    assert any("tombstone" in m and "skipped" in m for m in caplog.messages)


def test_remove_of_a_claimed_record_is_skipped(client, service, pg, caplog):
    (db,) = create(service)
    record = fresh(db.record)
    claim(record)
    record = fresh(record)
    record.delete()

    invoke_stream(client, remove_event(service.settings, record))

    assert works(url(service, db))
    assert any("claimed" in m and "skipped" in m for m in caplog.messages)


def test_odd_remove_event_for_a_record_that_is_claimed_does_not_drop(client, service, pg):
    # A replayed/forged REMOVE whose old image says UNCLAIMED, while the table says CLAIMED.
    (db,) = create(service)
    stale = image(fresh(db.record))
    claim(db.record)

    invoke_stream(client, remove_event(service.settings, db.record, old_image=stale))

    assert works(url(service, db))
    assert fresh(db.record).status == "CLAIMED"


def test_odd_remove_event_for_a_record_that_still_exists_does_not_drop(client, service, host, pg):
    (db,) = create(service)
    invoke_stream(client, remove_event(service.settings, fresh(db.record)))  # the item was never removed
    assert works(url(service, db))
    assert fresh(db.record).status == "UNCLAIMED"


def test_insert_and_modify_events_and_keys_only_removes_are_ignored(client, service, pg):
    (db,) = create(service)
    record = fresh(db.record)
    invoke_stream(
        client,
        remove_event(service.settings, record, name="INSERT"),
        remove_event(service.settings, record, name="MODIFY"),
        remove_event(service.settings, record, old_image={}),
    )
    assert works(url(service, db))
    assert fresh(db.record).status == "UNCLAIMED"


def test_redelivered_remove_drops_once_and_releases_one_slot(client, service, pg):
    (db,) = create(service)
    record = fresh(db.record)
    record.delete()
    before = allocated()
    event = remove_event(service.settings, record)

    invoke_stream(client, event)
    invoke_stream(client, event)  # streams deliver at least once

    assert_gone(pg, service, db)
    assert allocated() == before - 1


def test_stream_drop_on_an_unreachable_host_is_left_to_the_purge(client, service, host, pg, caplog):
    from chalicelib.models import DatabaseRecord, HostRecord

    batch = create(service, 2)
    records = [fresh(db.record) for db in batch]
    for record in records:
        record.delete()
    host.update(actions=[HostRecord.port.set(1)])
    service.hosts.all(fresh=True)
    before = allocated()

    invoke_stream(client, *(remove_event(service.settings, r) for r in records))  # does not raise

    assert sum("unavailable earlier in this batch" in m for m in caplog.messages) == 1  # one connect attempt
    for db in batch:
        tombstone = fresh(db.record)
        assert (tombstone.status, tombstone.due_bucket) == ("EXPIRED", "EXPIRED")
        assert catalog(pg, db.record.db_name) == (True, True)
        tombstone.update(actions=[DatabaseRecord.due_at.set(int(time.time()) - 1)])  # the lease ran out
    host.update(actions=[HostRecord.port.set(pg.port)])
    service.hosts.all(fresh=True)
    assert purge(service).leftovers_dropped == 2
    for db in batch:
        assert_gone(pg, service, db)
    assert allocated() == before - 2


# -- the scheduled purge ----------------------------------------------------------


def test_purge_across_many_pages(client, service, pg):
    from chalicelib.settings import TRIAL_PLAN

    # Six pages of ten: the paging is what is tested; make bench times hundreds.
    batch = create(service, 60)
    keep = create(service, 3)
    claimed = create(service, 3)
    for db in batch:
        age(db.record)
    for db in claimed:
        age(db.record)  # stale expiry and due entry left behind on purpose
        claim(db.record)
    before = allocated()

    started = time.monotonic()
    summary = purge(service, page_size=10)
    elapsed = time.monotonic() - started

    assert summary.expired_dropped == 60, summary
    assert summary.failed == 0 and not summary.stopped_early
    assert summary.skipped == 3  # the claimed ones: the conditional write refused them
    assert allocated() == before - 60
    ttl = service.settings.tombstone_ttl_s
    for db in batch:
        record = fresh(db.record)
        assert record.status == "EXPIRED"
        assert record.due_bucket is None and record.due_at is None and record.secret is None
        assert abs((record.expires_at - datetime.now(UTC)).total_seconds() - ttl) < 120
        assert catalog(pg, db.record.db_name) == (False, False)
    for db in batch[:5]:
        response = client.http.get(f"/api/v1/database/{db.record.id}")
        assert response.status_code == 410
        assert response.json_body["error"] == "Database expired"
        assert response.json_body["expired_at"]
    for db in keep + claimed:
        assert works(url(service, db))
    for db in keep:
        assert fresh(db.record).status == "UNCLAIMED"
        assert client.http.get(f"/api/v1/database/{db.record.id}").status_code == 200
    assert [fresh(db.record).status for db in claimed] == ["CLAIMED"] * 3
    assert service.settings.plan(TRIAL_PLAN).lifetime_s == 259200
    print(f"purged 60 databases in {elapsed:.2f}s")


def test_a_run_stops_at_its_deadline_and_the_next_resumes(service, host, pg, caplog):
    batch = create(service, 5)
    for db in batch:
        age(db.record)

    first = purge(service, budget_s=0)
    assert first.stopped_early and first.expired_dropped == 0
    assert all(works(url(service, db)) for db in batch)

    second = purge(service)
    assert second.expired_dropped == 5 and not second.stopped_early
    lines = [json.loads(m) for m in caplog.messages if m.startswith('{"event": "purge"')]
    assert len(lines) == 2
    assert {"expired_dropped", "orphans_dropped", "failed", "duration_ms", "stopped_early"} <= set(lines[-1])
    assert lines[-1]["expired_dropped"] == 5


def test_scheduled_lambda_handler_runs_the_purge(client, service, pg):
    (db,) = create(service)
    age(db.record)
    event = client.events.generate_cw_event(
        source="aws.events",
        detail_type="Scheduled Event",
        detail={},
        resources=["arn:aws:events:us-east-2:123456789012:rule/instapg-prod-purge"],
    )
    client.lambda_.invoke("purge", event)
    assert_gone(pg, service, db)
    assert fresh(db.record).status == "EXPIRED"


@pytest.fixture
def atomic_moto():
    """DynamoDB applies a conditional write atomically; moto's in-process backend does not
    (check and write are separate Python steps), so threads could both win. The session's
    moto is made atomic by tools.dev.motoatomic (one lock for every call, transactions
    included); a second lock of the test's own around single writes would deadlock against
    a transaction holding the first."""
    from tools.dev import motoatomic

    motoatomic.install()


def test_the_lambda_budget_is_the_configured_fraction_of_remaining_time(service, monkeypatch):
    from chalicelib import jobs

    budgets = []
    monkeypatch.setattr(jobs, "run", lambda ctx, deadline: budgets.append(deadline.left()))

    class Context:
        def get_remaining_time_in_millis(self):
            return 300_000

    jobs.run_lambda(service, Context())
    assert budgets == [pytest.approx(48.0, abs=1)]  # 0.8 of the 60 s between runs, not of the 300 s left


def test_a_run_that_fails_still_logs_its_summary(service, monkeypatch, caplog):
    from chalicelib import expiry
    from chalicelib.clock import Deadline

    def unavailable(fresh=False):
        raise RuntimeError("metadata store unavailable")

    monkeypatch.setattr(service.hosts, "all", unavailable)
    with pytest.raises(RuntimeError):
        expiry.run_scheduled(service, Deadline.after(10))
    (line,) = [json.loads(m) for m in caplog.messages if m.startswith('{"event": "purge"')]
    assert line["error"].startswith("RuntimeError") and "duration_ms" in line


def test_two_runs_at_once_drop_each_database_once(service, host, pg, atomic_moto):
    batch = create(service, 30)
    for db in batch:
        age(db.record)
    before = allocated()
    results, errors = [], []

    def run():
        try:
            results.append(purge(service, page_size=5))
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()

    assert errors == []
    assert sum(r.expired_dropped for r in results) == 30
    assert sum(r.failed for r in results) == 0
    assert allocated() == before - 30
    for db in batch:
        assert fresh(db.record).status == "EXPIRED"
        assert catalog(pg, db.record.db_name) == (False, False)


def test_a_failed_drop_is_retried_after_the_lease(service, pg, host):
    from chalicelib.models import DatabaseRecord, HostRecord

    (db,) = create(service)
    age(db.record)
    host.update(actions=[HostRecord.port.set(1)])
    service.hosts.invalidate()
    before = allocated()

    down = purge(service)
    assert down.failed == 1 and down.hosts_unavailable == ["local-1"] and down.expired_dropped == 0
    record = fresh(db.record)
    assert record.status == "EXPIRED" and record.due_bucket == "EXPIRED"  # pending, leased
    assert allocated() == before

    host.update(actions=[HostRecord.port.set(pg.port)])
    service.hosts.invalidate()
    assert purge(service).leftovers_dropped == 0  # still leased
    record.update(actions=[DatabaseRecord.due_at.set(int(time.time()) - 1)])  # the lease ran out
    retried = purge(service)
    assert retried.leftovers_dropped == 1 and retried.failed == 0
    assert_gone(pg, service, db)
    assert fresh(db.record).due_bucket is None
    assert allocated() == before - 1


def test_one_minute_lifetime(instapg_env, host, pg):
    service = reconfigure(instapg_env, INSTAPG_UNCLAIMED_LIFETIME_SECONDS=60)
    (db,) = create(service)
    assert (db.record.expires_at - db.record.created_at).total_seconds() == pytest.approx(60, abs=2)
    assert db.record.due_at == int(db.record.expires_at.timestamp())


def test_short_lifetime_expires_on_the_clock(instapg_env, host, pg):
    # 3 s, not 1: due_at is a whole second, so the first run must come well before it.
    service = reconfigure(instapg_env, INSTAPG_UNCLAIMED_LIFETIME_SECONDS=3)
    (db,) = create(service)
    assert purge(service).expired_dropped == 0
    assert works(url(service, db))
    time.sleep(max(0.0, db.record.due_at - time.time()) + 1.1)
    assert purge(service).expired_dropped == 1
    assert_gone(pg, service, db)


# -- fault injection and reconciliation --------------------------------------------


def _superuser(pg):
    return psycopg.connect(pg.superuser_dsn, autocommit=True)


def test_one_run_cleans_every_kind_of_leftover_and_touches_nothing_else(instapg_env, host, pg):
    from chalicelib import hosts as hostlib
    from chalicelib import postgres, provisioning, records
    from chalicelib.identifiers import tenant_name
    from chalicelib.models import DatabaseRecord

    service = reconfigure(instapg_env, INSTAPG_ORPHAN_GRACE_SECONDS=0)
    prefix = service.settings.name_prefix
    target = hostlib.target(host, service.settings)
    plan = service.settings.plan("unclaimed")

    # 1. A create that crashed after CREATE DATABASE, before the record became UNCLAIMED.
    crashed_host = hostlib.reserve(service.hosts.all(fresh=True))
    crashed = records.new(service, str(uuid.uuid4()), crashed_host, plan, "pw", ref="x")
    crashed.due_at = int(time.time()) - 1  # the provisioning timeout has passed
    crashed.save()
    provisioning.create_tenant(target, crashed.role_name, crashed.db_name, "a-password-for-the-crash", plan)

    # 2. An expired record whose database an operator already dropped by hand.
    (by_hand,) = create(service)
    age(by_hand.record)
    provisioning.drop_tenant(target, by_hand.record.role_name, by_hand.record.db_name)

    # 3. An orphan with the prefix: a role and database whose record was lost (its slot still taken).
    orphan = tenant_name(prefix)
    hostlib.reserve(service.hosts.all(fresh=True))
    provisioning.create_tenant(target, orphan, orphan, "orphan-password-123", plan)

    # 4. Hostile tenants: A grants SELECT to B, sets IS_TEMPLATE, leaves a session and a
    #    prepared transaction behind; both expire.
    a, b = create(service, 2)
    with psycopg.connect(url(service, a), autocommit=True) as conn:
        conn.execute("CREATE TABLE shared (x int)")
        conn.execute(sql.SQL("GRANT SELECT ON shared TO {}").format(sql.Identifier(b.record.role_name)))
        conn.execute(sql.SQL("ALTER DATABASE {} IS_TEMPLATE true").format(sql.Identifier(a.record.db_name)))
    with _superuser(pg) as su:
        assert su.execute(
            "SELECT datistemplate FROM pg_database WHERE datname = %s", (a.record.db_name,)
        ).fetchone() == (True,)
    lingering = psycopg.connect(url(service, a), autocommit=True)
    prepared = psycopg.connect(url(service, a))
    prepared.execute("INSERT INTO shared VALUES (1)")
    prepared.execute("PREPARE TRANSACTION 'hostile'")
    age(a.record)
    age(b.record)

    # Bystanders: a live tenant, a claimed one with a stale expiry, and names just outside the prefix.
    live, claimed = create(service, 2)
    age(claimed.record)
    claim(claimed.record)
    lookalike = f"{prefix}x{orphan[len(prefix) + 1 :]}"  # matches "<prefix>_%" if `_` were not escaped
    with _superuser(pg) as su:
        su.execute(sql.SQL("CREATE ROLE {} LOGIN").format(sql.Identifier(lookalike)))
        su.execute(sql.SQL("CREATE DATABASE {} OWNER {}").format(sql.Identifier(lookalike), sql.Identifier(lookalike)))
    before = allocated()

    try:
        summary = purge(service)
    finally:
        lingering.close()
        prepared.close()

    assert summary.failed == 0, summary
    assert summary.expired_dropped == 3  # by_hand, a, b
    assert summary.stuck_failed == 1
    assert summary.orphans_dropped == 1
    assert allocated() == before - 5  # every dropped tenant gave its slot back, the orphan's too
    for name in (crashed.db_name, by_hand.record.db_name, orphan, a.record.db_name, b.record.db_name):
        assert catalog(pg, name) == (False, False), name
    with _superuser(pg) as su:
        assert su.execute("SELECT count(*) FROM pg_prepared_xacts WHERE gid = 'hostile'").fetchone() == (0,)
        left = su.execute(
            "SELECT rolname FROM pg_roles WHERE rolname LIKE %s UNION ALL SELECT datname FROM pg_database WHERE datname LIKE %s",
            (postgres.like_prefix(prefix + "_"),) * 2,
        ).fetchall()
    assert sorted(n for (n,) in left) == sorted([live.record.db_name] * 2 + [claimed.record.db_name] * 2)
    assert works(url(service, live)) and works(url(service, claimed))
    assert catalog(pg, lookalike) == (True, True)
    assert DatabaseRecord.get(crashed.id).status == "FAILED"
    with _superuser(pg) as su:
        su.execute(sql.SQL("DROP DATABASE {}").format(sql.Identifier(lookalike)))
        su.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(lookalike)))


def test_a_grantee_expiring_leaves_the_granting_tenant_intact(service, host, pg):
    a, b = create(service, 2)
    with psycopg.connect(url(service, a), autocommit=True) as conn:
        conn.execute("CREATE TABLE shared (x int)")
        conn.execute("INSERT INTO shared VALUES (42)")
        conn.execute(sql.SQL("GRANT SELECT ON shared TO {}").format(sql.Identifier(b.record.role_name)))
    age(b.record)

    summary = purge(service)

    assert summary.expired_dropped == 1 and summary.failed == 0
    assert_gone(pg, service, b)
    with psycopg.connect(url(service, a)) as conn:
        assert conn.execute("SELECT x FROM shared").fetchone() == (42,)
        grantees = conn.execute("SELECT grantee FROM information_schema.role_table_grants WHERE table_name = 'shared'")
        assert b.record.role_name not in {g for (g,) in grantees.fetchall()}


def test_orphans_wait_for_the_grace_period(instapg_env, host, pg):
    from chalicelib import hosts as hostlib
    from chalicelib import provisioning
    from chalicelib.identifiers import tenant_name

    service = reconfigure(instapg_env, INSTAPG_ORPHAN_GRACE_SECONDS=2)
    (live,) = create(service)
    orphan = tenant_name(service.settings.name_prefix)
    provisioning.create_tenant(
        hostlib.target(host, service.settings),
        orphan,
        orphan,
        "orphan-password-123",
        service.settings.plan("unclaimed"),
    )

    first = purge(service)
    assert first.orphans_seen == 1 and first.orphans_dropped == 0
    assert catalog(pg, orphan) == (True, True)
    time.sleep(2.1)
    second = purge(service)
    assert second.orphans_seen == 0 and second.orphans_dropped == 1
    assert catalog(pg, orphan) == (False, False)
    assert works(url(service, live))  # referenced by its record: never a candidate


def test_a_database_whose_record_was_lost_is_dropped_as_an_orphan_and_frees_its_slot(instapg_env, host, pg):
    service = reconfigure(instapg_env, INSTAPG_ORPHAN_GRACE_SECONDS=0)
    (lost, kept) = create(service, 2)
    before = allocated()
    # The record goes with no stream handler to see it (e.g. the stream's 24 h passed).
    lost.record.delete()
    summary = purge(service)
    assert summary.orphans_dropped == 1
    assert catalog(pg, lost.record.db_name) == (False, False)
    assert allocated() == before - 1  # else the host's capacity would shrink by one for good
    assert works(url(service, kept))


def test_failed_record_with_leftovers_is_cleaned_and_releases_its_slot(service, host, pg):
    from chalicelib.models import FAILED, DatabaseRecord

    (db,) = create(service)
    # What tombstones.fail leaves when the host was down during cleanup.
    db.record.update(
        actions=[
            DatabaseRecord.status.set(FAILED),
            DatabaseRecord.due_bucket.set(FAILED),
            DatabaseRecord.due_at.set(int(time.time()) - 1),
        ]
    )
    before = allocated()
    summary = purge(service)
    assert summary.leftovers_dropped == 1
    assert_gone(pg, service, db)
    assert fresh(db.record).due_bucket is None
    assert allocated() == before - 1


# -- never a claimed database --------------------------------------------------------


@pytest.mark.parametrize("bucket", ["UNCLAIMED", "PROVISIONING", "FAILED", "EXPIRED"])
def test_purge_never_drops_a_claimed_database_whatever_bucket_it_is_left_in(service, host, pg, bucket):
    from chalicelib.models import DatabaseRecord

    (db,) = create(service)
    age(db.record)
    claim(db.record)
    db.record.update(actions=[DatabaseRecord.due_bucket.set(bucket), DatabaseRecord.due_at.set(int(time.time()) - 1)])

    summary = purge(service)

    assert summary.skipped == 1 and summary.orphans_dropped == 0
    assert works(url(service, db))
    assert fresh(db.record).status == "CLAIMED"


def test_reconciliation_never_drops_a_claimed_database(instapg_env, host, pg):
    from chalicelib.models import DatabaseRecord

    service = reconfigure(instapg_env, INSTAPG_ORPHAN_GRACE_SECONDS=0)
    (db,) = create(service)
    claim(db.record)
    db.record.update(actions=[DatabaseRecord.due_bucket.remove(), DatabaseRecord.due_at.remove()])

    summary = purge(service)

    assert summary.orphans_seen == 0 and summary.orphans_dropped == 0
    assert works(url(service, db))


def test_a_claim_that_wins_the_race_keeps_its_database(service, host, pg):
    from chalicelib import tombstones
    # The purge read the record while UNCLAIMED; the claim lands before its conditional write.
    (db,) = create(service)
    age(db.record)
    seen = fresh(db.record)
    claim(db.record)
    assert tombstones.expire(service, seen) is False
    assert works(url(service, db))


# -- small parts ---------------------------------------------------------------------


def test_like_prefix_escapes_wildcards():
    from chalicelib.postgres import like_prefix

    assert like_prefix("ipg_") == "ipg\\_%"
    assert like_prefix("a%b\\") == "a\\%b\\\\%"


def test_purge_settings_are_validated():
    from chalicelib.settings import load

    settings = load({})
    assert (settings.purge_rate_minutes, settings.purge_time_fraction, settings.orphan_grace_s) == (1, 0.8, 3600)
    assert load({"INSTAPG_PURGE_TIME_FRACTION": "0.5"}).purge_time_fraction == 0.5
    for bad in ("0", "1.5", "most"):
        with pytest.raises(ValueError, match="INSTAPG_PURGE_TIME_FRACTION"):
            load({"INSTAPG_PURGE_TIME_FRACTION": bad})
    assert settings.purge_sessions_per_host == 16
    assert load({"INSTAPG_PURGE_SESSIONS_PER_HOST": "0"}).purge_sessions_per_host == 1  # never none
    with pytest.raises(ValueError, match="INSTAPG_PURGE_SESSIONS_PER_HOST"):
        load({"INSTAPG_PURGE_SESSIONS_PER_HOST": "many"})


def test_slots_given_back_in_one_write_never_go_below_zero(service, host):
    from chalicelib import hosts

    assert hosts.set_allocated(host.id, 5, expected=int(host.allocated or 0))
    hosts.release(host.id, 3)  # the purge: one write for a page of drops
    assert allocated() == 2
    hosts.release(host.id, 4)  # more than counted (a recount moved it): 0, not -2
    assert allocated() == 0


def test_drop_removes_a_database_an_interrupted_drop_left_invalid(service, host, pg):
    from chalicelib import hosts as hostlib
    from chalicelib import provisioning

    (db,) = create(service)
    with _superuser(pg) as su:
        # What PostgreSQL 16+ leaves when DROP DATABASE is interrupted: datconnlimit = -2.
        su.execute("UPDATE pg_database SET datconnlimit = -2 WHERE datname = %s", (db.record.db_name,))
    provisioning.drop_tenant(hostlib.target(host, service.settings), db.record.role_name, db.record.db_name)
    assert catalog(pg, db.record.db_name) == (False, False)


# -- final writes in batches (issue 15) ------------------------------------------------


def _tombstones(service, n: int, due_at: int) -> list:
    """EXPIRED tombstones due at `due_at` whose databases are already gone (their drops are no-ops)."""
    from chalicelib.identifiers import tenant_name
    from chalicelib.models import EXPIRED, DatabaseRecord

    now = datetime.now(UTC)
    made = []
    for _ in range(n):
        name = tenant_name(service.settings.name_prefix)
        record = DatabaseRecord(
            id=str(uuid.uuid4()),
            status=EXPIRED,
            plan="unclaimed",
            host_id="local-1",
            role_name=name,
            db_name=name,
            created_at=now,
            updated_at=now,
            ended_at=now,
            expires_at=now + timedelta(days=1),
            due_bucket=EXPIRED,
            due_at=due_at,
        )
        record.save()
        made.append(record)
    return made


def _purged_events(record) -> int:
    from chalicelib import audit

    return sum(e.action == audit.PURGED for e in audit.page(record.id).events)


def test_a_batch_whose_record_another_run_took_is_written_again_without_it(service, host):
    from chalicelib import audit, tombstones
    from chalicelib.models import DatabaseRecord

    batch = _tombstones(service, 5, int(time.time()) + 60)
    taken = batch[2]
    # Another run leased it meanwhile: its condition (due_at unchanged) fails in our transaction.
    DatabaseRecord(taken.id).update(actions=[DatabaseRecord.due_at.set(int(time.time()) + 120)])

    won = tombstones.finish_batch(
        batch, lambda r: audit.event(r.id, audit.PURGED, audit.SYSTEM, detail="expired unclaimed")
    )

    assert [r.id for r in won] == [r.id for r in batch if r is not taken]
    for record in won:
        assert fresh(record).due_bucket is None and _purged_events(record) == 1
    assert fresh(taken).due_bucket == "EXPIRED" and _purged_events(taken) == 0


def test_a_run_finishes_more_records_than_one_transaction_holds(service, host, pg):
    from chalicelib import hosts as hostlib
    from chalicelib import tombstones

    n = tombstones.finish_batch_size(audited=True) + 7
    batch = _tombstones(service, n, int(time.time()) - 1)
    hostlib.set_allocated("local-1", allocated() + n, expected=allocated())
    before = allocated()

    summary = purge(service)

    assert summary.leftovers_dropped == n and summary.failed == 0, summary
    assert allocated() == before - n
    for record in batch:
        assert fresh(record).due_bucket is None
        assert _purged_events(record) == 1  # with its final write: once, never twice
