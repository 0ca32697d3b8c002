"""Issue 12, points 6 and 7: bad input gets a clear 4xx JSON answer, never a 500.

Each case runs through chalice.test.Client and over real HTTP through
tools/dev/localserver.py (what `make dev` and the e2e tests serve).
"""

from __future__ import annotations

import http.client
import json
import select
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass

import pytest

from tests import localhttp

JSON = {"Content-Type": "application/json"}


@dataclass
class Reply:
    status: int
    headers: dict[str, str]  # lower-case names
    body: dict


Call = Callable[..., Reply]


@pytest.fixture(params=["client", "local"])
def call(request, host) -> Call:
    """`call(method, path, body=None, headers=None)` through chalice.test.Client or the local server."""
    if request.param == "client":
        from chalice.test import Client

        from app import app

        with Client(app) as client:

            def via_client(method: str, path: str, body=None, headers=None) -> Reply:
                raw = json.dumps(body) if isinstance(body, (dict, list)) else body
                response = client.http.request(method, path, headers=headers or {}, body=raw or b"")
                text = response.body.decode() if isinstance(response.body, bytes) else response.body
                lowered = {k.lower(): v for k, v in response.headers.items()}
                return Reply(response.status_code, lowered, json.loads(text) if text else {})

            yield via_client
        return
    with localhttp.serving() as port:

        def via_http(method: str, path: str, body=None, headers=None) -> Reply:
            raw = json.dumps(body) if isinstance(body, (dict, list)) else body
            answer = localhttp.request(port, method, path, raw, headers)
            lowered = {k.lower(): v for k, v in answer.headers.items()}
            return Reply(answer.status, lowered, json.loads(answer.body) if answer.body else {})

        yield via_http


def _signup(call: Call) -> str:
    reply = call("POST", "/api/v1/accounts", {"email": "bad-input@example.com"}, JSON)
    assert reply.status == 201, reply.body
    return reply.body["api_key"]


def _owned_database(call: Call, key: str) -> str:
    reply = call("POST", "/api/v1/database", {"ref": "bad-input"}, JSON)
    assert reply.status == 201, reply.body
    database_id = reply.body["id"]
    reply = call("POST", f"/api/v1/database/{database_id}/claim", None, {"Authorization": f"Bearer {key}"})
    assert reply.status == 200, reply.body
    return database_id


def _is_error(reply: Reply, status: int) -> None:
    assert reply.status == status, reply.body
    assert reply.headers["content-type"] == "application/json"
    assert set(reply.body) == {"error", "hint"} and reply.body["hint"], reply.body


# -- JSON nested too deep --------------------------------------------------------------------

# The routes that read a JSON body; test_every_body_route_is_covered keeps the list whole.
BODY_ROUTES = [
    "/api/v1/database",
    "/api/v1/database/{database_id}",
    "/api/v1/accounts",
    "/api/v1/database/{database_id}/claim",
    "/api/v1/databases/{database_id}/rotate-password",
    "/api/v1/databases/{database_id}/copies",
    "/api/v1/databases/{database_id}/reset",
    "/api/v1/database/{database_id}/extend",
    "/api/v1/account/rotate-key",
    "/api/v1/account/revoke-key",
]
# The operator's routes: the same bound, behind an operator key (tools.ops.operatorctl).
ADMIN_BODY_ROUTES = [
    "/admin/api/databases/{database_id}/extend",
    "/admin/api/databases/{database_id}/lock",
    "/admin/api/databases/{database_id}/unlock",
]
DEEP_BODIES = {
    "arrays": "[" * 1500 + "]" * 1500,
    "objects": '{"a":' * 1500 + "1" + "}" * 1500,
    "inside_ref": '{"ref": ' + "[" * 2000 + "]" * 2000 + "}",
    "unclosed": "[" * 5000,
}


def test_every_body_route_is_covered():
    from app import app

    json_posts = {
        path
        for path, methods in app.routes.items()
        if "POST" in methods and "application/json" in methods["POST"].content_types
    }
    assert json_posts == set(BODY_ROUTES) | set(ADMIN_BODY_ROUTES)


def test_deeply_nested_json_is_400_on_every_body_route(call):
    key = _signup(call)
    database_id = _owned_database(call, key)
    from chalicelib import operators

    operator = operators.create("bad-input").key
    for route in BODY_ROUTES + ADMIN_BODY_ROUTES:
        bearer = operator if route.startswith("/admin/") else key
        headers = {**JSON, "Authorization": f"Bearer {bearer}"}
        path = route.replace("{database_id}", database_id)
        for shape, body in DEEP_BODIES.items():
            reply = call("POST", path, body, headers)
            _is_error(reply, 400)
            assert reply.body["error"] == "Request body is nested deeper than 32 levels", (route, shape, reply.body)


def test_nesting_within_the_bound_is_parsed(call):
    # 32 levels is accepted by the depth check (the field's type is what is wrong then).
    body = '{"ref": ' + "[" * 31 + "]" * 31 + "}"
    reply = call("POST", "/api/v1/database", body, JSON)
    _is_error(reply, 400)
    assert reply.body["error"] == "Field 'ref' must be a string, not an array"


def test_brackets_inside_strings_do_not_count(call):
    reply = call("POST", "/api/v1/database", {"ref": "[" * 100}, JSON)
    assert reply.status == 201, reply.body


# -- type errors name the field and the type -------------------------------------------------

TYPE_ERRORS = [
    ("/api/v1/accounts", {"email": 5}, "Field 'email' must be a string, not a number"),
    ("/api/v1/accounts", {"email": True}, "Field 'email' must be a string, not a boolean"),
    ("/api/v1/accounts", {"email": ["a@example.com"]}, "Field 'email' must be a string, not an array"),
    ("/api/v1/accounts", {"email": {}}, "Field 'email' must be a string, not an object"),
    ("/api/v1/database", {"ref": 5}, "Field 'ref' must be a string, not a number"),
    ("/api/v1/database", {"ref": None}, "Field 'ref' must be a string, not null"),
    (
        "/api/v1/database",
        {"ref": "x", "enable_logical_replication": "yes"},
        "Field 'enable_logical_replication' must be a boolean, not a string",
    ),
    ("/api/v1/database/{id}", {"ref": {"a": 1}}, "Field 'ref' must be a string, not an object"),
    (
        "/api/v1/database/{id}",
        {"ref": "x", "enable_logical_replication": 1},
        "Field 'enable_logical_replication' must be a boolean, not a number",
    ),
]


def test_type_errors_name_the_field_and_the_expected_type(call):
    for route, body, error in TYPE_ERRORS:
        path = route.replace("{id}", "0190a2b4-6c1e-7d3f-8a9b-0c1d2e3f4a5b")
        reply = call("POST", path, body, JSON)
        _is_error(reply, 400)
        assert reply.body["error"] == error


def test_ref_and_referrer_are_checked_wherever_they_come_from(call):
    cases = [
        ("/api/v1/database", {"ref": "a\u0000b"}, "Field 'ref' must be at most 128 printable characters"),
        ("/api/v1/database", {"ref": "a\ud800"}, "Field 'ref' must be at most 128 printable characters"),
        ("/api/v1/database", {"ref": "x" + " " * 128}, "Field 'ref' must be at most 128 printable characters"),
        ("/api/v1/database?referrer=a%0Ab", {}, "Parameter 'referrer' must be at most 128 printable characters"),
        # A bad ?referrer= is not ignored because the body has a good ref.
        (
            "/api/v1/database?referrer=a%07",
            {"ref": "ok"},
            "Parameter 'referrer' must be at most 128 printable characters",
        ),
        ("/api/v1/database", {"ref": "   "}, "Missing referrer"),
    ]
    for path, body, error in cases:
        reply = call("POST", path, json.dumps(body), JSON)
        _is_error(reply, 400)
        assert reply.body["error"] == error, (path, body)


def test_claim_and_rotate_refuse_a_body_that_is_not_an_object(call):
    key = _signup(call)
    database_id = _owned_database(call, key)
    headers = {**JSON, "Authorization": f"Bearer {key}"}
    for route in ("/api/v1/database/{id}/claim", "/api/v1/databases/{id}/rotate-password"):
        path = route.replace("{id}", database_id)
        for body, kind in (("null", "null"), ("[]", "an array"), ('"x"', "a string"), ("5", "a number")):
            reply = call("POST", path, body, headers)
            _is_error(reply, 400)
            assert reply.body["error"] == f"Request body must be a JSON object, not {kind}"
        assert call("POST", path, "{}", headers).status == 200  # an object, its fields ignored
        assert call("POST", path, None, headers).status == 200  # or no body at all


# -- Idempotency-Key bound to its request -----------------------------------------------------


def test_idempotency_key_reused_with_another_body_is_422_naming_the_key(call):
    headers = {**JSON, "Idempotency-Key": "order-7"}
    first = call("POST", "/api/v1/database", {"ref": "shop"}, headers)
    assert first.status == 201, first.body
    again = call("POST", "/api/v1/database", {"enable_logical_replication": False, "ref": "shop"}, headers)
    assert again.status == 200 and again.body["id"] == first.body["id"]  # same request, other spelling
    for other in ({"ref": "blog"}, {"ref": "shop", "enable_logical_replication": True}):
        reply = call("POST", "/api/v1/database", other, headers)
        _is_error(reply, 422)
        assert "'order-7'" in reply.body["error"]
    # ... and the key still means its first database.
    assert call("POST", "/api/v1/database", {"ref": "shop"}, headers).body["id"] == first.body["id"]


def test_idempotency_key_with_ref_as_referrer_is_the_same_request(call):
    headers = {**JSON, "Idempotency-Key": "k1"}
    first = call("POST", "/api/v1/database?referrer=get-db", {}, headers)
    assert first.status == 201
    again = call("POST", "/api/v1/database", {"ref": "get-db"}, headers)
    assert again.status == 200 and again.body["id"] == first.body["id"]
    _is_error(call("POST", "/api/v1/database?referrer=other", {}, headers), 422)


def test_a_key_whose_first_create_made_nothing_is_free_for_another_request(client, host):
    from chalicelib.models import HostRecord
    from tests.conftest import post_json

    headers = {"Idempotency-Key": "retry-me"}
    host.update(actions=[HostRecord.capacity.set(0)])
    assert post_json(client, "/api/v1/database", {"ref": "first"}, headers).status_code == 503
    host.update(actions=[HostRecord.capacity.set(1000)])
    second = post_json(client, "/api/v1/database", {"ref": "second"}, headers)
    assert second.status_code == 201, second.json_body
    # From now on the key belongs to the second request.
    assert post_json(client, "/api/v1/database", {"ref": "second"}, headers).json_body["id"] == second.json_body["id"]
    assert post_json(client, "/api/v1/database", {"ref": "first"}, headers).status_code == 422


# -- The local server: methods, slow bodies, per-address budgets ---------------------------


@pytest.fixture
def port(host):
    with localhttp.serving() as port:
        yield port


def test_unknown_methods_are_405_json_with_allow(port):
    for method in ("TRACE", "CONNECT", "PROPFIND", "BREW"):
        for path, allow in (("/api/v1/database", "POST"), ("/healthz", "GET"), ("/nope", "")):
            answer = localhttp.request(port, method, path)
            assert answer.status == 405, (method, path)
            assert answer.headers["Content-Type"] == "application/json"
            assert answer.headers["Allow"] == allow, (method, path)
            assert set(answer.json) == {"error", "hint"}
    # A body sent with one is read and dropped: the connection stays usable.
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request("TRACE", "/healthz", body=b"x" * 1000)
    assert conn.getresponse().read() and conn.sock is not None
    conn.request("GET", "/api/v1/openapi.yaml")
    assert conn.getresponse().status == 200
    conn.close()


def test_a_request_the_http_layer_refuses_is_answered_in_json(port):
    headers = "".join(f"X-{i}: {i}\r\n" for i in range(101))  # http.server reads at most 100
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(f"GET /healthz HTTP/1.1\r\nHost: x\r\n{headers}\r\n".encode())
        head, body = _read_answer(sock)
    assert head.startswith(b"HTTP/1.1 431"), head
    assert b"Content-Type: application/json" in head
    assert set(body) == {"error", "hint"}


@pytest.fixture
def short_timeout(monkeypatch):
    from tools.dev import localserver

    monkeypatch.setattr(localserver, "READ_TIMEOUT_S", 1.0)
    monkeypatch.setattr(localserver.InstapgRequestHandler, "timeout", 1.0)
    return 1.0


def _post_head(length: int) -> bytes:
    return (
        f"POST /api/v1/database HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"Content-Length: {length}\r\n\r\n"
    ).encode()


def _read_answer(sock: socket.socket) -> tuple[bytes, dict]:
    raw = sock.makefile("rb").read()  # the server closes the connection after a timeout
    head, _, body = raw.partition(b"\r\n\r\n")
    return head, json.loads(body)


def test_a_body_that_never_finishes_is_408_within_the_read_timeout(port, short_timeout):
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        started = time.monotonic()
        sock.sendall(_post_head(100) + b'{"ref": "')
        head, body = _read_answer(sock)
        waited = time.monotonic() - started
    assert head.startswith(b"HTTP/1.1 408"), head
    assert body["error"] == "Request body timed out" and body["hint"]
    assert short_timeout <= waited < short_timeout + 5


def test_a_body_dribbled_byte_by_byte_is_cut_off_at_the_deadline(port, short_timeout):
    # A byte every 0.3 s keeps each read well within the 1 s per-read timeout:
    # only a deadline for the whole body ends this. Sends stop once the answer
    # is there (a byte the server never reads would make its close a reset).
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        started = time.monotonic()
        sock.sendall(_post_head(1000))
        while time.monotonic() - started < 6 * short_timeout:
            if select.select([sock], [], [], 0.3)[0]:
                break
            sock.sendall(b" ")
        waited = time.monotonic() - started
        head, body = _read_answer(sock)
    assert head.startswith(b"HTTP/1.1 408"), head
    assert body["error"] == "Request body timed out"
    assert waited < 4 * short_timeout  # a per-read timeout alone would wait past 6


def test_a_slow_client_does_not_hold_up_another(port, short_timeout):
    with socket.create_connection(("127.0.0.1", port), timeout=30) as stuck:
        stuck.sendall(_post_head(100))
        answer = localhttp.request(port, "GET", "/api/v1/openapi.yaml")
        assert answer.status == 200


def test_oversized_and_malformed_content_length_are_refused_unread(port):
    for length, status in (("20000000", 413), ("12abc", 400), ("-1", 400)):
        with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
            sock.sendall(f"POST /api/v1/database HTTP/1.1\r\nHost: x\r\nContent-Length: {length}\r\n\r\n".encode())
            head, body = _read_answer(sock)
        assert head.startswith(f"HTTP/1.1 {status}".encode()), head
        assert set(body) == {"error", "hint"}


def test_each_peer_address_has_its_own_rate_budget(host, instapg_env):
    from chalicelib import context

    instapg_env.setenv("INSTAPG_CREATES_PER_MINUTE", "2")
    context.reset()
    with localhttp.serving() as port:

        def create(source: str, headers: dict | None = None) -> int:
            body = json.dumps({"ref": "rate"})
            return localhttp.request(port, "POST", "/api/v1/database", body, {**JSON, **(headers or {})}, source).status

        assert [create("127.0.0.1"), create("127.0.0.1")] == [201, 201]
        assert create("127.0.0.1") == 429
        # X-Forwarded-For from the client changes nothing: the peer address counts.
        assert create("127.0.0.1", {"X-Forwarded-For": "127.0.0.9"}) == 429
        assert create("127.0.0.1", {"X-Forwarded-For": "203.0.113.5, 127.0.0.9"}) == 429
        # Another address on the loopback network has a budget of its own.
        assert [create("127.0.0.2"), create("127.0.0.2")] == [201, 201]
        assert create("127.0.0.2", {"X-Forwarded-For": "127.0.0.3"}) == 429
        assert create("127.0.0.3") == 201


def test_the_audit_log_records_the_peer_address(host):
    with localhttp.serving() as port:
        body = json.dumps({"email": "peer@example.com"})
        key = localhttp.request(port, "POST", "/api/v1/accounts", body, JSON, "127.0.0.7").json["api_key"]
        created = localhttp.request(port, "POST", "/api/v1/database", json.dumps({"ref": "a"}), JSON, "127.0.0.7")
        database_id = created.json["id"]
        auth = {"Authorization": f"Bearer {key}"}
        assert localhttp.request(port, "POST", f"/api/v1/database/{database_id}/claim", None, auth).status == 200
        events = localhttp.request(port, "GET", f"/api/v1/databases/{database_id}/audit", None, auth).json["events"]
    assert {e["action"]: e["ip"] for e in events} == {"created": "127.0.0.7", "claimed": "127.0.0.1"}


def test_the_signup_form_without_an_email_is_400_even_on_a_claimed_database(client):
    from tests.conftest import post_json

    database_id = post_json(client, "/api/v1/database", {"ref": "form"}).json_body["id"]
    key = post_json(client, "/api/v1/accounts", {"email": "owner@example.com"}).json_body["api_key"]
    claimed = client.http.post(f"/api/v1/database/{database_id}/claim", headers={"Authorization": f"Bearer {key}"})
    assert claimed.status_code == 200
    form = {"Content-Type": "application/x-www-form-urlencoded"}
    for body in ("", "x=1", "email=", "email=not-an-address"):
        response = client.http.post(f"/claim/{database_id}/account", body=body, headers=form)
        assert response.status_code == 400, body
        assert response.headers["Content-Type"].startswith("text/html")
