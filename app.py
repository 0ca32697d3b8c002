"""instapg: routes and event handlers only. The logic lives in chalicelib/."""

import os

from chalice import Chalice, Rate, Response

from chalicelib import apidoc, context, schemas
from chalicelib.clock import Deadline
from chalicelib.errors import Invalid
from chalicelib.http import json_errors, json_response, store_outages
from chalicelib.identifiers import parse_client_id, parse_database_id
from chalicelib.settings import load as load_settings
from chalicelib.web import base_url, http_policy

app = Chalice(app_name="instapg")
# Registered first, so outermost: origin checks before, security headers after everything.
app.register_middleware(http_policy, "http")
app.register_middleware(json_errors, "http")


@app.middleware("all")
def structured_logs(event, get_response):
    """JSON log lines carrying this invocation's request ids (chalicelib/logs.py)."""
    from chalicelib import logs

    if os.environ.get("AWS_LAMBDA_FUNCTION_NAME"):  # the local stack keeps plain lines
        logs.configure()
    # An HTTP request carries its Lambda context; a stream or schedule event has it as `context`.
    # (`app.lambda_context` is set by HTTP requests only: unset in the stream and schedule functions.)
    logs.bind_event(getattr(event, "lambda_context", None) or getattr(event, "context", None), event)
    return get_response(event)


def route(path: str, **options):
    """`app.route`, with DynamoDB outages answered as 503 instead of 500."""
    return lambda view: app.route(path, **options)(store_outages(view))


# `curl -d '{...}'` without -H sends a form content type; accept it as JSON.
BODY_TYPES = ["application/json", "application/x-www-form-urlencoded", "text/plain"]


def _database_id(raw: str) -> str:
    database_id = parse_database_id(raw)
    if database_id is None:
        raise Invalid(
            "Invalid database id", hint="A database id is a UUID, e.g. 0190a2b4-6c1e-7d3f-8a9b-0c1d2e3f4a5b."
        )
    return database_id


def _client_id(raw: str) -> str:
    """A client-chosen id for a new database: a random v4/v7 UUID, since the id is a capability."""
    database_id = parse_client_id(raw)
    if database_id is None:
        _database_id(raw)  # not a UUID at all: that error
        raise Invalid(
            "Database id is not a random UUID",
            hint="Anyone who knows the id can read the database's password, so choose a random version 4 or 7 UUID "
            "(e.g. crypto.randomUUID(), uuid.uuid4()), or let the server choose: POST /api/v1/database.",
        )
    return database_id


def _client_ip() -> str | None:
    return ((app.current_request.context or {}).get("identity") or {}).get("sourceIp")


def _requester():
    from chalicelib.abuse import parse_idempotency_key
    from chalicelib.records import Requester

    request = app.current_request
    identity = (request.context or {}).get("identity") or {}
    return Requester(
        ip=identity.get("sourceIp"),
        user_agent=request.headers.get("user-agent"),
        idempotency_key=parse_idempotency_key(request.headers.get("idempotency-key")),
    )


def _claim_base() -> str:
    request = app.current_request
    return base_url(context.get().settings, request.headers, request.context)


def _create_request(referrer: str | None = None):
    settings = context.get().settings
    body = schemas.json_object(app.current_request.raw_body, settings.max_body_bytes)
    return schemas.create_database(body, referrer=referrer)


def _database_response(result) -> Response:
    from chalicelib import views

    region = context.get().region(result.record.host_id)
    body = views.database(
        result.record, result.plan, _claim_base(), result.host, result.password, result.creator_token, region
    )
    return json_response(body, 201 if result.created else 200)


@route("/api/v1/database", methods=["POST"], content_types=BODY_TYPES)
def create_database():
    from chalicelib import creation

    request = _create_request((app.current_request.query_params or {}).get("referrer"))
    return _database_response(creation.create(context.get(), request, _requester()))


@route("/api/v1/database/{database_id}", methods=["POST"], content_types=BODY_TYPES)
def create_database_with_id(database_id):
    from chalicelib import creation

    database_id = _client_id(database_id)
    request = _create_request((app.current_request.query_params or {}).get("referrer"))
    return _database_response(creation.create(context.get(), request, _requester(), database_id=database_id))


@route("/api/v1/database/{database_id}", methods=["GET"])
def get_database(database_id):
    from chalicelib import records

    return _database_response(records.get(context.get(), _database_id(database_id)))


@route("/api/v1/database/{database_id}", methods=["DELETE"])
def delete_unclaimed_database(database_id):
    """The creator deletes an unclaimed database early, with the creator token (issue 17, point 5)."""
    from chalicelib import auth, ownership

    database_id = _database_id(database_id)
    token = auth.bearer_token(app.current_request.headers)
    ownership.delete_unclaimed(context.get(), database_id, token, _requester())
    return Response(body="", status_code=204)


@route("/api/v1/database/{database_id}/extend", methods=["POST"], content_types=BODY_TYPES)
def extend_database(database_id):
    from chalicelib import ownership

    _no_fields()
    ownership.extend(context.get(), _database_id(database_id))  # always refused: claiming is the way


@route("/healthz", methods=["GET"])
def healthz():
    from chalicelib import health

    ok, checks = health.run(context.get())
    return json_response({"ok": ok, **checks}, 200 if ok else 503, None if ok else {"Retry-After": "5"})


# --- The scheduled job and the stream handler -----------------------------------
# The stream ARN and the rate are needed at `chalice package` time; both come
# from the environment (chalicelib.settings), with a placeholder ARN so that
# `import app` works without configuration. Reading them touches no AWS.
_DEPLOY = load_settings()


@app.schedule(Rate(_DEPLOY.purge_rate_minutes, unit=Rate.MINUTES), name="purge")
def purge(event):
    """The scheduled job: expiry, reconciliation and quota enforcement (chalicelib.jobs)."""
    from chalicelib import jobs

    return jobs.run_lambda(context.get(), event.context)


@app.on_dynamodb_record(stream_arn=_DEPLOY.stream_arn, batch_size=100, name="drop_removed")
def drop_removed(event):
    """The databases table's stream: drop what TTL removed, then top up the pools creates took from."""
    from chalicelib import jobs, pool, stream

    records = [record.to_dict() for record in event]
    ctx = context.get()
    summary = stream.handle_stream(ctx, records)
    pool.refill_after_takes(ctx, records, Deadline.after(jobs.budget_s(ctx, event.context)))
    return summary.batch_item_failures()  # the mapping reports partial batch failures


# --- The OpenAPI document ----------------------------------------------------------


@route("/api/v1/openapi.yaml", methods=["GET"])
def openapi_document():
    return Response(body=apidoc.text(), status_code=200, headers={"Content-Type": "application/yaml"})


# --- Accounts, claiming, the owner's endpoints, the claim page --------------------
# Authenticated routes call _account() first: the one authentication check
# lives in chalicelib/auth.py (see there why it is not a custom authorizer).

FORM = ["application/x-www-form-urlencoded"]


def _account():
    from chalicelib import auth

    # Failed keys count against the caller's IP (429 after too many), before any Postgres work.
    return auth.require_account(app.current_request.headers, context.get().guard, _client_ip())


def _no_fields() -> None:
    """A body is optional here; one that is sent must be a JSON object (its fields are ignored)."""
    schemas.json_object(app.current_request.raw_body, context.get().settings.max_body_bytes)


def _owned(database_id: str, ended_ok: bool = False):
    from chalicelib import ownership

    account = _account()  # 401 before anything about the id
    return ownership.owned(context.get(), _database_id(database_id), account.id, ended_ok=ended_ok)


@route("/api/v1/accounts", methods=["POST"], content_types=BODY_TYPES)
def create_account():
    from chalicelib import accounts, views

    settings = context.get().settings
    body = schemas.json_object(app.current_request.raw_body, settings.max_body_bytes)
    new = accounts.signup(settings, body.get("email"))
    return json_response(views.account(new.account, new.api_key), 201)


@route("/api/v1/account", methods=["GET"])
def get_account():
    from chalicelib import views

    return json_response(views.account(_account()), 200)


@route("/api/v1/account/rotate-key", methods=["POST"], content_types=BODY_TYPES)
def rotate_api_key():
    from chalicelib import accounts, auth, views

    account = _account()
    body = schemas.json_object(app.current_request.raw_body, context.get().settings.max_body_bytes)
    grace = accounts.parse_grace(body.get("grace_seconds"))
    key = auth.bearer_token(app.current_request.headers)
    new_key, old_until = accounts.rotate_key(account.id, key, grace, ip=_client_ip())
    return json_response({"api_key": new_key, "old_key_expires_at": views.iso(old_until)}, 201)


@route("/api/v1/account/revoke-key", methods=["POST"], content_types=BODY_TYPES)
def revoke_api_key():
    from chalicelib import accounts, auth

    account = _account()
    _no_fields()
    accounts.revoke_own_key(account.id, auth.bearer_token(app.current_request.headers), ip=_client_ip())
    return Response(body="", status_code=204)


@route("/api/v1/account/audit", methods=["GET"])
def get_account_audit():
    from chalicelib import audit, views

    account = _account()
    params = app.current_request.query_params or {}
    page = audit.page(audit.account_subject(account.id), audit.parse_limit(params.get("limit")), params.get("cursor"))
    return json_response({"events": [views.audit_event(e) for e in page.events], "next_cursor": page.cursor}, 200)


@route("/api/v1/database/{database_id}/claim", methods=["POST"], content_types=BODY_TYPES)
def claim_database(database_id):
    from chalicelib import ownership

    account = _account()
    _no_fields()
    token = app.current_request.headers.get("instapg-creator-token")
    result = ownership.claim(context.get(), _database_id(database_id), account.id, _requester(), creator_token=token)
    return _database_response(result)


@route("/api/v1/databases", methods=["GET"])
def list_databases():
    from chalicelib import ownership, views

    ctx = context.get()
    owned = ownership.list_owned(_account().id)
    rows = [views.owned_database(r, ctx.plan(r.plan), region=ctx.region(r.host_id)) for r in owned]
    return json_response({"databases": rows}, 200)


@route("/api/v1/databases/{database_id}", methods=["GET"])
def get_owned_database(database_id):
    from chalicelib import ownership, usage, views

    ctx = context.get()
    record = _owned(database_id)
    now_usage, days = ownership.usage(ctx, record), usage.last_days(record.id)
    body = views.owned_database(record, ctx.plan(record.plan), now_usage, days, ctx.region(record.host_id))
    return json_response(body, 200)


@route("/api/v1/databases/{database_id}/connection-string", methods=["GET"])
def get_connection_string(database_id):
    from chalicelib import ownership, views

    result = ownership.connection(context.get(), _owned(database_id), _requester())
    return json_response(views.connection(result.record, result.host, result.password), 200)


@route("/api/v1/databases/{database_id}/rotate-password", methods=["POST"], content_types=BODY_TYPES)
def rotate_password(database_id):
    from chalicelib import ownership, views

    record = _owned(database_id)
    _no_fields()
    result = ownership.rotate_password(context.get(), record, _requester())
    return json_response(views.connection(result.record, result.host, result.password), 200)


@route("/api/v1/databases/{database_id}/copies", methods=["POST"], content_types=BODY_TYPES)
def copy_database(database_id):
    from chalicelib import copies, views

    account = _account()
    _no_fields()
    ctx = context.get()
    result = copies.create(ctx, _database_id(database_id), account.id, _requester())
    region = ctx.region(result.record.host_id)
    return json_response(views.copy(result.record, result.plan, result.host, result.password, region), 201)


@route("/api/v1/databases/{database_id}/reset", methods=["POST"], content_types=BODY_TYPES)
def reset_copy(database_id):
    from chalicelib import copies, views

    account = _account()
    _no_fields()
    ctx = context.get()
    record = copies.reset(ctx, _database_id(database_id), account.id, _requester())
    return json_response(views.owned_database(record, ctx.plan(record.plan), region=ctx.region(record.host_id)), 200)


@route("/api/v1/databases/{database_id}", methods=["DELETE"])
def delete_database(database_id):
    from chalicelib import ownership

    account = _account()
    ownership.delete(context.get(), _database_id(database_id), account.id, _requester())
    return Response(body="", status_code=204)


@route("/api/v1/databases/{database_id}/audit", methods=["GET"])
def get_audit(database_id):
    from chalicelib import audit, views

    record = _owned(database_id, ended_ok=True)
    params = app.current_request.query_params or {}
    page = audit.page(record.id, audit.parse_limit(params.get("limit")), params.get("cursor"))
    return json_response({"events": [views.audit_event(e) for e in page.events], "next_cursor": page.cursor}, 200)


def _pages():
    from chalicelib.pages import ClaimPages

    return ClaimPages(context.get(), _claim_base())


def _html(page) -> Response:
    return Response(body=page.html(), status_code=page.status, headers=page.headers())


@route("/claim/{database_id}", methods=["GET"])
def claim_page(database_id):
    return _html(_pages().show(database_id))


@route("/database/{database_id}", methods=["GET"])
def database_page(database_id):
    return _html(_pages().show(database_id))


@route("/claim/{database_id}", methods=["POST"], content_types=FORM)
def claim_page_submit(database_id):
    return _html(_pages().claim_with_key(database_id, app.current_request.raw_body, _requester()))


@route("/claim/{database_id}/account", methods=["POST"], content_types=FORM)
def claim_page_signup(database_id):
    return _html(_pages().signup_and_claim(database_id, app.current_request.raw_body, _requester()))


# --- The landing page (chalicelib/landing.py) ---------------------------------------


def _landing():
    from chalicelib.landing import LandingPages

    return LandingPages(context.get(), _claim_base())


@route("/", methods=["GET"])
def landing_page():
    return _html(_landing().home())


@route("/new", methods=["POST"], content_types=FORM)
def landing_create():
    return _html(_landing().create(app.current_request.raw_body, _requester()))


@route("/database", methods=["GET"])
def database_lookup():
    """The landing page's status form (a GET form cannot put the id in the path): on to the database's page."""
    raw = (app.current_request.query_params or {}).get("id")
    location = _landing().lookup_location(raw)
    if location is None:
        return _html(_pages().show(raw or ""))
    return Response(body="", status_code=303, headers={"Location": location, "Cache-Control": "no-store"})


# --- The operator's dashboard (chalicelib/admin.py pages, chalicelib/fleet.py actions) ---
# JSON routes take the operator key as a bearer token; pages a session cookie (chalicelib/operators.py).


def _operator():
    from chalicelib import auth, operators

    return operators.check_key(auth.bearer_token(app.current_request.headers), context.get().guard, _client_ip())


def _admin():
    from chalicelib.admin import AdminPages

    return AdminPages(context.get(), _claim_base(), app.current_request.headers, _client_ip())


def _params() -> dict:
    return dict(app.current_request.query_params or {})


@route("/admin", methods=["GET"])
def admin_home():
    return _html(_admin().home())


@route("/admin/login", methods=["GET"])
def admin_login_form():
    return _html(_admin().login_form())


@route("/admin/login", methods=["POST"], content_types=FORM)
def admin_login():
    return _html(_admin().login(app.current_request.raw_body))


@route("/admin/logout", methods=["POST"], content_types=FORM)
def admin_logout():
    return _html(_admin().logout(app.current_request.raw_body))


@route("/admin/databases", methods=["GET"])
def admin_databases_page():
    return _html(_admin().databases(_params()))


@route("/admin/databases/{database_id}", methods=["GET"])
def admin_database_page(database_id):
    return _html(_admin().database(database_id, _params()))


@route("/admin/databases/{database_id}/action", methods=["POST"], content_types=FORM)
def admin_database_action(database_id):
    return _html(_admin().action(database_id, app.current_request.raw_body))


@route("/admin/api/summary", methods=["GET"])
def admin_api_summary():
    from chalicelib import stats, views

    _operator()
    return json_response(views.admin_summary(stats.summary(context.get())), 200)


@route("/admin/api/databases", methods=["GET"])
def admin_api_databases():
    from chalicelib import fleet, views

    _operator()
    params = _params()
    filters = fleet.parse_filters(context.get(), params)
    page = fleet.page(filters, fleet.parse_limit(params.get("limit")), params.get("cursor"))
    body = {"databases": [views.admin_database(r) for r in page.records], "next_cursor": page.cursor, "read": page.source}
    return json_response(body, 200)


@route("/admin/api/databases/{database_id}", methods=["GET"])
def admin_api_database(database_id):
    from chalicelib import audit, fleet, views

    _operator()
    record = fleet.require(_database_id(database_id))
    params = _params()
    page = fleet.history(record.id, audit.parse_limit(params.get("limit")), params.get("cursor"))
    events = [views.audit_event(e) for e in page.events]
    return json_response({"database": views.admin_database(record), "events": events, "next_cursor": page.cursor}, 200)


@route("/admin/api/databases/{database_id}", methods=["DELETE"])
def admin_api_delete(database_id):
    from chalicelib import fleet

    operator = _operator()
    claimed = (_params().get("claimed") or "").lower() == "true"
    fleet.force_delete(context.get(), _database_id(database_id), operator.actor, _client_ip(), claimed=claimed)
    return Response(body="", status_code=204)


@route("/admin/api/databases/{database_id}/extend", methods=["POST"], content_types=BODY_TYPES)
def admin_api_extend(database_id):
    from chalicelib import fleet, views

    operator = _operator()
    body = schemas.json_object(app.current_request.raw_body, context.get().settings.max_body_bytes)
    record = fleet.extend(context.get(), _database_id(database_id), body.get("hours"), operator.actor, _client_ip())
    return json_response({"database": views.admin_database(record)}, 200)


@route("/admin/api/databases/{database_id}/lock", methods=["POST"], content_types=BODY_TYPES)
def admin_api_lock(database_id):
    from chalicelib import fleet, views

    operator = _operator()
    _no_fields()
    record = fleet.lock(context.get(), _database_id(database_id), operator.actor, _client_ip())
    return json_response({"database": views.admin_database(record)}, 200)


@route("/admin/api/databases/{database_id}/unlock", methods=["POST"], content_types=BODY_TYPES)
def admin_api_unlock(database_id):
    from chalicelib import fleet, views

    operator = _operator()
    _no_fields()
    record = fleet.unlock(context.get(), _database_id(database_id), operator.actor, _client_ip())
    return json_response({"database": views.admin_database(record)}, 200)
