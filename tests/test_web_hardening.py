"""Issue 19 (web hardening) and issue 17 point 5 (the creator deletes early), over HTTP.

Each point is tested through chalice's test client, and again over real HTTP
against tools/dev/localserver.py (the server `make dev` runs) at the end.
"""

from __future__ import annotations

import json
import logging
import shutil
import urllib.error
import urllib.request
import uuid
from urllib.parse import urlencode

import psycopg
import pytest

from tests.conftest import post_json
from tests.test_claim_page import live_server  # noqa: F401 (a fixture)

EVIL = "https://evil.example"
FORM = {"Content-Type": "application/x-www-form-urlencoded"}


def _reset(env, **values):
    from chalicelib import context

    for name, value in values.items():
        env.setenv(name, value)
    context.reset()


def _databases() -> int:
    from chalicelib.models import DatabaseRecord

    return sum(1 for r in DatabaseRecord.scan() if r.status not in ("POOLED",))


def _error(response, status: int) -> dict:
    assert response.status_code == status, response.body
    body = json.loads(response.body)
    assert set(body) >= {"error", "hint"}
    return body


def _create(client) -> dict:
    response = post_json(client, "/api/v1/database", {"ref": "webhard"})
    assert response.status_code == 201, response.body
    return response.json_body


def _signup(client, email="web@example.com") -> str:
    return post_json(client, "/api/v1/accounts", {"email": email}).json_body["api_key"]


def _bearer(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


# -- 1. cross-site requests ---------------------------------------------------------


@pytest.mark.parametrize("path", ["/api/v1/database", "/api/v1/accounts"])
def test_cross_site_browser_posts_are_refused_and_create_nothing(client, path):
    from chalicelib.models import AccountRecord

    body = '{"ref":"csrf","email":"csrf@example.com"}'
    for headers in (
        {"Origin": EVIL, "Content-Type": "text/plain"},  # the probe: a "simple" CORS request
        {"Origin": EVIL, "Content-Type": "application/json"},
        {"Sec-Fetch-Site": "cross-site", "Content-Type": "application/x-www-form-urlencoded"},
        {"Sec-Fetch-Site": "same-site", "Origin": "https://sub.localhost", "Content-Type": "text/plain"},
        {"Origin": "null", "Content-Type": "text/plain"},  # sandboxed iframes, data: URLs
    ):
        error = _error(client.http.post(path, body=body, headers=headers), 403)
        assert error["error"] == "Cross-site request refused"
        assert "INSTAPG_ALLOWED_ORIGINS" in error["hint"]
    assert _databases() == 0 and AccountRecord.count() == 0


def test_clients_without_browser_headers_keep_working(client):
    # curl -X POST .../api/v1/database -d '{"ref":"x"}' sends a form content type and no Origin.
    curl = client.http.post("/api/v1/database", body='{"ref":"curl"}', headers=FORM)
    assert curl.status_code == 201
    # get-db: POST /api/v1/database/{uuid}?referrer=... with a JSON body, no Origin.
    getdb = post_json(client, f"/api/v1/database/{uuid.uuid4()}?referrer=get-db", {})
    assert getdb.status_code == 201
    # text/plain from a program is fine too; only browsers must send JSON.
    assert (
        client.http.post("/api/v1/database", body='{"ref":"t"}', headers={"Content-Type": "text/plain"}).status_code
        == 201
    )


def test_same_origin_browser_requests_must_send_json_to_the_api(client):
    own = {"Host": "db.localtest:8000", "Origin": "http://db.localtest:8000"}
    for extra in ({}, {"Sec-Fetch-Site": "same-origin"}):
        plain = client.http.post("/api/v1/database", body='{"ref":"b"}', headers={**own, **extra, **FORM})
        assert _error(plain, 415)["error"] == "Browsers must send JSON to the API"
        as_json = client.http.post(
            "/api/v1/database", body='{"ref":"b"}', headers={**own, **extra, "Content-Type": "application/json"}
        )
        assert as_json.status_code == 201
    # The claim page's own forms are same-origin url-encoded posts outside /api/: allowed.
    database = _create(client)
    page = client.http.post(
        f"/claim/{database['id']}/account",
        body=urlencode({"email": "same@example.com"}),
        headers={**own, "Sec-Fetch-Site": "same-origin", "Origin": "null", **FORM},
    )
    assert page.status_code == 200 and b'id="claimed"' in page.body


def test_cross_site_claim_form_posts_are_refused(client):
    from chalicelib.models import AccountRecord

    database = _create(client)
    response = client.http.post(
        f"/claim/{database['id']}/account",
        body=urlencode({"email": "victim@example.com"}),
        headers={"Origin": EVIL, "Sec-Fetch-Site": "cross-site", **FORM},
    )
    _error(response, 403)
    assert AccountRecord.count() == 0


def test_an_allowed_origin_passes_and_may_read_the_answer(client, instapg_env):
    _reset(instapg_env, INSTAPG_ALLOWED_ORIGINS="https://app.example.com, https://other.example")
    response = client.http.post(
        "/api/v1/database",
        body='{"ref":"app"}',
        headers={"Origin": "https://app.example.com", "Sec-Fetch-Site": "cross-site", "Content-Type": "text/plain"},
    )
    assert response.status_code == 201
    assert response.headers["Access-Control-Allow-Origin"] == "https://app.example.com"
    assert response.headers["Vary"] == "Origin"
    refused = client.http.post("/api/v1/database", body='{"ref":"x"}', headers={"Origin": EVIL, **FORM})
    _error(refused, 403)
    assert "Access-Control-Allow-Origin" not in refused.headers


def test_delete_from_another_site_is_refused(client):
    database = _create(client)
    response = client.http.delete(
        f"/api/v1/database/{database['id']}",
        headers={**_bearer(database["creator_token"]), "Origin": EVIL, "Sec-Fetch-Site": "cross-site"},
    )
    _error(response, 403)
    assert client.http.get(f"/api/v1/database/{database['id']}").status_code == 200


# -- 2. secrets are not cacheable -------------------------------------------------------


def test_every_json_response_says_no_store_and_nosniff(client):
    key = _signup(client)
    database = _create(client)
    responses = {
        "create": post_json(client, "/api/v1/database", {"ref": "c"}),
        "get": client.http.get(f"/api/v1/database/{database['id']}"),
        "account": post_json(client, "/api/v1/accounts", {"email": "n@example.com"}),
        "owner": client.http.get("/api/v1/account", headers=_bearer(key)),
        "400": post_json(client, "/api/v1/database", {}),
        "401": client.http.get("/api/v1/account"),
        "403": client.http.post("/api/v1/database", body="{}", headers={"Origin": EVIL, **FORM}),
        "404": client.http.get(f"/api/v1/database/{uuid.uuid4()}"),
        "405": client.http.put("/api/v1/database", body="{}"),
        "415": client.http.post("/api/v1/database", body="{}", headers={"Content-Type": "image/png"}),
        "healthz": client.http.get("/healthz"),
    }
    for name, response in responses.items():
        assert response.headers["Content-Type"].startswith("application/json"), name
        assert response.headers["Cache-Control"] == "no-store", name
        assert response.headers["X-Content-Type-Options"] == "nosniff", name


# -- 3. the Host header -----------------------------------------------------------------


@pytest.mark.parametrize(
    "headers",
    [
        {"Host": "javascript:alert(1)//", "X-Forwarded-Proto": "javascript"},
        {"Host": "evil.example/claim/x?", "X-Forwarded-Proto": "https"},
        {"Host": "a" * 60_000},
        {"Host": "good.example <script>"},
    ],
    ids=["scheme", "path", "huge", "spaces"],
)
def test_a_bad_host_header_never_reaches_claim_url(client, headers):
    body = client.http.post("/api/v1/database", body='{"ref":"h"}', headers={**headers, **FORM}).json_body
    assert body["claim_url"] == f"http://localhost/claim/{body['id']}"


def test_a_sane_host_and_scheme_are_used_locally(client):
    headers = {"Host": "db.localtest:8443", "X-Forwarded-Proto": "javascript", **FORM}
    body = client.http.post("/api/v1/database", body='{"ref":"h"}', headers=headers).json_body
    assert body["claim_url"] == f"http://db.localtest:8443/claim/{body['id']}"  # scheme: only http/https
    headers["X-Forwarded-Proto"] = "https"
    body = client.http.post("/api/v1/database", body='{"ref":"h"}', headers=headers).json_body
    assert body["claim_url"] == f"https://db.localtest:8443/claim/{body['id']}"


def test_deployed_without_public_url_refuses_every_request(client, instapg_env, caplog):
    _reset(instapg_env, AWS_LAMBDA_FUNCTION_NAME="instapg-prod")
    with caplog.at_level(logging.ERROR, logger="chalicelib.web"):
        for response in (client.http.get("/healthz"), post_json(client, "/api/v1/database", {"ref": "x"})):
            error = _error(response, 503)
            assert error["error"] == "Service not configured" and "INSTAPG_PUBLIC_URL" in error["hint"]
            assert response.headers["Retry-After"] == "300"
    assert "INSTAPG_PUBLIC_URL is not set" in caplog.text
    assert _databases() == 0
    _reset(instapg_env, INSTAPG_PUBLIC_URL="https://db.example.com/")
    body = post_json(client, "/api/v1/database", {"ref": "x"}, {"Host": "evil.example"}).json_body
    assert body["claim_url"] == f"https://db.example.com/claim/{body['id']}"


def test_a_malformed_public_url_is_a_clear_503(client, instapg_env, caplog):
    _reset(instapg_env, INSTAPG_PUBLIC_URL="javascript:alert(1)")
    with caplog.at_level(logging.ERROR, logger="chalicelib.web"):
        response = client.http.get(f"/api/v1/database/{uuid.uuid4()}")
    _error(response, 503)
    assert response.headers["Retry-After"]
    assert "INSTAPG_PUBLIC_URL must be an http(s) URL" in caplog.text


# -- 4. the creator token, and issue 17.5: delete early, no extend ----------------------


def test_create_returns_a_creator_token_once_and_stores_only_its_hash(client, service):
    import boto3

    from chalicelib.identifiers import token_hash
    from chalicelib.models import DatabaseRecord

    database = _create(client)
    token = database["creator_token"]
    assert token.startswith("ipgc_") and len(token) == 5 + 43
    assert "creator_token" not in client.http.get(f"/api/v1/database/{database['id']}").json_body
    raw = boto3.client("dynamodb").scan(TableName=DatabaseRecord.Meta.table_name)["Items"]
    assert token not in repr(raw)
    assert DatabaseRecord.get(database["id"]).creator_token_hash == token_hash(token)
    # A repeat of a client-chosen id returns the database, not the token (it is not kept).
    database_id = str(uuid.uuid4())
    first = post_json(client, f"/api/v1/database/{database_id}?referrer=r", {}).json_body
    again = post_json(client, f"/api/v1/database/{database_id}?referrer=r", {}).json_body
    assert first["creator_token"].startswith("ipgc_") and "creator_token" not in again


def test_the_creator_deletes_an_unclaimed_database_early_and_the_id_alone_cannot(client, pg):
    from chalicelib.models import AuditEvent, DatabaseRecord

    database = _create(client)
    path = f"/api/v1/database/{database['id']}"
    assert _error(client.http.delete(path), 401)["error"] == "Missing creator token"
    assert _error(client.http.delete(path, headers=_bearer(database["id"])), 403)["error"] == (
        "Creator token does not match"
    )
    other = _create(client)
    _error(client.http.delete(path, headers=_bearer(other["creator_token"])), 403)
    assert client.http.get(path).status_code == 200

    record = DatabaseRecord.get(database["id"])
    assert client.http.delete(path, headers=_bearer(database["creator_token"])).status_code == 204
    assert _error(client.http.get(path), 410)["error"] == "Database deleted"
    with psycopg.connect(pg.superuser_dsn) as conn:
        left = conn.execute("SELECT count(*) FROM pg_database WHERE datname = %s", (record.db_name,)).fetchone()[0]
    assert left == 0
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(database["direct_connection_string"], connect_timeout=5).close()
    actions = [(e.action, e.actor) for e in AuditEvent.query(database["id"])]
    assert ("deleted", "creator") in actions
    # Again: gone.
    _error(client.http.delete(path, headers=_bearer(database["creator_token"])), 410)


def test_a_claimed_database_is_not_the_creators_to_delete(client):
    database = _create(client)
    key = _signup(client)
    assert client.http.post(f"/api/v1/database/{database['id']}/claim", headers=_bearer(key)).status_code == 200
    response = client.http.delete(f"/api/v1/database/{database['id']}", headers=_bearer(database["creator_token"]))
    assert "DELETE /api/v1/databases/" in _error(response, 409)["hint"]


def test_extend_is_refused_and_says_claiming_is_the_way(client):
    database = _create(client)
    error = _error(client.http.post(f"/api/v1/database/{database['id']}/extend"), 409)
    assert error["error"] == "Unclaimed databases cannot be extended"
    assert "Claim it to keep it" in error["hint"] and f"/claim/{database['id']}" in error["hint"]
    _error(client.http.post(f"/api/v1/database/{uuid.uuid4()}/extend"), 404)


def test_a_claim_with_a_wrong_creator_token_is_refused(client, service):
    database = _create(client)
    key = _signup(client)
    path = f"/api/v1/database/{database['id']}/claim"
    wrong = client.http.post(path, headers={**_bearer(key), "Instapg-Creator-Token": "ipgc_" + "x" * 43})
    _error(wrong, 403)
    right = client.http.post(path, headers={**_bearer(key), "Instapg-Creator-Token": database["creator_token"]})
    assert right.status_code == 200 and right.json_body["status"] == "CLAIMED"


def test_with_claim_requires_token_the_id_alone_cannot_claim(client, instapg_env):
    from chalicelib.models import AccountRecord

    _reset(instapg_env, INSTAPG_CLAIM_REQUIRES_TOKEN="true")
    database = _create(client)
    key = _signup(client)
    path = f"/api/v1/database/{database['id']}/claim"
    assert _error(client.http.post(path, headers=_bearer(key)), 403)["error"] == "Creator token required"
    page = client.http.get(f"/claim/{database['id']}").body.decode()
    assert 'name="creator_token"' in page
    accounts_before = AccountRecord.count()
    form = client.http.post(
        f"/claim/{database['id']}/account", body=urlencode({"email": "a@example.com"}), headers=FORM
    )
    assert form.status_code == 403 and b"Creator token required" in form.body
    assert AccountRecord.count() == accounts_before  # no account made for a claim that cannot happen
    by_form = client.http.post(
        f"/claim/{database['id']}",
        body=urlencode({"api_key": key, "creator_token": database["creator_token"]}),
        headers=FORM,
    )
    assert by_form.status_code == 200 and b'id="claimed"' in by_form.body


# -- 5. client-chosen ids -------------------------------------------------------------------


@pytest.mark.parametrize(
    "database_id",
    [
        "00000000-0000-0000-0000-000000000001",
        "00000000-0000-0000-0000-000000000000",
        "00000000-0000-4000-8000-000000000001",  # v4 bits, nothing random
        "ffffffff-ffff-4fff-bfff-ffffffffffff",
        "01010101-0101-4101-8101-010101010101",
        "00000000-0000-7000-8000-5a3c9f1e2d4b",  # v7 at 1970
        # Fixed ids for the generated ones, so every pytest-xdist worker collects the same tests.
        pytest.param(str(uuid.uuid1()), id="uuid1"),  # time and MAC
        pytest.param(str(uuid.uuid5(uuid.NAMESPACE_DNS, "my-app")), id="uuid5"),  # a hash of a name
        pytest.param(str(uuid.UUID(int=uuid.uuid4().int & ~(0b11 << 62) | (0b11 << 62))), id="not-rfc-variant"),
    ],
)
def test_guessable_client_ids_are_refused(client, database_id):
    error = _error(post_json(client, f"/api/v1/database/{database_id}?referrer=g", {}), 400)
    assert error["error"] == "Database id is not a random UUID"
    assert "version 4 or 7" in error["hint"]
    assert _databases() == 0


def test_random_v4_and_v7_client_ids_are_accepted(client):
    from chalicelib.identifiers import uuid7

    for database_id in (str(uuid.uuid4()), str(uuid7()), str(uuid.uuid4()).upper()):
        assert post_json(client, f"/api/v1/database/{database_id}?referrer=g", {}).status_code == 201


def test_random_ids_are_not_refused_by_the_entropy_check():
    from chalicelib.identifiers import parse_client_id, uuid7

    assert all(parse_client_id(str(uuid.uuid4())) for _ in range(20_000))
    assert all(parse_client_id(str(uuid7())) for _ in range(20_000))


# -- 6. failed authentications per IP ---------------------------------------------------------


def test_failed_keys_are_limited_per_ip_before_any_lookup(client, instapg_env):
    from chalicelib import accounts
    from chalicelib.models import RateCounter

    _reset(instapg_env, INSTAPG_AUTH_FAILURES_PER_HOUR="3")
    key = _signup(client)
    for _ in range(3):
        _error(client.http.get("/api/v1/account", headers=_bearer("ipg_" + "A" * 43)), 401)
    looked_up = []
    real = accounts.authenticate
    instapg_env.setattr(accounts, "authenticate", lambda k: looked_up.append(k) or real(k))
    limited = client.http.get("/api/v1/account", headers=_bearer("ipg_" + "B" * 43))
    error = _error(limited, 429)
    assert error["error"] == "Too many failed authentications from your address"
    assert 1 <= int(limited.headers["Retry-After"]) <= 3600
    # Even a valid key from that address waits: nothing is looked up for it.
    _error(client.http.get("/api/v1/account", headers=_bearer(key)), 429)
    assert looked_up == []
    # One counter item for the IP and hour, counted with one write per failure.
    counters = [c for c in RateCounter.scan() if c.key.startswith("auth#")]
    assert len(counters) == 1 and counters[0].key.endswith("#127.0.0.1") and counters[0].count == 3


def test_the_claim_form_is_limited_too_without_postgres_work(client, instapg_env, service):
    from chalicelib import ownership

    _reset(instapg_env, INSTAPG_AUTH_FAILURES_PER_HOUR="2")
    database = _create(client)
    path = f"/claim/{database['id']}"
    for _ in range(2):
        assert client.http.post(path, body=urlencode({"api_key": "ipg_" + "C" * 43}), headers=FORM).status_code == 401
    sized = []
    instapg_env.setattr(ownership, "usage", lambda ctx, record: sized.append(record))
    limited = client.http.post(path, body=urlencode({"api_key": "ipg_" + "D" * 43}), headers=FORM)
    assert limited.status_code == 429 and int(limited.headers["Retry-After"]) >= 1
    assert b"Too many failed authentications" in limited.body
    assert sized == []  # no size query for a refused guess


def test_wrong_creator_tokens_count_as_failed_authentications(client, instapg_env):
    _reset(instapg_env, INSTAPG_AUTH_FAILURES_PER_HOUR="2")
    database = _create(client)
    path = f"/api/v1/database/{database['id']}"
    for _ in range(2):
        _error(client.http.delete(path, headers=_bearer("ipgc_" + "E" * 43)), 403)
    _error(client.http.delete(path, headers=_bearer(database["creator_token"])), 429)
    assert client.http.get(path).status_code == 200


# -- 7. self-service keys ----------------------------------------------------------------


def test_rotate_with_no_grace_stops_the_old_key_at_once(client):
    old = _signup(client)
    rotated = post_json(client, "/api/v1/account/rotate-key", {}, _bearer(old))
    assert rotated.status_code == 201
    new = rotated.json_body["api_key"]
    assert new.startswith("ipg_") and new != old
    assert client.http.get("/api/v1/account", headers=_bearer(new)).status_code == 200
    _error(client.http.get("/api/v1/account", headers=_bearer(old)), 401)
    events = client.http.get("/api/v1/account/audit", headers=_bearer(new)).json_body["events"]
    assert [e["action"] for e in events] == ["api_key_rotated"] and events[0]["detail"] == "grace_s=0"


def test_rotate_with_a_grace_period_keeps_the_old_key_until_then(client, service):
    from datetime import UTC, datetime, timedelta

    from chalicelib.accounts import key_hash
    from chalicelib.models import ApiKeyRecord

    old = _signup(client)
    body = post_json(client, "/api/v1/account/rotate-key", {"grace_seconds": 3600}, _bearer(old)).json_body
    expires = datetime.fromisoformat(body["old_key_expires_at"].replace("Z", "+00:00"))
    assert timedelta(minutes=59) < expires - datetime.now(UTC) <= timedelta(hours=1)
    assert client.http.get("/api/v1/account", headers=_bearer(old)).status_code == 200
    assert client.http.get("/api/v1/account", headers=_bearer(body["api_key"])).status_code == 200
    # When the grace period ends, the old key stops.
    ApiKeyRecord(key_hash=key_hash(old)).update(
        actions=[ApiKeyRecord.revoked_at.set(datetime.now(UTC) - timedelta(seconds=1))]
    )
    _error(client.http.get("/api/v1/account", headers=_bearer(old)), 401)


@pytest.mark.parametrize("grace", [-1, 86401, "60", 1.5, True])
def test_rotate_refuses_a_grace_period_out_of_bounds(client, grace):
    key = _signup(client)
    error = _error(post_json(client, "/api/v1/account/rotate-key", {"grace_seconds": grace}, _bearer(key)), 400)
    assert "grace_seconds" in error["error"]
    assert client.http.get("/api/v1/account", headers=_bearer(key)).status_code == 200


def test_revoke_stops_the_key_and_is_audited(client):
    from chalicelib import audit
    from chalicelib.models import AuditEvent

    key = _signup(client)
    account_id = client.http.get("/api/v1/account", headers=_bearer(key)).json_body["id"]
    assert client.http.post("/api/v1/account/revoke-key", headers=_bearer(key)).status_code == 204
    _error(client.http.get("/api/v1/account", headers=_bearer(key)), 401)
    events = list(AuditEvent.query(audit.account_subject(account_id)))
    assert [(e.action, e.actor, e.ip) for e in events] == [("api_key_revoked", account_id, "127.0.0.1")]
    _error(client.http.post("/api/v1/account/revoke-key"), 401)


# -- 8. HSTS and framing ----------------------------------------------------------------------


def test_hsts_over_https_only_and_frames_denied(client):
    database = _create(client)
    for path in ("/healthz", f"/api/v1/database/{database['id']}", f"/claim/{database['id']}"):
        over_https = client.http.get(path, headers={"X-Forwarded-Proto": "https"})
        assert over_https.headers["Strict-Transport-Security"] == "max-age=31536000", path
        plain = client.http.get(path)
        assert "Strict-Transport-Security" not in plain.headers, path
        assert plain.headers["X-Frame-Options"] == "DENY", path
    page = client.http.get(f"/claim/{database['id']}")
    assert "frame-ancestors 'none'" in page.headers["Content-Security-Policy"]


# -- the same over real HTTP: tools/dev/localserver.py -----------------------------------------------


def _http(method: str, url: str, body: bytes | None = None, headers: dict | None = None):
    request = urllib.request.Request(url, data=body, headers=headers or {}, method=method)
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            raw = response.read()
            return response.status, dict(response.headers), json.loads(raw) if raw.startswith(b"{") else raw
    except urllib.error.HTTPError as error:
        raw = error.read()
        return error.code, dict(error.headers), json.loads(raw) if raw.startswith(b"{") else raw


def test_over_http_on_the_local_server(live_server, instapg_env, capfd, pg):  # noqa: F811 (the fixture)
    from chalicelib import context

    instapg_env.setenv("INSTAPG_AUTH_FAILURES_PER_HOUR", "2")
    context.reset()
    base = live_server
    create = f"{base}/api/v1/database"
    # 1. curl's default form content type, no Origin: served; a cross-site browser post: 403.
    status, headers, body = _http("POST", create, b'{"ref":"curl"}', FORM)
    assert status == 201
    # 2. no-store and nosniff on JSON; 3. claim_url from the sane Host of the request.
    assert headers["Cache-Control"] == "no-store" and headers["X-Content-Type-Options"] == "nosniff"
    assert body["claim_url"] == f"{base}/claim/{body['id']}"
    status, _, error = _http("POST", create, b'{"ref":"csrf"}', {"Origin": EVIL, "Content-Type": "text/plain"})
    assert status == 403 and error["error"] == "Cross-site request refused"
    status, _, _ = _http("POST", create, b'{"ref":"x"}', {"Sec-Fetch-Site": "cross-site", **FORM})
    assert status == 403
    # 5. a guessable id: 400.
    status, _, error = _http("POST", f"{create}/00000000-0000-0000-0000-000000000001?referrer=x", b"{}", FORM)
    assert status == 400 and error["error"] == "Database id is not a random UUID"
    # 4. the creator token deletes; the id alone does not.
    database_url = f"{create}/{body['id']}"
    assert _http("DELETE", database_url)[0] == 401
    assert _http("DELETE", database_url, headers=_bearer(body["creator_token"]))[0] == 204
    assert _http("GET", database_url)[0] == 410
    status, _, error = _http("POST", f"{create}/{uuid.uuid4()}/extend", b"{}", FORM)
    assert status == 404
    # 7. rotate and revoke.
    status, _, account = _http("POST", f"{base}/api/v1/accounts", b'{"email":"h@example.com"}', FORM)
    status, _, rotated = _http("POST", f"{base}/api/v1/account/rotate-key", b"{}", _bearer(account["api_key"]))
    assert status == 201
    assert _http("GET", f"{base}/api/v1/account", headers=_bearer(rotated["api_key"]))[0] == 200
    assert _http("POST", f"{base}/api/v1/account/revoke-key", b"", _bearer(rotated["api_key"]))[0] == 204
    # 8. HSTS behind an HTTPS proxy; frames denied.
    _, headers, _ = _http("GET", f"{base}/healthz", headers={"X-Forwarded-Proto": "https"})
    assert headers["Strict-Transport-Security"] == "max-age=31536000" and headers["X-Frame-Options"] == "DENY"
    # 6. failed keys from this address: 401, 401 (the old keys), then 429 before any lookup.
    statuses = [_http("GET", f"{base}/api/v1/account", headers=_bearer(k))[0] for k in (account["api_key"],) * 3]
    assert statuses == [401, 401, 429]
    _, headers, _ = _http("GET", f"{base}/api/v1/account", headers=_bearer(account["api_key"]))
    assert int(headers["Retry-After"]) >= 1
    # 4. the access log names databases by a short hash, never by id.
    from chalicelib.identifiers import short_hash

    log = capfd.readouterr().err
    assert body["id"] not in log
    assert f"id:{short_hash(body['id'])}" in log


# -- a real browser on another site ---------------------------------------------------------------


@pytest.fixture
def evil_site():
    """A page on another site (http://localhost:<port>) that posts to the service as soon as it loads."""
    import http.server
    import threading

    pages: dict[str, bytes] = {}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (http.server's name)
            body = pages.get(self.path, b"")
            self.send_response(200 if body else 404)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://localhost:{server.server_address[1]}", pages
    finally:
        server.shutdown()
        server.server_close()


def test_a_page_on_another_site_cannot_make_a_browser_create(live_server, evil_site):  # noqa: F811
    from chalicelib.models import AccountRecord
    from tests.test_claim_page import _chrome

    origin, pages = evil_site
    api = live_server  # http://127.0.0.1:<port>: another site than localhost
    # The probe: a text/plain form whose body is JSON, and a no-cors fetch; neither needs a preflight.
    pages["/"] = f"""<!doctype html><html><body>
<form id="f" method="post" action="{api}/api/v1/database" enctype="text/plain">
<input type="hidden" name='{{"ref":"csrf","x":"' value='"}}'></form>
<script>
fetch("{api}/api/v1/accounts", {{method: "POST", mode: "no-cors", headers: {{"Content-Type": "text/plain"}},
  body: JSON.stringify({{email: "victim@example.com"}})}})
  .finally(() => document.getElementById("f").submit());
</script></body></html>""".encode()
    from selenium.webdriver.support.ui import WebDriverWait

    driver, profile = _chrome(javascript=True)
    try:
        driver.get(origin + "/")
        WebDriverWait(driver, 30).until(lambda d: d.current_url.startswith(api))
        text = driver.find_element("tag name", "body").text
        assert "Cross-site request refused" in text
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)
    assert _databases() == 0 and AccountRecord.count() == 0
