"""Request bodies: parsed and checked before any work, with errors that name the field."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from chalicelib.errors import BadRequest, PayloadTooLarge

MAX_REF_LENGTH = 128


@dataclass(frozen=True)
class CreateDatabase:
    ref: str
    enable_logical_replication: bool = False


def json_object(raw: bytes | None, max_bytes: int) -> dict[str, Any]:
    """The body as a JSON object; an empty body is an empty object."""
    if raw and len(raw) > max_bytes:
        raise PayloadTooLarge(f"Request body is larger than {max_bytes} bytes", hint="Send only the documented fields.")
    if not raw or not raw.strip():
        return {}
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise BadRequest(
            "Request body is not valid JSON",
            hint='Send a JSON object, e.g. {"ref": "my-app"}, with Content-Type: application/json.',
        ) from None
    if not isinstance(body, dict):
        raise BadRequest(
            f"Request body must be a JSON object, not {_json_type(body)}", hint='Send e.g. {"ref": "my-app"}.'
        )
    return body


def _json_type(value: Any) -> str:
    return {list: "an array", str: "a string", bool: "a boolean", type(None): "null"}.get(type(value), "a number")


def create_database(body: dict[str, Any], referrer: str | None = None) -> CreateDatabase:
    """`ref` may come in the body or as ?referrer= (what get-db sends)."""
    ref = body.get("ref", referrer)
    if ref is not None and not isinstance(ref, str):
        raise BadRequest(f"Field 'ref' must be a string, not {_json_type(ref)}", hint='Send e.g. {"ref": "my-app"}.')
    ref = (ref or referrer or "").strip()
    if not ref:
        raise BadRequest(
            "Missing referrer",
            hint='Say who is asking: send {"ref": "my-app"} in the body, or ?referrer=my-app in the URL.',
        )
    if len(ref) > MAX_REF_LENGTH or not ref.isprintable():
        raise BadRequest(
            f"Field 'ref' must be at most {MAX_REF_LENGTH} printable characters",
            hint="Use a short name for your app or tool.",
        )
    logical = body.get("enable_logical_replication", False)
    if logical is None:
        logical = False
    if not isinstance(logical, bool):
        raise BadRequest(
            f"Field 'enable_logical_replication' must be a boolean, not {_json_type(logical)}",
            hint="Send true or false.",
        )
    return CreateDatabase(ref=ref, enable_logical_replication=logical)
