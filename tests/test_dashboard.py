"""The operator's dashboard (issue 17 section 3): operator keys, /admin pages and /admin/api routes.

Over chalice's test client against the real Postgres and moto, then in headless
Chromium (tests/test_claim_page.py's fixtures): log in, filter, force-delete,
see the audit entry.
"""

from __future__ import annotations

import os
import re
import shutil
from datetime import timedelta
from html import unescape
from pathlib import Path
from urllib.parse import urlencode

import psycopg
import pytest

from tests.conftest import post_json
from tests.pgerrors import login_sqlstate
from tests.test_claim_page import SCREENSHOT_DIR, _wait, browser, live_server  # noqa: F401  (fixtures)

ROOT = Path(__file__).resolve().parent.parent
FORM = {"Content-Type": "application/x-www-form-urlencoded"}
SAME_SITE = {**FORM, "Sec-Fetch-Site": "same-origin", "Origin": "http://localhost"}


def operator_key(name: str = "tester") -> str:
    from chalicelib import operators

    return operators.create(name).key


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def create(client, ref: str = "dash") -> dict:
    response = post_json(client, "/api/v1/database", {"ref": ref})
    assert response.status_code == 201
    return response.json_body


def login(client, key: str, headers: dict | None = None):
    return client.http.post("/admin/login", body=urlencode({"key": key}), headers={**SAME_SITE, **(headers or {})})


def session(client, key: str) -> dict[str, str]:
    response = login(client, key)
    assert response.status_code == 303
    cookie = response.headers["Set-Cookie"].split(";")[0]
    return {"Cookie": cookie}


def csrf(page: str) -> str:
    return re.search(r'name="csrf" value="([^"]+)"', page).group(1)


def events(database_id: str) -> list:
    from chalicelib import audit

    return audit.page(database_id, 100).events


# -- operator keys ------------------------------------------------------------------------


def test_operator_keys_and_account_keys_do_not_open_each_others_doors(client):
    from chalicelib import operators
    from chalicelib.models import OperatorKeyRecord

    key = operator_key()
    account_key = post_json(client, "/api/v1/accounts", {"email": "a@example.com"}).json_body["api_key"]
    assert client.http.get("/admin/api/summary", headers=bearer(key)).status_code == 200
    for path, wrong in (("/admin/api/summary", account_key), ("/api/v1/account", key)):
        response = client.http.get(path, headers=bearer(wrong))
        assert response.status_code == 401, path
        assert set(response.json_body) == {"error", "hint"}
    # An account key in the login form opens no session either.
    response = login(client, account_key)
    assert response.status_code == 401 and "Set-Cookie" not in response.headers
    # Stored hashed: the table holds the SHA-256 and never the key.
    stored = repr([r.attribute_values for r in OperatorKeyRecord.scan()])
    assert key not in stored and operators.key_hash(key) in stored
    # Revoked: refused at once.
    key_id = operators.key_hash(key)[:12]
    assert operators.revoke(key_id) and not operators.revoke("0" * 12)
    assert client.http.get("/admin/api/summary", headers=bearer(key)).status_code == 401


def test_operatorctl_creates_lists_and_revokes(service, capsys):
    import json

    from tools.ops import operatorctl

    assert operatorctl.main(["create", "--name", "alice"]) == 0
    made = json.loads(capsys.readouterr().out)
    assert made["operator_key"].startswith("ipgo_") and made["name"] == "alice"
    assert operatorctl.main(["list"]) == 0
    listed = capsys.readouterr().out
    assert made["key_id"] in listed and made["operator_key"] not in listed
    assert operatorctl.main(["revoke", made["key_id"]]) == 0
    assert operatorctl.main(["revoke", "ffffffffffff"]) == 1
    assert operatorctl.main(["create", "--name", " "]) == 2


# -- logging in ----------------------------------------------------------------------------


def test_login_gives_a_strict_short_session_that_revoking_ends(client):
    from chalicelib import audit, operators

    assert client.http.get("/admin").headers["Location"] == "http://localhost/admin/login"
    page = client.http.get("/admin/login")
    assert page.status_code == 200 and 'name="key" type="password"' in page.body.decode()
    assert "script-src 'nonce-" in page.headers["Content-Security-Policy"]
    assert login(client, "ipgo_" + "x" * 43).status_code == 401

    key = operator_key()
    response = login(client, key)
    assert response.status_code == 303 and response.headers["Location"] == "http://localhost/admin"
    cookie = response.headers["Set-Cookie"]
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and "Path=/admin" in cookie
    assert "Max-Age=1800" in cookie and "Secure" not in cookie
    assert key not in cookie and operators.COOKIE in cookie
    over_tls = login(client, key, {"X-Forwarded-Proto": "https"}).headers["Set-Cookie"]
    assert "; Secure" in over_tls
    jar = {"Cookie": cookie.split(";")[0]}
    home = client.http.get("/admin", headers=jar)
    assert home.status_code == 200
    text = home.body.decode()
    assert text.count("<svg") == 4 and "Databases by status" in text
    key_id = operators.key_hash(key)[:12]
    logins = audit.page(audit.operator_subject(key_id)).events
    assert [e.action for e in logins] == ["operator_login"] * 2 and logins[0].actor == f"operator:{key_id}"

    # A cookie changed by one character, or signed under another key ring, is no session.
    value = jar["Cookie"]
    forged = value[:-1] + ("0" if value[-1] != "0" else "1")
    assert client.http.get("/admin", headers={"Cookie": forged}).status_code == 303
    operators.revoke(key_id)
    assert client.http.get("/admin", headers=jar).status_code == 303


def test_session_expires(client, instapg_env):
    from chalicelib import context

    instapg_env.setenv("INSTAPG_ADMIN_SESSION_SECONDS", "-1")
    context.reset()
    jar = session(client, operator_key())
    assert client.http.get("/admin", headers=jar).status_code == 303


def test_forms_need_the_sessions_csrf_token(client):
    from chalicelib import records

    database_id = create(client)["id"]
    jar = session(client, operator_key())
    page = client.http.get(f"/admin/databases/{database_id}", headers=jar).body.decode()
    good = csrf(page)
    for token in ("", "x" * 64, good[:-1] + ("1" if good.endswith("0") else "0")):
        body = urlencode({"action": "lock", "csrf": token})
        response = client.http.post(f"/admin/databases/{database_id}/action", body=body, headers={**SAME_SITE, **jar})
        assert response.status_code == 403
    assert records.find(database_id).locked_reason is None
    # Another site's form is refused before any route (chalicelib.web), token or not.
    body = urlencode({"action": "lock", "csrf": csrf(page)})
    cross = {**FORM, **jar, "Sec-Fetch-Site": "cross-site", "Origin": "https://evil.example"}
    assert client.http.post(f"/admin/databases/{database_id}/action", body=body, headers=cross).status_code == 403
    assert records.find(database_id).locked_reason is None


# -- listing ------------------------------------------------------------------------------


def test_listing_filters_and_pages_with_bounded_reads(client):
    key = operator_key()
    mine = {create(client, ref)["id"] for ref in ("alpha-1", "alpha-2", "beta")}

    def listed(query: str) -> dict:
        response = client.http.get(f"/admin/api/databases?{query}", headers=bearer(key))
        assert response.status_code == 200, response.json_body
        return response.json_body

    found = listed("status=UNCLAIMED&ref=alpha")
    assert {d["ref"] for d in found["databases"]} == {"alpha-1", "alpha-2"} and found["read"] == "index by_due"
    assert listed("status=CLAIMED")["databases"] == []
    scanned = listed("host=local-1&plan=unclaimed&max_age_h=1")
    assert scanned["read"] == "scan" and {d["id"] for d in scanned["databases"]} == mine
    assert listed("min_age_h=1")["databases"] == []
    # limit=1 reads one record a page; following the cursor reaches every one, once.
    seen, cursor = [], None
    for _ in range(10):
        body = listed("limit=1" + (f"&cursor={cursor}" if cursor else ""))
        assert len(body["databases"]) <= 1
        seen += [d["id"] for d in body["databases"]]
        cursor = body["next_cursor"]
        if cursor is None:
            break
    assert sorted(seen) == sorted(mine)
    assert not {"secret", "creator_token_hash", "role_name"} & set(body["databases"][0] if body["databases"] else {})
    for query in (
        "status=NOPE",
        "limit=0",
        "limit=201",
        "cursor=nope",
        "cursor=1." + "z" * 36,
        "min_age_h=-1",
        "host=%3Cx%3E",
        "plan=gold",
        "ref=%01",
    ):
        response = client.http.get(f"/admin/api/databases?{query}", headers=bearer(key))
        assert response.status_code == 400, query
        assert set(response.json_body) == {"error", "hint"}


def test_listing_page_filters_in_html(client):
    jar = session(client, operator_key())
    create(client, "<script>x</script>")
    create(client, "plain")
    page = client.http.get("/admin/databases?" + urlencode({"ref": "<script>"}), headers=jar).body.decode()
    assert "&lt;script&gt;x&lt;/script&gt;" in page and "<script>x" not in page
    assert "plain" not in page
    bad = client.http.get("/admin/databases?status=NOPE", headers=jar)
    assert bad.status_code == 400 and "not a database status" in bad.body.decode()


# -- actions ------------------------------------------------------------------------------


def test_force_delete_of_a_claimed_database_must_be_explicit(client, service):
    from chalicelib import operators, records

    key = operator_key()
    actor = f"operator:{operators.key_hash(key)[:12]}"
    body = create(client)
    account_key = post_json(client, "/api/v1/accounts", {"email": "o@example.com"}).json_body["api_key"]
    assert client.http.post(f"/api/v1/database/{body['id']}/claim", headers=bearer(account_key)).status_code == 200
    response = client.http.delete(f"/admin/api/databases/{body['id']}", headers=bearer(key))
    assert response.status_code == 409 and response.json_body["error"] == "Database is claimed"
    assert records.find(body["id"]).status == "CLAIMED"
    assert client.http.delete(f"/admin/api/databases/{body['id']}?claimed=true", headers=bearer(key)).status_code == 204
    assert records.find(body["id"]).status == "DELETED"
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(body["direct_connection_string"], connect_timeout=5).close()
    trail = [(e.action, e.actor) for e in events(body["id"])]
    assert trail[:2] == [("deleted", actor), ("admin_delete", actor)]
    assert client.http.delete(f"/admin/api/databases/{body['id']}", headers=bearer(key)).status_code == 410
    detail = client.http.get(f"/admin/api/databases/{body['id']}", headers=bearer(key)).json_body
    assert detail["database"]["status"] == "DELETED" and detail["events"][0]["action"] == "deleted"


def test_extend_lock_and_unlock_go_through_postgres_and_the_audit_log(client, service):
    from chalicelib import quotas, records
    from chalicelib.clock import Deadline

    key = operator_key()
    body = create(client)
    database_id, url = body["id"], body["direct_connection_string"]
    before = records.find(database_id).expires_at
    response = post_json(client, f"/admin/api/databases/{database_id}/extend", {"hours": 24}, bearer(key))
    assert response.status_code == 200
    record = records.find(database_id)
    assert record.expires_at == before + timedelta(hours=24) and record.due_at == int(record.expires_at.timestamp())
    for bad in ({"hours": 0}, {"hours": "24"}, {"hours": 10_000}, {}):
        assert post_json(client, f"/admin/api/databases/{database_id}/extend", bad, bearer(key)).status_code == 400

    assert client.http.post(f"/admin/api/databases/{database_id}/lock", headers=bearer(key)).status_code == 200
    with pytest.raises(psycopg.OperationalError) as refused:
        psycopg.connect(url, connect_timeout=5).close()
    assert login_sqlstate(refused.value) == "28000"  # invalid_authorization_specification: NOLOGIN
    # The quota job lifts only its own locks: the database fits, and stays locked.
    quotas.enforce(service, Deadline.after(30))
    assert records.find(database_id).locked_reason == "operator"
    assert client.http.post(f"/admin/api/databases/{database_id}/unlock", headers=bearer(key)).status_code == 200
    with psycopg.connect(url, connect_timeout=5) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)
    trail = [(e.action, e.actor) for e in events(database_id)]
    actor = trail[1][1]
    assert actor.startswith("operator:")
    # Who asked (admin_*), then what quotas' one lock path did (the same events as a quota lock).
    assert trail[:5] == [
        ("quota_unlocked", "system"),
        ("admin_unlock", actor),
        ("quota_locked", "system"),
        ("admin_lock", actor),
        ("admin_extend", actor),
    ]


def test_summary_counts_creates_referrers_statuses_and_hosts(client, service):
    from chalicelib import pool
    from chalicelib.clock import Deadline

    key = operator_key()
    pool.refill(service, Deadline.after(60), size=2)
    for ref in ("top", "top", "other"):  # two from the pool, then one on demand
        create(client, ref)
    account_key = post_json(client, "/api/v1/accounts", {"email": "s@example.com"}).json_body["api_key"]
    claimed = create(client, "kept")["id"]
    assert client.http.post(f"/api/v1/database/{claimed}/claim", headers=bearer(account_key)).status_code == 200
    summary = client.http.get("/admin/api/summary", headers=bearer(key)).json_body
    now = summary["creates_per_hour"][-1]
    assert len(summary["creates_per_hour"]) == 24
    assert (now["pooled"], now["on_demand"], now["total"]) == (2, 2, 4)
    assert summary["top_referrers"][0] == {"ref": "top", "creates": 2}
    assert {r["ref"] for r in summary["top_referrers"]} == {"top", "other", "kept"}
    assert summary["by_status"]["UNCLAIMED"] == 3 and summary["by_status"]["CLAIMED"] == 1
    assert summary["by_status"]["POOLED"] == 0
    [host] = summary["hosts"]
    assert (host["id"], host["allocated"], host["unclaimed"], host["claimed"]) == ("local-1", 4, 3, 1)
    assert summary["complete"] is True


def test_admin_routes_refuse_without_a_key(client):
    for method, path in (
        ("GET", "/admin/api/summary"),
        ("GET", "/admin/api/databases"),
        ("POST", "/admin/api/databases/0190a2b4-6c1e-7d3f-8a9b-0c1d2e3f4a5b/lock"),
    ):
        response = getattr(client.http, method.lower())(path)
        assert response.status_code == 401 and response.headers["WWW-Authenticate"].startswith("Bearer")
    for path in ("/admin", "/admin/databases", "/admin/databases/0190a2b4-6c1e-7d3f-8a9b-0c1d2e3f4a5b"):
        assert client.http.get(path).status_code == 303


# -- a real browser --------------------------------------------------------------------------


@pytest.mark.parametrize("browser", [False], ids=["no-javascript"], indirect=True)
def test_browser_logs_in_filters_force_deletes_and_sees_the_audit_entry(live_server, browser, service, tmp_path):  # noqa: F811
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    from chalicelib import pool, records
    from chalicelib.clock import Deadline
    from tests.test_claim_page import _create_over_http

    pool.refill(service, Deadline.after(60), size=6)  # so the pool and creates charts have something to show
    doomed = _create_over_http(live_server)
    for _ in range(2):
        _create_over_http(live_server)
    key = operator_key("browser")

    browser.get(f"{live_server}/admin")
    _wait(browser, "key").send_keys(key)
    browser.find_element(By.ID, "login").click()
    _wait(browser, "summary")
    assert len(browser.find_elements(By.CSS_SELECTOR, ".charts svg")) == 4
    SCREENSHOT_DIR.mkdir(parents=True, exist_ok=True)
    shot = SCREENSHOT_DIR / "dashboard.png"
    browser.save_screenshot(str(shot))
    assert shot.stat().st_size > 20_000
    if os.environ.get("INSTAPG_UPDATE_SCREENSHOTS"):  # the README's picture, on request
        shutil.copy(shot, ROOT / "docs" / "dashboard.png")

    browser.find_element(By.ID, "nav-databases").click()
    Select(_wait(browser, "status")).select_by_value("UNCLAIMED")
    browser.find_element(By.ID, "ref").send_keys("browser-test")
    browser.find_element(By.ID, "filter").click()
    _wait(browser, "databases")
    rows = browser.find_elements(By.CSS_SELECTOR, "#databases tbody tr")
    assert len(rows) == 3 and "status=UNCLAIMED" in browser.current_url
    browser.save_screenshot(str(SCREENSHOT_DIR / "dashboard-databases.png"))

    browser.find_element(By.LINK_TEXT, doomed["id"]).click()
    _wait(browser, "delete").click()
    assert "Deleted" in _wait(browser, "notice").text
    assert browser.find_element(By.ID, "status").text == "DELETED"
    history = browser.find_element(By.ID, "history").text
    assert "admin_delete" in history and "operator:" in history
    browser.save_screenshot(str(SCREENSHOT_DIR / "dashboard-deleted.png"))
    assert records.find(doomed["id"]).status == "DELETED"
    assert unescape(doomed["id"]) in browser.current_url
