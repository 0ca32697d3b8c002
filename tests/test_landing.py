"""The landing page at `/`: over chalice's test client, then in a real headless Chromium.

The browser tests use the claim page's fixtures (tests/test_claim_page.py:
Debian's chromium driven by selenium against tools/dev/localserver).
"""

from __future__ import annotations

import os
import re
import shutil
from html import unescape
from pathlib import Path
from urllib.parse import urlencode

import psycopg
import pytest

from tests.test_claim_page import _wait, browser, live_server  # noqa: F401  (fixtures)

ROOT = Path(__file__).resolve().parent.parent
FORM = {"Content-Type": "application/x-www-form-urlencoded"}
SAME_SITE = {**FORM, "Sec-Fetch-Site": "same-origin", "Origin": "http://localhost"}


def html(response) -> str:
    assert response.headers["Content-Type"] == "text/html; charset=utf-8"
    return response.body.decode()


def pre(page: str, element_id: str) -> str:
    """The text of the <pre> with this id, as a browser would show it."""
    found = re.search(rf'<pre id="{element_id}"[^>]*>(.*?)</pre>', page, re.S)
    assert found, f"no <pre id={element_id}>"
    return unescape(found.group(1))


def _databases() -> int:
    from chalicelib.models import DatabaseRecord

    return DatabaseRecord.count()


def test_landing_page_renders_with_both_forms(client):
    response = client.http.get("/")
    assert response.status_code == 200
    page = html(response)
    assert "A PostgreSQL database in one click" in page
    assert '<form method="post" action="/new" id="create-form">' in page
    assert '<label for="ref">' in page and '<label for="lookup-id">' in page
    assert '<form method="get" action="/database" id="lookup-form">' in page
    assert "It lasts 72 hours" in page
    nonce = re.search(r"script-src 'nonce-([^']+)'", response.headers["Content-Security-Policy"]).group(1)
    assert f'<script nonce="{nonce}">' in page
    assert response.headers["Cache-Control"] == "no-store"
    # Every render carries its own Idempotency-Key for the Create form.
    keys = {re.search(r'name="idempotency_key" value="([^"]+)"', html(client.http.get("/"))).group(1) for _ in "ab"}
    assert len(keys) == 2


def test_create_form_makes_a_database_and_shows_it_once(client, service):
    from chalicelib import records
    from chalicelib.identifiers import token_hash

    before = _databases()
    response = client.http.post(
        "/new", body=urlencode({"ref": "landing-test", "idempotency_key": "k1"}), headers=SAME_SITE
    )
    assert response.status_code == 201
    assert response.headers["Cache-Control"] == "no-store"
    page = html(response)
    assert _databases() == before + 1
    database_id = re.search(r'<code id="database-id">([^<]+)</code>', page).group(1)
    record = records.find(database_id)
    assert record.status == "UNCLAIMED" and record.ref == "landing-test"
    pooled, direct = pre(page, "pooled-url"), pre(page, "direct-url")
    with psycopg.connect(direct, connect_timeout=10) as conn:
        assert conn.execute("SELECT current_database()").fetchone()[0] == record.db_name
    assert pre(page, "snippet-psql") == f'psql "{pooled}"'
    assert pre(page, "snippet-env") == f"DATABASE_URL={pooled}"
    assert "pg.Client" in pre(page, "snippet-node") and "psycopg.connect" in pre(page, "snippet-psycopg")
    assert f'href="http://localhost/claim/{database_id}"' in page
    assert re.search(r'id="countdown" data-expires="\d+">7[01] h \d\d min<', page)
    token = pre(page, "creator-token")
    assert token_hash(token) == record.creator_token_hash
    # Copy buttons are there for the script to show, hidden without it.
    assert page.count('class="copy" data-copy=') == 7 and 'data-copy="pooled-url"' in page
    assert re.search(r'<button type="button" class="copy" data-copy="pooled-url"[^>]* hidden>', page)

    # The same form sent again (a double click, a reload): the same database, the token not again.
    again = client.http.post(
        "/new", body=urlencode({"ref": "landing-test", "idempotency_key": "k1"}), headers=SAME_SITE
    )
    assert again.status_code == 200
    second = html(again)
    assert f'<code id="database-id">{database_id}</code>' in second
    assert "This form already created a database" in second
    assert token not in second and 'id="token-shown"' in second
    assert _databases() == before + 1


def test_create_form_without_a_ref_uses_the_default(client, service):
    from chalicelib import records
    from chalicelib.landing import DEFAULT_REF

    page = html(client.http.post("/new", body="ref=", headers=SAME_SITE))
    database_id = re.search(r'<code id="database-id">([^<]+)</code>', page).group(1)
    assert records.find(database_id).ref == DEFAULT_REF


def test_cross_site_form_post_is_refused(client):
    before = _databases()
    for headers in (
        {**FORM, "Sec-Fetch-Site": "cross-site", "Origin": "https://evil.example"},
        {**FORM, "Origin": "https://evil.example"},  # an older browser: Origin only
        {**FORM, "Origin": "null"},  # a sandboxed frame
    ):
        response = client.http.post("/new", body="ref=x", headers=headers)
        assert response.status_code == 403, headers
        assert response.json_body["error"] == "Cross-site request refused"
    assert _databases() == before


def test_rate_limit_is_a_clear_html_answer(client, instapg_env):
    from chalicelib import context

    instapg_env.setenv("INSTAPG_CREATES_PER_DAY", "1")
    context.reset()
    assert client.http.post("/new", body="ref=a", headers=SAME_SITE).status_code == 201
    before = _databases()
    response = client.http.post("/new", body="ref=b", headers=SAME_SITE)
    assert response.status_code == 429
    assert int(response.headers["Retry-After"]) >= 1
    page = html(response)
    assert re.search(r'<h1 id="headline">[^<]*per day[^<]*</h1>', page)
    assert re.search(r'<p id="notice">[^<]+</p>', page)
    assert 'id="create-form"' in page  # the page to try again from
    assert _databases() == before


def test_bad_forms_are_html_errors_that_echo_nothing(client):
    before = _databases()
    evil = "<script>alert(1)</script>" * 10
    response = client.http.post("/new", body=urlencode({"ref": evil}), headers=SAME_SITE)
    assert response.status_code == 400
    page = html(response)
    assert "at most 128 printable characters" in page and "<script>alert" not in page
    for body in ("ref=%20%20", "idempotency_key=%01", "&".join(f"f{i}=1" for i in range(20)), b"\xff"):
        assert client.http.post("/new", body=body, headers=SAME_SITE).status_code == 400, body
    # A JSON body is not the form.
    response = client.http.post("/new", body='{"ref": "x"}', headers={"Content-Type": "application/json"})
    assert response.status_code == 415
    assert _databases() == before


def test_status_form_leads_to_the_database_page(client):
    from tests.conftest import post_json

    database_id = post_json(client, "/api/v1/database", {"ref": "lookup"}).json_body["id"]
    response = client.http.get(f"/database?id={database_id.upper()}")
    assert response.status_code == 303
    assert response.headers["Location"] == f"http://localhost/database/{database_id}"
    for query in ("?id=%3Cscript%3Ealert(1)%3C/script%3E", "?id=", ""):
        response = client.http.get(f"/database{query}")
        assert response.status_code == 404, query
        page = html(response)
        assert "Database not found" in page and "<script>alert" not in page


# -- a real browser --------------------------------------------------------------


@pytest.mark.parametrize("browser", [True, False], ids=["javascript", "no-javascript"], indirect=True)
def test_browser_creates_a_database_from_the_landing_page(live_server, browser, service, request, tmp_path):  # noqa: F811
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    from chalicelib import records

    javascript = request.node.callspec.id == "javascript"
    browser.get(f"{live_server}/")
    create = browser.find_element(By.ID, "create")
    assert create.text == "Create a database"
    browser.save_screenshot(str(tmp_path / f"landing-{request.node.callspec.id}.png"))
    browser.find_element(By.ID, "ref").send_keys("browser-landing")
    create.click()

    url = _wait(browser, "pooled-url").text
    database_id = browser.find_element(By.ID, "database-id").text
    assert records.find(database_id).ref == "browser-landing"
    assert browser.find_element(By.ID, "claim-url").text == f"{live_server}/claim/{database_id}"
    with psycopg.connect(url, connect_timeout=10) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)
    copy = browser.find_element(By.CSS_SELECTOR, 'button[data-copy="pooled-url"]')
    assert copy.is_displayed() is javascript  # progressive enhancement
    countdown = browser.find_element(By.ID, "countdown").text
    assert countdown.endswith(" s") if javascript else countdown.endswith("min")
    shot = tmp_path / f"landing-result-{request.node.callspec.id}.png"
    browser.save_screenshot(str(shot))
    assert shot.stat().st_size > 10_000
    if javascript and os.environ.get("INSTAPG_UPDATE_SCREENSHOTS"):  # the README's pictures, on request
        shutil.copy(tmp_path / "landing-javascript.png", ROOT / "docs" / "landing.png")
        shutil.copy(shot, ROOT / "docs" / "landing-result.png")
    if javascript:
        # Keyboard: the copy button takes focus and answers Enter.
        copy.send_keys("\n")
        # The clipboard write is a promise: the label changes when it settles, not on the key press.
        WebDriverWait(browser, 5).until(lambda _: copy.text in ("Copied", "Selected"))

    # The status form, from the landing page, to the database's page.
    browser.get(f"{live_server}/")
    browser.find_element(By.ID, "lookup-id").send_keys(database_id)
    browser.find_element(By.ID, "lookup").click()
    assert _wait(browser, "status").text == "UNCLAIMED"
    assert browser.current_url == f"{live_server}/database/{database_id}"


def test_the_documents_form_pattern_is_the_api_ref_pattern_or_empty():
    import yaml

    from chalicelib import schemas

    document = yaml.safe_load((ROOT / "chalicelib" / "openapi.yaml").read_text())
    form = document["paths"]["/new"]["post"]["requestBody"]["content"]["application/x-www-form-urlencoded"]
    ref = form["schema"]["properties"]["ref"]
    assert ref["pattern"] == f"^({schemas.REF_PATTERN[1:-1]})?$"
    assert ref["maxLength"] == schemas.MAX_REF_LENGTH
