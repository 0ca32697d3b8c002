"""The warm pool: ready databases handed out once each, with a password nobody had before."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import psycopg
import pytest

from tests.conftest import post_json
from tests.pgerrors import refused_login


def _refill(service, size: int):
    from chalicelib import pool
    from chalicelib.clock import Deadline

    return pool.refill(service, Deadline.after(120), size=size)


def _pooled(host_id: str = "local-1"):
    from chalicelib import pool

    return pool.pooled(host_id)


def _role(pg, name: str):
    with psycopg.connect(pg.superuser_dsn) as conn:
        return conn.execute("SELECT rolcanlogin, rolconnlimit FROM pg_roles WHERE rolname = %s", (name,)).fetchone()


def _allocated(host_id: str = "local-1") -> int:
    from chalicelib.models import HostRecord

    return int(HostRecord.get(host_id, consistent_read=True).allocated)


def test_refill_fills_the_pool_with_locked_ready_databases(service, host, pg):
    summary = _refill(service, 3)
    assert summary.added == 3
    records = _pooled()
    assert len(records) == 3
    assert {r.status for r in records} == {"POOLED"}
    assert _allocated() == 3  # pooled databases count against capacity
    for record in records:
        assert _role(pg, record.role_name) == (False, 5)  # NOLOGIN, limit of the unclaimed plan
    assert _refill(service, 3).added == 0  # already full


def test_create_takes_a_pooled_database(client, service, pg):
    _refill(service, 2)
    pooled_ids = {r.id for r in _pooled()}
    response = post_json(client, "/api/v1/database", {"ref": "pool-test"})
    assert response.status_code == 201, response.json_body
    body = response.json_body
    assert body["id"] in pooled_ids
    assert len(_pooled()) == 1
    assert _allocated() == 2  # the slot moved with the database: no new one taken
    with psycopg.connect(body["connection_string"], connect_timeout=10) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)
    again = client.http.get(f"/api/v1/database/{body['id']}")
    assert again.status_code == 200
    assert again.json_body["connection_string"] == body["connection_string"]
    assert again.json_body["status"] == body["status"] == "UNCLAIMED"
    assert body["created_at"] == again.json_body["created_at"]
    # The audit event was written in the take's transaction.
    from chalicelib import audit

    assert [e.action for e in audit.page(body["id"]).events] == ["created"]


def test_a_pooled_database_cannot_be_logged_into_before_its_take(client, service, pg):
    """The refill sets the password the take hands out; until the take the role is NOLOGIN."""
    from chalicelib import records

    _refill(service, 2)
    pooled = {r.id: r for r in _pooled()}
    passwords = {records.password(service, r) for r in pooled.values()}
    assert len(passwords) == 2  # each pooled database has its own
    for record in pooled.values():
        params = {"host": pg.host, "port": pg.port, "user": record.role_name, "dbname": record.db_name}
        # While pooled the role cannot log in at all, even with the right password.
        assert refused_login(**params, password=records.password(service, record)) == "28000"
        assert client.http.get(f"/api/v1/database/{record.id}").status_code == 404  # never shown
    body = post_json(client, "/api/v1/database", {"ref": "fresh"}).json_body
    taken = pooled.pop(body["id"])
    [waiting] = pooled.values()
    given = psycopg.conninfo.conninfo_to_dict(body["connection_string"])
    assert given["password"] == records.password(service, taken)
    assert (
        refused_login(
            host=pg.host, port=pg.port, user=taken.role_name, dbname=taken.db_name, password=given["password"]
        )
        is None
    )
    assert _role(pg, taken.role_name) == (True, 5)
    # The one still pooled stays locked.
    assert (
        refused_login(
            host=pg.host,
            port=pg.port,
            user=waiting.role_name,
            dbname=waiting.db_name,
            password=records.password(service, waiting),
        )
        == "28000"
    )


def test_a_take_whose_alter_role_fails_is_left_for_the_purge_and_the_create_still_answers(client, service, pg):
    from psycopg import sql

    from chalicelib.models import DatabaseRecord

    _refill(service, 1)
    [record] = _pooled()
    # The pooled role disappears behind the service's back: the take's ALTER ROLE fails.
    with psycopg.connect(pg.superuser_dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE {}").format(sql.Identifier(record.db_name)))
        conn.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(record.role_name)))
    response = post_json(client, "/api/v1/database", {"ref": "after-a-bad-take"})
    assert response.status_code == 201, response.json_body
    assert response.json_body["id"] != record.id  # made on demand instead
    with psycopg.connect(response.json_body["connection_string"], connect_timeout=10) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)
    taken = DatabaseRecord.get(record.id, consistent_read=True)
    assert taken.status == "FAILED" and taken.due_bucket == "FAILED" and taken.secret is None
    assert client.http.get(f"/api/v1/database/{record.id}").status_code != 200


def test_empty_pool_falls_back_with_the_same_response(client, service):
    _refill(service, 1)
    pooled = post_json(client, "/api/v1/database", {"ref": "a"})
    on_demand = post_json(client, "/api/v1/database", {"ref": "b"})
    assert pooled.status_code == on_demand.status_code == 201
    assert set(pooled.json_body) == set(on_demand.json_body)
    assert pooled.headers == on_demand.headers
    for key in ("status", "limits"):
        assert pooled.json_body[key] == on_demand.json_body[key]
    with psycopg.connect(on_demand.json_body["connection_string"], connect_timeout=10) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)


def test_pooled_ids_are_not_visible(client, service):
    _refill(service, 1)
    [record] = _pooled()
    assert client.http.get(f"/api/v1/database/{record.id}").status_code == 404


def test_client_chosen_id_never_takes_from_the_pool(client, service):
    _refill(service, 1)
    database_id = "0190a2b4-6c1e-7d3f-8a9b-0c1d2e3f4a5b"
    response = post_json(client, f"/api/v1/database/{database_id}", {"ref": "own-id"})
    assert response.status_code == 201
    assert len(_pooled()) == 1


def test_100_concurrent_creates_get_100_distinct_databases(service, host, pg):
    from chalicelib import creation
    from chalicelib.records import Requester
    from chalicelib.schemas import CreateDatabase

    _refill(service, 100)
    pooled_roles = {r.role_name for r in _pooled()}
    assert len(pooled_roles) == 100

    def create(i: int):
        return creation.create(service, CreateDatabase(ref=f"race-{i}"), Requester())

    with ThreadPoolExecutor(max_workers=100) as executor:
        results = list(executor.map(create, range(100)))

    ids = [r.record.id for r in results]
    roles = [r.record.role_name for r in results]
    passwords = [r.password for r in results]
    assert len(set(ids)) == 100
    assert len(set(roles)) == 100  # no database handed out twice
    assert len(set(passwords)) == 100
    from_pool = [role for role in roles if role in pooled_roles]
    assert len(from_pool) >= 90  # a few may lose every race and be created on demand
    assert len(_pooled()) == 100 - len(from_pool)
    # Every one answers with its own password, so none was overwritten by a second taker.
    for result in results:
        params = {
            "host": pg.host,
            "port": pg.port,
            "user": result.record.role_name,
            "dbname": result.record.db_name,
            "password": result.password,
        }
        assert refused_login(**params) is None


def test_shrinking_the_pool_drops_the_extra_databases(service, host, pg):
    _refill(service, 3)
    summary = _refill(service, 1)
    assert summary.discarded == 2
    assert len(_pooled()) == 1
    assert _allocated() == 1
    with psycopg.connect(pg.superuser_dsn) as conn:
        left = conn.execute(
            "SELECT count(*) FROM pg_roles WHERE rolname LIKE %s", (service.settings.name_prefix + "_%",)
        ).fetchone()[0]
    assert left == 1


@pytest.mark.parametrize("size", [0])
def test_pool_size_zero_keeps_no_pool(service, host, size):
    assert _refill(service, size).added == 0
    assert _pooled() == []


def test_pooled_databases_are_never_purged_as_orphans(service, host, pg, instapg_env):
    from chalicelib import context, expiry, provisioning
    from chalicelib import hosts as hostlib
    from chalicelib.clock import Deadline

    _refill(service, 2)
    pooled_roles = {r.role_name for r in _pooled()}
    # A prefixed tenant no record references: reconciliation must drop it, and only it.
    stray = service.settings.name_prefix + "_stray"
    provisioning.create_tenant(
        hostlib.target(host, service.settings), stray, stray, "unused-password", service.settings.plan("unclaimed")
    )
    instapg_env.setenv("INSTAPG_ORPHAN_GRACE_SECONDS", "0")
    context.reset()
    fresh = context.get()
    for _ in range(2):  # first sighting, then the drop once the (zero) grace has passed
        summary = expiry.run_scheduled(fresh, Deadline.after(60))
        assert summary.hosts_reconciled == 1
    with psycopg.connect(pg.superuser_dsn) as conn:
        left = {
            name
            for (name,) in conn.execute(
                "SELECT rolname FROM pg_roles WHERE rolname LIKE %s", (service.settings.name_prefix + "_%",)
            )
        }
    assert stray not in left
    assert pooled_roles <= left
    assert {r.role_name for r in _pooled()} == pooled_roles


def _pool_size(env, size: int):
    from chalicelib import context

    env.setenv("INSTAPG_POOL_SIZE", str(size))
    context.reset()
    return context.get()


def test_creates_that_take_from_the_pool_top_it_up_through_the_stream(client, instapg_env):
    from chalicelib.models import DatabaseRecord
    from tests.streams import image, stream_event

    service = _pool_size(instapg_env, 2)
    _refill(service, 2)
    before = {r.id: r for r in _pooled()}
    body = post_json(client, "/api/v1/database", {"ref": "burst"}).json_body
    assert body["id"] in before and len(_pooled()) == 1
    taken = DatabaseRecord.get(body["id"], consistent_read=True)
    # The take's write as the table's stream delivers it: a pooled record, modified.
    event = stream_event(service.settings, "MODIFY", taken.id, old=image(before[taken.id]), new=image(taken))
    client.lambda_.invoke("drop_removed", {"Records": [event]})
    assert len(_pooled()) == 2  # back to the pool size, not at the next scheduled run
    assert DatabaseRecord.get(taken.id, consistent_read=True).status == "UNCLAIMED"


def test_other_changes_on_the_stream_start_no_refill(client, instapg_env):
    from chalicelib.models import DatabaseRecord
    from tests.streams import image, stream_event

    service = _pool_size(instapg_env, 2)
    body = post_json(client, "/api/v1/database", {"ref": "on-demand"}).json_body  # the pool is empty
    record = DatabaseRecord.get(body["id"], consistent_read=True)
    provisioning = DatabaseRecord.get(body["id"], consistent_read=True)
    provisioning.status = "PROVISIONING"
    events = [
        stream_event(service.settings, "MODIFY", record.id, old=image(provisioning), new=image(record)),
        stream_event(service.settings, "INSERT", record.id, new=image(provisioning)),
    ]
    client.lambda_.invoke("drop_removed", {"Records": events})
    assert _pooled() == []


def test_a_refill_skips_a_host_another_refill_holds(service, host):
    from chalicelib import hosts as hostlib

    assert hostlib.lease_refill("local-1", time.time() + 60)
    summary = _refill(service, 2)
    assert summary.hosts_busy == ["local-1"] and summary.added == 0
    assert _pooled() == []
    assert not hostlib.lease_refill("local-1", time.time() + 60)  # still the other refill's


def test_a_refill_lease_whose_holder_died_ends_by_itself(service, host):
    from chalicelib import hosts as hostlib

    assert hostlib.lease_refill("local-1", time.time() - 1)  # taken by a process that never gave it back
    assert _refill(service, 2).added == 2
    assert hostlib.lease_refill("local-1", time.time() + 60)  # the refill gave its own lease back


def test_refills_at_once_fill_a_host_once(service, host):
    with ThreadPoolExecutor(max_workers=3) as executor:
        summaries = list(executor.map(lambda _: _refill(service, 4), range(3)))
    assert sum(s.added for s in summaries) == 4
    assert len(_pooled()) == 4
    assert _allocated() == 4
