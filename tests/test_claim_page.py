"""The claim page: HTML over chalice's test client, then in a real headless Chromium.

The browser tests need Debian's chromium and chromium-driver, which
`make test` installs (tools/dev/install-chromium.sh). Without them the browser
tests are skipped, except under CI=true, where they fail.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import threading
import uuid
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import urlencode

import psycopg
import pytest

from tests.conftest import post_json

ROOT = Path(__file__).resolve().parent.parent
SCREENSHOT_DIR = ROOT / ".local" / "screenshots"
FORM = {"Content-Type": "application/x-www-form-urlencoded"}


def create(client) -> dict:
    response = post_json(client, "/api/v1/database", {"ref": "page-tests"})
    assert response.status_code == 201
    return response.json_body


def signup(client, email="page@example.com") -> str:
    return post_json(client, "/api/v1/accounts", {"email": email}).json_body["api_key"]


def html(response) -> str:
    assert response.headers["Content-Type"] == "text/html; charset=utf-8"
    return response.body.decode()


# -- the page over chalice's test client ---------------------------------------


@pytest.mark.parametrize("prefix", ["/claim", "/database"])
def test_page_of_an_unclaimed_database(client, prefix):
    database = create(client)
    response = client.http.get(f"{prefix}/{database['id']}")
    assert response.status_code == 200
    page = html(response)
    assert "This database is unclaimed" in page
    assert 'id="countdown" data-expires="' in page
    assert re.search(r'id="countdown" data-expires="\d+">7[01] h \d\d min<', page)
    assert "MB of 100 MB" in page
    assert f'action="/claim/{database["id"]}"' in page
    assert f'action="/claim/{database["id"]}/account"' in page
    # The page never shows the connection string or password.
    assert database["connection_string"] not in page
    password = psycopg.conninfo.conninfo_to_dict(database["connection_string"])["password"]
    assert password not in page
    assert "script-src 'nonce-" in response.headers["Content-Security-Policy"]
    assert response.headers["Cache-Control"] == "no-store"


def test_page_shows_usage_charts_as_inline_svg(client):
    from chalicelib import charts, context, metering, usage
    from chalicelib.clock import Deadline
    from chalicelib.models import UsageDay

    database = create(client)
    metering.run(context.get(), Deadline.after(30))
    response = client.http.get(f"/claim/{database['id']}")
    page = html(response)
    assert page.count("<svg ") == 3 and 'id="chart-connections"' in page
    today = usage.day_key(datetime.now(UTC))
    row = UsageDay.get(database["id"], today, consistent_read=True)
    assert f"<title>{today}: {charts.human_bytes(int(row.size_bytes))}</title>" in page
    assert "default-src 'none'" in response.headers["Content-Security-Policy"]  # nothing fetched, no new script
    assert page.count("<script") == 1


def test_page_of_unknown_and_malformed_ids(client):
    for path in [f"/claim/{uuid.uuid4()}", "/claim/nope", "/database/%3Cscript%3E"]:
        response = client.http.get(path)
        assert response.status_code == 404, path
        page = html(response)
        assert "Database not found" in page
        assert "<script>" not in page.split("<script nonce=")[0]


def test_page_of_expired_and_claimed_databases(client, service):
    from chalicelib.models import DatabaseRecord

    expired = create(client)
    DatabaseRecord(id=expired["id"]).update(actions=[DatabaseRecord.status.set("EXPIRED")])
    response = client.http.get(f"/claim/{expired['id']}")
    assert response.status_code == 410
    assert "Database expired" in html(response)

    claimed = create(client)
    key = signup(client)
    client.http.post(f"/api/v1/database/{claimed['id']}/claim", headers={"Authorization": f"Bearer {key}"})
    response = client.http.get(f"/claim/{claimed['id']}")
    assert response.status_code == 200
    page = html(response)
    assert "This database has been claimed" in page
    assert 'id="claim-form"' not in page


def test_claim_with_a_key_by_form_post(client, service):
    from chalicelib import records
    database = create(client)
    key = signup(client)
    response = client.http.post(f"/claim/{database['id']}", body=urlencode({"api_key": key}), headers=FORM)
    assert response.status_code == 200
    page = html(response)
    assert "Claimed: this database is yours" in page
    assert key not in page  # a key the user typed is not echoed back
    assert records.find(database["id"]).status == "CLAIMED"


def test_claim_form_with_a_bad_key_shows_the_error(client, service):
    from chalicelib import records
    database = create(client)
    response = client.http.post(f"/claim/{database['id']}", body=urlencode({"api_key": "nope"}), headers=FORM)
    assert response.status_code == 401
    page = html(response)
    assert "Invalid API key" in page and 'id="claim-form"' in page
    response = client.http.post(f"/claim/{database['id']}", body="", headers=FORM)
    assert response.status_code == 401 and "Missing API key" in html(response)
    assert records.find(database["id"]).status == "UNCLAIMED"


def test_signup_form_creates_an_account_claims_and_shows_the_key_once(client, service):
    from chalicelib import accounts, records

    database = create(client)
    response = client.http.post(
        f"/claim/{database['id']}/account", body=urlencode({"email": "new@example.com"}), headers=FORM
    )
    assert response.status_code == 200
    page = html(response)
    key = page.split('<pre class="key" id="api-key">')[1].split("</pre>")[0]
    owner = accounts.authenticate(key)
    assert owner.email == "new@example.com"
    assert records.find(database["id"]).owner_id == owner.id
    # Reloading the page does not show the key again.
    assert key not in html(client.http.get(f"/claim/{database['id']}"))


def test_signup_form_escapes_and_validates(client):
    database = create(client)
    response = client.http.post(f"/claim/{database['id']}/account", body=urlencode({"email": "<b>x</b>"}), headers=FORM)
    assert response.status_code == 400
    page = html(response)
    assert "not an email address" in page
    assert "<b>x</b>" not in page


def test_signup_form_is_hidden_when_signup_is_closed(client, instapg_env):
    from chalicelib import context

    instapg_env.setenv("INSTAPG_OPEN_SIGNUP", "false")
    context.reset()
    database = create(client)
    page = html(client.http.get(f"/claim/{database['id']}"))
    assert 'id="claim-form"' in page and 'id="signup-form"' not in page
    response = client.http.post(
        f"/claim/{database['id']}/account", body=urlencode({"email": "a@example.com"}), headers=FORM
    )
    assert response.status_code == 403 and "Signup is closed" in html(response)


# -- a real browser --------------------------------------------------------------


def _browser_tools() -> tuple[str, str] | None:
    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    return (chromium, driver) if chromium and driver else None


@pytest.fixture
def live_server(host):
    """The app served over real HTTP by chalice local's server, in a thread of this process.

    moto (mock_aws, from the `aws` fixture) patches botocore process-wide, so
    the served app talks to the same in-process DynamoDB as the test.
    """
    from tools.dev.localserver import create_server
    from tools.dev.pgserver import free_port

    saved = dict(os.environ)
    port = free_port()
    server = create_server(ROOT, "127.0.0.1", port)
    thread = threading.Thread(target=server.server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.shutdown()
        server.server.server_close()
        os.environ.clear()
        os.environ.update(saved)


def _chrome(javascript: bool):
    tools = _browser_tools()
    if tools is None:
        if os.environ.get("CI"):
            pytest.fail(
                "chromium and chromium-driver are missing: tools/dev/install-chromium.sh should have installed them"
            )
        pytest.skip("chromium and chromium-driver are not installed (run tools/dev/install-chromium.sh as root)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="instapg-chrome-")
    options = webdriver.ChromeOptions()
    options.binary_location = tools[0]
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--window-size=1000,1100",
        f"--user-data-dir={profile}",
    ):
        options.add_argument(flag)
    if not javascript:
        options.add_argument("--blink-settings=scriptEnabled=false")
    driver = webdriver.Chrome(options=options, service=Service(executable_path=tools[1]))
    driver.set_page_load_timeout(30)
    return driver, profile


@pytest.fixture
def browser(request):
    driver, profile = _chrome(javascript=request.param)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def _create_over_http(base: str) -> dict:
    import json
    import urllib.request

    req = urllib.request.Request(
        f"{base}/api/v1/database",
        data=b'{"ref": "browser-test"}',
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(req, timeout=30) as resp:
        assert resp.status == 201
        return json.loads(resp.read())


def _wait(browser, element_id: str):
    """The element once the page that has it has loaded (a click does not wait for the next page)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(browser, 30).until(expected_conditions.presence_of_element_located((By.ID, element_id)))


@pytest.mark.parametrize("browser", [True, False], ids=["javascript", "no-javascript"], indirect=True)
def test_browser_signs_up_and_claims_from_the_claim_url(live_server, browser, service, request):
    import time

    from selenium.webdriver.common.by import By

    from chalicelib import accounts, context, metering, records, usage
    from chalicelib.clock import Deadline

    javascript = request.node.callspec.id == "javascript"
    database = _create_over_http(live_server)
    assert database["claim_url"] == f"{live_server}/claim/{database['id']}"
    metering.run(context.get(), Deadline.after(30))  # today's usage row, as the schedule writes it
    browser.get(database["claim_url"])
    assert browser.find_element(By.ID, "status").text == "UNCLAIMED"
    chart = browser.find_element(By.ID, "chart-size")  # inline SVG: drawn under the page's CSP
    assert chart.size["height"] == 60 and chart.size["width"] > 200
    bars = [b.get_attribute("textContent") for b in chart.find_elements(By.TAG_NAME, "rect")]
    assert len(bars) == 1 + usage.KEEP_DAYS  # the baseline, then a bar a day
    assert bars[-1].startswith(usage.day_key(datetime.now(UTC)) + ": ") and bars[-1].endswith(" MB")
    countdown = browser.find_element(By.ID, "countdown")
    first = countdown.text
    if javascript:
        # The script turns "71 h 59 min" into a ticking "71 h 59 min 58 s".
        time.sleep(1.5)
        assert countdown.text.endswith(" s") and countdown.text != first
    else:
        time.sleep(1.5)
        assert countdown.text == first and first.endswith("min")

    SCREENSHOT_DIR.mkdir(parents=True, exist_ok=True)
    browser.save_screenshot(str(SCREENSHOT_DIR / f"claim-page-{request.node.callspec.id}.png"))

    browser.find_element(By.ID, "email").send_keys("browser@example.com")
    browser.find_element(By.ID, "signup").click()
    assert "this database is yours" in _wait(browser, "claimed").text
    key = browser.find_element(By.ID, "api-key").text
    assert browser.find_element(By.ID, "status").text == "CLAIMED"
    assert browser.find_element(By.ID, "chart-transfer").size["height"] == 60  # the owner's view keeps the charts
    browser.save_screenshot(str(SCREENSHOT_DIR / f"claimed-{request.node.callspec.id}.png"))
    owner = accounts.authenticate(key)
    assert records.find(database["id"]).owner_id == owner.id

    # A second database, claimed with the key just shown, through the key form.
    second = _create_over_http(live_server)
    browser.get(second["claim_url"])
    browser.find_element(By.ID, "api_key").send_keys(key)
    browser.find_element(By.ID, "claim").click()
    assert "this database is yours" in _wait(browser, "claimed").text
    assert records.find(second["id"]).owner_id == owner.id

    # Claiming it again with a wrong key shows an error on the page, not a JSON body.
    third = _create_over_http(live_server)
    browser.get(third["claim_url"])
    browser.find_element(By.ID, "api_key").send_keys("ipg_wrong")
    browser.find_element(By.ID, "claim").click()
    assert "Invalid API key" in _wait(browser, "notice").text
    assert records.find(third["id"]).status == "UNCLAIMED"


def test_claim_form_for_a_database_someone_else_claimed_is_409(client):
    database = create(client)
    owner, other = signup(client, "o@example.com"), signup(client, "x@example.com")
    assert (
        client.http.post(f"/claim/{database['id']}", body=urlencode({"api_key": owner}), headers=FORM).status_code
        == 200
    )
    response = client.http.post(f"/claim/{database['id']}", body=urlencode({"api_key": other}), headers=FORM)
    assert response.status_code == 409
    page = html(response)
    assert "Database already claimed" in page and "This database has been claimed" in page


def test_signup_form_on_a_claimed_database_makes_no_account(client):
    from chalicelib.models import AccountRecord

    database = create(client)
    key = signup(client)
    client.http.post(f"/api/v1/database/{database['id']}/claim", headers={"Authorization": f"Bearer {key}"})
    before = AccountRecord.count()
    response = client.http.post(
        f"/claim/{database['id']}/account", body=urlencode({"email": "late@example.com"}), headers=FORM
    )
    assert response.status_code == 200
    page = html(response)
    assert "This database has been claimed" in page and 'id="api-key"' not in page
    assert AccountRecord.count() == before
