"""Transfer metering and usage over time (chalicelib.metering, chalicelib.usage).

Against the embedded Postgres, a real PgBouncer (conftest `pgbouncer`, or
one of the test's own where it restarts it) and moto. A database made by the
API is published to the pooler with the verifier Postgres holds for its role
(SCRAM pass-through needs the same one), and the service's `ctx.pooler(host)`
answers with that PgBouncer.
"""

from __future__ import annotations

import shutil
from datetime import UTC, datetime, timedelta
from urllib.parse import urlsplit

import psycopg
import pytest

from tests.conftest import post_json
from tests.pgwire import login_sqlstate
from tests.test_claim import bearer, claim, signup


@pytest.fixture
def bouncer(pgbouncer, monkeypatch):
    """The session PgBouncer as every host's pooler; tenants published here are revoked afterwards."""
    from chalicelib.context import Context

    current = {"pooler": pgbouncer.pooler()}
    monkeypatch.setattr(Context, "pooler", lambda self, host: current["pooler"])
    published: list[tuple[str, str]] = []
    current["published"] = published
    yield current
    for role, dbname in published:
        current["pooler"].revoke(role, dbname)


def _create(client) -> dict:
    response = post_json(client, "/api/v1/database", {"ref": "metering-test"})
    assert response.status_code == 201, response.json_body
    return response.json_body


def _record(database_id: str):
    from chalicelib.models import DatabaseRecord

    return DatabaseRecord.get(database_id, consistent_read=True)


def _publish(pg, bouncer: dict, body: dict) -> str:
    """Publish an API-made database to the pooler; its pooled connection string."""
    from chalicelib import pooler

    record = _record(body["id"])
    with psycopg.connect(pg.superuser_dsn) as conn:
        (verifier,) = conn.execute(
            "SELECT rolpassword FROM pg_authid WHERE rolname = %s", (record.role_name,)
        ).fetchone()
    tenant = pooler.Tenant(record.role_name, record.db_name, verifier, 5, pg.host, pg.port)
    bouncer["pooler"].publish(tenant)
    bouncer["published"].append((record.role_name, record.db_name))
    password = urlsplit(body["connection_string"]).password
    return bouncer["pooler"].pooled_url(record.role_name, password, record.db_name)


def _traffic(url: str, out_bytes: int) -> None:
    with psycopg.connect(url, prepare_threshold=None, connect_timeout=10) as conn:
        conn.execute("SELECT repeat('x', %s)", (out_bytes,)).fetchone()


def _meter(deadline_s: float = 30) -> dict:
    from chalicelib import context, metering
    from chalicelib.clock import Deadline

    return metering.run(context.get(), Deadline.after(deadline_s))


def _counters(bouncer: dict, body: dict) -> tuple[int, int]:
    return bouncer["pooler"].stats()[_record(body["id"]).db_name]


def _totals(database_id: str) -> tuple[int, int]:
    record = _record(database_id)
    return int(record.transfer_in_bytes), int(record.transfer_out_bytes)


def _today(database_id: str):
    from chalicelib import usage
    from chalicelib.models import UsageDay

    return UsageDay.get(database_id, usage.day_key(datetime.now(UTC)), consistent_read=True)


def test_transfer_is_metered_once_per_reading_and_shown_on_get(client, pg, bouncer):
    body = _create(client)
    pooled = _publish(pg, bouncer, body)
    _traffic(pooled, 200_000)

    # A run whose deadline has passed writes nothing; the next one counts it all (cumulative counters).
    assert _meter(0)["complete"] is False and _record(body["id"]).transfer_in_bytes is None
    first = _meter()
    assert first["metered"] == 1 and first["complete"] and not first["errors"]
    counters = _counters(bouncer, body)
    assert _totals(body["id"]) == counters and counters[1] >= 200_000
    assert _meter()["metered"] == 0  # nothing moved: nothing written
    assert _totals(body["id"]) == counters

    _traffic(pooled, 50_000)
    _meter()
    later = _counters(bouncer, body)
    assert _totals(body["id"]) == later and later[1] - counters[1] >= 50_000
    transfer = client.http.get(f"/api/v1/database/{body['id']}").json_body["quota"]["transfer"]
    assert (transfer["in_bytes"], transfer["out_bytes"]) == later
    assert transfer["period"] == datetime.now(UTC).strftime("%Y-%m")
    assert transfer["limit_bytes"] == 1024 * 1024 * 1024 and transfer["checked_at"]
    day = _today(body["id"])
    assert (int(day.transfer_in_bytes), int(day.transfer_out_bytes)) == later


def test_two_runs_with_the_same_reading_count_it_once(client, pg, bouncer):
    from chalicelib import metering

    body = _create(client)
    _traffic(_publish(pg, bouncer, body), 100_000)
    now = datetime.now(UTC)
    reading = _counters(bouncer, body)
    # Two runs read the record and the counters at the same time, then both write.
    first, second = _record(body["id"]), _record(body["id"])
    change = metering.delta(first, reading, now)
    assert metering.apply(first, change, now) is True
    assert metering.apply(second, metering.delta(second, reading, now), now) is False
    assert _totals(body["id"]) == reading
    day = _today(body["id"])
    assert (int(day.transfer_in_bytes), int(day.transfer_out_bytes)) == reading


def test_a_pgbouncer_restart_counts_from_zero(client, pg, bouncer, tmp_path):
    from tools.dev import pgbouncer as local_pgbouncer
    from tools.dev import pgserver

    root = pgserver.private_dir("instapg-pgbouncer-restart-")
    own = local_pgbouncer.start(root / "pgbouncer")
    try:
        bouncer["pooler"] = own.pooler()
        body = _create(client)
        _traffic(_publish(pg, bouncer, body), 300_000)
        _meter()
        before = _totals(body["id"])
        own.stop()
        own = local_pgbouncer.start(root / "pgbouncer", port=own.port)  # counters start at zero again
        bouncer["pooler"] = own.pooler()
        _traffic(_publish(pg, bouncer, body), 10_000)
        after_restart = _counters(bouncer, body)
        assert after_restart[1] < before[1]  # what makes the restart visible
        summary = _meter()
        assert summary["restarts"] == 1
        assert _totals(body["id"]) == (before[0] + after_restart[0], before[1] + after_restart[1])
    finally:
        bouncer["published"].clear()
        own.stop()
        shutil.rmtree(root, ignore_errors=True)


def test_over_the_transfer_limit_locks_and_a_claim_or_a_new_limit_unlocks(client, pg, bouncer, instapg_env):
    from chalicelib import context

    instapg_env.setenv("INSTAPG_UNCLAIMED_TRANSFER_MB", "1")
    context.reset()
    body, small = _create(client), _create(client)
    _traffic(_publish(pg, bouncer, body), 2 * 1024 * 1024)
    _traffic(_publish(pg, bouncer, small), 10_000)
    summary = _meter()
    assert summary["locked"] == [body["id"]]  # the small one stays open
    assert login_sqlstate(body["direct_connection_string"]) == "28000"
    locked = client.http.get(f"/api/v1/database/{body['id']}").json_body["quota"]["locked"]
    assert locked["reason"] == "transfer" and "this month" in locked["hint"]
    assert _meter()["locked"] == []  # not locked twice

    # Claimed: the claimed plan's transfer (10 GB by default) fits, so the claim lifts the lock.
    key = signup(client)
    assert claim(client, body["id"], key).status_code == 200
    assert _record(body["id"]).locked_reason is None
    with psycopg.connect(body["direct_connection_string"]) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)
    owned = client.http.get(f"/api/v1/databases/{body['id']}", headers=bearer(key)).json_body
    assert owned["quota"]["transfer"]["out_bytes"] >= 2 * 1024 * 1024
    assert owned["quota"]["transfer"]["limit_bytes"] == 10240 * 1024 * 1024

    # An unclaimed one locked for transfer opens again when the limit is raised.
    instapg_env.setenv("INSTAPG_UNCLAIMED_TRANSFER_MB", "0")
    context.reset()
    assert _meter()["locked"] == [small["id"]]
    instapg_env.setenv("INSTAPG_UNCLAIMED_TRANSFER_MB", "1")
    context.reset()
    assert _meter()["unlocked"] == [small["id"]]
    with psycopg.connect(small["direct_connection_string"]) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)


def test_a_new_month_unlocks_and_starts_the_count_again(client, pg, bouncer, instapg_env):
    from chalicelib import context, metering

    instapg_env.setenv("INSTAPG_UNCLAIMED_TRANSFER_MB", "0")
    context.reset()
    body = _create(client)
    _traffic(_publish(pg, bouncer, body), 10_000)
    assert _meter()["locked"] == [body["id"]]
    # The record as a run in the next month sees it: no new bytes, a new period.
    record = _record(body["id"])
    next_month = (datetime.now(UTC).replace(day=1) + timedelta(days=32)).replace(day=1)
    change = metering.delta(record, (int(record.pooler_seen_in), int(record.pooler_seen_out)), next_month)
    assert change is not None and change.added == (0, 0) and change.period == next_month.strftime("%Y-%m")
    assert metering.apply(record, change, next_month)
    summary: dict = {"locked": [], "unlocked": []}
    service = context.get()
    metering._enforce(service, service.hosts.get(record.host_id), record, next_month, summary)
    assert summary["unlocked"] == [body["id"]]
    stored = _record(body["id"])
    assert stored.transfer_period == next_month.strftime("%Y-%m") and int(stored.transfer_out_bytes) == 0
    assert stored.locked_reason is None


def test_daily_usage_rows_hold_size_and_peak_connections_and_the_owner_sees_30_days(client, pg):
    from chalicelib import usage

    body = _create(client)  # no pooler here: size and connections are still sampled, transfer stays 0
    name = _record(body["id"]).db_name

    def size() -> int:  # the server may still change a few pages (hint bits, free space map): bound it
        with psycopg.connect(pg.superuser_dsn) as conn:
            return conn.execute("SELECT pg_database_size(%s)", (name,)).fetchone()[0]

    open_sessions = [psycopg.connect(body["direct_connection_string"]) for _ in range(3)]
    try:
        before = size()
        first = _meter()
        after = size()
    finally:
        for conn in open_sessions:
            conn.close()
    assert first["sampled"] >= 1 and first["metered"] == 0  # ours, and any other test's database that changed
    day = _today(body["id"])
    assert min(before, after) <= int(day.size_bytes) <= max(before, after)
    assert int(day.connections_peak) == 3
    assert day.expires_at == datetime.combine(datetime.now(UTC).date(), datetime.min.time(), UTC) + timedelta(
        days=usage.KEEP_DAYS + 2
    )
    # Nothing changed: no write. Asked of this record alone, as other tests' databases may change meanwhile.
    unchanged = {name: int(day.size_bytes)}
    assert usage.sample([_record(body["id"])], unchanged, {name: 3}, datetime.now(UTC)) == 0
    assert usage.sample([_record(body["id"])], unchanged, {name: 1}, datetime.now(UTC)) == 0
    assert int(_today(body["id"]).connections_peak) == 3  # fewer sessions later never lower the peak

    key = signup(client)
    assert claim(client, body["id"], key).status_code == 200
    owned = client.http.get(f"/api/v1/databases/{body['id']}", headers=bearer(key)).json_body
    days = owned["usage"]
    assert len(days) == usage.KEEP_DAYS and days[-1]["day"] == usage.day_key(datetime.now(UTC))
    assert days[-1]["size_bytes"] == int(day.size_bytes) and days[-1]["connections_peak"] == 3
    assert days[0]["size_bytes"] is None and days[0]["transfer_out_bytes"] == 0
