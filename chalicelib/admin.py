"""The operator's dashboard pages under /admin: Jinja2 templates (autoescape on), one base layout.

Server-rendered and usable without JavaScript (there is none: the charts are
SVG drawn on the server, chalicelib.admincharts), under the claim page's headers:
strict CSP with a nonce, no-store, frame-ancestors 'none'. Authentication
and CSRF: chalicelib.operators (key in a form, then a signed HttpOnly
SameSite=Strict session cookie; a CSRF token in every POST form). The
actions themselves are chalicelib.fleet's, the same the JSON routes call.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import urlencode, urlsplit

from chalicelib import audit, fleet, http, operators, stats
from chalicelib.clock import iso
from chalicelib.errors import DomainError, Invalid, NotFound, RateLimited
from chalicelib.identifiers import parse_database_id
from chalicelib.models import CLAIMED, UNCLAIMED
from chalicelib.pages import Notice, Page, _form
from chalicelib.web import request_scheme

if TYPE_CHECKING:
    from chalicelib.context import Context

TEMPLATES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "templates")
WIDTH = "68rem"
DONE = {
    "delete": "Deleted: the database is dropped and its record is a DELETED tombstone.",
    "extend": "Extended: the new expiry is below.",
    "lock": "Locked: the tenant cannot log in, its sessions were ended.",
    "unlock": "Unlocked: the tenant can log in again.",
}


@functools.lru_cache(maxsize=1)
def environment():
    """The Jinja2 environment (built on first use: jinja2 is not imported by the API's cold start)."""
    import jinja2

    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(TEMPLATES),
        autoescape=True,  # every value is escaped unless it is Markup (the charts' SVG)
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
    )
    env.globals.update(iso=iso, badge=badge)
    return env


def badge(status: str) -> str:
    """The CSS class of a status badge (the claim page's colours)."""
    if status in (UNCLAIMED, CLAIMED):
        return status
    return "gone" if status in ("EXPIRED", "DELETED", "FAILED") else "other"


@dataclass
class AdminPage(Page):
    """A pages.Page (its headers: CSP, no-store...) whose HTML comes from a template."""

    rendered: str = ""

    def html(self) -> str:
        return self.rendered


class AdminPages:
    def __init__(self, ctx: Context, base: str, headers: Mapping[str, str], ip: str | None) -> None:
        self.ctx = ctx
        self.base = base  # the public base URL, for redirects
        self.ip = ip
        self.cookie = operators.cookie_value(dict(headers))
        self.https = request_scheme(headers) == "https"
        self.cookie_path = (urlsplit(base).path.rstrip("/") or "") + "/admin"

    # -- plumbing ----------------------------------------------------------------

    def _operator(self) -> operators.Operator | None:
        return operators.session(self.ctx, self.cookie) if self.cookie else None

    def _render(
        self,
        template: str,
        title: str,
        status: int = 200,
        operator: operators.Operator | None = None,
        notice: Notice | None = None,
        headers: dict[str, str] | None = None,
        **context: Any,
    ) -> AdminPage:
        page = AdminPage(status, title, "", extra_headers=headers or {})
        csrf = operators.csrf_token(self.ctx, self.cookie) if operator and self.cookie else ""
        page.rendered = (
            environment()
            .get_template(template)
            .render(title=title, width=WIDTH, operator=operator, notice=notice, csrf=csrf, **context)
        )
        return page

    def _redirect(self, path: str, headers: dict[str, str] | None = None) -> AdminPage:
        page = AdminPage(303, "Redirect", "", extra_headers={"Location": f"{self.base}{path}", **(headers or {})})
        return page

    def _cookie(self, value: str, max_age: int) -> dict[str, str]:
        header = operators.cookie_header(value, max_age, self.https).replace("Path=/admin", f"Path={self.cookie_path}")
        return {"Set-Cookie": header}

    def _error(self, exc: DomainError) -> Notice:
        return Notice(f"{exc.error}. {exc.hint or ''}".strip())

    # -- logging in and out ------------------------------------------------------

    def login_form(self, notice: Notice | None = None, status: int = 200, headers: dict | None = None) -> AdminPage:
        if notice is None and self._operator() is not None:
            return self._redirect("/admin")
        minutes = self.ctx.settings.admin_session_s // 60
        return self._render(
            "admin_login.html", "Log in", status, notice=notice, headers=headers, session_minutes=minutes
        )

    def login(self, raw_body: bytes | None) -> AdminPage:
        try:
            key = _form(raw_body).get("key")
            _, cookie = operators.login(self.ctx, key, self.ctx.guard, self.ip)
        except RateLimited as exc:
            return self.login_form(self._error(exc), http.status(exc), http.headers(exc))
        except DomainError as exc:
            return self.login_form(self._error(exc), http.status(exc))
        return self._redirect("/admin", self._cookie(cookie, self.ctx.settings.admin_session_s))

    def logout(self, raw_body: bytes | None) -> AdminPage:
        operator = self._operator()
        try:
            token = _form(raw_body).get("csrf")
        except DomainError:
            token = None
        if operator is not None and not operators.check_csrf(self.ctx, self.cookie, token):
            return self._forbidden(operator)
        return self._redirect("/admin/login", self._cookie("", 0))

    def _message(self, operator: operators.Operator, exc: DomainError) -> AdminPage:
        """An error as a page of the dashboard (404, 400), with its status."""
        return self._render("admin_message.html", exc.error, http.status(exc), operator, self._error(exc))

    def _forbidden(self, operator: operators.Operator) -> AdminPage:
        notice = Notice("The form expired. Reload the page and submit it again.")
        return self._render("admin_login.html", "Forbidden", 403, operator, notice, session_minutes=0)

    # -- pages -------------------------------------------------------------------

    def home(self) -> AdminPage:
        operator = self._operator()
        if operator is None:
            return self._redirect("/admin/login")
        from chalicelib import admincharts

        summary = stats.summary(self.ctx)
        return self._render(
            "admin_home.html", "Fleet summary", operator=operator, summary=summary, charts=admincharts.charts(summary)
        )

    def databases(self, params: Mapping[str, str]) -> AdminPage:
        operator = self._operator()
        if operator is None:
            return self._redirect("/admin/login")
        context: dict[str, Any] = {
            "statuses": fleet.STATUSES,
            "plans": list(self.ctx.settings.plans),
            "filters": fleet.Filters(),
            "limit": fleet.DEFAULT_LIMIT,
            "page": fleet.Page([], None, "nothing read"),
            "next_url": None,
        }
        try:
            filters = fleet.parse_filters(self.ctx, params)
            limit = fleet.parse_limit(params.get("limit"))
            page = fleet.page(filters, limit, params.get("cursor") or None)
        except Invalid as exc:
            return self._render("admin_databases.html", "Databases", 400, operator, self._error(exc), **context)
        next_url = None
        if page.cursor:
            next_url = "/admin/databases?" + urlencode({**filters.query(), "limit": limit, "cursor": page.cursor})
        context.update(filters=filters, limit=limit, page=page, next_url=next_url)
        return self._render("admin_databases.html", "Databases", operator=operator, **context)

    def database(
        self, raw_id: str, params: Mapping[str, str], notice: Notice | None = None, status: int = 200
    ) -> AdminPage:
        operator = self._operator()
        if operator is None:
            return self._redirect("/admin/login")
        database_id = parse_database_id(raw_id)
        try:
            record = fleet.require(database_id or "")
            history = fleet.history(record.id, audit.DEFAULT_PAGE, params.get("cursor") or None)
        except (NotFound, Invalid) as exc:
            return self._message(operator, exc)
        if notice is None and params.get("done") in DONE:
            notice = Notice(DONE[params["done"]], "ok")
        next_url = f"/admin/databases/{record.id}?cursor={history.cursor}" if history.cursor else None
        rows = [
            ("Host", record.host_id),
            ("Plan", record.plan),
            ("Ref", record.ref or ""),
            ("Owner", record.owner_id or ""),
            ("Created", f"{iso(record.created_at)} from {record.created_ip or 'no address'}"),
            ("Expires", iso(record.expires_at) if record.status != CLAIMED else "never (claimed)"),
        ]
        if record.status in ("EXPIRED", "DELETED", "FAILED"):  # a tombstone's expires_at is its own TTL
            rows[-1] = ("Ended", f"{iso(record.ended_at)}; record kept until {iso(record.expires_at)}")
        rows += [
            ("Size", f"{int(record.size_bytes) / 1048576:.1f} MB" if record.size_bytes is not None else "not measured"),
            ("Locked", f"{record.locked_reason} since {iso(record.locked_at)}" if record.locked_reason else "no"),
        ]
        actions = []
        if record.status == UNCLAIMED:
            actions.append("extend")
        if record.status in (UNCLAIMED, CLAIMED):
            actions.append("unlock" if record.locked_reason else "lock")
        if record.status in (UNCLAIMED, CLAIMED, "CLAIMING", "DELETING"):
            actions.append("delete")
        return self._render(
            "admin_database.html",
            f"Database {record.id}",
            status,
            operator,
            notice,
            record=record,
            rows=rows,
            actions=actions,
            events=history.events,
            next_url=next_url,
        )

    def action(self, raw_id: str, raw_body: bytes | None) -> AdminPage:
        """The detail page's forms: delete, extend, lock, unlock; then back to the page (303)."""
        operator = self._operator()
        if operator is None:
            return self._redirect("/admin/login")
        database_id = parse_database_id(raw_id)
        try:
            form = _form(raw_body)
            if database_id is None:
                raise NotFound("Database not found", hint="No record has this id.")
        except DomainError as exc:
            return self._message(operator, exc)
        if not operators.check_csrf(self.ctx, self.cookie, form.get("csrf")):
            return self._forbidden(operator)
        action = form.get("action")
        try:
            if action == "delete":
                fleet.force_delete(
                    self.ctx, database_id, operator.actor, self.ip, claimed=form.get("claimed") == "true"
                )
            elif action == "extend":
                hours = (form.get("hours") or "").strip()  # a form sends text; the JSON route wants a number
                fleet.extend(self.ctx, database_id, int(hours) if hours.isdigit() else hours, operator.actor, self.ip)
            elif action == "lock":
                fleet.lock(self.ctx, database_id, operator.actor, self.ip)
            elif action == "unlock":
                fleet.unlock(self.ctx, database_id, operator.actor, self.ip)
            else:
                raise Invalid("Unknown action", hint="Use the page's buttons.")
        except NotFound as exc:
            return self._message(operator, exc)
        except DomainError as exc:
            return self.database(database_id, {}, self._error(exc), http.status(exc))
        return self._redirect(f"/admin/databases/{database_id}?done={action}")
