"""Issue 16: structured JSON logs with request ids, and EMF metrics for what the alarms watch."""

from __future__ import annotations

import io
import json
import logging

import pytest

from tests.test_expiry import create, reconfigure


def _emf(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.startswith('{"_aws"')]


def test_metrics_stay_off_stdout_outside_lambda(monkeypatch, capsys):
    from chalicelib import metrics

    monkeypatch.delenv("AWS_LAMBDA_FUNCTION_NAME", raising=False)
    metrics.emit({"Creates": 1})
    assert capsys.readouterr().out == ""  # the CLI's and the local stack's output stay theirs


def test_emf_line_is_what_cloudwatch_extracts():
    from chalicelib import metrics

    out = io.StringIO()
    metrics.emit({"PoolReady": 0, "HostFillPercent": 91.5}, host="rds-1", out=out)
    (line,) = _emf(out.getvalue())
    (directive,) = line["_aws"]["CloudWatchMetrics"]
    assert directive["Namespace"] == "instapg"
    # Per host, and without the dimension: the alarms watch the latter (any host).
    assert directive["Dimensions"] == [["Host"], []]
    assert directive["Metrics"] == [{"Name": "PoolReady", "Unit": "Count"}, {"Name": "HostFillPercent", "Unit": "Percent"}]
    assert (line["PoolReady"], line["HostFillPercent"], line["Host"]) == (0, 91.5, "rds-1")
    assert isinstance(line["_aws"]["Timestamp"], int)


def test_creates_claims_drops_and_host_metrics_are_emitted(client, instapg_env, host, pg, capsys):
    from chalicelib import jobs
    from chalicelib.clock import Deadline
    from tests.conftest import post_json

    instapg_env.setenv("AWS_LAMBDA_FUNCTION_NAME", "instapg-prod")  # EMF goes to stdout only in Lambda
    instapg_env.setenv("INSTAPG_PUBLIC_URL", "https://db.example.com")  # which Lambda requires
    service = reconfigure(instapg_env, INSTAPG_POOL_SIZE=0)
    capsys.readouterr()
    (db,) = create(service)
    lines = _emf(capsys.readouterr().out)
    assert [(m.get("Creates"), m.get("OnDemandCreates"), m.get("PoolTakes")) for m in lines] == [(1, 1, None)]

    signup = post_json(client, "/api/v1/accounts", {"email": "ops@example.com"})
    key = signup.json_body["api_key"]
    capsys.readouterr()
    claimed = client.http.post(
        f"/api/v1/database/{db.record.id}/claim", headers={"Authorization": f"Bearer {key}"}, body=b""
    )
    assert claimed.status_code == 200, claimed.body
    assert [m.get("Claims") for m in _emf(capsys.readouterr().out)] == [1]

    jobs.run(service, Deadline.after(30))
    lines = _emf(capsys.readouterr().out)
    per_host = [m for m in lines if m.get("Host") == host.id]
    assert per_host and per_host[0]["HostFillPercent"] > 0
    assert any("Drops" in m and "Failures" in m for m in lines)


def test_json_logs_carry_the_request_ids_and_merge_summary_lines():
    from chalicelib import logs

    out = io.StringIO()
    logger = logging.getLogger("instapg.test.logs")
    handler = logging.StreamHandler(out)
    handler.setFormatter(logs.JsonFormatter())
    logger.addHandler(handler)
    logger.propagate = False
    logger.setLevel(logging.INFO)
    try:

        class Ctx:
            aws_request_id = "lambda-req-1"

        logs.bind(Ctx(), api_request_id="apigw-req-9")
        logger.warning("host %s unavailable", "rds-1")
        logger.info(json.dumps({"event": "purge", "expired_dropped": 3}))
        logs.bind(None)
        logger.error("later")
    finally:
        logger.removeHandler(handler)
    first, second, third = (json.loads(line) for line in out.getvalue().splitlines())
    assert first["message"] == "host rds-1 unavailable" and first["level"] == "WARNING"
    assert (first["request_id"], first["api_request_id"]) == ("lambda-req-1", "apigw-req-9")
    assert (second["event"], second["expired_dropped"], second["request_id"]) == ("purge", 3, "lambda-req-1")
    assert "request_id" not in third


def test_the_api_binds_each_request_id(client, monkeypatch, capsys):
    """In Lambda (AWS_LAMBDA_FUNCTION_NAME set) every route's log lines are JSON with the invocation's id."""
    from chalicelib import logs

    monkeypatch.setenv("AWS_LAMBDA_FUNCTION_NAME", "instapg-prod")
    monkeypatch.setenv("INSTAPG_PUBLIC_URL", "https://db.example.com")  # which Lambda requires
    root = logging.getLogger()
    handler = logging.StreamHandler(io.StringIO())
    root.addHandler(handler)
    level = root.level
    try:
        response = client.http.get("/api/v1/database/not-a-uuid")
        assert response.status_code == 400
        assert isinstance(handler.formatter, logs.JsonFormatter)
        logger = logging.getLogger("chalicelib.observability_test")
        logger.setLevel(logging.INFO)
        logger.warning("after the request")
        line = json.loads(handler.stream.getvalue().splitlines()[-1])
        assert line["message"] == "after the request" and len(line["request_id"]) == 36
    finally:
        root.removeHandler(handler)
        root.setLevel(level)


def test_the_scheduled_job_hardens_a_host_registered_without_checks(service, host, pg):
    """`tools.ops.hostctl add --no-check` (all a Network=create VPC allows from outside) leaves the REVOKE to the job."""
    import psycopg

    from chalicelib import jobs
    from chalicelib.clock import Deadline

    open_query = (
        "SELECT count(*) FROM pg_database WHERE datname = 'postgres' AND (datacl IS NULL OR EXISTS "
        "(SELECT 1 FROM aclexplode(datacl) a WHERE a.grantee = 0 AND a.privilege_type = 'CONNECT'))"
    )
    from psycopg import sql

    acl_query = (
        "SELECT a.grantee::regrole::text, a.privilege_type FROM pg_database d, aclexplode(d.datacl) a "
        "WHERE d.datname = 'postgres' AND a.grantee <> d.datdba AND a.grantee <> 0"
    )
    with psycopg.connect(pg.superuser_dsn, autocommit=True) as conn:
        owner = conn.execute("SELECT datdba::regrole::text FROM pg_database WHERE datname = 'postgres'").fetchone()[0]
        grants = conn.execute(acl_query).fetchall()  # the admin's own CONNECT, which a change of owner loses
        # As on RDS, where the master user owns `postgres`; and open, as a host never hardened is.
        conn.execute(sql.SQL("ALTER DATABASE postgres OWNER TO {}").format(sql.Identifier(pg.admin_user)))
        conn.execute("GRANT CONNECT ON DATABASE postgres TO PUBLIC")
        assert conn.execute(open_query).fetchone() == (1,)
    service.hardened.clear()
    try:
        jobs.run(service, Deadline.after(30))
        with psycopg.connect(pg.superuser_dsn) as conn:
            assert conn.execute(open_query).fetchone() == (0,)
        assert host.id in service.hardened
        assert jobs.harden_hosts(service, Deadline(float("inf"))) == []  # once per process
    finally:
        with psycopg.connect(pg.superuser_dsn, autocommit=True) as conn:
            conn.execute(sql.SQL("ALTER DATABASE postgres OWNER TO {}").format(sql.Identifier(owner)))
            conn.execute("REVOKE CONNECT, TEMPORARY ON DATABASE postgres FROM PUBLIC")
            for grantee, privilege in grants:
                conn.execute(
                    sql.SQL("GRANT {} ON DATABASE postgres TO {}").format(sql.SQL(privilege), sql.Identifier(grantee))
                )
            assert sorted(conn.execute(acl_query).fetchall()) == sorted(grants)


@pytest.mark.parametrize("function", ["drop_removed", "purge"])
def test_event_handlers_bind_their_own_invocation_id_in_a_process_that_served_no_request(client, monkeypatch, function):
    """The stream and schedule functions are their own Lambda processes: no HTTP request ever sets
    `app.lambda_context` there, so the logging middleware takes the id from the event's own context."""
    from app import app
    from chalicelib import logs

    monkeypatch.setenv("AWS_LAMBDA_FUNCTION_NAME", f"instapg-prod-{function}")
    monkeypatch.setenv("INSTAPG_PUBLIC_URL", "https://db.example.com")  # which Lambda requires
    monkeypatch.delattr(app, "lambda_context", raising=False)  # as in a fresh stream or schedule process
    root = logging.getLogger()
    handler = logging.StreamHandler(io.StringIO())
    root.addHandler(handler)
    level = root.level
    try:
        if function == "drop_removed":
            event = {"Records": []}
        else:
            event = client.events.generate_cw_event(
                source="aws.events", detail_type="Scheduled Event", detail={}, resources=[]
            )
        client.lambda_.invoke(function, event)
        assert isinstance(handler.formatter, logs.JsonFormatter)
        logging.getLogger("chalicelib.observability_test").warning("after the invocation")
        line = json.loads(handler.stream.getvalue().splitlines()[-1])
        assert line["message"] == "after the invocation" and len(line["request_id"]) == 36
    finally:
        root.removeHandler(handler)
        root.setLevel(level)
