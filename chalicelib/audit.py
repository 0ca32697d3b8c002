"""The audit log: what happened to each database, newest first.

Events are keyed by database id and a uuid7, so a query in reverse key order
is newest first. Pages are cut with a cursor (the last event's id, a UUID),
which a client hands back unchanged.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import UTC, datetime

from chalicelib.errors import Invalid
from chalicelib.identifiers import parse_database_id, uuid7
from chalicelib.models import AuditEvent

log = logging.getLogger(__name__)

CREATED = "created"
CLAIMED = "claimed"
CONNECTION_STRING_VIEWED = "connection_string_viewed"
PASSWORD_ROTATED = "password_rotated"
DELETED = "deleted"
# Written by the scheduled purge (issue 3) and the quota job (issue 5).
PURGED = "purged"
QUOTA_LOCKED = "quota_locked"
QUOTA_UNLOCKED = "quota_unlocked"
# Issue 18 §2: on the source ("copied", detail names the copy) and on the copy ("reset").
COPIED = "copied"
RESET = "reset"

# Issue 19: self-service API keys, logged under account_subject(account id).
API_KEY_ROTATED = "api_key_rotated"
API_KEY_REVOKED = "api_key_revoked"

# Issue 17 section 3: the operator's dashboard; the actor is "operator:<key id>".
ADMIN_DELETE = "admin_delete"
ADMIN_EXTEND = "admin_extend"
ADMIN_LOCK = "admin_lock"
ADMIN_UNLOCK = "admin_unlock"

SYSTEM = "system"
ANONYMOUS = "anonymous"
CREATOR = "creator"  # whoever held an unclaimed database's creator token


def account_subject(account_id: str) -> str:
    """The audit log's key for an account's own events (database ids are bare UUIDs, so they never collide)."""
    return f"account:{account_id}"


def operator_subject(key_id: str) -> str:
    """The audit log's key for an operator key's own events (its logins)."""
    return f"operator:{key_id}"


MAX_PAGE = 100
DEFAULT_PAGE = 25


def event(database_id: str, action: str, actor: str, ip: str | None = None, detail: str | None = None) -> AuditEvent:
    """One event, not written yet (a caller may put it in a transaction, as the pooled take does)."""
    return AuditEvent(
        database_id=database_id,
        event_id=str(uuid7()),
        action=action,
        at=datetime.now(UTC),
        actor=actor,
        ip=ip,
        detail=detail,
    )


def record(database_id: str, action: str, actor: str, ip: str | None = None, detail: str | None = None) -> None:
    """Append one event. Raises if DynamoDB does: callers that must not act unaudited rely on it."""
    event(database_id, action, actor, ip, detail).save()


def record_quietly(database_id: str, action: str, actor: str, ip: str | None = None, detail: str | None = None) -> None:
    """Append one event after the fact; a failure is logged, not raised (the action already happened)."""
    try:
        record(database_id, action, actor, ip, detail)
    except Exception as exc:
        log.error("audit event %s for %s not written: %s", action, database_id, type(exc).__name__)


@dataclass(frozen=True)
class Page:
    events: list[AuditEvent]
    cursor: str | None  # None: this was the last page


def _decode(cursor: str) -> str:
    # The cursor is the last event's id as it stands (openapi.yaml: a UUID), so
    # the document can say exactly which cursors are valid.
    event_id = parse_database_id(cursor)  # event ids are UUIDs too
    if event_id is None:
        raise Invalid("Invalid cursor", hint="Pass the 'next_cursor' of the previous page unchanged.")
    return event_id


def parse_limit(raw: str | None) -> int:
    if raw is None or raw == "":
        return DEFAULT_PAGE
    if not raw.isdigit() or not 1 <= int(raw) <= MAX_PAGE:
        raise Invalid(f"Parameter 'limit' must be an integer from 1 to {MAX_PAGE}", hint="E.g. ?limit=25.")
    return int(raw)


def page(database_id: str, limit: int = DEFAULT_PAGE, cursor: str | None = None) -> Page:
    start = {"database_id": {"S": database_id}, "event_id": {"S": _decode(cursor)}} if cursor else None
    result = AuditEvent.query(
        database_id,
        scan_index_forward=False,
        limit=limit,
        last_evaluated_key=start,
        consistent_read=True,
    )
    events = list(result)
    last = result.last_evaluated_key
    return Page(events, last["event_id"]["S"] if last and len(events) == limit else None)
