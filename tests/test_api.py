"""The public API of issue 2: create, create with a client-chosen id, get, errors."""

from __future__ import annotations

import re
import uuid

import psycopg
import pytest

from tests.conftest import post_json

ISO = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")


def test_create_returns_a_working_database(client):
    response = post_json(client, "/api/v1/database", {"ref": "my-app"})
    assert response.status_code == 201
    body = response.json_body
    assert uuid.UUID(body["id"]).version == 7
    assert body["status"] == "UNCLAIMED"
    assert body["claim_url"].endswith(f"/claim/{body['id']}")
    assert body["limits"] == {"storage_mb": 100, "connections": 5}
    for key in ("expires_at", "created_at", "updated_at"):
        assert ISO.match(body[key]), body[key]
    # No pooler configured: both strings are the direct one.
    assert body["connection_string"] == body["direct_connection_string"]
    with psycopg.connect(body["connection_string"]) as conn:
        conn.execute("CREATE TABLE notes (id serial PRIMARY KEY, body text)")
        conn.execute("INSERT INTO notes (body) VALUES ('hello')")
        assert conn.execute("SELECT body FROM notes").fetchone() == ("hello",)


def test_expiry_is_72_hours_after_creation(client):
    from datetime import datetime, timedelta

    body = post_json(client, "/api/v1/database", {"ref": "t"}).json_body
    created = datetime.strptime(body["created_at"], "%Y-%m-%dT%H:%M:%S.%fZ")
    expires = datetime.strptime(body["expires_at"], "%Y-%m-%dT%H:%M:%S.%fZ")
    assert abs((expires - created) - timedelta(hours=72)) < timedelta(seconds=5)


def test_get_returns_the_same_database(client):
    created = post_json(client, "/api/v1/database", {"ref": "my-app"}).json_body
    response = client.http.get(f"/api/v1/database/{created['id']}")
    assert response.status_code == 200
    assert response.json_body["connection_string"] == created["connection_string"]
    assert response.json_body["id"] == created["id"]


def test_form_content_type_is_read_as_json(client):
    # `curl -d '{"ref":"x"}'` without -H sends application/x-www-form-urlencoded.
    response = client.http.post(
        "/api/v1/database", body='{"ref":"curl"}', headers={"Content-Type": "application/x-www-form-urlencoded"}
    )
    assert response.status_code == 201


def test_client_chosen_id_is_idempotent(client, pg):
    database_id = str(uuid.uuid4())
    first = post_json(client, f"/api/v1/database/{database_id}?referrer=get-db", {"enable_logical_replication": False})
    assert first.status_code == 201
    assert first.json_body["id"] == database_id
    second = post_json(client, f"/api/v1/database/{database_id}?referrer=get-db", {})
    assert second.status_code == 200
    assert second.json_body["connection_string"] == first.json_body["connection_string"]
    role = psycopg.conninfo.conninfo_to_dict(first.json_body["connection_string"])["user"]
    with psycopg.connect(pg.superuser_dsn) as conn:
        assert conn.execute("SELECT count(*) FROM pg_roles WHERE rolname = %s", (role,)).fetchone() == (1,)
        prefix = role.split("_")[0] + "_%"
        assert conn.execute("SELECT count(*) FROM pg_database WHERE datname LIKE %s", (prefix,)).fetchone() == (1,)


def test_client_chosen_id_accepts_ref_in_body(client):
    response = post_json(client, f"/api/v1/database/{uuid.uuid4()}", {"ref": "body-ref"})
    assert response.status_code == 201


def test_unknown_id_is_404(client):
    response = client.http.get(f"/api/v1/database/{uuid.uuid4()}")
    assert response.status_code == 404
    assert response.json_body["error"] == "Database not found"


@pytest.mark.parametrize("path", ["/api/v1/database/not-a-uuid", "/api/v1/database/1234"])
def test_malformed_id_is_400_on_get(client, path):
    response = client.http.get(path)
    assert response.status_code == 400
    assert response.json_body["error"] == "Invalid database id"
    assert response.json_body["hint"]


def test_malformed_id_is_400_on_post(client):
    response = post_json(client, "/api/v1/database/nope?referrer=x", {})
    assert response.status_code == 400
    assert response.json_body["error"] == "Invalid database id"


@pytest.mark.parametrize(
    "body, error",
    [
        ({}, "Missing referrer"),
        ({"ref": ""}, "Missing referrer"),
        ({"ref": "   "}, "Missing referrer"),
        ("", "Missing referrer"),
        ("not json", "Request body is not valid JSON"),
        ("[1, 2]", "Request body must be a JSON object, not an array"),
        ('"ref"', "Request body must be a JSON object, not a string"),
        ({"ref": 5}, "Field 'ref' must be a string, not a number"),
        ({"ref": ["a"]}, "Field 'ref' must be a string, not an array"),
        (
            {"ref": "x", "enable_logical_replication": "yes"},
            "Field 'enable_logical_replication' must be a boolean, not a string",
        ),
        ({"ref": "x" * 200}, "Field 'ref' must be at most 128 printable characters"),
    ],
)
def test_bad_bodies_are_400_with_a_hint(client, body, error):
    response = post_json(client, "/api/v1/database", body)
    assert response.status_code == 400
    assert response.json_body["error"] == error
    assert response.json_body["hint"]


def test_missing_referrer_hint_says_how(client):
    hint = post_json(client, "/api/v1/database", {}).json_body["hint"]
    assert "ref" in hint and "referrer" in hint


def test_body_over_16_kib_is_413(client):
    response = post_json(client, "/api/v1/database", {"ref": "x", "pad": "y" * 17000})
    assert response.status_code == 413
    assert response.json_body["hint"]


def test_logical_replication_unavailable_is_422(client):
    response = post_json(client, "/api/v1/database", {"ref": "x", "enable_logical_replication": True})
    assert response.status_code == 422
    assert "replication" in response.json_body["error"].lower()


def test_wrong_method_and_media_type_are_json(client):
    response = client.http.put("/api/v1/database")
    assert response.status_code == 405
    assert set(response.json_body) == {"error", "hint"}
    response = client.http.post("/api/v1/database", body="<x/>", headers={"Content-Type": "application/xml"})
    assert response.status_code == 415
    assert set(response.json_body) == {"error", "hint"}


def test_no_capacity_is_503(client, host):
    from chalicelib.models import HostRecord

    host.update(actions=[HostRecord.capacity.set(0)])
    response = post_json(client, "/api/v1/database", {"ref": "x"})
    assert response.status_code == 503
    assert response.json_body["error"] == "No capacity"
    assert response.json_body["hint"]


def test_claim_url_uses_configured_public_url(client, instapg_env):
    from chalicelib import context

    instapg_env.setenv("INSTAPG_PUBLIC_URL", "https://db.example.com/")
    context.reset()
    body = post_json(client, "/api/v1/database", {"ref": "x"}).json_body
    assert body["claim_url"] == f"https://db.example.com/claim/{body['id']}"


def test_pooler_endpoint_and_sslmode_shape_the_strings(client, host, service):
    from chalicelib.models import HostRecord

    host.update(actions=[HostRecord.pooler_hostname.set("pooler.internal"), HostRecord.pooler_port.set(6432)])
    service.hosts.invalidate()
    body = post_json(client, "/api/v1/database", {"ref": "x"}).json_body
    assert "@pooler.internal:6432/" in body["connection_string"]
    assert "@127.0.0.1:" in body["direct_connection_string"]
    assert body["connection_string"].endswith("?sslmode=disable")


def test_healthz_ok(client):
    response = client.http.get("/healthz")
    assert response.status_code == 200
    assert response.json_body["ok"] is True


def test_healthz_503_when_no_host_answers(client, host, service):
    from chalicelib.models import HostRecord

    host.update(actions=[HostRecord.port.set(1)])
    service.hosts.invalidate()
    response = client.http.get("/healthz")
    assert response.status_code == 503
    assert response.json_body["ok"] is False
    assert response.json_body["hosts"] == {"local-1": "unavailable"}


def test_dynamodb_outage_is_503_not_500(client, instapg_env):
    from chalicelib import context, models

    # A closed port: every DynamoDB call fails to connect.
    instapg_env.setenv("INSTAPG_DYNAMODB_ENDPOINT", "http://127.0.0.1:9")
    context.reset()
    saved = {m: m.Meta.max_retry_attempts for m in models.MODELS}
    for model in models.MODELS:
        model.Meta.max_retry_attempts = 0
    try:
        response = client.http.get(f"/api/v1/database/{uuid.uuid4()}")
        created = post_json(client, "/api/v1/database", {"ref": "x"})
    finally:
        for model, attempts in saved.items():
            model.Meta.max_retry_attempts = attempts
            model._connection = None
    for r in (response, created):
        assert r.status_code == 503
        assert r.json_body["error"] == "Metadata store unavailable"
