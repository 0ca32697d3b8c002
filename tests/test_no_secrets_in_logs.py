"""No password, admin credential or key-ring material in any log line, or in DynamoDB in plaintext.

Every logger is captured at DEBUG (ours, botocore, pynamodb, psycopg) while a
client walks through every route that exists. Routes added later (claim,
rotate, delete) add a step to STEPS and a secret to `secrets` if they make one.
"""

from __future__ import annotations

import base64
import logging
import time
import uuid
from collections.abc import Callable

import psycopg
import pytest

from tests.conftest import ADMIN_ENV, post_json


class _Capture(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        text = self.format(record)
        if record.exc_info:
            text += logging.Formatter().formatException(record.exc_info)
        self.lines.append(text)


@pytest.fixture
def captured():
    handler = _Capture()
    root = logging.getLogger()
    old_level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    try:
        yield handler
    finally:
        root.removeHandler(handler)
        root.setLevel(old_level)


def _password(body: dict) -> str:
    return psycopg.conninfo.conninfo_to_dict(body["connection_string"])["password"]


def step_create(client, state):
    body = post_json(client, "/api/v1/database", {"ref": "logs"}).json_body
    state["secrets"].append(_password(body))
    state["id"] = body["id"]


def step_create_with_id(client, state):
    body = post_json(client, f"/api/v1/database/{uuid.uuid4()}?referrer=logs", {}).json_body
    state["secrets"].append(_password(body))


def step_idempotent_create_and_replay(client, state):
    for _ in range(2):
        body = post_json(client, "/api/v1/database", {"ref": "logs"}, {"Idempotency-Key": "k"}).json_body
    state["secrets"].append(_password(body))


def step_get(client, state):
    assert client.http.get(f"/api/v1/database/{state['id']}").status_code == 200


def step_errors(client, state):
    post_json(client, "/api/v1/database", "{not json")
    client.http.get("/api/v1/database/not-a-uuid")
    client.http.get(f"/api/v1/database/{uuid.uuid4()}")


def step_lock_and_unlock(client, state):
    from chalicelib import quotas, services

    state["env"].setenv("INSTAPG_UNCLAIMED_STORAGE_MB", "1")
    services.reset()
    assert quotas.enforce(services.databases(), time.time() + 30)["locked"]
    state["env"].setenv("INSTAPG_UNCLAIMED_STORAGE_MB", "100")
    services.reset()
    assert quotas.enforce(services.databases(), time.time() + 30)["unlocked"]


def step_health_and_openapi(client, state):
    assert client.http.get("/healthz").status_code == 200
    assert client.http.get("/api/v1/openapi.yaml").status_code == 200


STEPS: list[Callable] = [
    step_create,
    step_create_with_id,
    step_idempotent_create_and_replay,
    step_get,
    step_errors,
    step_lock_and_unlock,
    step_health_and_openapi,
]


def test_no_secret_in_logs_or_in_dynamodb(client, instapg_env, pg, captured):
    import os

    from chalicelib.models import MODELS

    state = {"secrets": [], "env": instapg_env}
    for step in STEPS:
        step(client, state)
    assert len(state["secrets"]) == 3

    keyring = os.environ["INSTAPG_KEYRING"]
    key_b64 = keyring.split(":", 1)[1]
    forbidden = [
        *state["secrets"],
        pg.admin_password,
        os.environ[ADMIN_ENV],
        keyring,
        key_b64,
        base64.b64decode(key_b64).hex(),
    ]
    logs = "\n".join(captured.lines)
    assert len(captured.lines) > 50  # DEBUG capture really happened (botocore alone logs plenty)
    for secret in forbidden:
        assert secret not in logs

    items = repr([item.attribute_values for model in MODELS for item in model.scan()])
    for secret in forbidden:
        assert secret not in items
