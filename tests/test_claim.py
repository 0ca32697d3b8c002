"""Issue 4: accounts, authentication, claiming, the owner's endpoints, the audit log."""

from __future__ import annotations

import threading
import uuid
from datetime import UTC, datetime, timedelta

import psycopg
import pytest

from tests.conftest import post_json
from tests.pgerrors import refused_login


def signup(client, email="dev@example.com") -> str:
    response = post_json(client, "/api/v1/accounts", {"email": email})
    assert response.status_code == 201, response.json_body
    return response.json_body["api_key"]


def bearer(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


def create(client) -> dict:
    response = post_json(client, "/api/v1/database", {"ref": "claim-tests"})
    assert response.status_code == 201
    return response.json_body


def claim(client, database_id: str, key: str):
    return client.http.post(f"/api/v1/database/{database_id}/claim", headers=bearer(key))


def role_of(body: dict) -> str:
    return psycopg.conninfo.conninfo_to_dict(body["connection_string"])["user"]


def actions(client, database_id: str, key: str) -> list[str]:
    response = client.http.get(f"/api/v1/databases/{database_id}/audit", headers=bearer(key))
    assert response.status_code == 200
    return [e["action"] for e in response.json_body["events"]]


# -- accounts and authentication ---------------------------------------------


def test_signup_returns_a_key_stored_only_as_a_hash(client):
    from chalicelib.accounts import key_hash
    from chalicelib.models import AccountRecord, ApiKeyRecord

    response = post_json(client, "/api/v1/accounts", {"email": "a@example.com"})
    assert response.status_code == 201
    body = response.json_body
    key = body["api_key"]
    assert key.startswith("ipg_") and len(key) == 47  # 32 random bytes, base64url
    assert body["email"] == "a@example.com"
    stored = [r.attribute_values for r in ApiKeyRecord.scan()] + [r.attribute_values for r in AccountRecord.scan()]
    assert key not in repr(stored)
    assert ApiKeyRecord.get(key_hash(key)).account_id == body["id"]
    me = client.http.get("/api/v1/account", headers=bearer(key))
    assert me.status_code == 200 and me.json_body["id"] == body["id"] and "api_key" not in me.json_body


@pytest.mark.parametrize("body", [{}, {"email": ""}, {"email": 5}, {"email": "not-an-email"}, {"email": "a@b"}])
def test_signup_needs_an_email(client, body):
    response = post_json(client, "/api/v1/accounts", body)
    assert response.status_code == 400
    assert "email" in response.json_body["error"] and response.json_body["hint"]


def test_signup_can_be_closed(client, instapg_env):
    from chalicelib import context

    instapg_env.setenv("INSTAPG_OPEN_SIGNUP", "false")
    context.reset()
    response = post_json(client, "/api/v1/accounts", {"email": "a@example.com"})
    assert response.status_code == 403
    assert response.json_body["error"] == "Signup is closed"


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": ""},
        {"Authorization": "Bearer"},
        {"Authorization": "Basic dXNlcjpwYXNz"},
        {"Authorization": "Bearer not-a-key"},
        {"Authorization": "Bearer ipg_" + "A" * 43},  # well formed, unknown
    ],
)
def test_missing_malformed_or_unknown_key_is_401_json(client, headers):
    database = create(client)
    for method, path in [
        ("get", "/api/v1/databases"),
        ("get", f"/api/v1/databases/{database['id']}"),
        ("get", f"/api/v1/databases/{database['id']}/connection-string"),
        ("post", f"/api/v1/databases/{database['id']}/rotate-password"),
        ("delete", f"/api/v1/databases/{database['id']}"),
        ("get", f"/api/v1/databases/{database['id']}/audit"),
        ("post", f"/api/v1/database/{database['id']}/claim"),
    ]:
        response = getattr(client.http, method)(path, headers=headers)
        assert response.status_code == 401, (method, path)
        assert set(response.json_body) == {"error", "hint"}
        assert response.headers["WWW-Authenticate"].startswith("Bearer")


def test_revoked_account_and_key_are_401(client):
    from chalicelib import accounts

    key = signup(client)
    account_id = client.http.get("/api/v1/account", headers=bearer(key)).json_body["id"]
    other = accounts.add_key(account_id)
    assert accounts.revoke_key(other)
    assert client.http.get("/api/v1/databases", headers=bearer(other)).status_code == 401
    assert client.http.get("/api/v1/databases", headers=bearer(key)).status_code == 200
    assert accounts.revoke(account_id)
    assert client.http.get("/api/v1/databases", headers=bearer(key)).status_code == 401


def test_someone_elses_database_is_404(client):
    database = create(client)
    owner, stranger = signup(client, "o@example.com"), signup(client, "s@example.com")
    assert claim(client, database["id"], owner).status_code == 200
    for method, path in [
        ("get", f"/api/v1/databases/{database['id']}"),
        ("get", f"/api/v1/databases/{database['id']}/connection-string"),
        ("post", f"/api/v1/databases/{database['id']}/rotate-password"),
        ("get", f"/api/v1/databases/{database['id']}/audit"),
        ("delete", f"/api/v1/databases/{database['id']}"),
    ]:
        response = getattr(client.http, method)(path, headers=bearer(stranger))
        assert response.status_code == 404, (method, path)
        assert response.json_body["error"] == "Database not found"
    # An unclaimed database is nobody's: 404 on the owner's endpoints too.
    unclaimed = create(client)
    assert client.http.get(f"/api/v1/databases/{unclaimed['id']}", headers=bearer(owner)).status_code == 404
    # A malformed id is 400, but only after authentication.
    assert client.http.get("/api/v1/databases/nope", headers=bearer(owner)).status_code == 400
    assert client.http.get("/api/v1/databases/nope").status_code == 401


# -- claim ---------------------------------------------------------------------


def test_claim_raises_limits_and_keeps_the_database(client, pg, service):
    from chalicelib.models import DatabaseRecord

    database = create(client)
    role = role_of(database)
    with psycopg.connect(pg.superuser_dsn) as conn:
        before = conn.execute("SELECT rolconnlimit FROM pg_roles WHERE rolname = %s", (role,)).fetchone()[0]
    assert before == 5
    key = signup(client)
    response = claim(client, database["id"], key)
    assert response.status_code == 200
    body = response.json_body
    assert body["status"] == "CLAIMED"
    assert body["connection_string"] is None and body["expires_at"] is None
    assert body["limits"] == {"storage_mb": 512, "connections": 20}
    with psycopg.connect(pg.superuser_dsn) as conn:
        limit, config = conn.execute(
            "SELECT rolconnlimit, rolconfig FROM pg_roles WHERE rolname = %s", (role,)
        ).fetchone()
    assert limit == 20
    assert "statement_timeout=3600s" in config
    record = DatabaseRecord.get(database["id"])
    # Nothing left that could expire it: no TTL, not in the purge's index.
    assert record.expires_at is None and record.due_bucket is None and record.due_at is None
    assert record.claimed_at is not None and record.plan == "claimed"
    assert list(DatabaseRecord.by_due.query("UNCLAIMED")) == []
    # The connection string the creator got keeps working.
    with psycopg.connect(database["connection_string"]) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)


def test_public_get_after_claim_hides_the_connection_string(client):
    database = create(client)
    claim(client, database["id"], signup(client))
    response = client.http.get(f"/api/v1/database/{database['id']}")
    assert response.status_code == 200
    assert response.json_body["status"] == "CLAIMED"
    assert response.json_body["connection_string"] is None
    assert response.json_body["direct_connection_string"] is None


def test_claim_again_by_the_same_account_is_200(client):
    database = create(client)
    key = signup(client)
    first = claim(client, database["id"], key)
    second = claim(client, database["id"], key)
    assert first.status_code == second.status_code == 200
    assert second.json_body == first.json_body
    assert actions(client, database["id"], key).count("claimed") == 1


def test_claim_by_another_account_is_409(client):
    database = create(client)
    assert claim(client, database["id"], signup(client, "a@example.com")).status_code == 200
    response = claim(client, database["id"], signup(client, "b@example.com"))
    assert response.status_code == 409
    assert response.json_body["error"] == "Database already claimed"


@pytest.fixture
def atomic_dynamodb(monkeypatch):
    """One DynamoDB call at a time, as DynamoDB guarantees per item.

    moto's in-process backend has no lock: two threads' conditional updates
    can both pass the check before either writes, which real DynamoDB never
    allows. Serializing each API call restores that guarantee and nothing
    more; the calls of racing claims still interleave freely.
    """
    from moto.dynamodb.responses import DynamoHandler

    lock = threading.Lock()
    original = DynamoHandler.call_action

    def call_action(self):
        with lock:
            return original(self)

    monkeypatch.setattr(DynamoHandler, "call_action", call_action)


def test_concurrent_claims_have_exactly_one_winner(client, service, atomic_dynamodb):
    from chalicelib import accounts, ownership, records
    from chalicelib.errors import Conflict
    from chalicelib.records import Requester

    database = create(client)
    contenders = [accounts.create(f"c{i}@example.com").account.id for i in range(4)]
    barrier = threading.Barrier(len(contenders))
    outcomes: dict[str, str] = {}

    def run(account_id: str) -> None:
        barrier.wait()
        try:
            ownership.claim(service, database["id"], account_id, Requester())
            outcomes[account_id] = "won"
        except Conflict:
            outcomes[account_id] = "409"
        except Exception as exc:  # recorded, so the assertion below shows it
            outcomes[account_id] = repr(exc)

    threads = [threading.Thread(target=run, args=(a,)) for a in contenders]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(outcomes.values()) == ["409", "409", "409", "won"]
    winner = next(a for a, o in outcomes.items() if o == "won")
    assert records.find(database["id"]).owner_id == winner


def test_claim_of_unknown_malformed_expired_deleted(client, service):
    from chalicelib import records
    from chalicelib.models import DatabaseRecord

    key = signup(client)
    assert claim(client, str(uuid.uuid4()), key).status_code == 404
    assert claim(client, "nope", key).status_code == 400

    expired = create(client)
    DatabaseRecord(id=expired["id"]).update(
        actions=[DatabaseRecord.expires_at.set(datetime.now(UTC) - timedelta(seconds=1))]
    )
    response = claim(client, expired["id"], key)
    assert response.status_code == 410
    assert response.json_body["error"] == "Database expired"
    assert records.find(expired["id"]).status == "UNCLAIMED"  # the claim changed nothing

    tombstone = create(client)
    DatabaseRecord(id=tombstone["id"]).update(actions=[DatabaseRecord.status.set("EXPIRED")])
    assert claim(client, tombstone["id"], key).status_code == 410

    deleted = create(client)
    assert claim(client, deleted["id"], key).status_code == 200
    assert client.http.delete(f"/api/v1/databases/{deleted['id']}", headers=bearer(key)).status_code == 204
    response = claim(client, deleted["id"], key)
    assert response.status_code == 410
    assert response.json_body["error"] == "Database deleted"


def test_claim_that_failed_halfway_is_finished_by_a_retry(client, pg, service, host):
    """The host is down after the CLAIMING write: 503, nothing expires, the retry finishes."""
    from chalicelib import records
    from chalicelib.models import HostRecord

    database = create(client)
    key = signup(client)
    host.update(actions=[HostRecord.port.set(1)])
    service.hosts.all(fresh=True)
    response = claim(client, database["id"], key)
    assert response.status_code == 503
    record = records.find(database["id"])
    assert record.status == "CLAIMING" and record.expires_at is None and record.due_bucket == "CLAIMING"
    # The purge's conditional expiry (status == UNCLAIMED) can no longer act on it.
    from pynamodb.exceptions import UpdateError

    from chalicelib.models import DatabaseRecord

    with pytest.raises(UpdateError) as purge:
        record.update(actions=[DatabaseRecord.status.set("EXPIRED")], condition=DatabaseRecord.status == "UNCLAIMED")
    assert purge.value.cause_response_code == "ConditionalCheckFailedException"
    # Another account cannot take it meanwhile.
    assert claim(client, database["id"], signup(client, "other@example.com")).status_code == 409
    host.update(actions=[HostRecord.port.set(pg.port)])
    service.hosts.all(fresh=True)
    response = claim(client, database["id"], key)
    assert response.status_code == 200 and response.json_body["status"] == "CLAIMED"
    with psycopg.connect(pg.superuser_dsn) as conn:
        limit = conn.execute("SELECT rolconnlimit FROM pg_roles WHERE rolname = %s", (role_of(database),)).fetchone()
    assert limit == (20,)


# -- the owner's endpoints ---------------------------------------------------


def test_list_and_details(client):
    key = signup(client)
    mine = [create(client) for _ in range(2)]
    create(client)  # unclaimed, not listed
    for database in mine:
        claim(client, database["id"], key)
    listed = client.http.get("/api/v1/databases", headers=bearer(key))
    assert listed.status_code == 200
    assert [d["id"] for d in listed.json_body["databases"]] == [d["id"] for d in mine]
    assert all(d["status"] == "CLAIMED" for d in listed.json_body["databases"])

    with psycopg.connect(mine[0]["connection_string"]) as conn:
        conn.execute("CREATE TABLE t AS SELECT g FROM generate_series(1, 20000) g")
        details = client.http.get(f"/api/v1/databases/{mine[0]['id']}", headers=bearer(key))
        assert details.status_code == 200
        body = details.json_body
        assert body["connections"] == 1  # this session
        assert body["size_bytes"] > 1_000_000
        assert body["limits"] == {"storage_mb": 512, "connections": 20}
    assert client.http.get("/api/v1/databases", headers=bearer(signup(client, "x@example.com"))).json_body == {
        "databases": []
    }


def test_list_is_oldest_first_whatever_the_ids(client):
    key = signup(client)
    # A client-chosen v4 id that sorts after every server-made (v7, time-ordered) id.
    first_id = "f" + str(uuid.uuid4())[1:]
    first = post_json(client, f"/api/v1/database/{first_id}?referrer=order", {})
    assert first.status_code == 201, first.json_body
    second = create(client)
    for database_id in (second["id"], first_id):  # claimed newest first, so claim order proves nothing either
        assert claim(client, database_id, key).status_code == 200
    listed = client.http.get("/api/v1/databases", headers=bearer(key)).json_body["databases"]
    assert [d["id"] for d in listed] == [first_id, second["id"]]


def test_connection_string_is_audited(client):
    database = create(client)
    key = signup(client)
    claim(client, database["id"], key)
    response = client.http.get(f"/api/v1/databases/{database['id']}/connection-string", headers=bearer(key))
    assert response.status_code == 200
    assert response.json_body["connection_string"] == database["connection_string"]
    assert response.json_body["direct_connection_string"] == database["direct_connection_string"]
    assert actions(client, database["id"], key)[0] == "connection_string_viewed"


def test_rotate_password(client):
    database = create(client)
    key = signup(client)
    claim(client, database["id"], key)
    old_session = psycopg.connect(database["connection_string"], autocommit=True)
    assert old_session.execute("SELECT 1").fetchone() == (1,)

    response = client.http.post(f"/api/v1/databases/{database['id']}/rotate-password", headers=bearer(key))
    assert response.status_code == 200
    new_url = response.json_body["connection_string"]
    assert new_url != database["connection_string"]

    # The old session was ended: admin_shutdown.
    with pytest.raises(psycopg.OperationalError) as ended:
        old_session.execute("SELECT 1")
    assert ended.value.sqlstate == "57P01"
    old_session.close()
    # The old password is refused, the new one works.
    assert refused_login(**psycopg.conninfo.conninfo_to_dict(database["connection_string"])) == "28P01"
    with psycopg.connect(new_url) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)
    # The stored copy is the new one.
    stored = client.http.get(f"/api/v1/databases/{database['id']}/connection-string", headers=bearer(key))
    assert stored.json_body["connection_string"] == new_url
    assert "password_rotated" in actions(client, database["id"], key)


def test_delete_drops_and_leaves_a_tombstone(client, pg, service):
    from chalicelib import records
    database = create(client)
    key = signup(client)
    claim(client, database["id"], key)
    role = role_of(database)
    response = client.http.delete(f"/api/v1/databases/{database['id']}", headers=bearer(key))
    assert response.status_code == 204
    with psycopg.connect(pg.superuser_dsn) as conn:
        assert conn.execute("SELECT count(*) FROM pg_roles WHERE rolname = %s", (role,)).fetchone() == (0,)
        assert conn.execute("SELECT count(*) FROM pg_database WHERE datname = %s", (role,)).fetchone() == (0,)
    record = records.find(database["id"])
    assert record.status == "DELETED" and record.secret is None and record.expires_at is not None
    assert record.due_bucket is None
    again = client.http.delete(f"/api/v1/databases/{database['id']}", headers=bearer(key))
    assert again.status_code == 410
    assert again.json_body["error"] == "Database deleted"
    public = client.http.get(f"/api/v1/database/{database['id']}")
    assert public.status_code == 410
    assert client.http.get("/api/v1/databases", headers=bearer(key)).json_body == {"databases": []}
    assert client.http.get(f"/api/v1/databases/{database['id']}", headers=bearer(key)).status_code == 410


def test_audit_log_records_each_action_newest_first(client):
    from chalicelib import audit
    from chalicelib.models import AuditEvent

    database = create(client)
    key = signup(client)
    claim(client, database["id"], key)
    client.http.get(f"/api/v1/databases/{database['id']}/connection-string", headers=bearer(key))
    client.http.post(f"/api/v1/databases/{database['id']}/rotate-password", headers=bearer(key))
    assert actions(client, database["id"], key) == [
        "password_rotated",
        "connection_string_viewed",
        "claimed",
        "created",
    ]
    client.http.delete(f"/api/v1/databases/{database['id']}", headers=bearer(key))
    # The owner can still read the log of a deleted database; nobody else can.
    assert actions(client, database["id"], key)[0] == audit.DELETED
    stranger = bearer(signup(client, "s@example.com"))
    assert client.http.get(f"/api/v1/databases/{database['id']}/audit", headers=stranger).status_code == 404
    # Nothing secret in the log.
    assert "postgresql://" not in repr([e.attribute_values for e in AuditEvent.scan()])


def test_audit_pagination(client):
    database = create(client)
    key = signup(client)
    claim(client, database["id"], key)
    for _ in range(5):
        client.http.get(f"/api/v1/databases/{database['id']}/connection-string", headers=bearer(key))
    seen, cursor = [], None
    path = f"/api/v1/databases/{database['id']}/audit?limit=3"
    for _ in range(5):
        response = client.http.get(path + (f"&cursor={cursor}" if cursor else ""), headers=bearer(key))
        assert response.status_code == 200
        seen += response.json_body["events"]
        cursor = response.json_body["next_cursor"]
        if cursor is None:
            break
    assert len(seen) == 7  # created, claimed, 5 views
    assert [e["action"] for e in seen][-2:] == ["claimed", "created"]
    assert [e["at"] for e in seen] == sorted((e["at"] for e in seen), reverse=True)
    assert len({e["id"] for e in seen}) == 7
    for bad in ["?cursor=zzz", "?limit=0", "?limit=101", "?limit=x"]:
        response = client.http.get(f"/api/v1/databases/{database['id']}/audit{bad}", headers=bearer(key))
        assert response.status_code == 400, bad


# -- the operator CLI ----------------------------------------------------------


def test_operator_cli_creates_and_revokes_accounts(client, instapg_env, capsys, monkeypatch):
    import io
    import json

    from chalicelib import context
    from tools.ops import accountctl as cli

    instapg_env.setenv("INSTAPG_OPEN_SIGNUP", "false")
    context.reset()
    assert post_json(client, "/api/v1/accounts", {"email": "a@example.com"}).status_code == 403

    assert cli.main(["create", "--email", "ops@example.com"]) == 0
    created = json.loads(capsys.readouterr().out)
    key = created["api_key"]
    assert client.http.get("/api/v1/databases", headers=bearer(key)).status_code == 200

    assert cli.main(["new-key", created["account_id"]]) == 0
    second = json.loads(capsys.readouterr().out)["api_key"]
    monkeypatch.setattr("sys.stdin", io.StringIO(second + "\n"))
    assert cli.main(["revoke-key"]) == 0
    assert client.http.get("/api/v1/databases", headers=bearer(second)).status_code == 401
    assert client.http.get("/api/v1/databases", headers=bearer(key)).status_code == 200

    assert cli.main(["revoke", created["account_id"]]) == 0
    assert client.http.get("/api/v1/databases", headers=bearer(key)).status_code == 401
    assert cli.main(["show", created["account_id"]]) == 0
    assert json.loads(capsys.readouterr().out)["status"] == "REVOKED"
    assert cli.main(["revoke", "no-such-account"]) == 1
    assert cli.main(["create", "--email", "nope"]) == 2


def test_stalled_claim_and_delete_are_finished_by_the_sweep(client, pg, service, host, instapg_env):

    from chalicelib import context, ownership, records
    from chalicelib.clock import Deadline
    from chalicelib.models import HostRecord

    # Stalled work is due at once here (default: after the provisioning timeout).
    instapg_env.setenv("INSTAPG_PROVISIONING_TIMEOUT_SECONDS", "0")
    context.reset()
    service = context.get()
    to_claim, to_delete = create(client), create(client)
    key = signup(client)
    assert claim(client, to_delete["id"], key).status_code == 200

    host.update(actions=[HostRecord.port.set(1)])
    service.hosts.all(fresh=True)
    assert claim(client, to_claim["id"], key).status_code == 503
    assert client.http.delete(f"/api/v1/databases/{to_delete['id']}", headers=bearer(key)).status_code == 503
    assert records.find(to_claim["id"]).status == "CLAIMING"
    assert records.find(to_delete["id"]).status == "DELETING"
    # Host still down: nothing finished, nothing lost.
    assert ownership.finish_stalled(service, Deadline.after(30)) == 0

    host.update(actions=[HostRecord.port.set(pg.port)])
    service.hosts.all(fresh=True)
    assert ownership.finish_stalled(service, Deadline.after(30)) == 2
    assert records.find(to_claim["id"]).status == "CLAIMED"
    assert records.find(to_delete["id"]).status == "DELETED"
    with psycopg.connect(pg.superuser_dsn) as conn:
        rows = conn.execute(
            "SELECT rolname, rolconnlimit FROM pg_roles WHERE rolname IN (%s, %s)",
            (role_of(to_claim), role_of(to_delete)),
        ).fetchall()
    assert rows == [(role_of(to_claim), 20)]
    assert ownership.finish_stalled(service, Deadline.after(30)) == 0


def test_connection_string_is_withheld_when_the_audit_log_is_down(client):
    from chalicelib.models import AuditEvent

    database = create(client)
    key = signup(client)
    claim(client, database["id"], key)
    AuditEvent.delete_table()
    response = client.http.get(f"/api/v1/databases/{database['id']}/connection-string", headers=bearer(key))
    assert response.status_code == 503
    assert response.json_body["error"] == "Audit log unavailable"
    assert "postgresql://" not in response.body.decode()


def test_the_scheduled_purge_audits_purges_and_finishes_stalled_claims(client, pg, service, host, instapg_env):
    import time

    from chalicelib import context, expiry, records
    from chalicelib.clock import Deadline
    from chalicelib.models import AuditEvent, DatabaseRecord, HostRecord

    instapg_env.setenv("INSTAPG_PROVISIONING_TIMEOUT_SECONDS", "0")
    context.reset()
    service = context.get()
    doomed, stalled = create(client), create(client)
    past = datetime.now(UTC) - timedelta(seconds=5)
    DatabaseRecord(id=doomed["id"]).update(
        actions=[DatabaseRecord.expires_at.set(past), DatabaseRecord.due_at.set(int(past.timestamp()))]
    )
    key = signup(client)
    host.update(actions=[HostRecord.port.set(1)])
    service.hosts.all(fresh=True)
    assert claim(client, stalled["id"], key).status_code == 503
    host.update(actions=[HostRecord.port.set(pg.port)])
    time.sleep(1)  # due_at is in whole seconds

    summary = expiry.run_scheduled(service, Deadline.after(30))
    assert summary.expired_dropped == 1 and summary.stalled_finished == 1
    assert records.find(stalled["id"]).status == "CLAIMED"
    purged = [e for e in AuditEvent.query(doomed["id"]) if e.action == "purged"]
    assert len(purged) == 1 and purged[0].actor == "system"
    assert "claimed" in actions(client, stalled["id"], key)


def test_claim_lifts_a_storage_lock_the_claimed_plan_fits(client, instapg_env):

    from chalicelib import context, quotas, records
    from chalicelib.clock import Deadline

    database = create(client)
    key = signup(client)
    # Every database is bigger than 1 MB: the quota pass locks this one.
    instapg_env.setenv("INSTAPG_UNCLAIMED_STORAGE_MB", "1")
    context.reset()
    assert quotas.enforce(context.get(), Deadline.after(30))["locked"] == [database["id"]]
    assert refused_login(**psycopg.conninfo.conninfo_to_dict(database["connection_string"])) == "28000"

    assert claim(client, database["id"], key).status_code == 200
    assert records.find(database["id"]).locked_reason is None
    with psycopg.connect(database["connection_string"]) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)
    log = actions(client, database["id"], key)
    assert log[:3] == ["quota_unlocked", "claimed", "quota_locked"]
