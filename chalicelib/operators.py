"""Operator keys and the dashboard's browser sessions.

An operator key is `ipgo_` plus 256 random bits, shown once by
`python -m tools.ops.operatorctl create`; DynamoDB keeps only its SHA-256,
in a table of its own (models.OperatorKeyRecord), so an account key never
opens /admin and an operator key never authenticates as an account: each is
looked up only in its own table, and the two prefixes differ too.

JSON routes under /admin/api/ take the key as `Authorization: Bearer ipgo_...`.
A browser logs in once with the key in a form (POST /admin/login) and gets
a session cookie:

    ipg_admin = v1.<key hash>.<expires epoch>.<kid>.<HMAC-SHA256>

signed with a key derived from the credential key ring (`KeyRing.mac_key`),
so no new secret to deploy. Every request checks the signature, the expiry
(INSTAPG_ADMIN_SESSION_SECONDS) and that the operator key is still not
revoked (one consistent read): revoking the key ends its sessions at once.
The cookie is HttpOnly, SameSite=Strict, Path=/admin, and Secure when the
request came over HTTPS.

CSRF: the dashboard's forms carry a token, an HMAC of the session cookie
(so it changes with each login and is useless without the cookie), checked on
every POST. Two more layers stand in front: SameSite=Strict keeps the cookie
off cross-site requests, and chalicelib.web refuses cross-site POSTs before
any route runs.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import re
import secrets
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from chalicelib import audit
from chalicelib.errors import Invalid, Unauthenticated
from chalicelib.models import OperatorKeyRecord

if TYPE_CHECKING:
    from chalicelib.abuse import Guard
    from chalicelib.context import Context

log = logging.getLogger(__name__)

KEY_PREFIX = "ipgo_"
_KEY_SHAPE = re.compile(r"^ipgo_[A-Za-z0-9_-]{43}$")
_KEY_ID = re.compile(r"^[0-9a-f]{12}$")
COOKIE = "ipg_admin"
_PURPOSE = "admin session"
_CHALLENGE = 'Bearer realm="instapg-admin"'
MAX_NAME_LENGTH = 64
# Written under audit.operator_subject(key id).
LOGIN = "operator_login"


@dataclass(frozen=True)
class Operator:
    key_id: str
    name: str

    @property
    def actor(self) -> str:
        """Who did it, in audit events."""
        return f"operator:{self.key_id}"


@dataclass(frozen=True)
class NewKey:
    record: OperatorKeyRecord
    key: str  # the only time the plaintext exists outside the operator's hands


def key_hash(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def create(name: str) -> NewKey:
    name = (name or "").strip()
    if not name or len(name) > MAX_NAME_LENGTH or not name.isprintable():
        raise Invalid(
            f"An operator key needs a name of 1 to {MAX_NAME_LENGTH} printable characters", hint="E.g. alice."
        )
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    digest = key_hash(key)
    record = OperatorKeyRecord(key_hash=digest, key_id=digest[:12], name=name, created_at=datetime.now(UTC))
    record.save(condition=OperatorKeyRecord.key_hash.does_not_exist())
    return NewKey(record, key)


def all_keys() -> list[OperatorKeyRecord]:
    """Every operator key (a scan: the table holds a handful, for the ops tool only)."""
    return sorted(OperatorKeyRecord.scan(), key=lambda r: r.created_at)


def revoke(key_id: str) -> bool:
    """Revoke the key with this id; its sessions end at their next request. False if unknown."""
    if not _KEY_ID.fullmatch(key_id or ""):
        return False
    found = [r for r in OperatorKeyRecord.scan(OperatorKeyRecord.key_id == key_id)]
    for record in found:
        record.update(actions=[OperatorKeyRecord.revoked_at.set(datetime.now(UTC))])
    return bool(found)


def _active(digest: str) -> Operator | None:
    try:
        record = OperatorKeyRecord.get(digest, consistent_read=True)
    except OperatorKeyRecord.DoesNotExist:
        return None
    if not hmac.compare_digest(record.key_hash, digest) or record.revoked_at is not None:
        return None
    return Operator(record.key_id, record.name)


def _refused(error: str = "Invalid operator key") -> Unauthenticated:
    return Unauthenticated(
        error,
        hint="Send 'Authorization: Bearer ipgo_...' with a key from `python -m tools.ops.operatorctl create`. "
        "Account API keys do not open the dashboard.",
        challenge=_CHALLENGE,
    )


def check_key(key: str | None, guard: Guard | None = None, ip: str | None = None) -> Operator:
    """The operator of a raw key, or 401 (429 after too many failures from `ip`, as for account keys)."""
    if not key:
        raise _refused("Missing operator key")
    if guard is not None:
        guard.check_auth(ip)
    operator = _active(key_hash(key.strip())) if _KEY_SHAPE.fullmatch(key.strip()) else None
    if operator is None:
        log.info("rejected operator key")  # never the key
        if guard is not None:
            guard.auth_failed(ip)
        raise _refused()
    return operator


# -- browser sessions ------------------------------------------------------------------


def _sign(ctx: Context, payload: str, kid: str | None = None) -> tuple[str, str] | None:
    found = ctx.keyring.mac_key(_PURPOSE, kid)
    if found is None:
        return None
    kid, mac_key = found
    return kid, hmac.new(mac_key, payload.encode(), hashlib.sha256).hexdigest()


def login(ctx: Context, key: str | None, guard: Guard | None = None, ip: str | None = None) -> tuple[Operator, str]:
    """Check the key from the login form; (the operator, a new session cookie value). Audited."""
    operator = check_key(key, guard, ip)
    expires = int(time.time()) + ctx.settings.admin_session_s
    digest = key_hash(key.strip())
    kid, _ = _sign(ctx, "")
    payload = f"v1.{digest}.{expires}.{kid}"
    _, mac = _sign(ctx, payload, kid)
    audit.record(audit.operator_subject(operator.key_id), LOGIN, operator.actor, ip)
    return operator, f"{payload}.{mac}"


def session(ctx: Context, cookie: str | None) -> Operator | None:
    """The operator of a valid, unexpired session cookie whose key is not revoked; None otherwise."""
    parts = (cookie or "").split(".")
    if len(parts) != 5 or parts[0] != "v1" or not parts[2].isdigit():
        return None
    payload, mac = ".".join(parts[:4]), parts[4]
    signed = _sign(ctx, payload, parts[3])
    if signed is None or not hmac.compare_digest(signed[1], mac):
        return None
    if int(parts[2]) <= time.time():
        return None
    return _active(parts[1])


def csrf_token(ctx: Context, cookie: str) -> str:
    """The forms' CSRF token of this session (an HMAC of its cookie)."""
    signed = _sign(ctx, "csrf:" + cookie)
    return signed[1] if signed else ""


def check_csrf(ctx: Context, cookie: str, token: str | None) -> bool:
    return bool(token) and hmac.compare_digest(csrf_token(ctx, cookie), token or "")


def cookie_header(value: str, max_age: int, https: bool) -> str:
    """Set-Cookie for the session (an empty value with max_age 0 logs out)."""
    secure = "; Secure" if https else ""
    return f"{COOKIE}={value}; Max-Age={max_age}; Path=/admin; HttpOnly; SameSite=Strict{secure}"


def cookie_value(headers: dict[str, str]) -> str | None:
    """The session cookie of a request, or None."""
    raw = next((v for k, v in headers.items() if k.lower() == "cookie"), "")
    for part in raw.split(";"):
        name, _, value = part.strip().partition("=")
        if name == COOKIE and value:
            return value
    return None
