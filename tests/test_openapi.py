"""The OpenAPI document: served, complete, and true to the running API.

schemathesis drives the real local HTTP stack (chalice's local server in a
thread, moto in process, the embedded Postgres) from the document;
hypothesis throws arbitrary bodies at POST /api/v1/database.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

import psycopg
import pytest
import schemathesis
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from tests.conftest import post_json

ROOT = Path(__file__).resolve().parent.parent
DOCUMENT = ROOT / "chalicelib" / "openapi.yaml"
# Enough to make every create in these tests, so rates are not what they test.
GENEROUS = {"INSTAPG_CREATES_PER_MINUTE": "100000", "INSTAPG_CREATES_PER_DAY": "100000"}


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
    for path, item in _document()["paths"].items():
        for method, operation in item.items():
            if method == "parameters" or path in ("/healthz", "/api/v1/openapi.yaml"):
                continue
            assert "400" in operation["responses"], (method, path)
            if method == "post":  # every body is described
                assert operation["requestBody"]["content"]["application/json"]["schema"], (method, path)


# -- schemathesis against the local HTTP stack ---------------------------------------


@pytest.fixture
def local_server(host, instapg_env):
    from chalice.config import Config
    from chalice.local import LocalChalice, LocalDevServer, create_local_server

    from app import app
    from chalicelib import services
    from tools.pgserver import free_port

    for name, value in GENEROUS.items():
        instapg_env.setenv(name, value)
    services.reset()
    original_class = app.__class__
    if isinstance(app, LocalChalice):  # another test's local server swapped the class already
        server = LocalDevServer(app, Config(), "127.0.0.1", free_port())
    else:
        server = create_local_server(app, Config(), "127.0.0.1", free_port())
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.port}"
    finally:
        server.shutdown()
        thread.join(timeout=10)
        server.server.server_close()
        app.__class__ = original_class  # create_local_server swaps the class of the app object


CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
    response_headers_conformance,
]
OPERATIONS = [
    "POST /api/v1/database",
    "POST /api/v1/database/{database_id}",
    "GET /api/v1/database/{database_id}",
    "GET /api/v1/openapi.yaml",
    "GET /healthz",
]


# schemathesis' pytest plugin does not run on pytest 9 (it reads a removed
# private attribute), so each operation's strategy is driven with hypothesis.
@pytest.mark.parametrize("label", OPERATIONS)
def test_api_conforms_to_its_document(local_server, label):
    operation = schemathesis.openapi.from_dict(_document()).find_operation_by_label(label)
    assert operation is not None, label

    @given(case=operation.as_strategy())
    @settings(max_examples=20, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
    def call(case):
        case.call_and_validate(base_url=local_server, checks=CHECKS, timeout=30)

    call()


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
    from chalicelib import services
    from chalicelib.models import DatabaseRecord

    for name, value in GENEROUS.items():
        instapg_env.setenv(name, value)
    services.reset()
    statuses: list[int] = []

    @given(body=bodies)
    @settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
    def post(body):
        response = post_json(client, "/api/v1/database", body)
        statuses.append(response.status_code)
        assert response.status_code in (201, 400, 413), response.json_body
        assert set(response.json_body) >= ({"id", "connection_string"} if response.status_code == 201 else {"error"})

    post()
    assert 201 in statuses and 400 in statuses  # both paths were exercised
    prefix = services.databases().settings.name_prefix + "_"
    with psycopg.connect(pg.superuser_dsn) as conn:
        on_host = {
            row[0] for row in conn.execute("SELECT datname FROM pg_database WHERE starts_with(datname, %s)", (prefix,))
        }
    recorded = {record.db_name for record in DatabaseRecord.scan() if record.status == "UNCLAIMED"}
    assert on_host == recorded
    assert len(on_host) == statuses.count(201)
