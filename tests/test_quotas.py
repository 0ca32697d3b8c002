"""Quota enforcement (chalicelib.quotas) against the real embedded Postgres and moto."""

from __future__ import annotations

import threading
import time

import psycopg
import pytest

from tests.conftest import post_json
from tests.pgwire import login_sqlstate


def _settings(env, **values) -> None:
    from chalicelib import context

    for name, value in values.items():
        env.setenv(name, str(value))
    context.reset()


def _create(client) -> dict:
    response = post_json(client, "/api/v1/database", {"ref": "quota-test"})
    assert response.status_code == 201, response.json_body
    return response.json_body


def _record(database_id: str):
    from chalicelib.models import DatabaseRecord

    return DatabaseRecord.get(database_id, consistent_read=True)


def _enforce() -> dict:
    from chalicelib import context, quotas
    from chalicelib.clock import Deadline

    return quotas.enforce(context.get(), Deadline.after(30))


def _pid_alive(pg, pid: int) -> bool:
    with psycopg.connect(pg.superuser_dsn) as conn:
        return conn.execute("SELECT 1 FROM pg_stat_activity WHERE pid = %s", (pid,)).fetchone() is not None


def test_sizes_are_measured_in_one_pass_and_shown_on_get(client):
    first, second = _create(client), _create(client)
    summary = _enforce()
    assert summary["measured"] == 2 and summary["complete"] and not summary["errors"]
    assert summary["locked"] == []
    for body in (first, second):
        record = _record(body["id"])
        assert record.size_bytes > 1_000_000  # an empty database is several MB
        assert record.locked_reason is None
        quota = client.http.get(f"/api/v1/database/{body['id']}").json_body["quota"]
        assert quota["size_bytes"] == record.size_bytes
        assert quota["storage_limit_bytes"] == 100 * 1024 * 1024
        assert quota["locked"] is None


def test_database_over_its_plan_is_locked_and_its_sessions_end(client, instapg_env, pg):
    body = _create(client)
    session = psycopg.connect(body["connection_string"], autocommit=True)
    pid = session.info.backend_pid
    # Every database is bigger than 1 MB, so this one is over the plan.
    _settings(instapg_env, INSTAPG_UNCLAIMED_STORAGE_MB=1)
    summary = _enforce()
    assert summary["locked"] == [body["id"]]
    assert not _pid_alive(pg, pid)
    assert login_sqlstate(body["connection_string"]) == "28000"  # role is not permitted to log in
    record = _record(body["id"])
    assert record.locked_reason == "storage" and record.locked_at is not None
    locked = client.http.get(f"/api/v1/database/{body['id']}").json_body["quota"]["locked"]
    assert locked["reason"] == "storage" and locked["since"]
    # A second pass does not lock again.
    assert _enforce()["locked"] == []
    session.close()


def test_unlock_if_fits_lifts_the_lock_only_when_the_plan_fits(client, instapg_env):
    from chalicelib import context, quotas
    from chalicelib.settings import FREE_PLAN, Plan

    body = _create(client)
    _settings(instapg_env, INSTAPG_UNCLAIMED_STORAGE_MB=1)
    _enforce()
    service = context.get()
    too_small = Plan("tiny", storage_mb=1, connections=5, statement_timeout_s=1, lifetime_s=None,
                     idle_in_transaction_s=1, temp_file_limit_mb=1)  # fmt: skip
    assert quotas.unlock_if_fits(service, _record(body["id"]), too_small) is False
    assert login_sqlstate(body["connection_string"]) == "28000"
    assert quotas.unlock_if_fits(service, _record(body["id"]), service.settings.plan(FREE_PLAN)) is True
    with psycopg.connect(body["connection_string"]) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)
    assert _record(body["id"]).locked_reason is None


def test_unlock_if_fits_on_an_unlocked_database_is_a_no_op(client):
    from chalicelib import context, quotas
    from chalicelib.settings import FREE_PLAN

    body = _create(client)
    service = context.get()
    assert quotas.unlock_if_fits(service, _record(body["id"]), service.settings.plan(FREE_PLAN)) is True


def test_a_raised_limit_unlocks_on_the_next_pass(client, instapg_env):
    body = _create(client)
    _settings(instapg_env, INSTAPG_UNCLAIMED_STORAGE_MB=1)
    assert _enforce()["locked"] == [body["id"]]
    _settings(instapg_env, INSTAPG_UNCLAIMED_STORAGE_MB=100)
    assert _enforce()["unlocked"] == [body["id"]]
    with psycopg.connect(body["connection_string"]) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)


def test_query_longer_than_the_plan_is_ended_even_if_the_tenant_lifts_statement_timeout(client, instapg_env, pg):
    _settings(instapg_env, INSTAPG_UNCLAIMED_STATEMENT_TIMEOUT_SECONDS=1)
    body = _create(client)
    errors: list[BaseException] = []
    busy = psycopg.connect(body["connection_string"], autocommit=True)
    idle = psycopg.connect(body["connection_string"], autocommit=True)
    busy.execute("SET statement_timeout = 0")  # the role default is no enforcement

    def run() -> None:
        try:
            busy.execute("SELECT pg_sleep(30)")
        except psycopg.Error as exc:
            errors.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    time.sleep(2)
    summary = _enforce()
    thread.join(timeout=10)
    assert not thread.is_alive()
    assert summary["terminated"] == 1
    assert errors and errors[0].sqlstate == "57P01"  # admin_shutdown
    # An idle session (not in a transaction) is left alone.
    assert idle.execute("SELECT 1").fetchone() == (1,)
    busy.close()
    idle.close()


def test_idle_in_transaction_past_the_limit_is_ended(client, instapg_env, pg):
    _settings(instapg_env, INSTAPG_UNCLAIMED_IDLE_IN_TRANSACTION_SECONDS=1)
    body = _create(client)
    conn = psycopg.connect(body["connection_string"])
    conn.execute("SET idle_in_transaction_session_timeout = 0")  # the tenant lifts the default
    conn.execute("SELECT 1")  # psycopg opened a transaction; it now sits idle in it
    pid = conn.info.backend_pid
    time.sleep(1.5)
    assert _enforce()["terminated"] == 1
    assert not _pid_alive(pg, pid)
    conn.close()


def test_role_defaults_carry_the_plan_limits(client, pg):
    body = _create(client)
    role = psycopg.conninfo.conninfo_to_dict(body["connection_string"])["user"]
    with psycopg.connect(pg.superuser_dsn) as conn:
        row = conn.execute(
            "SELECT s.setconfig, r.rolconnlimit FROM pg_db_role_setting s JOIN pg_roles r ON r.oid = s.setrole "
            "WHERE r.rolname = %s",
            (role,),
        ).fetchone()
    config, connlimit = row
    assert "statement_timeout=300s" in config
    assert "idle_in_transaction_session_timeout=60s" in config
    assert connlimit == 5


def test_temp_file_limit_is_skipped_without_privilege_and_set_with_it(client, pg, caplog):
    import logging

    def settings_of(body) -> list[str]:
        role = psycopg.conninfo.conninfo_to_dict(body["connection_string"])["user"]
        with psycopg.connect(pg.superuser_dsn) as conn:
            return conn.execute(
                "SELECT s.setconfig FROM pg_db_role_setting s JOIN pg_roles r ON r.oid = s.setrole "
                "WHERE r.rolname = %s",
                (role,),
            ).fetchone()[0]

    with caplog.at_level(logging.INFO, logger="chalicelib"):
        plain = _create(client)
    assert not any(s.startswith("temp_file_limit") for s in settings_of(plain))
    assert "temp_file_limit not set" in caplog.text

    with psycopg.connect(pg.superuser_dsn, autocommit=True) as su:
        su.execute(f'GRANT SET ON PARAMETER temp_file_limit TO "{pg.admin_user}"')
    try:
        granted = _create(client)
    finally:
        with psycopg.connect(pg.superuser_dsn, autocommit=True) as su:
            su.execute(f'REVOKE SET ON PARAMETER temp_file_limit FROM "{pg.admin_user}"')
    assert "temp_file_limit=1024MB" in settings_of(granted)
    with psycopg.connect(granted["connection_string"]) as conn:
        assert conn.execute("SHOW temp_file_limit").fetchone() == ("1GB",)
        with pytest.raises(psycopg.Error) as exc:
            conn.execute("SET temp_file_limit = -1")  # superuser-only: the tenant cannot lift it
        assert exc.value.sqlstate == "42501"


def test_enforce_reports_an_unreachable_host_and_goes_on(client, host, service):
    from chalicelib.models import HostRecord

    _create(client)
    host.update(actions=[HostRecord.port.set(1)])
    summary = _enforce()
    assert summary["hosts"] == 0
    assert summary["errors"] and summary["errors"][0].startswith("local-1:")


def test_enforce_stops_at_its_deadline(client):
    from chalicelib import context, quotas
    from chalicelib.clock import Deadline

    _create(client)
    summary = quotas.enforce(context.get(), Deadline.after(-1))
    assert summary["complete"] is False and summary["hosts"] == 0


class _LambdaContext:
    """What Lambda hands a handler; the job reads only its remaining time."""

    def get_remaining_time_in_millis(self) -> int:
        return 60_000


def test_the_scheduled_job_enforces_quotas(client):
    from app import purge

    body = _create(client)
    event = {
        "version": "0",
        "id": "event-1",
        "detail-type": "Scheduled Event",
        "source": "aws.events",
        "account": "123456789012",
        "time": "2026-01-01T00:00:00Z",
        "region": "us-east-2",
        "resources": ["arn:aws:events:us-east-2:123456789012:rule/instapg-purge"],
        "detail": {},
    }
    summary = purge(event, _LambdaContext())["quotas"]
    assert summary["measured"] == 1 and summary["complete"]
    assert _record(body["id"]).size_bytes > 0


def test_apply_plan_gives_an_existing_role_the_claimed_limits(client, service, host, pg):
    from chalicelib import hosts, provisioning
    from chalicelib.settings import FREE_PLAN

    body = _create(client)
    role = psycopg.conninfo.conninfo_to_dict(body["connection_string"])["user"]
    provisioning.apply_plan(hosts.target(host, service.settings), role, service.settings.plan(FREE_PLAN))
    with psycopg.connect(pg.superuser_dsn) as conn:
        config, connlimit = conn.execute(
            "SELECT s.setconfig, r.rolconnlimit FROM pg_db_role_setting s JOIN pg_roles r ON r.oid = s.setrole "
            "WHERE r.rolname = %s",
            (role,),
        ).fetchone()
    assert connlimit == 20
    assert "statement_timeout=3600s" in config and "idle_in_transaction_session_timeout=600s" in config


def test_old_prepared_transactions_are_rolled_back(client, instapg_env, pg):
    """A prepared transaction outlives its session, holds locks and VACUUM's horizon: the job rolls it back."""
    _settings(instapg_env, INSTAPG_UNCLAIMED_IDLE_IN_TRANSACTION_SECONDS=1)
    body = _create(client)
    with psycopg.connect(body["connection_string"], autocommit=True) as conn:
        conn.execute("CREATE TABLE t (x int)")
        conn.execute("BEGIN")
        conn.execute("INSERT INTO t VALUES (1)")
        conn.execute("PREPARE TRANSACTION 'held-forever'")
    time.sleep(1.5)
    summary = _enforce()
    assert summary["rolled_back"] == 1
    with psycopg.connect(pg.superuser_dsn) as su:
        assert su.execute("SELECT count(*) FROM pg_prepared_xacts WHERE gid = 'held-forever'").fetchone() == (0,)
    assert _enforce()["rolled_back"] == 0
