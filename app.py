"""instapg: routes and event handlers only. The logic lives in chalicelib/."""

from chalice import Chalice, Rate, Response

from chalicelib import services
from chalicelib.errors import BadRequest, json_errors, json_response, store_outages

app = Chalice(app_name="instapg")
app.register_middleware(json_errors, "http")


def route(path: str, **options):
    """`app.route`, with DynamoDB outages answered as 503 instead of 500."""
    return lambda view: app.route(path, **options)(store_outages(view))


# `curl -d '{...}'` without -H sends a form content type; accept it as JSON.
BODY_TYPES = ["application/json", "application/x-www-form-urlencoded", "text/plain"]


def _database_id(raw: str) -> str:
    from chalicelib.identifiers import parse_database_id

    database_id = parse_database_id(raw)
    if database_id is None:
        raise BadRequest(
            "Invalid database id", hint="A database id is a UUID, e.g. 0190a2b4-6c1e-7d3f-8a9b-0c1d2e3f4a5b."
        )
    return database_id


def _requester():
    from chalicelib.abuse import parse_idempotency_key
    from chalicelib.databases import Requester

    request = app.current_request
    identity = (request.context or {}).get("identity") or {}
    return Requester(
        ip=identity.get("sourceIp"),
        user_agent=request.headers.get("user-agent"),
        idempotency_key=parse_idempotency_key(request.headers.get("idempotency-key")),
    )


def _claim_base() -> str:
    configured = services.databases().settings.public_url
    if configured:
        return configured
    request = app.current_request
    proto = request.headers.get("x-forwarded-proto", "http")
    host = request.headers.get("host", "127.0.0.1")
    stage = (request.context or {}).get("stage")
    # Behind API Gateway's default domain, paths carry the stage name.
    prefix = f"/{stage}" if stage and host.endswith(".amazonaws.com") else ""
    return f"{proto}://{host}{prefix}"


def _create_request(referrer: str | None = None):
    from chalicelib import schemas

    settings = services.databases().settings
    body = schemas.json_object(app.current_request.raw_body, settings.max_body_bytes)
    return schemas.create_database(body, referrer=referrer)


def _database_response(result) -> Response:
    from chalicelib import views

    body = views.database(result.record, result.plan, _claim_base(), result.host, result.password)
    return json_response(body, 201 if result.created else 200)


@route("/api/v1/database", methods=["POST"], content_types=BODY_TYPES)
def create_database():
    request = _create_request((app.current_request.query_params or {}).get("referrer"))
    return _database_response(services.databases().create(request, _requester()))


@route("/api/v1/database/{database_id}", methods=["POST"], content_types=BODY_TYPES)
def create_database_with_id(database_id):
    database_id = _database_id(database_id)
    request = _create_request((app.current_request.query_params or {}).get("referrer"))
    return _database_response(services.databases().create(request, _requester(), database_id=database_id))


@route("/api/v1/database/{database_id}", methods=["GET"])
def get_database(database_id):
    return _database_response(services.databases().get(_database_id(database_id)))


@route("/healthz", methods=["GET"])
def healthz():
    ok, checks = services.health().run()
    return json_response({"ok": ok, **checks}, 200 if ok else 503)


# --- Expiry and cleanup (issue 3) ------------------------------------------------------
# The stream ARN and the rate are needed at `chalice package` time; both come
# from the environment (chalicelib.settings), with a placeholder ARN so that
# `import app` works without configuration.
def _deploy_settings():
    from chalicelib.settings import load

    return load()


_DEPLOY = _deploy_settings()


@app.schedule(Rate(_DEPLOY.purge_rate_minutes, unit=Rate.MINUTES), name="purge")
def purge(event):
    """The scheduled job: expiry, reconciliation and quota enforcement (chalicelib.jobs)."""
    from chalicelib import jobs

    return jobs.run_lambda(services.databases(), event.context)


@app.on_dynamodb_record(stream_arn=_DEPLOY.stream_arn, batch_size=100, name="drop_removed")
def drop_removed(event):
    from chalicelib import expiry

    expiry.handle_stream(services.databases(), (record.to_dict() for record in event))


# --- The OpenAPI document ----------------------------------------------------------


@route("/api/v1/openapi.yaml", methods=["GET"])
def openapi_document():
    from chalicelib import apidoc

    return Response(body=apidoc.text(), status_code=200, headers={"Content-Type": "application/yaml"})
