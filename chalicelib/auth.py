"""The one place that decides who is calling.

Routes that need an account call `require_account(headers)`. It is a plain
function rather than a Chalice custom authorizer because authorizers do not
run in `chalice.test.Client`, and `chalice local` runs them differently from
API Gateway; a function behaves the same everywhere. To put Cognito or another
OIDC issuer in front later, replace the body of `require_account` (for
example, read the verified claims API Gateway puts in the request context and
map them to an account); no route changes.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING

from chalicelib import accounts
from chalicelib.errors import Unauthenticated
from chalicelib.models import AccountRecord

if TYPE_CHECKING:
    from chalicelib.abuse import Guard

log = logging.getLogger(__name__)

_CHALLENGE = 'Bearer realm="instapg"'


def bearer_token(headers: Mapping[str, str]) -> str | None:
    """The token of an `Authorization: Bearer <token>` header, or None."""
    value = None
    for name, raw in headers.items():
        if name.lower() == "authorization":
            value = raw
            break
    if not value:
        return None
    scheme, _, token = value.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


def check_key(api_key: str | None, guard: Guard | None = None, ip: str | None = None) -> AccountRecord:
    """The account of a raw API key (the claim page's form sends one), or 401.

    With a `guard`, an IP that used up its failed authentications gets 429
    before any lookup, and each failure is counted (chalicelib.abuse).
    """
    if not api_key:
        raise Unauthenticated(
            "Missing API key",
            hint="Send 'Authorization: Bearer <api key>'. Create an account with POST /api/v1/accounts.",
            challenge=_CHALLENGE,
        )
    if guard is not None:
        guard.check_auth(ip)
    try:
        return accounts.authenticate(api_key.strip())
    except accounts.InvalidKey as exc:
        # Never log the key; the reason is enough to debug.
        log.info("rejected API key: %s", exc)
        if guard is not None:
            guard.auth_failed(ip)
        raise Unauthenticated(
            "Invalid API key",
            hint="The key is malformed, unknown or revoked. Keys look like ipg_ followed by 43 characters.",
            challenge=_CHALLENGE,
        ) from None


def require_account(headers: Mapping[str, str], guard: Guard | None = None, ip: str | None = None) -> AccountRecord:
    """The calling account, from its bearer token; 401 JSON otherwise (429 after too many failures)."""
    return check_key(bearer_token(headers), guard, ip)
