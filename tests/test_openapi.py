"""The OpenAPI document: served, complete, and true to the running API.

`schemathesis run` drives the real local HTTP stack (tools/dev/localserver.py in a
thread, moto in process, the embedded Postgres) from the document, with
schemathesis.toml; hypothesis throws arbitrary bodies at POST /api/v1/database.
"""

from __future__ import annotations

import json
from pathlib import Path

import psycopg
import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from tests.conftest import post_json

ROOT = Path(__file__).resolve().parent.parent
DOCUMENT = ROOT / "chalicelib" / "openapi.yaml"
# Enough to make every create in these tests, so rates are not what they test.
# schemathesis sends many bad keys on purpose: the failed-authentication limit would answer 429 to the rest.
GENEROUS = {
    "INSTAPG_CREATES_PER_MINUTE": "100000",
    "INSTAPG_CREATES_PER_DAY": "100000",
    "INSTAPG_AUTH_FAILURES_PER_HOUR": "100000",
}


def _document() -> dict:
    return yaml.safe_load(DOCUMENT.read_text())


def test_root_openapi_yaml_is_the_packaged_document():
    # chalicelib/ ships to Lambda; the repo root's copy is a symlink to it.
    assert (ROOT / "openapi.yaml").resolve() == DOCUMENT.resolve()


def test_document_is_served(client):
    response = client.http.get("/api/v1/openapi.yaml")
    assert response.status_code == 200
    assert response.headers["Content-Type"] == "application/yaml"
    assert yaml.safe_load(response.body) == _document()


def test_every_route_is_documented_and_every_documented_route_exists():
    from app import app

    routes = {(path, method.lower()) for path, methods in app.routes.items() for method in methods}
    documented = {
        (path, method)
        for path, item in _document()["paths"].items()
        for method in item
        if method in {"get", "post", "put", "patch", "delete"}
    }
    assert routes == documented


def test_every_operation_documents_its_errors():
    document = _document()

    def resolved(response: dict) -> dict:
        ref = response.get("$ref")
        return document["components"]["responses"][ref.rsplit("/", 1)[1]] if ref else response

    for path, item in document["paths"].items():
        for method, operation in item.items():
            if method == "parameters" or path in ("/healthz", "/api/v1/openapi.yaml"):
                continue
            if not path.startswith(("/api/", "/admin/api/")):  # the pages: HTML, their forms url-encoded
                # ... but for the 415 that Chalice sends before the page is built, the cross-site
                # 403 (chalicelib.web, before any route) and redirects, which have no body.
                before_page = ("415", "3")
                pages = [
                    resolved(r).get("content", {})
                    for s, r in operation["responses"].items()
                    if not s.startswith(before_page) and r != {"$ref": "#/components/responses/Forbidden"}
                ]
                assert all("text/html" in content for content in pages), (method, path)
                if method == "post":
                    assert "application/json" in resolved(operation["responses"]["415"])["content"], path
                continue
            assert "400" in operation["responses"], (method, path)
            if method == "post":  # every body is described
                assert operation["requestBody"]["content"]["application/json"]["schema"], (method, path)


def test_the_documents_patterns_are_the_ones_the_code_checks():
    from chalicelib import accounts, schemas

    document = _document()
    create = document["components"]["schemas"]["CreateDatabase"]["properties"]
    assert create["ref"]["pattern"] == schemas.REF_PATTERN
    assert create["ref"]["maxLength"] == schemas.MAX_REF_LENGTH
    assert create["region"]["pattern"] == schemas.REGION_PATTERN
    referrer = document["components"]["parameters"]["Referrer"]["schema"]
    assert (referrer["pattern"], referrer["maxLength"]) == (schemas.REF_PATTERN, schemas.MAX_REF_LENGTH)
    for email in (
        document["components"]["schemas"]["CreateAccount"]["properties"]["email"],
        document["paths"]["/claim/{database_id}/account"]["post"]["requestBody"]["content"][
            "application/x-www-form-urlencoded"
        ]["schema"]["properties"]["email"],
    ):
        assert (email["pattern"], email["maxLength"]) == (accounts.EMAIL_PATTERN, accounts.MAX_EMAIL_LENGTH)


# -- schemathesis against the local HTTP stack ---------------------------------------

# Examples per operation in the fuzzing phase; the coverage phase adds the
# cases the schema implies (boundaries, missing and wrong-typed values).
SCHEMATHESIS_EXAMPLES = 5


def test_schemathesis_finds_no_server_error_and_no_contract_failure(host, instapg_env):
    """`schemathesis run` with every default check, schemathesis.toml and its hooks.

    It drives tools/dev/localserver.py (what `make dev` serves) in this process;
    moto is in process too, so the CLI runs as a subprocess against it.
    """
    import os
    import subprocess
    import sys

    from chalicelib import context
    from tests import localhttp

    for name, value in GENEROUS.items():
        instapg_env.setenv(name, value)
    context.reset()
    with localhttp.serving() as port:
        signup = localhttp.request(port, "POST", "/api/v1/accounts", json.dumps({"email": "st@example.com"}))
        key = signup.json["api_key"]
        command = [
            str(Path(sys.executable).with_name("schemathesis")),
            "run",
            str(DOCUMENT),
            f"--url=http://127.0.0.1:{port}",
            f"--header=Authorization: Bearer {key}",
            f"--max-examples={SCHEMATHESIS_EXAMPLES}",
            "--phases=examples,coverage,fuzzing,stateful",
            "--generation-deterministic",
            "--seed=12",
            "--request-timeout=30",
            "--workers=1",
        ]
        env = {**os.environ, "PYTHONPATH": str(ROOT), "NO_COLOR": "1"}
        run = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    report = run.stdout[-20000:] + run.stderr[-5000:]
    assert run.returncode == 0, report
    assert "Unsupported regex" not in report, report  # a pattern schemathesis drops is a pattern never tested


# -- hypothesis: arbitrary bodies ------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=10,
)
bodies = st.one_of(
    json_values.map(json.dumps),
    st.fixed_dictionaries(
        {},
        optional={
            "ref": st.one_of(st.text(max_size=140), json_values),
            "enable_logical_replication": json_values,
        },
    ).map(json.dumps),
    st.binary(max_size=64),
)


def test_arbitrary_bodies_never_500_and_never_leave_a_database_without_a_record(client, instapg_env, pg):
    from chalicelib import context
    from chalicelib.models import DatabaseRecord

    for name, value in GENEROUS.items():
        instapg_env.setenv(name, value)
    context.reset()
    statuses: list[int] = []

    @given(body=bodies)
    @example(body='{"ref": "x"}')  # a valid create is among the bodies, whatever the draw
    @settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
    def post(body):
        response = post_json(client, "/api/v1/database", body)
        statuses.append(response.status_code)
        assert response.status_code in (201, 400, 413), response.json_body
        assert set(response.json_body) >= ({"id", "connection_string"} if response.status_code == 201 else {"error"})

    post()
    assert 201 in statuses and 400 in statuses  # both paths were exercised
    prefix = context.get().settings.name_prefix + "_"
    with psycopg.connect(pg.superuser_dsn) as conn:
        on_host = {
            row[0] for row in conn.execute("SELECT datname FROM pg_database WHERE starts_with(datname, %s)", (prefix,))
        }
    recorded = {record.db_name for record in DatabaseRecord.scan() if record.status == "UNCLAIMED"}
    assert on_host == recorded
    assert len(on_host) == statuses.count(201)
