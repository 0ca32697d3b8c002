"""Accounts and their API keys.

A key is `ipg_` plus 256 random bits (base64url). It is shown once, when it is
made; DynamoDB holds only its SHA-256, which is also the key of the
`api-keys` table, so authenticating a request is one consistent read of the
key and one of its account. Plain SHA-256 is right here: the key has 256 bits
of entropy, so there is no dictionary to stretch against.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from pynamodb.exceptions import UpdateError

from chalicelib import audit
from chalicelib.errors import Forbidden, Invalid
from chalicelib.identifiers import uuid7
from chalicelib.models import ACCOUNT_ACTIVE, ACCOUNT_REVOKED, AccountRecord, ApiKeyRecord
from chalicelib.schemas import is_text, json_type
from chalicelib.settings import Settings

KEY_PREFIX = "ipg_"
_KEY_SHAPE = re.compile(r"^ipg_[A-Za-z0-9_-]{43}$")
# Deliberately loose: one @, something on each side, a dot in the domain, no
# control characters (openapi.yaml states the same pattern; a test keeps them equal).
_EMAIL_PART = r"[^@\s\x00-\x1f\x7f-\x9f]+"
EMAIL_PATTERN = rf"^{_EMAIL_PART}@{_EMAIL_PART}\.{_EMAIL_PART}$"
_EMAIL_SHAPE = re.compile(EMAIL_PATTERN)
MAX_EMAIL_LENGTH = 254
# How long a rotated key may keep working beside its successor: long enough to
# roll a deployment, short enough that a leaked key does not linger.
MAX_GRACE_S = 86400


class InvalidKey(Exception):
    """The key is malformed, unknown, revoked, or its account is (the reason is for logs only)."""


@dataclass(frozen=True)
class NewAccount:
    account: AccountRecord
    api_key: str  # the only time the plaintext exists outside the client


def new_api_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def key_hash(api_key: str) -> str:
    return hashlib.sha256(api_key.encode()).hexdigest()


def well_formed(api_key: str) -> bool:
    return bool(_KEY_SHAPE.match(api_key))


def parse_email(raw: object) -> str:
    if raw is not None and not isinstance(raw, str):
        raise Invalid(
            f"Field 'email' must be a string, not {json_type(raw)}", hint='Send {"email": "you@example.com"}.'
        )
    if not raw or not raw.strip():
        raise Invalid("Field 'email' is required", hint='Send {"email": "you@example.com"}.')
    email = raw.strip()
    if len(email) > MAX_EMAIL_LENGTH or not _EMAIL_SHAPE.fullmatch(email) or not is_text(email):
        raise Invalid("Field 'email' is not an email address", hint="Send an address like you@example.com.")
    return email


def create(email: str) -> NewAccount:
    """A new account with one key. Emails are contact data, not unique: checking
    uniqueness would tell strangers which addresses have accounts."""
    now = datetime.now(UTC)
    account = AccountRecord(id=str(uuid7()), email=email, status=ACCOUNT_ACTIVE, created_at=now)
    account.save(condition=AccountRecord.id.does_not_exist())
    return NewAccount(account, add_key(account.id, now))


def add_key(account_id: str, now: datetime | None = None) -> str:
    api_key = new_api_key()
    ApiKeyRecord(key_hash=key_hash(api_key), account_id=account_id, created_at=now or datetime.now(UTC)).save(
        condition=ApiKeyRecord.key_hash.does_not_exist()
    )
    return api_key


def authenticate(api_key: str) -> AccountRecord:
    """The active account that `api_key` belongs to, or InvalidKey."""
    if not well_formed(api_key):
        raise InvalidKey("malformed")
    digest = key_hash(api_key)
    try:
        record = ApiKeyRecord.get(digest, consistent_read=True)
    except ApiKeyRecord.DoesNotExist:
        raise InvalidKey("unknown") from None
    # Constant-time compare of what we looked up, for good measure.
    # A rotated key's revoked_at may lie ahead (its grace period): it works until then.
    if not hmac.compare_digest(record.key_hash, digest) or (
        record.revoked_at is not None and record.revoked_at <= datetime.now(UTC)
    ):
        raise InvalidKey("revoked key")
    account = find(record.account_id)
    if account is None or account.status != ACCOUNT_ACTIVE:
        raise InvalidKey("revoked account")
    return account


def find(account_id: str) -> AccountRecord | None:
    try:
        return AccountRecord.get(account_id, consistent_read=True)
    except AccountRecord.DoesNotExist:
        return None


def revoke(account_id: str) -> bool:
    """Revoke an account: every key of it stops working at once. False if unknown."""
    account = find(account_id)
    if account is None:
        return False
    account.update(actions=[AccountRecord.status.set(ACCOUNT_REVOKED), AccountRecord.revoked_at.set(datetime.now(UTC))])
    return True


def revoke_key(api_key: str) -> bool:
    """Revoke one key (the account stays). False if the key is unknown."""
    try:
        record = ApiKeyRecord.get(key_hash(api_key), consistent_read=True)
    except ApiKeyRecord.DoesNotExist:
        return False
    record.update(actions=[ApiKeyRecord.revoked_at.set(datetime.now(UTC))])
    return True


def signup(settings: Settings, email: object) -> NewAccount:
    """Open signup (the API and the claim page); refused when the operator turned it off."""
    if not settings.open_signup:
        raise Forbidden(
            "Signup is closed",
            hint="This deployment creates accounts only through its operator; ask them for an API key.",
        )
    return create(parse_email(email))


def parse_grace(raw: object) -> int:
    """`grace_seconds` of a rotation: 0 (the old key stops at once) up to MAX_GRACE_S."""
    if raw is None:
        return 0
    if isinstance(raw, bool) or not isinstance(raw, int) or not 0 <= raw <= MAX_GRACE_S:
        raise Invalid(
            f"Field 'grace_seconds' must be an integer from 0 to {MAX_GRACE_S}",
            hint="0 stops the old key at once; e.g. 3600 keeps it working for an hour while you roll out the new one.",
        )
    return raw


def rotate_key(account_id: str, old_key: str, grace_s: int, ip: str | None = None) -> tuple[str, datetime]:
    """A new key for the account; the old one stops at now + grace_s. Returns (new key, old key's end).

    Audited before it happens: a key change nobody can trace is worse than a 503.
    """
    audit.record(audit.account_subject(account_id), audit.API_KEY_ROTATED, account_id, ip, f"grace_s={grace_s}")
    new_key = add_key(account_id)
    until = datetime.now(UTC) + timedelta(seconds=grace_s)
    try:
        # Never lengthens a grace period a previous rotation already set.
        ApiKeyRecord(key_hash=key_hash(old_key)).update(
            actions=[ApiKeyRecord.revoked_at.set(until)],
            condition=(ApiKeyRecord.account_id == account_id)
            & (ApiKeyRecord.revoked_at.does_not_exist() | (ApiKeyRecord.revoked_at > until)),
        )
    except UpdateError as exc:
        if exc.cause_response_code != "ConditionalCheckFailedException":
            raise
        until = ApiKeyRecord.get(key_hash(old_key), consistent_read=True).revoked_at or until
    return new_key, until


def revoke_own_key(account_id: str, api_key: str, ip: str | None = None) -> None:
    """The account holder stops the key they called with, at once; audited first."""
    audit.record(audit.account_subject(account_id), audit.API_KEY_REVOKED, account_id, ip)
    revoke_key(api_key)
