"""Secrets Manager in production: host admin credentials (RDS rotates them) and the key ring."""

from __future__ import annotations

import json

import psycopg
import pytest
from psycopg import sql

from tests.conftest import post_json


@pytest.fixture
def secrets(aws):
    import boto3

    return boto3.client("secretsmanager", region_name="us-east-2")


@pytest.fixture
def admin_password_restored(pg):
    """Put the session admin's password back whatever the test did to it."""
    yield
    with psycopg.connect(pg.superuser_dsn, autocommit=True) as conn:
        conn.execute(
            sql.SQL("ALTER ROLE {} PASSWORD {}").format(sql.Identifier(pg.admin_user), sql.Literal(pg.admin_password))
        )


def _client():
    from chalice.test import Client

    from app import app

    return Client(app)


def test_create_still_works_after_the_admin_password_is_rotated(service, pg, secrets, admin_password_restored):
    from chalicelib import hosts

    arn = secrets.create_secret(Name="rds!db-test", SecretString=pg.admin_json())["ARN"]
    hosts.register(
        service.settings, "rds-1", pg.host, pg.port, f"secretsmanager:{arn}", capacity=100, sslmode="disable"
    )
    service.hosts.invalidate()
    with _client() as client:
        assert post_json(client, "/api/v1/database", {"ref": "before"}).status_code == 201

        # What RDS's rotation does: a new password on the role and in the secret.
        new_password = "rotated-" + pg.admin_password
        with psycopg.connect(pg.superuser_dsn, autocommit=True) as conn:
            conn.execute(
                sql.SQL("ALTER ROLE {} PASSWORD {}").format(sql.Identifier(pg.admin_user), sql.Literal(new_password))
            )
        secrets.put_secret_value(
            SecretId=arn, SecretString=json.dumps({"username": pg.admin_user, "password": new_password})
        )
        # The cache still holds the old password, which the server now refuses.
        assert service.credentials.get(f"secretsmanager:{arn}").password == pg.admin_password

        response = post_json(client, "/api/v1/database", {"ref": "after"})
        assert response.status_code == 201, response.json_body
        with psycopg.connect(response.json_body["connection_string"]) as conn:
            assert conn.execute("SELECT current_database()").fetchone()[0]
        assert service.credentials.get(f"secretsmanager:{arn}").password == new_password


def test_a_wrong_password_in_the_secret_is_a_503_not_a_retry_loop(service, pg, secrets):
    from chalicelib import hosts

    arn = secrets.create_secret(Name="rds!db-bad", SecretString=pg.admin_json())["ARN"]
    hosts.register(
        service.settings, "rds-1", pg.host, pg.port, f"secretsmanager:{arn}", capacity=100, sslmode="disable"
    )
    service.hosts.invalidate()
    secrets.put_secret_value(SecretId=arn, SecretString=json.dumps({"username": pg.admin_user, "password": "nope"}))
    service.credentials.forget(f"secretsmanager:{arn}")
    with _client() as client:
        response = post_json(client, "/api/v1/database", {"ref": "bad-secret"})
    assert response.status_code == 503, response.json_body
    assert response.json_body["error"] == "Database host unavailable"
    assert "nope" not in json.dumps(response.json_body)


def _use_keyring_secret(instapg_env, secrets, spec: str) -> str:
    from chalicelib import context, models

    arn = secrets.create_secret(Name="instapg-test/keyring", SecretString=spec)["ARN"]
    instapg_env.delenv("INSTAPG_KEYRING")
    instapg_env.setenv("INSTAPG_KEYRING_SECRET_ARN", arn)
    context.reset()
    models.configure(context.get().settings)
    return arn


def test_rotating_the_primary_key_keeps_existing_databases_readable(instapg_env, host, secrets):
    from chalicelib import context
    from chalicelib.models import DatabaseRecord
    from tools.ops import keyringctl

    arn = _use_keyring_secret(instapg_env, secrets, keyringctl.UNINITIALIZED)
    assert keyringctl.rotate(arn, "old", client=secrets) == ["old"]
    context.reset()
    with _client() as client:
        before = post_json(client, "/api/v1/database", {"ref": "before"}).json_body
    assert DatabaseRecord.get(before["id"]).secret_key_id == "old"

    assert keyringctl.rotate(arn, "new", client=secrets) == ["new", "old"]
    context.reset()  # a new Lambda instance
    with _client() as client:
        after = post_json(client, "/api/v1/database", {"ref": "after"}).json_body
        again = client.http.get(f"/api/v1/database/{before['id']}")
    assert DatabaseRecord.get(after["id"]).secret_key_id == "new"
    assert again.status_code == 200
    assert again.json_body["connection_string"] == before["connection_string"]
    for body in (again.json_body, after):
        with psycopg.connect(body["connection_string"]) as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)
    # No key material reached the records in plaintext.
    raw = json.dumps([DatabaseRecord.get(b["id"]).attribute_values for b in (before, after)], default=str)
    assert before["connection_string"].split(":")[2].split("@")[0] not in raw


def test_a_warm_instance_reads_the_secret_again_for_a_key_it_has_not_seen(instapg_env, host, secrets):
    from chalicelib import context, records
    from tools.ops import keyringctl

    arn = _use_keyring_secret(instapg_env, secrets, keyringctl.rotated("", "old"))
    settings = context.settings()
    warm = context.build(settings)
    assert warm.keyring.primary_id == "old"

    keyringctl.rotate(arn, "new", client=secrets)
    fresh = context.build(settings)
    record = records.find(_create(fresh))
    assert record.secret_key_id == "new"
    # The warm instance's cached ring has no "new" yet; decrypting reads the secret again.
    assert records.password(warm, record) == records.password(fresh, record)
    assert warm.keyring.primary_id == "new"


def _create(service) -> str:
    from chalicelib import creation
    from chalicelib.records import Requester
    from chalicelib.schemas import create_database

    return creation.create(service, create_database({"ref": "warm"}), Requester()).record.id


def test_the_rotate_tool_refuses_a_secret_that_is_not_a_key_ring(secrets):
    from tools.ops import keyringctl

    arn = secrets.create_secret(Name="x/keyring", SecretString="not-a-ring")["ARN"]
    with pytest.raises(Exception, match="kid:base64key"):
        keyringctl.rotate(arn, "k2", client=secrets)
    assert secrets.get_secret_value(SecretId=arn)["SecretString"] == "not-a-ring"
