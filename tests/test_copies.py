"""Issue 18 §2: copies of a claimed database (CREATE DATABASE ... TEMPLATE), reset, delete, limits."""

from __future__ import annotations

import psycopg
import pytest

from tests.conftest import post_json
from tests.test_claim import bearer, claim, create, role_of, signup


def _claimed(client) -> tuple[dict, str]:
    """A claimed database with a table and one row, and its owner's key."""
    database = create(client)
    key = signup(client)
    assert claim(client, database["id"], key).status_code == 200
    with psycopg.connect(database["connection_string"]) as conn:
        conn.execute("CREATE TABLE todo (id serial PRIMARY KEY, title text NOT NULL)")
        conn.execute("CREATE FUNCTION n() RETURNS bigint LANGUAGE sql AS 'SELECT count(*) FROM todo'")
        conn.execute("INSERT INTO todo (title) VALUES ('from the source')")
    return database, key


def _copy(client, database_id: str, key: str):
    return post_json(client, f"/api/v1/databases/{database_id}/copies", {}, headers=bearer(key))


def _titles(url: str) -> list[str]:
    with psycopg.connect(url) as conn:
        return [t for (t,) in conn.execute("SELECT title FROM todo ORDER BY id").fetchall()]


def test_copy_has_the_data_its_own_role_and_the_source_keeps_working(client, pg):
    source, key = _claimed(client)
    held = psycopg.connect(source["connection_string"])  # a session the copy must end
    response = _copy(client, source["id"], key)
    assert response.status_code == 201, response.json_body
    copy = response.json_body
    assert copy["status"] == "CLAIMED" and copy["source_id"] == source["id"] and copy["id"] != source["id"]
    assert role_of(copy) != role_of(source)
    assert _titles(copy["connection_string"]) == ["from the source"]
    with pytest.raises(psycopg.OperationalError):
        held.execute("SELECT 1")  # ended for the copy: the source's brief downtime
    held.close()
    # The copy's objects are its role's: it can change and drop them; the source does not see it.
    with psycopg.connect(copy["connection_string"]) as conn:
        assert conn.execute("SELECT n()").fetchone() == (1,)
        conn.execute("INSERT INTO todo (title) VALUES ('only in the copy')")
        conn.execute("ALTER TABLE todo ADD COLUMN done boolean")
        owners = conn.execute(
            "SELECT DISTINCT pg_get_userbyid(relowner) FROM pg_class WHERE relnamespace = 'public'::regnamespace"
        ).fetchall()
        assert owners == [(role_of(copy),)]
    assert _titles(source["connection_string"]) == ["from the source"]  # the source opens again, unchanged
    # Another tenant cannot connect to the copy (only its own role may), whatever the source granted PUBLIC.
    other = create(client)
    conninfo = psycopg.conninfo.conninfo_to_dict(other["connection_string"])
    conninfo["dbname"] = role_of(copy)
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(**conninfo)
    with psycopg.connect(pg.superuser_dsn) as conn:
        rows = dict(
            conn.execute(
                "SELECT datname, pg_get_userbyid(datdba) FROM pg_database WHERE datname IN (%s, %s)",
                (role_of(source), role_of(copy)),
            ).fetchall()
        )
        # REASSIGN OWNED moved no database: each belongs to its own role.
        assert rows == {role_of(source): role_of(source), role_of(copy): role_of(copy)}
        assert conn.execute(
            "SELECT datallowconn FROM pg_database WHERE datname = %s", (role_of(source),)
        ).fetchone() == (True,)
    listed = client.http.get("/api/v1/databases", headers=bearer(key)).json_body["databases"]
    assert {d["id"]: d["source_id"] for d in listed} == {source["id"]: None, copy["id"]: source["id"]}
    from chalicelib.models import HostRecord

    assert int(HostRecord.get("local-1").allocated) == 3  # source, other tenant, and the copy on the source's host


def test_reset_copies_the_source_again_and_delete_removes_only_the_copy(client, pg):
    source, key = _claimed(client)
    copy = _copy(client, source["id"], key).json_body
    with psycopg.connect(copy["connection_string"]) as conn:
        conn.execute("DROP TABLE todo")
    with psycopg.connect(source["connection_string"]) as conn:
        conn.execute("INSERT INTO todo (title) VALUES ('added later')")
    response = client.http.post(f"/api/v1/databases/{copy['id']}/reset", headers=bearer(key))
    assert response.status_code == 200, response.json_body
    # Same role and password: the connection string the owner has keeps working.
    assert _titles(copy["connection_string"]) == ["from the source", "added later"]
    events = client.http.get(f"/api/v1/databases/{copy['id']}/audit", headers=bearer(key)).json_body["events"]
    assert [e["action"] for e in events][:1] == ["reset"]
    assert client.http.delete(f"/api/v1/databases/{copy['id']}", headers=bearer(key)).status_code == 204
    with psycopg.connect(pg.superuser_dsn) as conn:
        assert conn.execute("SELECT count(*) FROM pg_roles WHERE rolname = %s", (role_of(copy),)).fetchone() == (0,)
    assert _titles(source["connection_string"]) == ["from the source", "added later"]


def test_refusals(client, instapg_env):
    from chalicelib import context

    unclaimed = create(client)
    key = signup(client)
    refused = _copy(client, unclaimed["id"], key)
    assert refused.status_code == 409 and refused.json_body["error"] == "Unclaimed databases cannot be copied"
    assert "claim" in refused.json_body["hint"]
    source, owner = _claimed(client)
    assert _copy(client, source["id"], key).status_code == 404  # someone else's
    not_a_copy = client.http.post(f"/api/v1/databases/{source['id']}/reset", headers=bearer(owner))
    assert not_a_copy.status_code == 409 and not_a_copy.json_body["error"] == "Not a copy"
    instapg_env.setenv("INSTAPG_DATABASES_PER_ACCOUNT", "2")
    context.reset()
    copy = _copy(client, source["id"], owner)
    assert copy.status_code == 201
    over = _copy(client, source["id"], owner)
    assert over.status_code == 403 and over.json_body["error"] == "Database limit reached"
    assert over.json_body["limit"] == 2
    # The source deleted: the copy stays, and a reset says why it cannot.
    assert client.http.delete(f"/api/v1/databases/{source['id']}", headers=bearer(owner)).status_code == 204
    orphaned = client.http.post(f"/api/v1/databases/{copy.json_body['id']}/reset", headers=bearer(owner))
    assert orphaned.status_code == 409 and orphaned.json_body["error"] == "Source database is gone"
    assert _titles(copy.json_body["connection_string"]) == ["from the source"]


def test_a_held_source_is_a_409_and_leaves_the_copy_and_the_slots_as_they_were(client, pg, instapg_env):
    from chalicelib import context
    from chalicelib.models import HostRecord

    source, key = _claimed(client)
    copy = _copy(client, source["id"], key).json_body
    with psycopg.connect(source["connection_string"], autocommit=True) as conn:
        conn.execute("BEGIN")
        conn.execute("INSERT INTO todo (title) VALUES ('prepared')")
        conn.execute("PREPARE TRANSACTION 'held'")
    try:
        response = _copy(client, source["id"], key)
        assert response.status_code == 409 and response.json_body["error"] == "Database is busy"
        assert int(HostRecord.get("local-1").allocated) == 2  # the failed copy's slot went back
        listed = client.http.get("/api/v1/databases", headers=bearer(key)).json_body["databases"]
        assert sorted(d["id"] for d in listed) == sorted([source["id"], copy["id"]])
        reset = client.http.post(f"/api/v1/databases/{copy['id']}/reset", headers=bearer(key))
        assert reset.status_code == 409 and reset.json_body["error"] == "Database is busy"
        assert _titles(copy["connection_string"]) == ["from the source"]  # the copy is whole, and logs in
        assert _titles(source["connection_string"]) == ["from the source"]  # the source is open again
    finally:
        with psycopg.connect(source["connection_string"], autocommit=True) as conn:
            conn.execute("ROLLBACK PREPARED 'held'")
    # Another change to the source role holds its lock (a claim, a quota lock): busy once the
    # copy's own deadline (its statement and lock timeouts) runs out.
    instapg_env.setenv("INSTAPG_COPY_DEADLINE_SECONDS", "2")
    context.reset()
    with psycopg.connect(pg.superuser_dsn, autocommit=True) as holder:
        holder.execute("SELECT pg_advisory_lock(hashtext('instapg-role:' || %s))", (role_of(source),))
        response = _copy(client, source["id"], key)
    assert response.status_code == 409 and response.json_body["error"] == "Database is busy"


def test_a_copy_whose_process_died_is_purged_and_its_source_opened(client, pg, service, host):
    """What a copy killed between its DDL steps leaves: a PROVISIONING record, a half-made tenant, a closed source."""
    from psycopg import sql

    from chalicelib import expiry, provisioning, records
    from chalicelib.clock import Deadline
    from chalicelib.identifiers import tenant_password, uuid7
    from chalicelib.models import DatabaseRecord

    source, key = _claimed(client)
    owner = records.find(source["id"]).owner_id
    plan = service.plan("claimed")
    copy = records.new(service, str(uuid7()), host, plan, tenant_password(), owner_id=owner, source_id=source["id"])
    copy.due_at = 0  # past the provisioning timeout
    copy.save()
    with service.target(host).connect() as conn:  # the admin's first steps, as copy_tenant takes them
        conn.execute(sql.SQL("CREATE ROLE {} NOLOGIN").format(sql.Identifier(copy.role_name)))
        conn.execute(provisioning._membership_grant(conn, copy.role_name))
        conn.execute(sql.SQL("ALTER DATABASE {} ALLOW_CONNECTIONS false").format(sql.Identifier(role_of(source))))
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(source["connection_string"])
    # Meanwhile the owner sees it being made, and cannot delete it halfway.
    for method in ("get", "delete"):
        response = getattr(client.http, method)(f"/api/v1/databases/{copy.id}", headers=bearer(key))
        assert response.status_code == 409 and response.json_body["error"] == "Database is still being created"
    expiry.run_scheduled(service, Deadline.after(30))
    assert DatabaseRecord.get(copy.id).status == "FAILED"
    assert _titles(source["connection_string"]) == ["from the source"]
    with psycopg.connect(pg.superuser_dsn) as conn:
        assert conn.execute("SELECT count(*) FROM pg_roles WHERE rolname = %s", (copy.role_name,)).fetchone() == (0,)


def test_a_copy_on_a_pooled_host_connects_through_the_pooler_at_once(pooled_client, pgbouncer):
    source, key = _claimed(pooled_client)
    response = _copy(pooled_client, source["id"], key)
    assert response.status_code == 201, response.json_body
    copy = response.json_body
    pooled = psycopg.conninfo.conninfo_to_dict(copy["connection_string"])
    assert int(pooled["port"]) == pgbouncer.port  # the pooled string goes through PgBouncer
    with psycopg.connect(copy["connection_string"], prepare_threshold=None) as conn:
        assert [t for (t,) in conn.execute("SELECT title FROM todo").fetchall()] == ["from the source"]
    # Deleting the copy takes it off the pooler too.
    assert pooled_client.http.delete(f"/api/v1/databases/{copy['id']}", headers=bearer(key)).status_code in (200, 204)
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(copy["connection_string"], prepare_threshold=None, connect_timeout=5)
