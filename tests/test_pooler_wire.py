"""The pooler wired into the lifecycle (issue 14 §1-5): the API hands out pooled strings, and every
create, claim, rotation, lock, expiry and delete reaches the real PgBouncer in front of the embedded Postgres.

Refused logins are asserted by SQLSTATE: PgBouncer 1.18 refuses the logins it decides itself with
08P01; a refusal that comes from Postgres (NOLOGIN: 28000) is passed on.
"""

from __future__ import annotations

import shutil
import time
from datetime import UTC, datetime, timedelta

import psycopg
import pytest

from tests.conftest import post_json, register_pooled
from tests.pgwire import login_sqlstate

POOLER_REFUSED = "08P01"


def _create(client) -> dict:
    response = post_json(client, "/api/v1/database", {"ref": "pooler-wire"})
    assert response.status_code == 201, response.json_body
    return response.json_body


def _params(url: str) -> dict:
    return psycopg.conninfo.conninfo_to_dict(url)


def _pooled(url: str, **kwargs) -> psycopg.Connection:
    # Transaction pooling on PgBouncer 1.18: no protocol-level prepared statements.
    return psycopg.connect(url, prepare_threshold=None, connect_timeout=10, **kwargs)


def _ended(conn: psycopg.Connection) -> bool:
    try:
        conn.execute("SELECT 1")
        return False
    except psycopg.OperationalError:
        return True
    finally:
        conn.close()


def _record(database_id: str):
    from chalicelib.models import DatabaseRecord

    return DatabaseRecord.get(database_id, consistent_read=True)


def _published(bouncer) -> set[str]:
    return bouncer.pooler().published()


def _signup_and_claim(client, database_id: str) -> str:
    key = post_json(client, "/api/v1/accounts", {"email": "pooler@example.com"}).json_body["api_key"]
    response = client.http.post(f"/api/v1/database/{database_id}/claim", headers={"Authorization": f"Bearer {key}"})
    assert response.status_code == 200, response.json_body
    return key


def test_a_new_database_connects_through_the_pooler_at_once(pooled_client, pg, pgbouncer):
    body = _create(pooled_client)
    pooled, direct = _params(body["connection_string"]), _params(body["direct_connection_string"])
    assert int(pooled["port"]) == pgbouncer.port and int(direct["port"]) == pg.port
    assert pooled["dbname"] == direct["dbname"] and pooled["password"] == direct["password"]
    with _pooled(body["connection_string"]) as conn:
        assert conn.execute("SELECT current_user, current_database()").fetchone() == (
            pooled["user"],
            pooled["dbname"],
        )
    with psycopg.connect(body["direct_connection_string"], connect_timeout=10) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)
    # The public GET shows the same two strings; the auth source holds no password.
    again = pooled_client.http.get(f"/api/v1/database/{body['id']}").json_body
    assert (again["connection_string"], again["direct_connection_string"]) == (
        body["connection_string"],
        body["direct_connection_string"],
    )
    assert pooled["password"] not in (pgbouncer.state_dir / "userlist.txt").read_text()
    # The record keeps the role's verifier sealed, never in clear.
    record = _record(body["id"])
    assert record.verifier_secret and b"SCRAM-SHA-256" not in record.verifier_secret


def test_a_private_postgres_gets_the_session_entry_as_its_direct_string(service, pg, pgbouncer, instapg_env):
    from chalice.test import Client

    from app import app

    register_pooled(service, pg, pgbouncer, instapg_env, postgres_private=True)
    with Client(app) as client:
        body = _create(client)
    direct = _params(body["direct_connection_string"])
    assert int(direct["port"]) == pgbouncer.port and direct["dbname"].endswith("_session")
    with psycopg.connect(body["direct_connection_string"], autocommit=True, connect_timeout=10) as conn:
        conn.execute("LISTEN jobs")  # session semantics on the pooler's session entry
        conn.execute("SELECT pg_notify('jobs', 'x')")
        assert [n.payload for n in conn.notifies(timeout=5, stop_after=1)] == ["x"]


def test_claim_rotate_and_delete_reach_the_pooler(pooled_client, pgbouncer):
    body = _create(pooled_client)
    dbname = _params(body["connection_string"])["dbname"]
    key = _signup_and_claim(pooled_client, body["id"])
    headers = {"Authorization": f"Bearer {key}"}
    # Published again with the claimed plan's connections as its pool size.
    entries = {row["name"]: row for row in pgbouncer.pooler().admin("SHOW DATABASES")}
    from chalicelib import context
    from chalicelib.settings import FREE_PLAN

    assert entries[dbname]["pool_size"] == context.get().plan(FREE_PLAN).connections
    owned = pooled_client.http.get(f"/api/v1/databases/{body['id']}/connection-string", headers=headers).json_body
    assert owned["connection_string"] == body["connection_string"]

    held = _pooled(body["connection_string"], autocommit=True)
    held.execute("SELECT 1")
    rotated = pooled_client.http.post(f"/api/v1/databases/{body['id']}/rotate-password", headers=headers)
    assert rotated.status_code == 200, rotated.json_body
    assert login_sqlstate(body["connection_string"]) == POOLER_REFUSED  # the old password, through the pooler
    assert login_sqlstate(body["direct_connection_string"]) == "28P01"  # and on Postgres
    assert _ended(held)
    new = rotated.json_body["connection_string"]
    assert int(_params(new)["port"]) == pgbouncer.port
    with _pooled(new) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)

    held = _pooled(new, autocommit=True)
    held.execute("SELECT 1")
    deleted = pooled_client.http.delete(f"/api/v1/databases/{body['id']}", headers=headers)
    assert deleted.status_code in (200, 204), deleted.json_body
    assert _ended(held)
    assert dbname not in _published(pgbouncer)
    assert login_sqlstate(new) == POOLER_REFUSED


def test_quota_lock_refuses_the_pooler_and_unlock_opens_it_again(pooled_client, instapg_env, pgbouncer):
    from chalicelib import context, quotas
    from chalicelib.clock import Deadline

    body = _create(pooled_client)
    held = _pooled(body["connection_string"], autocommit=True)
    held.execute("SELECT 1")  # a warm server connection: NOLOGIN alone would not stop the pooler
    instapg_env.setenv("INSTAPG_UNCLAIMED_STORAGE_MB", "1")
    context.reset()
    assert quotas.enforce(context.get(), Deadline.after(30))["locked"] == [body["id"]]
    assert _ended(held)
    assert login_sqlstate(body["connection_string"]) == POOLER_REFUSED
    assert login_sqlstate(body["direct_connection_string"]) == "28000"
    instapg_env.setenv("INSTAPG_UNCLAIMED_STORAGE_MB", "100")
    context.reset()
    assert quotas.enforce(context.get(), Deadline.after(30))["unlocked"] == [body["id"]]
    with _pooled(body["connection_string"]) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)


def test_expiry_ends_the_pooler_sessions(pooled_client, service, pgbouncer):
    from chalicelib import expiry
    from chalicelib.clock import Deadline
    from chalicelib.models import DatabaseRecord

    body = _create(pooled_client)
    held = _pooled(body["connection_string"], autocommit=True)
    held.execute("SELECT 1")
    past = datetime.now(UTC) - timedelta(seconds=60)
    _record(body["id"]).update(
        actions=[DatabaseRecord.expires_at.set(past), DatabaseRecord.due_at.set(int(past.timestamp()))]
    )
    assert expiry.run_scheduled(service, Deadline.after(60)).expired_dropped == 1
    assert _ended(held)
    assert _params(body["connection_string"])["dbname"] not in _published(pgbouncer)
    assert login_sqlstate(body["connection_string"]) == POOLER_REFUSED


def test_the_warm_pool_publishes_at_refill_and_the_role_is_refused_until_taken(pooled_client, service, pgbouncer):
    from chalicelib import pool, records
    from chalicelib.clock import Deadline

    assert pool.refill(service, Deadline.after(30), size=1).added == 1
    (pooled_record,) = pool.pooled("local-1")
    assert pooled_record.db_name in _published(pgbouncer)
    bouncer = pgbouncer.pooler()
    secret = records.password(service, pooled_record)
    # Published, but NOLOGIN until taken: Postgres refuses the pooler's login for it.
    refused = login_sqlstate(bouncer.pooled_url(pooled_record.role_name, secret, pooled_record.db_name))
    assert refused == POOLER_REFUSED, refused  # Postgres refused the NOLOGIN role; PgBouncer says 08P01
    # That failed server login makes PgBouncer hold the pool back for server_login_retry; only this
    # test can cause it (nobody else knows a pooled database's password), so end it here.
    bouncer.admin(f"KILL {pooled_record.db_name}", f"RESUME {pooled_record.db_name}")
    body = _create(pooled_client)
    assert body["id"] == pooled_record.id  # taken from the pool
    with _pooled(body["connection_string"]) as conn:
        assert conn.execute("SELECT current_database()").fetchone() == (pooled_record.db_name,)


def test_a_discarded_pooled_database_leaves_the_pooler(pooled_host, service, pgbouncer):
    from chalicelib import pool
    from chalicelib.clock import Deadline

    assert pool.refill(service, Deadline.after(30), size=1).added == 1
    (pooled_record,) = pool.pooled("local-1")
    assert pooled_record.db_name in _published(pgbouncer)
    # The pool shrank (or the host drains): the discard revokes before it drops.
    assert pool.refill(service, Deadline.after(30), size=0).discarded == 1
    assert pooled_record.db_name not in _published(pgbouncer)


def test_context_pooler_is_none_without_one_and_cached_with_one(host, service, pgbouncer, pg, instapg_env):
    assert service.pooler(host) is None
    pooled = register_pooled(service, pg, pgbouncer, instapg_env)
    first = service.pooler(pooled)
    assert first is not None and service.pooler(service.hosts.get(pooled.id)) is first
    assert first.port == pgbouncer.port and first.admin_password not in repr(first)


def test_reconciliation_removes_leftover_entries_and_restores_lost_ones(pooled_client, service, pg, pgbouncer):
    from chalicelib import expiry, pooler, postgres
    from chalicelib.clock import Deadline

    body = _create(pooled_client)
    dbname = _params(body["connection_string"])["dbname"]
    leftover = service.settings.name_prefix + "_leftover0000000000000000000"
    bouncer = pgbouncer.pooler()
    bouncer.publish(pooler.Tenant(leftover, leftover, postgres.scram_verifier("x"), 5, pg.host, pg.port))
    bouncer.store.remove(dbname, dbname)  # lost: a crash between the store and the record, say
    summary = expiry.run_scheduled(service, Deadline.after(60))
    assert (summary.pooler_revoked, summary.pooler_published) == (1, 1)
    assert leftover not in bouncer.published() and dbname in bouncer.published()
    with _pooled(body["connection_string"]) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)


def test_a_record_from_before_verifiers_were_kept_is_published_with_a_new_one(pooled_client, service, pgbouncer):
    from chalicelib import access
    from chalicelib.models import DatabaseRecord

    body = _create(pooled_client)
    dbname = _params(body["connection_string"])["dbname"]
    old = _record(body["id"])
    old.update(actions=[DatabaseRecord.verifier_key_id.remove(), DatabaseRecord.verifier_secret.remove()])
    pgbouncer.pooler().store.remove(dbname, dbname)
    record = _record(body["id"])
    access.publish(service, service.hosts.get(record.host_id), record, service.plan(record.plan))
    # Same password, a new verifier on the role, in the pooler and sealed on the record.
    assert _record(body["id"]).verifier_secret
    with _pooled(body["connection_string"]) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)
    with psycopg.connect(body["direct_connection_string"], connect_timeout=10) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)


@pytest.fixture
def own_bouncer(pg):
    """A PgBouncer of this test's own, which the test stops."""
    from tools.dev import pgbouncer as local_pgbouncer
    from tools.dev import pgserver

    root = pgserver.private_dir("instapg-pgbouncer-down-")
    bouncer = local_pgbouncer.start(root / "pgbouncer")
    try:
        yield bouncer
    finally:
        bouncer.stop()
        shutil.rmtree(root, ignore_errors=True)


def test_a_stopped_pooler_fails_creates_cleanly_and_lets_deletes_proceed(service, pg, own_bouncer, instapg_env):
    from chalice.test import Client

    from app import app
    from chalicelib import expiry
    from chalicelib.clock import Deadline
    from chalicelib.models import DatabaseRecord

    register_pooled(service, pg, own_bouncer, instapg_env)
    with Client(app) as client:
        body = _create(client)
        token = body["creator_token"]
        dbname = _params(body["connection_string"])["dbname"]
        own_bouncer.stop()
        refused = post_json(client, "/api/v1/database", {"ref": "pooler-down"})
        assert refused.status_code == 503, refused.json_body
        assert refused.headers["Retry-After"] and set(refused.json_body) >= {"error", "hint"}
        # Nothing live was left behind by the failed create.
        live = [r for r in DatabaseRecord.scan() if r.status in ("PROVISIONING", "UNCLAIMED") and r.id != body["id"]]
        assert live == []
        # The delete proceeds on Postgres; the store no longer lists the tenant.
        deleted = client.http.delete(f"/api/v1/database/{body['id']}", headers={"Authorization": f"Bearer {token}"})
        assert deleted.status_code in (200, 204), deleted.json_body
    assert login_sqlstate(body["direct_connection_string"]) is not None
    assert dbname not in own_bouncer.pooler().published()
    # The scheduled run goes on with the pooler down: the pooler's part is logged and left for the next run.
    expiry.run_scheduled(service, Deadline.after(60))


def test_a_purge_revokes_a_host_s_tenants_together_and_each_before_its_drop(
    pooled_client, service, pg, pgbouncer, instapg_env, monkeypatch
):
    import fcntl
    import threading

    from chalicelib import context, expiry, pooler
    from chalicelib.clock import Deadline
    from chalicelib.models import DatabaseRecord

    bodies = [_create(pooled_client) for _ in range(4)]
    held = [_pooled(body["connection_string"], autocommit=True) for body in bodies]
    past = datetime.now(UTC) - timedelta(seconds=60)
    for body in bodies:
        _record(body["id"]).update(
            actions=[DatabaseRecord.expires_at.set(past), DatabaseRecord.due_at.set(int(past.timestamp()))]
        )
    calls: list[list] = []
    entered = threading.Event()
    original = pooler.FileStore.remove_many

    def counted(store, tenants):
        calls.append(list(tenants))
        entered.set()
        return original(store, calls[-1])

    monkeypatch.setattr(pooler.FileStore, "remove_many", counted)
    instapg_env.setenv("INSTAPG_PURGE_SESSIONS_PER_HOST", "4")
    context.reset()
    run = threading.Thread(target=lambda: result.append(expiry.run_scheduled(context.get(), Deadline.after(60))))
    result: list = []
    # The store's own lock held: the first revoke waits in it, and the other workers queue behind it.
    with open(pgbouncer.state_dir / ".lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        run.start()
        assert entered.wait(30)
        time.sleep(0.5)  # the other three workers reach their revoke meanwhile
        names = {_params(body["connection_string"])["dbname"] for body in bodies}
        assert names <= _published(pgbouncer)
        with psycopg.connect(pg.superuser_dsn) as conn:  # no drop before its tenant's revoke
            (left,) = conn.execute("SELECT count(*) FROM pg_database WHERE datname = ANY(%s)", (list(names),)).fetchone()
        assert left == 4
        fcntl.flock(lock, fcntl.LOCK_UN)
    run.join(60)

    assert result and result[0].expired_dropped == 4 and result[0].failed == 0, result
    assert len(calls) == 2 and sorted(len(c) for c in calls) == [1, 3], calls  # one revoke for the three queued
    assert not names & _published(pgbouncer)
    assert all(_ended(conn) for conn in held)
