"""The JSON error shape, `{"error": ..., "hint": ...}`, for every failure.

Routes and services raise `ApiError` subclasses. They derive from Chalice's
`ChaliceUnhandledError`, which Chalice re-raises to middleware instead of
turning into its own `{"Code", "Message"}` body, so `json_errors` renders
them. Chalice's own errors (405, 415, BadRequestError) and any unexpected
exception are reshaped there too; no stack trace reaches a client.
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Callable
from typing import Any

from chalice import Response
from chalice.app import ChaliceUnhandledError

log = logging.getLogger(__name__)


# What an unknown path answers: API Gateway's gateway response in the deployed
# stack, and tools/localserver.py locally.
NOT_FOUND_BODY = {"error": "Not found", "hint": "No such path; see GET /api/v1/openapi.yaml for the API."}


class ApiError(ChaliceUnhandledError):
    status = 500

    def __init__(self, error: str, hint: str | None = None, headers: dict[str, str] | None = None, **extra: Any):
        super().__init__(error)
        self.error = error
        self.hint = hint
        self.headers = headers or {}
        self.extra = extra

    def response(self) -> Response:
        body: dict[str, Any] = {"error": self.error, "hint": self.hint}
        body.update(self.extra)
        return json_response(body, self.status, self.headers)


class BadRequest(ApiError):
    status = 400


class Unauthorized(ApiError):
    status = 401


class Forbidden(ApiError):
    status = 403


class NotFound(ApiError):
    status = 404


class Conflict(ApiError):
    status = 409


class Gone(ApiError):
    status = 410


class PayloadTooLarge(ApiError):
    status = 413


class UnsupportedMediaType(ApiError):
    status = 415


class Unprocessable(ApiError):
    status = 422


class TooManyRequests(ApiError):
    status = 429


class ServiceUnavailable(ApiError):
    status = 503

    def __init__(self, error: str, hint: str | None = None, headers: dict[str, str] | None = None, **extra: Any):
        # Every 503 says when to come back; 5 s unless the raiser knows better.
        super().__init__(error, hint, {"Retry-After": "5", **(headers or {})}, **extra)


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
    status = response.status_code
    if status >= 500:
        return json_response(
            {"error": "Internal error", "hint": "This is a bug on our side; retry, and report it if it persists."},
            500,
        )
    return json_response(
        {"error": body.get("Message") or body["Code"], "hint": _CHALICE_HINTS.get(status)},
        status,
        {k: v for k, v in response.headers.items() if k.lower() == "allow"},
    )


def store_outages(view: Callable[..., Any]) -> Callable[..., Any]:
    """Answer 503 when DynamoDB fails: not the client's fault, and not a bug.

    Chalice turns any other exception a view raises into its 500 before
    middleware sees it, so this wraps the views themselves (app.route does).
    """

    @functools.wraps(view)
    def guarded(*args: Any, **kwargs: Any) -> Any:
        from chalicelib import reliability
        from chalicelib.settings import get_settings

        try:
            # Every request under one deadline (chalicelib.reliability).
            with reliability.request_deadline(get_settings().request_deadline_s):
                return view(*args, **kwargs)
        except ApiError:
            raise
        except Exception as exc:
            module = type(exc).__module__
            if module.startswith(("pynamodb", "botocore")):
                log.error("metadata store error: %s", exc.__class__.__name__)
                raise ServiceUnavailable(
                    "Metadata store unavailable", hint="Retry in a few seconds.", headers={"Retry-After": "5"}
                ) from None
            # A Postgres host down or too slow for the deadline: a fault, not a bug.
            if module.startswith("psycopg") or type(exc).__name__ == "HostUnavailable":
                log.error("database host error: %s", exc.__class__.__name__)
                raise ServiceUnavailable("Database host unavailable", hint="Retry in a few seconds.") from None
            raise

    return guarded


def json_errors(event: Any, get_response: Callable[[Any], Response]) -> Response:
    """Chalice HTTP middleware: every error leaves as `{"error", "hint"}`."""
    try:
        return _reshape(get_response(event))
    except ApiError as exc:
        return exc.response()
    except Exception:
        log.exception("unhandled error on %s", getattr(event, "path", "?"))
        return _reshape(Response(body={"Code": "InternalServerError"}, status_code=500))
