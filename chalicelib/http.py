"""The one place where the domain meets HTTP: exceptions to responses, `{"error": ..., "hint": ...}`.

Domain modules raise chalicelib.errors exceptions; `store_outages` (around
every view, app.route does it) and `http_error` turn them into JSON
responses with their status and headers. Chalice's own errors (405, 415,
BadRequestError) and any unexpected exception are reshaped by the
`json_errors` middleware; no stack trace reaches a client.
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Callable
from typing import Any

from chalice import Response

from chalicelib import context, errors, reliability

log = logging.getLogger(__name__)

# What an unknown path answers: API Gateway's gateway response in the deployed
# stack, and tools/dev/localserver.py locally.
NOT_FOUND_BODY = {"error": "Not found", "hint": "No such path; see GET /api/v1/openapi.yaml for the API."}

STATUS: dict[type[errors.DomainError], int] = {
    errors.Invalid: 400,
    errors.Unauthenticated: 401,
    errors.Forbidden: 403,
    errors.NotFound: 404,
    errors.Conflict: 409,
    errors.Gone: 410,
    errors.TooLarge: 413,
    errors.UnsupportedMediaType: 415,
    errors.Refused: 422,
    errors.RateLimited: 429,
    errors.Unavailable: 503,
}


def status(exc: errors.DomainError) -> int:
    for cls in type(exc).__mro__:
        if cls in STATUS:
            return STATUS[cls]
    return 500


def headers(exc: errors.DomainError) -> dict[str, str]:
    found = {}
    if exc.retry_after is not None:
        found["Retry-After"] = str(exc.retry_after)
    if exc.challenge is not None:
        found["WWW-Authenticate"] = exc.challenge
    return found


def http_error(exc: errors.DomainError) -> Response:
    body: dict[str, Any] = {"error": exc.error, "hint": exc.hint}
    body.update(exc.extra)
    return json_response(body, status(exc), headers(exc))


def json_response(body: Any, status: int, headers: dict[str, str] | None = None) -> Response:
    return Response(body=body, status_code=status, headers={"Content-Type": "application/json", **(headers or {})})


_CHALICE_HINTS = {
    405: "See GET /api/v1/openapi.yaml for the methods each path accepts.",
    415: "Send the body as JSON with 'Content-Type: application/json'.",
}


def _reshape(response: Response) -> Response:
    """Turn Chalice's built-in error bodies into ours."""
    body = response.body
    if isinstance(body, (str, bytes)) and response.status_code >= 400:
        try:
            body = json.loads(body)
        except ValueError:
            return response
    if not (isinstance(body, dict) and "Code" in body and "error" not in body):
        return response
    code = response.status_code
    if code >= 500:
        return json_response(
            {"error": "Internal error", "hint": "This is a bug on our side; retry, and report it if it persists."},
            500,
        )
    return json_response(
        {"error": body.get("Message") or body["Code"], "hint": _CHALICE_HINTS.get(code)},
        code,
        {k: v for k, v in response.headers.items() if k.lower() == "allow"},
    )


def store_outages(view: Callable[..., Any]) -> Callable[..., Any]:
    """Domain errors as their responses; 503 when DynamoDB or a host fails: not the client's fault, and not a bug.

    Chalice turns any exception a view raises into its 500 before
    middleware sees it, so this wraps the views themselves (app.route does).
    """

    @functools.wraps(view)
    def guarded(*args: Any, **kwargs: Any) -> Any:
        try:
            # Every request under one deadline (chalicelib.reliability).
            with reliability.request_deadline(context.settings().request_deadline_s):
                return view(*args, **kwargs)
        except errors.DomainError as exc:
            return http_error(exc)
        except Exception as exc:
            module = type(exc).__module__
            if module.startswith(("pynamodb", "botocore")):
                log.error("metadata store error: %s", exc.__class__.__name__)
                return http_error(errors.Unavailable("Metadata store unavailable", hint="Retry in a few seconds."))
            # A Postgres host down or too slow for the deadline: a fault, not a bug.
            if module.startswith("psycopg") or type(exc).__name__ == "HostUnavailable":
                log.error("database host error: %s", exc.__class__.__name__)
                return http_error(errors.Unavailable("Database host unavailable", hint="Retry in a few seconds."))
            raise

    return guarded


def json_errors(event: Any, get_response: Callable[[Any], Response]) -> Response:
    """Chalice HTTP middleware: every error leaves as `{"error", "hint"}`."""
    try:
        return _reshape(get_response(event))
    except errors.DomainError as exc:
        return http_error(exc)
    except Exception:
        log.exception("unhandled error on %s", getattr(event, "path", "?"))
        return _reshape(Response(body={"Code": "InternalServerError"}, status_code=500))
