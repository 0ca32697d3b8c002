"""More than one host: placement spreads, draining, and a host that is down."""

from __future__ import annotations

import psycopg

from tests.conftest import post_json
from tools.dev.pgserver import free_port


def _create(client, ref: str = "multi") -> dict:
    response = post_json(client, "/api/v1/database", {"ref": ref})
    assert response.status_code == 201, response.json_body
    return response.json_body


def _host_of(database_id: str) -> str:
    from chalicelib.models import DatabaseRecord

    return DatabaseRecord.get(database_id, consistent_read=True).host_id


def _allocated(host_id: str) -> int:
    from chalicelib.models import HostRecord

    return int(HostRecord.get(host_id, consistent_read=True).allocated)


def _set_host(service, host_id: str, **changes) -> None:
    from chalicelib.models import HostRecord

    record = HostRecord.get(host_id)
    for key, value in changes.items():
        setattr(record, key, value)
    record.save()
    service.hosts.invalidate()


def _works(body: dict) -> bool:
    with psycopg.connect(body["connection_string"], connect_timeout=10) as conn:
        return conn.execute("SELECT 1").fetchone() == (1,)


def test_placement_spreads_databases_over_hosts(client, second_host):
    placed = [_host_of(_create(client)["id"]) for _ in range(6)]
    assert placed.count("local-1") == 3
    assert placed.count("local-2") == 3
    assert _allocated("local-1") == _allocated("local-2") == 3


def test_placement_prefers_the_host_with_more_room(client, service, second_host):
    _set_host(service, "local-1", capacity=10)
    placed = {_host_of(_create(client)["id"]) for _ in range(3)}
    assert placed == {"local-2"}


def test_draining_host_takes_no_new_databases_but_keeps_serving(client, service, second_host):
    from chalicelib.models import HOST_DRAINING

    before = [_create(client) for _ in range(4)]
    on_two = [b for b in before if _host_of(b["id"]) == "local-2"]
    assert on_two
    _set_host(service, "local-2", status=HOST_DRAINING)
    after = [_host_of(_create(client)["id"]) for _ in range(4)]
    assert set(after) == {"local-1"}
    for body in on_two:  # still served: GET and a login work
        got = client.http.get(f"/api/v1/database/{body['id']}")
        assert got.status_code == 200
        assert _works(got.json_body)


def test_one_host_down_does_not_block_creates(client, service, second_host):
    # local-2 now points at a port where nothing listens, and has the most room.
    _set_host(service, "local-2", port=free_port(), capacity=5000)
    body = _create(client)
    assert _host_of(body["id"]) == "local-1"
    assert _works(body)
    assert _allocated("local-2") == 0  # the failed attempt gave its slot back
    # Later creates skip the host marked down without trying it again.
    assert service.hosts.is_down("local-2")
    assert _host_of(_create(client)["id"]) == "local-1"


def test_every_host_down_is_503_and_leaves_no_slot_taken(client, service, host):
    _set_host(service, "local-1", port=free_port())
    response = post_json(client, "/api/v1/database", {"ref": "down"})
    assert response.status_code == 503
    assert response.json_body["error"] == "Database host unavailable"
    assert _allocated("local-1") == 0


def test_pool_on_a_down_host_falls_over_to_the_other(client, service, second_host):
    from chalicelib import pool
    from chalicelib.clock import Deadline
    from chalicelib.models import FAILED, DatabaseRecord

    pool.refill(service, Deadline.after(60), size=2)
    local_1_pool = {r.id for r in pool.pooled("local-1")}
    # local-2 has the most room, so its pool is tried first; but it is down.
    _set_host(service, "local-2", port=free_port(), capacity=5000)
    body = _create(client, "failover")
    assert body["id"] in local_1_pool
    assert _works(body)
    # The pooled database taken on the down host is left FAILED and due, for the purge.
    failed = [r for r in DatabaseRecord.scan() if r.status == FAILED]
    assert [(r.host_id, r.due_bucket) for r in failed] == [("local-2", FAILED)]
    assert len(pool.pooled("local-2")) == 1


def test_refill_walks_every_host_and_a_down_one_does_not_stop_it(service, second_host):
    from chalicelib import pool
    from chalicelib.clock import Deadline

    _set_host(service, "local-1", port=free_port())
    summary = pool.refill(service, Deadline.after(60), size=2)
    assert summary.hosts_unavailable == ["local-1"]
    assert summary.added == 2
    assert len(pool.pooled("local-2")) == 2
    assert pool.pooled("local-1") == []


def test_draining_host_gives_its_pool_back(service, second_host, pg2):
    from chalicelib import pool
    from chalicelib.clock import Deadline
    from chalicelib.models import HOST_DRAINING

    pool.refill(service, Deadline.after(60), size=2)
    names = [r.role_name for r in pool.pooled("local-2")]
    _set_host(service, "local-2", status=HOST_DRAINING)
    summary = pool.refill(service, Deadline.after(60), size=2)
    assert summary.discarded == 2
    assert pool.pooled("local-2") == []
    assert _allocated("local-2") == 0
    with psycopg.connect(pg2.superuser_dsn) as conn:
        left = conn.execute("SELECT count(*) FROM pg_roles WHERE rolname = ANY(%s)", (names,)).fetchone()[0]
    assert left == 0


def test_ddl_failure_on_one_host_retries_on_the_other_and_cleans_up(client, service, second_host, pg2):
    # local-2 answers, but its admin can no longer create databases: CREATE ROLE
    # works there and CREATE DATABASE fails, leaving a role to clean up.
    _set_host(service, "local-2", capacity=5000)
    with psycopg.connect(pg2.superuser_dsn, autocommit=True) as conn:
        conn.execute(f"ALTER ROLE {pg2.admin_user} NOCREATEDB")
    try:
        body = _create(client, "retry")
    finally:
        with psycopg.connect(pg2.superuser_dsn, autocommit=True) as conn:
            conn.execute(f"ALTER ROLE {pg2.admin_user} CREATEDB")
    assert _host_of(body["id"]) == "local-1"
    assert _works(body)
    assert _allocated("local-2") == 0
    with psycopg.connect(pg2.superuser_dsn) as conn:
        left = conn.execute(
            "SELECT count(*) FROM pg_roles WHERE rolname LIKE %s", (service.settings.name_prefix + "_%",)
        ).fetchone()[0]
    assert left == 0  # the half-made tenant was dropped


def test_a_host_marked_down_is_still_tried_when_no_other_can_answer(client, service, host):
    # One slow connect under load marks a host down for a while; when it is
    # the only host left, creates still go to it rather than answer 503.
    service.hosts.mark_down("local-1", 60)
    body = _create(client, "marked")
    assert _host_of(body["id"]) == "local-1"
    assert _works(body)


def test_draining_a_down_host_leaves_its_pool_to_the_purge(service, second_host):
    from chalicelib import pool
    from chalicelib.clock import Deadline
    from chalicelib.models import HOST_DRAINING, DatabaseRecord

    pool.refill(service, Deadline.after(60), size=1)
    _set_host(service, "local-2", status=HOST_DRAINING, port=free_port())
    summary = pool.refill(service, Deadline.after(60), size=1)
    assert summary.hosts_unavailable == ["local-2"]
    records = [r for r in DatabaseRecord.scan() if r.host_id == "local-2"]
    # Not lost: a FAILED record with the drop pending, and the slot kept until the purge drops it.
    assert [(r.status, r.due_bucket) for r in records] == [("FAILED", "FAILED")]
    assert _allocated("local-2") == 1
    assert len(pool.pooled("local-1")) == 1  # the other host was still served
