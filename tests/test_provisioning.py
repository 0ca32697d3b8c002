"""What a create leaves on the host and in DynamoDB: hardened tenants, sealed secrets, no strays."""

from __future__ import annotations

import base64

import boto3
import psycopg
import pytest

from tests.conftest import post_json
from tests.pgerrors import refused_login


def _params(body: dict) -> dict:
    return psycopg.conninfo.conninfo_to_dict(body["connection_string"])


def _create(client) -> dict:
    response = post_json(client, "/api/v1/database", {"ref": "provisioning-test"})
    assert response.status_code == 201, response.json_body
    return response.json_body


def test_service_admin_is_not_a_superuser(client, pg):
    with psycopg.connect(pg.superuser_dsn) as conn:
        row = conn.execute(
            "SELECT rolsuper, rolcreaterole, rolcreatedb FROM pg_roles WHERE rolname = %s", (pg.admin_user,)
        ).fetchone()
    assert row == (False, True, True)
    _create(client)  # and creating works with it


def test_tenant_role_is_hardened(client, pg):
    params = _params(_create(client))
    with psycopg.connect(pg.superuser_dsn) as conn:
        row = conn.execute(
            "SELECT rolsuper, rolcreatedb, rolcreaterole, rolreplication, rolbypassrls, rolconnlimit, rolcanlogin "
            "FROM pg_roles WHERE rolname = %s",
            (params["user"],),
        ).fetchone()
        owner = conn.execute(
            "SELECT pg_get_userbyid(datdba) FROM pg_database WHERE datname = %s", (params["dbname"],)
        ).fetchone()[0]
    assert row == (False, False, False, False, False, 5, True)
    assert owner == params["user"]


def test_names_are_opaque(client):
    body = _create(client)
    params = _params(body)
    assert params["user"] == params["dbname"]
    assert body["id"].replace("-", "") not in params["user"]
    assert "provisioning" not in params["user"]


def test_tenant_can_do_what_orms_do(client):
    with psycopg.connect(**_params(_create(client))) as conn:
        conn.execute("CREATE SCHEMA drizzle")
        conn.execute("CREATE TABLE drizzle.migrations (id serial PRIMARY KEY, hash text)")
        conn.execute("CREATE INDEX ON drizzle.migrations (hash)")
        conn.execute("CREATE EXTENSION citext")
        conn.execute("CREATE EXTENSION hstore")
        conn.execute("CREATE TABLE users (id uuid PRIMARY KEY DEFAULT gen_random_uuid(), email citext UNIQUE)")
        conn.execute("INSERT INTO users (email) VALUES ('A@example.com')")
        assert conn.execute("SELECT count(*) FROM users WHERE email = 'a@example.com'").fetchone() == (1,)


def test_tenant_cannot_enter_another_tenants_database(client):
    a, b = _params(_create(client)), _params(_create(client))
    assert refused_login(**{**a, "dbname": b["dbname"]}) == "42501"
    assert refused_login(**{**b, "dbname": a["dbname"]}) == "42501"


@pytest.mark.parametrize("dbname", ["postgres", "template1"])
def test_tenant_cannot_enter_maintenance_databases(client, dbname):
    a = _params(_create(client))
    assert refused_login(**{**a, "dbname": dbname}) == "42501"


@pytest.mark.parametrize(
    "statement",
    ["CREATE ROLE intruder", "CREATE DATABASE intruder", "ALTER ROLE CURRENT_USER CONNECTION LIMIT 100"],
)
def test_tenant_cannot_create_roles_or_databases(client, statement):
    with psycopg.connect(**_params(_create(client)), autocommit=True) as conn:
        with pytest.raises(psycopg.Error) as err:
            conn.execute(statement)
    assert err.value.sqlstate == "42501"


def test_password_is_encrypted_at_rest(client, service):
    bodies = [_create(client) for _ in range(3)]
    passwords = [_params(b)["password"] for b in bodies]
    raw = boto3.client("dynamodb", region_name="us-east-2").scan(TableName=service.settings.table_name("databases"))
    items = raw["Items"]
    assert len(items) == 3
    dump = repr(items).encode()
    for password in passwords:
        assert password.encode() not in dump
        assert base64.b64encode(password.encode()) not in dump
    for item in items:
        assert set(item["secret"]) == {"B"}
        assert item["secret_key_id"] == {"S": "test1"}


def test_record_keeps_ref_ip_and_user_agent(client, service):
    from chalicelib import records
    response = client.http.post(
        "/api/v1/database",
        body='{"ref": "tracked"}',
        headers={"Content-Type": "application/json", "User-Agent": "get-db/1.0"},
    )
    record = records.find(response.json_body["id"])
    assert (record.ref, record.created_ip, record.user_agent) == ("tracked", "127.0.0.1", "get-db/1.0")


def _tenant_names(pg, prefix: str) -> tuple[list, list]:
    like = prefix.replace("_", r"\_") + r"\_%"
    with psycopg.connect(pg.superuser_dsn) as conn:
        roles = conn.execute("SELECT rolname FROM pg_roles WHERE rolname LIKE %s", (like,)).fetchall()
        dbs = conn.execute("SELECT datname FROM pg_database WHERE datname LIKE %s", (like,)).fetchall()
    return roles, dbs


def test_ddl_failure_leaves_nothing_but_a_failed_record(client, service, pg):
    """CREATE ROLE works, CREATE DATABASE fails: 503, the role is dropped, the record says FAILED."""
    from chalicelib.models import DatabaseRecord

    with psycopg.connect(pg.superuser_dsn, autocommit=True) as conn:
        conn.execute(f"ALTER ROLE {pg.admin_user} NOCREATEDB")
    try:
        response = post_json(client, "/api/v1/database", {"ref": "doomed"})
    finally:
        with psycopg.connect(pg.superuser_dsn, autocommit=True) as conn:
            conn.execute(f"ALTER ROLE {pg.admin_user} CREATEDB")
    assert response.status_code == 503
    assert response.json_body["error"] == "Database host unavailable"
    assert _tenant_names(pg, service.settings.name_prefix) == ([], [])
    (record,) = list(DatabaseRecord.scan())
    assert record.status == "FAILED"
    assert record.secret is None
    assert record.due_bucket is None  # nothing left for the purge to clean
    host = service.hosts.get(record.host_id)
    host.refresh()
    assert host.allocated == 0


def test_unreachable_host_is_503_and_gives_its_slot_back(client, service, host):
    from chalicelib.models import DatabaseRecord, HostRecord

    host.update(actions=[HostRecord.port.set(1)])
    service.hosts.invalidate()
    response = post_json(client, "/api/v1/database", {"ref": "x"})
    assert response.status_code == 503
    assert "Retry-After" in response.headers
    (record,) = list(DatabaseRecord.scan())
    # The connection never opened, so nothing was created: a FAILED tombstone
    # with nothing left for the purge, and the slot is free again (issue 7).
    assert (record.status, record.due_bucket) == ("FAILED", None)
    assert int(HostRecord.get("local-1", consistent_read=True).allocated) == 0


def test_concurrent_creates_with_one_client_chosen_id_make_one_database(service, host, pg):
    """Through the service, in threads: chalice.test.Client shares one current_request across threads."""
    import uuid
    from concurrent.futures import ThreadPoolExecutor

    from chalicelib import creation
    from chalicelib.errors import Conflict
    from chalicelib.records import Requester
    from chalicelib.schemas import CreateDatabase

    database_id = str(uuid.uuid4())

    def create(_):
        try:
            return creation.create(service, CreateDatabase(ref="race"), Requester(), database_id=database_id)
        except Conflict:
            return None  # the other request is still provisioning it

    with ThreadPoolExecutor(max_workers=6) as pool:
        results = [r for r in pool.map(create, range(6)) if r is not None]
    assert [r.created for r in results].count(True) == 1
    passwords = {r.password for r in results}
    assert len(passwords) == 1
    roles, dbs = _tenant_names(pg, service.settings.name_prefix)
    assert len(roles) == 1 and len(dbs) == 1
