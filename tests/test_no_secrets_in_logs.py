"""No password, admin credential or key-ring material in any log line, or in DynamoDB in plaintext.

Every logger is captured at DEBUG (ours, botocore, pynamodb, psycopg) while a
client walks through every route the app has. Each step names the routes it
exercises; a test fails when a route of `app.routes` has no step, so a new route
is covered without anyone having to remember. A step that makes a secret adds
it to `secrets`.
"""

from __future__ import annotations

import base64
import logging
import re
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


STEPS: list[Callable] = []


def step(*routes: str):
    """Register a step and the routes (`METHOD /path` as in app.routes) it exercises."""

    def register(fn: Callable) -> Callable:
        fn.routes = set(routes)
        STEPS.append(fn)
        return fn

    return register


def _bearer(state) -> dict:
    return {"Authorization": f"Bearer {state['api_key']}"}


@step("POST /api/v1/database")
def step_create(client, state):
    body = post_json(client, "/api/v1/database", {"ref": "logs"}).json_body
    state["secrets"].append(_password(body))
    state["id"] = body["id"]


@step("POST /api/v1/database/{database_id}")
def step_create_with_id(client, state):
    body = post_json(client, f"/api/v1/database/{uuid.uuid4()}?referrer=logs", {}).json_body
    state["secrets"].append(_password(body))


@step()
def step_idempotent_create_and_replay(client, state):
    for _ in range(2):
        body = post_json(client, "/api/v1/database", {"ref": "logs"}, {"Idempotency-Key": "k"}).json_body
    state["secrets"].append(_password(body))


@step("GET /api/v1/database/{database_id}")
def step_get(client, state):
    assert client.http.get(f"/api/v1/database/{state['id']}").status_code == 200


@step()
def step_errors(client, state):
    post_json(client, "/api/v1/database", "{not json")
    client.http.get("/api/v1/database/not-a-uuid")
    client.http.get(f"/api/v1/database/{uuid.uuid4()}")


@step("POST /api/v1/accounts", "GET /api/v1/account")
def step_account(client, state):
    response = post_json(client, "/api/v1/accounts", {"email": "logs@example.com"})
    assert response.status_code == 201
    state["api_key"] = response.json_body["api_key"]
    state["secrets"].append(state["api_key"])
    assert client.http.get("/api/v1/account", headers=_bearer(state)).status_code == 200


@step("GET /claim/{database_id}", "GET /database/{database_id}", "POST /claim/{database_id}")
def step_claim_page(client, state):
    from urllib.parse import urlencode

    body = post_json(client, "/api/v1/database", {"ref": "logs"}).json_body
    state["secrets"].append(_password(body))
    assert client.http.get(f"/claim/{body['id']}").status_code == 200
    assert client.http.get(f"/database/{body['id']}").status_code == 200
    form = urlencode({"api_key": state["api_key"]})
    headers = {"Content-Type": "application/x-www-form-urlencoded"}
    assert client.http.post(f"/claim/{body['id']}", body=form, headers=headers).status_code == 200


@step("GET /", "POST /new", "GET /database")
def step_landing_page(client, state):
    from html import unescape

    assert client.http.get("/").status_code == 200
    headers = {"Content-Type": "application/x-www-form-urlencoded", "Sec-Fetch-Site": "same-origin"}
    page = client.http.post("/new", body="ref=logs&idempotency_key=logs-1", headers=headers)
    assert page.status_code == 201
    text = unescape(page.body.decode())
    state["secrets"].append(re.search(r"ipgc_[A-Za-z0-9_-]+", text).group())  # the creator token
    url = re.search(r'<pre id="direct-url"[^>]*>([^<]+)</pre>', text).group(1)
    state["secrets"].append(psycopg.conninfo.conninfo_to_dict(url)["password"])
    database_id = re.search(r'<code id="database-id">([^<]+)</code>', text).group(1)
    assert client.http.get(f"/database?id={database_id}").status_code == 303


@step("POST /claim/{database_id}/account")
def step_claim_page_signup(client, state):
    from urllib.parse import urlencode

    body = post_json(client, "/api/v1/database", {"ref": "logs"}).json_body
    state["secrets"].append(_password(body))
    form = urlencode({"email": "page@example.com"})
    headers = {"Content-Type": "application/x-www-form-urlencoded"}
    page = client.http.post(f"/claim/{body['id']}/account", body=form, headers=headers)
    assert page.status_code == 200
    key = re.search(rb"ipg_[A-Za-z0-9_-]{43}", page.body)
    assert key, "the signup page shows the new key once"
    state["secrets"].append(key.group().decode())


@step(
    "POST /api/v1/database/{database_id}/claim",
    "GET /api/v1/databases",
    "GET /api/v1/databases/{database_id}",
    "GET /api/v1/databases/{database_id}/connection-string",
    "POST /api/v1/databases/{database_id}/rotate-password",
    "POST /api/v1/databases/{database_id}/copies",
    "POST /api/v1/databases/{database_id}/reset",
    "GET /api/v1/databases/{database_id}/audit",
    "DELETE /api/v1/databases/{database_id}",
)
def step_owner(client, state):
    database_id, auth = state["id"], _bearer(state)
    assert client.http.post(f"/api/v1/database/{database_id}/claim", headers=auth).status_code == 200
    assert client.http.get("/api/v1/databases", headers=auth).status_code == 200
    assert client.http.get(f"/api/v1/databases/{database_id}", headers=auth).status_code == 200
    response = client.http.get(f"/api/v1/databases/{database_id}/connection-string", headers=auth)
    assert response.status_code == 200
    response = client.http.post(f"/api/v1/databases/{database_id}/rotate-password", headers=auth)
    assert response.status_code == 200
    state["secrets"].append(_password(response.json_body))
    copy = client.http.post(f"/api/v1/databases/{database_id}/copies", headers=auth)
    assert copy.status_code == 201
    state["secrets"].append(_password(copy.json_body))
    assert client.http.post(f"/api/v1/databases/{copy.json_body['id']}/reset", headers=auth).status_code == 200
    assert client.http.get(f"/api/v1/databases/{database_id}/audit", headers=auth).status_code == 200
    assert client.http.delete(f"/api/v1/databases/{database_id}", headers=auth).status_code == 204


@step("DELETE /api/v1/database/{database_id}", "POST /api/v1/database/{database_id}/extend")
def step_creator(client, state):
    body = post_json(client, "/api/v1/database", {"ref": "logs"}).json_body
    state["secrets"] += [_password(body), body["creator_token"]]
    assert client.http.post(f"/api/v1/database/{body['id']}/extend").status_code == 409
    wrong = {"Authorization": "Bearer ipgc_" + "x" * 43}
    assert client.http.delete(f"/api/v1/database/{body['id']}", headers=wrong).status_code == 403
    creator = {"Authorization": f"Bearer {body['creator_token']}"}
    assert client.http.delete(f"/api/v1/database/{body['id']}", headers=creator).status_code == 204


@step("POST /api/v1/account/rotate-key", "GET /api/v1/account/audit", "POST /api/v1/account/revoke-key")
def step_account_keys(client, state):
    response = post_json(client, "/api/v1/account/rotate-key", {"grace_seconds": 60}, _bearer(state))
    assert response.status_code == 201
    state["api_key"] = response.json_body["api_key"]
    state["secrets"].append(state["api_key"])
    assert client.http.get("/api/v1/account/audit", headers=_bearer(state)).status_code == 200
    assert client.http.post("/api/v1/account/revoke-key", headers=_bearer(state)).status_code == 204


@step()
def step_lock_and_unlock(client, state):
    from chalicelib import context, quotas
    from chalicelib.clock import Deadline

    state["env"].setenv("INSTAPG_UNCLAIMED_STORAGE_MB", "1")
    context.reset()
    assert quotas.enforce(context.get(), Deadline.after(30))["locked"]
    state["env"].setenv("INSTAPG_UNCLAIMED_STORAGE_MB", "100")
    context.reset()
    assert quotas.enforce(context.get(), Deadline.after(30))["unlocked"]


@step(
    "GET /admin",
    "GET /admin/login",
    "POST /admin/login",
    "POST /admin/logout",
    "GET /admin/databases",
    "GET /admin/databases/{database_id}",
    "POST /admin/databases/{database_id}/action",
    "GET /admin/api/summary",
    "GET /admin/api/databases",
    "GET /admin/api/databases/{database_id}",
    "DELETE /admin/api/databases/{database_id}",
    "POST /admin/api/databases/{database_id}/extend",
    "POST /admin/api/databases/{database_id}/lock",
    "POST /admin/api/databases/{database_id}/unlock",
)
def step_operator(client, state):
    from urllib.parse import urlencode

    from chalicelib import operators

    key = operators.create("logs").key
    body = post_json(client, "/api/v1/database", {"ref": "logs-admin"}).json_body
    state["secrets"] += [key, _password(body), body["creator_token"]]
    database_id, auth = body["id"], {"Authorization": f"Bearer {key}"}
    form = {"Content-Type": "application/x-www-form-urlencoded"}
    assert client.http.get("/admin/login").status_code == 200
    assert (
        client.http.post("/admin/login", body=urlencode({"key": "ipgo_" + "y" * 43}), headers=form).status_code == 401
    )
    login = client.http.post("/admin/login", body=urlencode({"key": key}), headers=form)
    cookie = login.headers["Set-Cookie"].split(";")[0]
    state["secrets"].append(cookie.split("=", 1)[1])
    jar = {"Cookie": cookie}
    assert client.http.get("/admin", headers=jar).status_code == 200
    assert client.http.get("/admin/databases?ref=logs", headers=jar).status_code == 200
    page = client.http.get(f"/admin/databases/{database_id}", headers=jar).body.decode()
    token = re.search(r'name="csrf" value="([^"]+)"', page).group(1)
    action = urlencode({"csrf": token, "action": "extend", "hours": "1"})
    assert (
        client.http.post(f"/admin/databases/{database_id}/action", body=action, headers={**form, **jar}).status_code
        == 303
    )
    assert client.http.get("/admin/api/summary", headers=auth).status_code == 200
    assert client.http.get("/admin/api/databases", headers=auth).status_code == 200
    assert client.http.get(f"/admin/api/databases/{database_id}", headers=auth).status_code == 200
    assert post_json(client, f"/admin/api/databases/{database_id}/extend", {"hours": 2}, auth).status_code == 200
    assert client.http.post(f"/admin/api/databases/{database_id}/lock", headers=auth).status_code == 200
    assert client.http.post(f"/admin/api/databases/{database_id}/unlock", headers=auth).status_code == 200
    assert client.http.delete(f"/admin/api/databases/{database_id}", headers=auth).status_code == 204
    logout = urlencode({"csrf": token})
    assert client.http.post("/admin/logout", body=logout, headers={**form, **jar}).status_code == 303


@step("GET /healthz", "GET /api/v1/openapi.yaml")
def step_health_and_openapi(client, state):
    assert client.http.get("/healthz").status_code == 200
    assert client.http.get("/api/v1/openapi.yaml").status_code == 200


def test_every_route_has_a_step():
    from app import app

    routes = {f"{method} {path}" for path, entries in app.routes.items() for method in entries}
    covered = set().union(*(fn.routes for fn in STEPS))
    assert routes - covered == set(), "routes no step of this test exercises: add one"
    assert covered - routes == set(), "steps name routes the app does not have"


def test_no_secret_in_logs_or_in_dynamodb(client, instapg_env, pg, captured):
    import os

    from chalicelib.models import MODELS

    state = {"secrets": [], "env": instapg_env}
    for step in STEPS:
        step(client, state)
    assert len(state["secrets"]) == 18

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
