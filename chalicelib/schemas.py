"""Request bodies: parsed and checked before any work, with errors that name the field."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from dataclasses import dataclass
from typing import Any

from chalicelib.errors import Invalid, TooLarge

MAX_REF_LENGTH = 128
# Text a person can read: no control characters (C0, DEL, C1). openapi.yaml
# states the same patterns (tests/test_openapi.py keeps them equal), so the
# document and the checks agree. Lone surrogates (JSON can escape them; they
# are not text and DynamoDB refuses them) are refused apart: see `is_text`.
TEXT_CHAR = r"[^\x00-\x1f\x7f-\x9f]"
REF_PATTERN = rf"^{TEXT_CHAR}*[^\s\x00-\x1f\x7f-\x9f]{TEXT_CHAR}*$"
_REF = re.compile(REF_PATTERN)
# No documented body nests deeper than 2; json.loads recurses once a level and
# raises RecursionError (a 500) near 1,000, so depth is checked before parsing.
MAX_JSON_DEPTH = 32


# A region's name, e.g. eu-west-1 (openapi.yaml states the same pattern; a test keeps them equal).
REGION_PATTERN = r"^[a-z0-9][a-z0-9-]{0,39}$"
_REGION_SHAPE = re.compile(REGION_PATTERN)


@dataclass(frozen=True)
class CreateDatabase:
    ref: str
    enable_logical_replication: bool = False
    region: str | None = None  # None: the deployment's default region (chalicelib.creation)

    def fingerprint(self) -> str:
        """SHA-256 of the request in canonical form: what an Idempotency-Key is bound to.

        Built from the parsed fields, so key order, spacing, ignored fields and
        whether `ref` came in the body or as ?referrer= make no difference.
        """
        fields = dataclasses.asdict(self)
        if fields["region"] is None:  # keys stored before regions existed keep their fingerprint
            del fields["region"]
        canonical = json.dumps(fields, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()


def json_object(raw: bytes | None, max_bytes: int) -> dict[str, Any]:
    """The body as a JSON object; an empty body is an empty object."""
    if raw and len(raw) > max_bytes:
        raise TooLarge(f"Request body is larger than {max_bytes} bytes", hint="Send only the documented fields.")
    if not raw or not raw.strip():
        return {}
    if json_depth(raw) > MAX_JSON_DEPTH:
        raise Invalid(
            f"Request body is nested deeper than {MAX_JSON_DEPTH} levels",
            hint='Send a flat JSON object, e.g. {"ref": "my-app"}.',
        )
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise Invalid(
            "Request body is not valid JSON",
            hint='Send a JSON object, e.g. {"ref": "my-app"}, with Content-Type: application/json.',
        ) from None
    if not isinstance(body, dict):
        raise Invalid(
            f"Request body must be a JSON object, not {json_type(body)}", hint='Send e.g. {"ref": "my-app"}.'
        )
    return body


def json_depth(raw: bytes) -> int:
    """How deep arrays and objects nest in `raw`, brackets inside strings not counted.

    One pass over at most INSTAPG_MAX_BODY_BYTES; it needs no valid JSON (the
    parser judges the rest).
    """
    depth = deepest = 0
    in_string = escaped = False
    for char in raw:
        if in_string:
            if escaped:
                escaped = False
            elif char == 0x5C:  # backslash
                escaped = True
            elif char == 0x22:  # quote
                in_string = False
        elif char == 0x22:
            in_string = True
        elif char in b"[{":
            depth += 1
            deepest = max(deepest, depth)
        elif char in b"]}":
            depth -= 1
    return deepest


def json_type(value: Any) -> str:
    """A JSON value's type as an error message names it ("a number", "null", ...)."""
    names = {dict: "an object", list: "an array", str: "a string", bool: "a boolean", type(None): "null"}
    return names.get(type(value), "a number")


def create_database(body: dict[str, Any], referrer: str | None = None) -> CreateDatabase:
    """`ref` may come in the body or as ?referrer= (what get-db sends); the body's wins.

    A ?referrer= that is sent is checked even when the body has `ref`, so a bad
    value is never silently ignored (openapi.yaml describes each on its own).
    """
    ref = None
    if "ref" in body:
        if not isinstance(body["ref"], str):
            raise Invalid(
                f"Field 'ref' must be a string, not {json_type(body['ref'])}", hint='Send e.g. {"ref": "my-app"}.'
            )
        ref = _checked_ref(body["ref"], "Field 'ref'")
    if referrer is not None:
        referrer = _checked_ref(referrer, "Parameter 'referrer'")
    ref = ref or referrer
    if ref is None:
        raise _missing_referrer()
    logical = body.get("enable_logical_replication", False)
    if logical is None:
        logical = False
    if not isinstance(logical, bool):
        raise Invalid(
            f"Field 'enable_logical_replication' must be a boolean, not {json_type(logical)}",
            hint="Send true or false.",
        )
    region = body.get("region")
    if region is not None and not isinstance(region, str):
        raise Invalid(
            f"Field 'region' must be a string, not {json_type(region)}", hint='Send e.g. {"region": "eu-west-1"}.'
        )
    # Which regions exist is the host registry's business (422 with the list); here only its shape.
    if region is not None and not _REGION_SHAPE.fullmatch(region):
        raise Invalid("Field 'region' is not a region name", hint='Send e.g. {"region": "eu-west-1"}.')
    return CreateDatabase(ref=ref, enable_logical_replication=logical, region=region)


def is_text(value: str) -> bool:
    """False when `value` holds a lone surrogate (a JSON escape like "\\ud800" makes one)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _missing_referrer() -> Invalid:
    return Invalid(
        "Missing referrer",
        hint='Say who is asking: send {"ref": "my-app"} in the body, or ?referrer=my-app in the URL.',
    )


def _checked_ref(value: str, label: str) -> str:
    if not value.strip():
        raise _missing_referrer()
    if len(value) > MAX_REF_LENGTH or not _REF.fullmatch(value) or not is_text(value):
        raise Invalid(
            f"{label} must be at most {MAX_REF_LENGTH} printable characters",
            hint="Use a short name for your app or tool.",
        )
    return value.strip()
