"""The landing page at `/`: what instapg is, a Create button, and the result page.

Server-rendered in the claim page's layout (chalicelib.pages: same CSS, CSP
nonce, no-store). The Create form is a same-origin url-encoded POST to
/new that goes through the API's own create path (creation.create: rate
limits, host caps, idempotency); the cross-site rule (chalicelib.web) has
refused a post from another site before it gets here. The form carries a
fresh Idempotency-Key, so a double click or a resubmitted result page shows
the same database instead of making a second one.

The result page shows secrets (the password inside the connection strings,
the creator token): Page always sends `Cache-Control: no-store`. Copy buttons
are progressive enhancement: hidden until the script shows them, and the
strings are plain selectable text without JavaScript.
"""

from __future__ import annotations

import dataclasses
import secrets
from html import escape
from typing import TYPE_CHECKING

from chalicelib import http, schemas
from chalicelib.abuse import parse_idempotency_key
from chalicelib.clock import iso, now
from chalicelib.errors import DomainError
from chalicelib.identifiers import parse_database_id
from chalicelib.pages import Page, _card, _form, _remaining
from chalicelib.settings import TRIAL_PLAN

if TYPE_CHECKING:
    from chalicelib.context import Context
    from chalicelib.records import Provisioned, Requester

DEFAULT_REF = "instapg-web"  # the ref of a database made from the page when the form names none

_STYLE = """
  .lead { font-size: 1.05rem; margin: 0 0 .5rem; }
  .field { display: flex; gap: .5rem; align-items: flex-start; }
  .field pre { flex: 1; margin: .25rem 0 .75rem; }
  button.copy { margin-top: .25rem; padding: .45rem .8rem; font-size: .9rem; white-space: nowrap; }
  h3 { font-size: 1rem; margin: .75rem 0 .1rem; }
  a { color: #1f5f99; }
"""

# Shows the copy buttons and makes them copy; without JavaScript they stay hidden.
_SCRIPT = """
  for (const button of document.querySelectorAll("button[data-copy]")) {
    button.hidden = false;
    button.addEventListener("click", async () => {
      const source = document.getElementById(button.dataset.copy);
      try {
        await navigator.clipboard.writeText(source.textContent);
        button.textContent = "Copied";
      } catch (e) {  // no clipboard access: select the text for Ctrl+C
        const range = document.createRange();
        range.selectNodeContents(source);
        getSelection().removeAllRanges();
        getSelection().addRange(range);
        button.textContent = "Selected";
      }
      setTimeout(() => { button.textContent = "Copy"; }, 2000);
    });
  }
"""


def _copyable(element_id: str, label: str, text: str) -> str:
    """A labelled block of text with a copy button (shown by the script)."""
    eid = escape(element_id)
    return (
        f'<h3 id="{eid}-label">{escape(label)}</h3>'
        f'<div class="field"><pre id="{eid}" aria-labelledby="{eid}-label">{escape(text)}</pre>'
        f'<button type="button" class="copy" data-copy="{eid}" aria-label="Copy {escape(label)}" hidden>'
        "Copy</button></div>"
    )


def snippets(url: str) -> list[tuple[str, str, str]]:
    """(element id, label, text) of the copy-paste snippets for a connection string."""
    return [
        ("snippet-psql", "psql", f'psql "{url}"'),
        ("snippet-env", ".env", f"DATABASE_URL={url}"),
        (
            "snippet-node",
            "Node.js (pg)",
            'import pg from "pg";\n\n'
            "const client = new pg.Client({ connectionString: process.env.DATABASE_URL });\n"
            "await client.connect();\n"
            'console.log((await client.query("SELECT version()")).rows[0]);\n'
            "await client.end();",
        ),
        (
            "snippet-psycopg",
            "Python (psycopg)",
            "import os\n\nimport psycopg\n\n"
            "# prepare_threshold=None: the pooled string is PgBouncer in transaction mode\n"
            'with psycopg.connect(os.environ["DATABASE_URL"], prepare_threshold=None) as conn:\n'
            '    print(conn.execute("SELECT version()").fetchone())',
        ),
    ]


class LandingPages:
    def __init__(self, ctx: Context, api_base: str) -> None:
        self.ctx = ctx
        self.api_base = api_base  # the public base URL, for links and the curl example

    def _page(self, status: int, title: str, body: str, extra_headers: dict[str, str] | None = None) -> Page:
        return Page(status, title, body, extra_headers=extra_headers or {}, style=_STYLE, script=_SCRIPT)

    # -- GET / -------------------------------------------------------------------

    def home(self, notice: DomainError | None = None) -> Page:
        """The landing page; with `notice`, the error a create got (its status and headers too)."""
        lifetime = self.ctx.plan(TRIAL_PLAN).lifetime_s or 0
        parts = []
        if notice is not None:
            parts.append(
                _card(
                    f'<h1 id="headline">{escape(notice.error)}</h1><p id="notice">{escape(notice.hint or "")}</p>',
                    "error",
                )
            )
        parts.append(
            _card(
                "<h1>A PostgreSQL database in one click</h1>"
                '<p class="lead">instapg gives you an isolated PostgreSQL database right away, with no sign-up.</p>'
                f"<p>It lasts {lifetime // 3600} hours; claim it with an account to keep it.</p>"
                '<form method="post" action="/new" id="create-form">'
                f'<input type="hidden" name="idempotency_key" value="{escape(secrets.token_urlsafe(18))}">'
                '<label for="ref">App name <span class="muted">(optional)</span></label>'
                '<input id="ref" name="ref" maxlength="128" autocomplete="off" spellcheck="false" '
                'placeholder="my-app">'
                '<button type="submit" id="create">Create a database</button></form>'
                '<p class="muted">Or from a terminal: '
                f"<code>curl -X POST {escape(self.api_base)}/api/v1/database -H 'Content-Type: application/json' "
                '-d \'{"ref": "my-app"}\'</code></p>'
            )
        )
        parts.append(
            _card(
                "<h2>Status of an existing database</h2>"
                '<form method="get" action="/database" id="lookup-form">'
                '<label for="lookup-id">Database id</label>'
                '<input id="lookup-id" name="id" required autocomplete="off" spellcheck="false" '
                'placeholder="0190a2b4-6c1e-7d3f-8a9b-0c1d2e3f4a5b">'
                '<button type="submit" id="lookup">Show status</button></form>'
            )
        )
        if notice is None:
            return self._page(200, "Create a PostgreSQL database", "".join(parts))
        return self._page(http.status(notice), notice.error, "".join(parts), http.headers(notice))

    # -- POST /new ---------------------------------------------------------------

    def create(self, raw_body: bytes | None, requester: Requester) -> Page:
        """The Create form: the API's create path, answered as the result page (or the error on /)."""
        from chalicelib import creation

        try:
            form = _form(raw_body)
            request = schemas.create_database({"ref": form.get("ref") or DEFAULT_REF})
            key = parse_idempotency_key(form.get("idempotency_key")) or requester.idempotency_key
            result = creation.create(self.ctx, request, dataclasses.replace(requester, idempotency_key=key))
        except DomainError as exc:
            return self.home(exc)
        return self._result(result)

    def _result(self, result: Provisioned) -> Page:
        from chalicelib import views

        record = result.record
        rid = escape(record.id)
        claim_url = f"{self.api_base}/claim/{record.id}"
        rows = [("Database", f'<code id="database-id">{rid}</code>')]
        if record.expires_at is not None:
            left = int((record.expires_at - now()).total_seconds())
            rows.append(
                (
                    "Expires in",
                    f'<span id="countdown" data-expires="{int(record.expires_at.timestamp())}">'
                    f"{escape(_remaining(left))}</span>"
                    f' <span class="muted" id="expires-at">({escape(iso(record.expires_at) or "")})</span>',
                )
            )
        rows.append(("Claim link", f'<a id="claim-url" href="{escape(claim_url)}">{escape(claim_url)}</a>'))
        table = "".join(f"<dt>{k}</dt><dd>{v}</dd>" for k, v in rows)
        headline = "Your database is ready" if result.created else "This form already created a database"
        parts = [
            _card(
                f'<h1 id="created">{headline}</h1><dl>{table}</dl>'
                '<p class="muted">Unclaimed databases are deleted when they expire. '
                "Open the claim link to keep it.</p>",
                "ok",
            )
        ]
        if result.host is not None and result.password is not None:
            pooled, direct = views.connection_urls(record, result.host, result.password)
            parts.append(
                _card(
                    "<h2>Connection strings</h2>"
                    + _copyable("pooled-url", "Pooled (for apps and serverless)", pooled)
                    + _copyable("direct-url", "Direct (for migrations, pg_dump, LISTEN)", direct)
                )
            )
        if result.creator_token is not None:
            parts.append(
                _card(
                    "<h2>Creator token</h2>"
                    "<p><strong>Copy it now: it is shown only once.</strong> It proves you created this database: "
                    "send it to delete the database before it expires "
                    f"(<code>curl -X DELETE {escape(self.api_base)}/api/v1/database/{rid} "
                    '-H "Authorization: Bearer $TOKEN"</code>), and with a claim where the operator requires it.</p>'
                    + _copyable("creator-token", "Creator token", result.creator_token)
                )
            )
        else:
            parts.append(
                _card(
                    '<p class="muted" id="token-shown">The creator token was shown when this database was created.</p>'
                )
            )
        if result.host is not None and result.password is not None:  # the snippets after the one-time token
            parts.append(
                _card("<h2>Use it</h2>" + "".join(_copyable(eid, label, text) for eid, label, text in snippets(pooled)))
            )
        parts.append(_card('<p><a href="/">Create another database</a></p>'))
        return self._page(201 if result.created else 200, f"Database {record.id}", "".join(parts))

    # -- GET /database?id= ---------------------------------------------------------

    def lookup_location(self, raw_id: str | None) -> str | None:
        """Where the status form's id leads (the database's page), or None when it is no database id."""
        database_id = parse_database_id(raw_id or "")
        return None if database_id is None else f"{self.api_base}/database/{database_id}"
