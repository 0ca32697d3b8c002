"""The claim page: server-rendered HTML for /claim/{id} and /database/{id}.

No framework and no external assets: inline CSS, and a few lines of inline
JavaScript whose only job is the live countdown. Everything works with
JavaScript off: the forms are plain `application/x-www-form-urlencoded` posts
to routes that answer HTML. Every value is escaped with `html.escape`.

CSRF: the claim form carries the API key itself, and the service sets no
cookie, so there is no ambient credential a forged cross-site post could
use. Still, cross-site posts are refused before they get here
(chalicelib.web), so no other site can make its visitors create accounts.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from datetime import UTC, datetime
from html import escape
from typing import TYPE_CHECKING
from urllib.parse import parse_qs

from chalicelib import accounts, auth, charts, http, ownership, records, usage
from chalicelib.clock import iso
from chalicelib.errors import DomainError, Gone, Invalid, NotFound, RateLimited
from chalicelib.identifiers import parse_database_id
from chalicelib.models import CLAIMED, CLAIMING, DELETING, PROVISIONING, UNCLAIMED, DatabaseRecord
from chalicelib.records import Requester

if TYPE_CHECKING:
    from chalicelib.context import Context

MAX_FORM_BYTES = 4096


@dataclass
class Page:
    status: int
    title: str
    body: str  # already-escaped HTML
    nonce: str = field(default_factory=lambda: secrets.token_urlsafe(16))
    extra_headers: dict[str, str] = field(default_factory=dict)
    style: str = ""  # extra CSS of one page (the landing page's)
    script: str = ""  # extra JavaScript of one page, under the same nonce

    def headers(self) -> dict[str, str]:
        return {
            **self.extra_headers,
            "Content-Type": "text/html; charset=utf-8",
            # The page may hold a freshly made API key: never cache it.
            "Cache-Control": "no-store",
            "Content-Security-Policy": (
                f"default-src 'none'; style-src 'unsafe-inline'; script-src 'nonce-{self.nonce}'; "
                "form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
            ),
            "X-Content-Type-Options": "nosniff",
            # frame-ancestors 'none' for current browsers, this for older ones.
            "X-Frame-Options": "DENY",
            # Not no-referrer: under it browsers send `Origin: null` on the
            # page's own form posts, which the cross-site check refuses when
            # Sec-Fetch-Site is missing. Other sites still get no referrer (the id).
            "Referrer-Policy": "same-origin",
        }

    def html(self) -> str:
        return _LAYOUT.format(
            title=escape(self.title), body=self.body, nonce=self.nonce, style=self.style, script=self.script
        )


_LAYOUT = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title} · instapg</title>
<style>
  body {{ font: 16px/1.5 system-ui, -apple-system, "Segoe UI", sans-serif; color: #1c2430; background: #f4f6f9; margin: 0; }}
  main {{ max-width: 40rem; margin: 2.5rem auto; padding: 0 1rem; }}
  header {{ font-weight: 700; color: #336791; letter-spacing: .02em; margin-bottom: 1rem; }}
  .card {{ background: #fff; border: 1px solid #dde3ea; border-radius: 10px; padding: 1.25rem 1.5rem; margin-bottom: 1rem; }}
  h1 {{ font-size: 1.4rem; margin: 0 0 .75rem; }}
  h2 {{ font-size: 1.1rem; margin: 0 0 .5rem; }}
  dl {{ display: grid; grid-template-columns: max-content 1fr; gap: .3rem 1rem; margin: 0; }}
  dt {{ color: #5b6675; }} dd {{ margin: 0; word-break: break-all; }}
  .badge {{ display: inline-block; padding: .05rem .55rem; border-radius: 99px; font-size: .85rem; font-weight: 600; }}
  .UNCLAIMED {{ background: #fff4d6; color: #7a5300; }} .CLAIMED {{ background: #dff5e3; color: #1d6b2f; }}
  .gone {{ background: #fde2e1; color: #8a1c17; }} .other {{ background: #e6ecf3; color: #2c4a6b; }}
  label {{ display: block; font-weight: 600; margin: .5rem 0 .25rem; }}
  input {{ width: 100%; box-sizing: border-box; padding: .55rem .6rem; font: inherit; border: 1px solid #b9c3cf; border-radius: 6px; }}
  button {{ margin-top: .75rem; padding: .55rem 1.1rem; font: inherit; font-weight: 600; color: #fff; background: #336791; border: 0; border-radius: 6px; cursor: pointer; }}
  button:hover {{ background: #28557a; }}
  .error {{ background: #fde2e1; border-color: #f3b5b2; color: #8a1c17; }}
  .ok {{ background: #dff5e3; border-color: #a9dcb4; }}
  code, pre {{ font: 14px/1.4 ui-monospace, SFMono-Regular, Menlo, monospace; }}
  pre {{ background: #f0f3f7; padding: .6rem .75rem; border-radius: 6px; overflow-x: auto; white-space: pre-wrap; word-break: break-all; }}
  .key {{ font-size: 1rem; background: #fffbe6; border: 1px dashed #d9b64a; }}
  .muted {{ color: #5b6675; font-size: .9rem; }}
  .chart {{ margin: .5rem 0 0; }} .chart svg {{ display: block; background: #f7f9fb; }}
  :focus-visible {{ outline: 3px solid #1f5f99; outline-offset: 2px; }}
{style}
</style>
</head>
<body>
<main>
<header>instapg</header>
{body}
</main>
<script nonce="{nonce}">
  // Live countdown; without JavaScript the server-rendered text stays.
  for (const el of document.querySelectorAll("[data-expires]")) {{
    const end = Number(el.dataset.expires) * 1000;
    const tick = () => {{
      let s = Math.max(0, Math.floor((end - Date.now()) / 1000));
      if (s === 0) {{ el.textContent = "expired"; return; }}
      const h = Math.floor(s / 3600); s %= 3600;
      const m = Math.floor(s / 60); s %= 60;
      el.textContent = h + " h " + String(m).padStart(2, "0") + " min " + String(s).padStart(2, "0") + " s";
      setTimeout(tick, 1000);
    }};
    tick();
  }}
{script}
</script>
</body>
</html>
"""


def _card(inner: str, kind: str = "") -> str:
    return f'<section class="card {kind}">{inner}</section>'


def _remaining(seconds: int) -> str:
    seconds = max(0, seconds)
    hours, rest = divmod(seconds, 3600)
    return f"{hours} h {rest // 60:02d} min"


def _size(size_bytes: int | None) -> str:
    if size_bytes is None:
        return "unknown"
    return f"{size_bytes / (1024 * 1024):.1f} MB"


def _badge(status: str) -> str:
    kind = status if status in (UNCLAIMED, CLAIMED) else ("gone" if status in ("EXPIRED", "DELETED") else "other")
    return f'<span class="badge {kind}" id="status">{escape(status)}</span>'


@dataclass(frozen=True)
class Notice:
    text: str
    kind: str = "error"


class ClaimPages:
    def __init__(self, ctx: Context, api_base: str) -> None:
        self.ctx = ctx
        self.api_base = api_base  # e.g. https://db.example.com, for the curl examples

    # -- GET -------------------------------------------------------------------

    def show(self, raw_id: str, notice: Notice | None = None, status: int = 200) -> Page:
        database_id = parse_database_id(raw_id)
        if database_id is None:
            return self._not_found()
        record = records.find(database_id)
        if record is None:
            return self._not_found()
        try:
            records.get(self.ctx, database_id)  # raises Gone for tombstones and past expiry
        except Gone as gone:
            return self._gone(database_id, gone)
        return self._database(record, notice, status)

    def _database(self, record: DatabaseRecord, notice: Notice | None, status: int) -> Page:
        plan = self.ctx.settings.plan(record.plan)
        rows = [("Database", f"<code>{escape(record.id)}</code>"), ("Status", _badge(record.status))]
        if record.status == UNCLAIMED and record.expires_at is not None:
            left = int((record.expires_at - datetime.now(UTC)).total_seconds())
            epoch = int(record.expires_at.timestamp())
            rows.append(
                (
                    "Expires in",
                    f'<span id="countdown" data-expires="{epoch}">{escape(_remaining(left))}</span>'
                    f' <span class="muted">({escape(iso(record.expires_at) or "")})</span>',
                )
            )
        rows.append(("Created", escape(iso(record.created_at) or "")))
        if record.status == UNCLAIMED:  # a claimed database's usage is its owner's business
            rows.append(("Size", f"{escape(self._size(record))} of {plan.storage_mb} MB"))
        rows.append(("Connections", f"up to {plan.connections}"))
        table = "".join(f"<dt>{k}</dt><dd>{v}</dd>" for k, v in rows)
        parts = []
        if notice is not None:
            parts.append(_card(f'<p id="notice">{escape(notice.text)}</p>', notice.kind))
        parts.append(_card(f"<h1>{self._headline(record)}</h1><dl>{table}</dl>"))
        if record.status == UNCLAIMED:  # whoever holds the id sees its usage, as its size above
            parts.append(self._usage(record.id))
            parts.append(self._forms(record))
        return Page(status, f"Database {record.id}", "".join(parts))

    @staticmethod
    def _usage(database_id: str) -> str:
        """Size, peak connections and transfer per day over the last 30 days (chalicelib.usage)."""
        try:
            days = usage.last_days(database_id)
        except Exception:  # a chart is not worth failing the page for
            return ""
        return _card(
            "<h2>Usage, last 30 days</h2>"
            + charts.bars(days, "size_bytes", "Size (last sample of the day)", "chart-size")
            + charts.bars(days, "connections_peak", "Connections (peak of per-minute samples)", "chart-connections")
            + charts.bars(days, "transfer", "Transfer through the pooler (in + out)", "chart-transfer"),
            "usage",
        )

    @staticmethod
    def _headline(record: DatabaseRecord) -> str:
        return {
            UNCLAIMED: "This database is unclaimed",
            CLAIMED: "This database has been claimed",
            CLAIMING: "A claim of this database is under way",
            PROVISIONING: "This database is being created",
            DELETING: "This database is being deleted",
        }.get(record.status, "Database")

    def _size(self, record: DatabaseRecord) -> str:
        try:
            return _size(ownership.usage(self.ctx, record).size_bytes)
        except DomainError:
            return "unknown"

    def _forms(self, record: DatabaseRecord) -> str:
        rid = escape(record.id)
        claim = _card(
            "<h2>Claim it to keep it</h2>"
            '<p class="muted">A claimed database never expires and gets the larger plan.</p>'
            f'<form method="post" action="/claim/{rid}" id="claim-form">'
            '<label for="api_key">Your API key</label>'
            '<input id="api_key" name="api_key" type="password" autocomplete="off" required '
            'placeholder="ipg_…" spellcheck="false">'
            + self._token_field("claim_creator_token")
            + '<button type="submit" id="claim">Claim database</button></form>'
        )
        if not self.ctx.settings.open_signup:
            return claim
        signup = _card(
            "<h2>No account yet?</h2>"
            '<p class="muted">Create one with your email: this database is claimed for it, '
            "and your API key is shown once.</p>"
            f'<form method="post" action="/claim/{rid}/account" id="signup-form">'
            '<label for="email">Email</label>'
            '<input id="email" name="email" type="email" autocomplete="email" required>'
            + self._token_field("signup_creator_token")
            + '<button type="submit" id="signup">Create account and claim</button></form>'
        )
        return claim + signup

    def _token_field(self, element_id: str) -> str:
        """With INSTAPG_CLAIM_REQUIRES_TOKEN, the forms ask for the creator token too."""
        if not self.ctx.settings.claim_requires_token:
            return ""
        return (
            f'<label for="{element_id}">Creator token (returned when the database was created)</label>'
            f'<input id="{element_id}" name="creator_token" type="password" autocomplete="off" required '
            'placeholder="ipgc_…" spellcheck="false">'
        )

    def _limited(self, exc: RateLimited) -> Page:
        """Too many failed keys from this address: a short page, with no work behind it."""
        body = _card(f'<h1 id="headline">{escape(exc.error)}</h1><p id="notice">{escape(exc.hint or "")}</p>', "error")
        return Page(http.status(exc), exc.error, body, extra_headers=http.headers(exc))

    def _not_found(self) -> Page:
        body = _card(
            '<h1 id="headline">Database not found</h1>'
            "<p>No database has this id. Check the link, or create a new database:</p>"
            f"<pre>curl -X POST {escape(self.api_base)}/api/v1/database -H 'Content-Type: application/json' "
            '-d \'{"ref": "my-app"}\'</pre>'
        )
        return Page(404, "Database not found", body)

    def _gone(self, database_id: str, gone: Gone) -> Page:
        when = gone.extra.get("expired_at") or gone.extra.get("deleted_at")
        body = _card(
            f'<h1 id="headline">{escape(gone.error)}</h1>'
            f"<p>Database <code>{escape(database_id)}</code> is gone"
            + (f" since {escape(when)}" if when else "")
            + f".</p><p>{escape(gone.hint or '')}</p>"
            f"<pre>curl -X POST {escape(self.api_base)}/api/v1/database -H 'Content-Type: application/json' "
            '-d \'{"ref": "my-app"}\'</pre>',
            "gone-card",
        )
        return Page(410, gone.error, body)

    # -- POST ------------------------------------------------------------------

    def claim_with_key(self, raw_id: str, raw_body: bytes | None, requester: Requester) -> Page:
        try:
            form = _form(raw_body)
            account = auth.check_key(form.get("api_key"), self.ctx.guard, requester.ip)
        except RateLimited as exc:
            return self._limited(exc)
        except DomainError as exc:
            return self.show(raw_id, Notice(f"{exc.error}. {exc.hint or ''}"), status=http.status(exc))
        return self._claim(raw_id, account.id, requester, form.get("creator_token"))

    def signup_and_claim(self, raw_id: str, raw_body: bytes | None, requester: Requester) -> Page:
        database_id = parse_database_id(raw_id)
        record = records.find(database_id) if database_id else None
        if record is None:
            return self._not_found()
        try:
            # A form without a usable email is a 400 whatever the database's state.
            email = accounts.parse_email(_form(raw_body).get("email"))
        except DomainError as exc:
            return self.show(raw_id, Notice(f"{exc.error}. {exc.hint or ''}"), status=http.status(exc))
        if not records.claimable(record):
            # Claimed or gone meanwhile: say so, and make no account for nothing.
            return self.show(database_id)
        try:
            token = _form(raw_body).get("creator_token")
            # Check the token before making an account that could not claim.
            ownership.check_claim_token(self.ctx, record, token, requester)
            new = accounts.signup(self.ctx.settings, email)
        except RateLimited as exc:
            return self._limited(exc)
        except DomainError as exc:
            return self.show(raw_id, Notice(f"{exc.error}. {exc.hint or ''}"), status=http.status(exc))
        result = self._claim(raw_id, new.account.id, requester, token)
        key = _card(
            "<h2>Your API key</h2>"
            "<p><strong>Copy it now: it is shown only once.</strong> It is how you manage your databases.</p>"
            f'<pre class="key" id="api-key">{escape(new.api_key)}</pre>'
            f'<p class="muted">Account {escape(new.account.id)} for {escape(new.account.email)}</p>'
        )
        result.body = key + result.body
        return result

    def _claim(self, raw_id: str, account_id: str, requester: Requester, creator_token: str | None = None) -> Page:
        database_id = parse_database_id(raw_id)
        if database_id is None:
            return self._not_found()
        try:
            ownership.claim(self.ctx, database_id, account_id, requester, creator_token)
        except RateLimited as exc:
            return self._limited(exc)
        except NotFound:
            return self._not_found()
        except Gone as gone:
            return self._gone(database_id, gone)
        except DomainError as exc:
            return self.show(database_id, Notice(f"{exc.error}. {exc.hint or ''}"), status=http.status(exc))
        base = escape(self.api_base)
        rid = escape(database_id)
        done = _card(
            '<h2 id="claimed">Claimed: this database is yours</h2>'
            "<p>It no longer expires. Get its connection string with your API key:</p>"
            f'<pre>curl -H "Authorization: Bearer $INSTAPG_API_KEY" '
            f"{base}/api/v1/databases/{rid}/connection-string</pre>"
            '<p class="muted">The connection string you had keeps working. '
            f"List your databases: <code>GET {base}/api/v1/databases</code></p>",
            "ok",
        )
        page = self.show(database_id)
        page.body = done + page.body + self._usage(database_id)  # the owner's view
        return page


def _form(raw_body: bytes | None) -> dict[str, str]:
    """A url-encoded form as {name: first value}."""
    if raw_body and len(raw_body) > MAX_FORM_BYTES:
        raise Invalid("Form too large", hint="Send only the form's fields.")
    try:
        fields = parse_qs((raw_body or b"").decode(), max_num_fields=10)
    except (UnicodeDecodeError, ValueError):
        raise Invalid("The form could not be read", hint="Submit the form on this page.") from None
    return {k: v[0] for k, v in fields.items()}
