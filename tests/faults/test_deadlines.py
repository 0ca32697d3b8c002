"""Issue 12.4: under one fault every API request answers within the request
deadline (10 s), with 503 and Retry-After: a DynamoDB endpoint that accepts and
never answers, a stopped Postgres, a Postgres endpoint that never answers."""

from __future__ import annotations

import json
import time
import uuid
from datetime import UTC, datetime

import pytest

DEADLINE_S = 10


def _timed(call, label: str = ""):
    started = time.monotonic()
    response = call()
    elapsed = time.monotonic() - started
    print(f"figure: {label}: {response.status_code} in {elapsed:.2f} s")
    return response, elapsed


def _assert_503(response, elapsed: float) -> None:
    assert response.status_code == 503, response.body
    assert int(response.headers["Retry-After"]) > 0
    body = json.loads(response.body)
    assert set(body) >= {"error", "hint"} and "Traceback" not in response.body.decode()
    assert elapsed < DEADLINE_S, elapsed


def _post(client, path: str, body=None, headers=None):
    return client.http.post(
        path, body=json.dumps(body or {}), headers={"Content-Type": "application/json", **(headers or {})}
    )


def test_a_hanging_dynamodb_gets_503_with_retry_after_within_the_deadline(instapg_env, hanging_endpoint):
    from chalice.test import Client

    from app import app
    from chalicelib import context

    instapg_env.setenv("INSTAPG_DYNAMODB_ENDPOINT", hanging_endpoint.url)
    context.reset()
    with Client(app) as client:
        for label, call in (
            ("hanging DynamoDB, GET database", lambda: client.http.get(f"/api/v1/database/{uuid.uuid4()}")),
            ("hanging DynamoDB, create", lambda: _post(client, "/api/v1/database", {"ref": "x"})),
            ("hanging DynamoDB, sign up", lambda: _post(client, "/api/v1/accounts", {"email": "a@example.com"})),
        ):
            _assert_503(*_timed(call, label))
    assert hanging_endpoint.accepted  # the requests did reach the endpoint


@pytest.fixture
def api(flaky_host):
    from chalice.test import Client

    from app import app

    with Client(app) as client:
        yield client


def _signup(client) -> dict:
    response = _post(client, "/api/v1/accounts", {"email": "owner@example.com"})
    assert response.status_code == 201
    return {"Authorization": f"Bearer {response.json_body['api_key']}"}


def test_a_stopped_postgres_gets_503_with_retry_after_on_every_route_and_loses_nothing(api, stoppable_pg):
    import psycopg

    key = _signup(api)
    owned = _post(api, "/api/v1/database", {"ref": "owned"}).json_body
    assert _post(api, f"/api/v1/database/{owned['id']}/claim", headers=key).status_code == 200
    pending = _post(api, "/api/v1/database", {"ref": "pending"}).json_body
    with psycopg.connect(owned["connection_string"], connect_timeout=5) as conn:
        conn.execute("CREATE TABLE kept (v text); INSERT INTO kept VALUES ('data')")

    stoppable_pg.stop()
    base = f"/api/v1/databases/{owned['id']}"
    for label, call in (
        ("stopped Postgres, create", lambda: _post(api, "/api/v1/database", {"ref": "new"})),
        ("stopped Postgres, claim", lambda: _post(api, f"/api/v1/database/{pending['id']}/claim", headers=key)),
        ("stopped Postgres, details", lambda: api.http.get(base, headers=key)),
        ("stopped Postgres, rotate", lambda: _post(api, f"{base}/rotate-password", headers=key)),
        ("stopped Postgres, delete", lambda: api.http.delete(base, headers=key)),
    ):
        _assert_503(*_timed(call, label))

    stoppable_pg.start()
    # The claim that got a 503 finishes on retry; the owned database has its data.
    assert _post(api, f"/api/v1/database/{pending['id']}/claim", headers=key).status_code == 200
    # The interrupted delete left the database DELETING: the owner's retry finishes it.
    assert api.http.delete(base, headers=key).status_code in (200, 204)
    with psycopg.connect(pending["connection_string"], connect_timeout=5) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)


def test_a_postgres_that_never_answers_gets_503_within_the_deadline(aws, service, hanging_endpoint, instapg_env):
    from chalice.test import Client

    from app import app
    from chalicelib.models import HostRecord
    from tests.faults.conftest import FLAKY_ADMIN_ENV

    instapg_env.setenv(FLAKY_ADMIN_ENV, json.dumps({"username": "admin", "password": "unused"}))
    HostRecord(
        id="hanging-1",
        hostname="127.0.0.1",
        port=hanging_endpoint.port,
        credentials=f"env:{FLAKY_ADMIN_ENV}",
        capacity=10,
        sslmode="disable",
        created_at=datetime.now(UTC),
    ).save()
    service.hosts.invalidate()
    with Client(app) as client:
        _assert_503(*_timed(lambda: _post(client, "/api/v1/database", {"ref": "x"}), "silent Postgres, create"))
