"""The operator's view of the whole fleet: listing with filters, and the admin actions.

Listing is bounded per page, whatever the filters:
- `status` one of the `by_due` buckets (PROVISIONING, UNCLAIMED, CLAIMING,
  DELETING): a Query of that index (sparse, so only records in that state
  are read), the other filters applied to what it reads;
- anything else: one Scan page of the databases table with the filters as a
  FilterExpression. Either way one request reads at most `limit` items
  (DynamoDB's Limit counts items evaluated, before the filter), so a page
  may hold fewer rows than `limit`, or none, and still have a `next_cursor`:
  the page view costs the same on a fleet of ten or of a million. A scan per
  filter combination would need an index per combination; an operator pages.

Actions go through the same steps as the owner's and the purge's
(records' conditional writes, ownership.finish_delete, quotas' one lock
path), and each is audited before it happens, with the operator key's id as
the actor: an admin action nobody can trace is worse than a 503.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING

from chalicelib import audit, clock, ownership, postgres, quotas, records, schemas
from chalicelib import hosts as hostlib
from chalicelib.errors import Conflict, Invalid, NotFound, Unavailable
from chalicelib.identifiers import parse_database_id
from chalicelib.models import (
    CLAIMED,
    CLAIMING,
    DELETED,
    DELETING,
    EXPIRED,
    FAILED,
    POOLED,
    PROVISIONING,
    UNCLAIMED,
    DatabaseRecord,
)

if TYPE_CHECKING:
    from chalicelib.context import Context

log = logging.getLogger(__name__)

STATUSES = (PROVISIONING, POOLED, UNCLAIMED, CLAIMING, CLAIMED, DELETING, EXPIRED, DELETED, FAILED)
INDEXED = (PROVISIONING, UNCLAIMED, CLAIMING, DELETING)
DEFAULT_LIMIT = 50
MAX_LIMIT = 200
MAX_AGE_H = 24 * 365 * 10
MAX_EXTEND_H = 24 * 30  # an operator grants weeks, not forever: claiming is the way to keep one
OPERATOR_LOCK = "operator"  # locked_reason of a lock the quota job never lifts
_HOST_ID = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
_CURSOR = re.compile(r"^(?:([0-9]{1,12})\.)?([0-9A-Fa-f-]{36})$")


@dataclass(frozen=True)
class Filters:
    status: str | None = None
    host: str | None = None
    plan: str | None = None
    ref: str | None = None  # a prefix
    min_age_h: int | None = None
    max_age_h: int | None = None

    def query(self) -> dict[str, str]:
        """The filters as query parameters (for links to the next page)."""
        return {k: str(v) for k, v in self.__dict__.items() if v is not None}


@dataclass(frozen=True)
class Page:
    records: list[DatabaseRecord]
    cursor: str | None
    source: str  # "index by_due" or "scan": how the page was read


def _hours(params: Mapping[str, str], name: str) -> int | None:
    raw = (params.get(name) or "").strip()
    if not raw:
        return None
    if not raw.isdigit() or int(raw) > MAX_AGE_H:
        raise Invalid(f"Parameter '{name}' must be a whole number of hours from 0 to {MAX_AGE_H}", hint="E.g. 24.")
    return int(raw)


def parse_filters(ctx: Context, params: Mapping[str, str]) -> Filters:
    """The listing's filters from query parameters (or a GET form); empty ones are no filter."""
    status = (params.get("status") or "").strip().upper() or None
    if status is not None and status not in STATUSES:
        raise Invalid("Parameter 'status' is not a database status", hint=f"One of {', '.join(STATUSES)}.")
    host = (params.get("host") or "").strip() or None
    if host is not None and not _HOST_ID.fullmatch(host):
        raise Invalid("Parameter 'host' is not a host id", hint="`hostctl list` shows the host ids.")
    plan = (params.get("plan") or "").strip() or None
    if plan is not None and plan not in ctx.settings.plans:
        raise Invalid("Parameter 'plan' is not a plan", hint=f"One of {', '.join(ctx.settings.plans)}.")
    ref = params.get("ref") or None
    if ref is not None:
        ref = schemas.create_database({"ref": ref}).ref  # the same rule as a create's ref
    # min_age_h above max_age_h is no error: nothing is that old and that young, the page is empty.
    return Filters(status, host, plan, ref, _hours(params, "min_age_h"), _hours(params, "max_age_h"))


def parse_limit(raw: str | None) -> int:
    if raw is None or raw == "":
        return DEFAULT_LIMIT
    if not raw.isdigit() or not 1 <= int(raw) <= MAX_LIMIT:
        raise Invalid(f"Parameter 'limit' must be an integer from 1 to {MAX_LIMIT}", hint="E.g. ?limit=50.")
    return int(raw)


def _start(cursor: str | None, status: str | None) -> dict | None:
    """DynamoDB's ExclusiveStartKey from our cursor: `<id>` (scan) or `<due_at>.<id>` (index).

    Any well-formed cursor is a valid start (DynamoDB positions by key, the
    item need not exist), so one from the other kind of listing just starts
    near the beginning instead of being an error.
    """
    if not cursor:
        return None
    found = _CURSOR.fullmatch(cursor)
    database_id = parse_database_id(found.group(2)) if found else None
    if database_id is None:
        raise Invalid("Invalid cursor", hint="Pass the 'next_cursor' of the previous page unchanged.")
    if status in INDEXED:
        return {"id": {"S": database_id}, "due_bucket": {"S": status}, "due_at": {"N": found.group(1) or "0"}}
    return {"id": {"S": database_id}}


def _cursor(last: dict | None) -> str | None:
    if not last:
        return None
    if "due_at" in last:
        return f"{last['due_at']['N']}.{last['id']['S']}"
    return last["id"]["S"]


def _condition(filters: Filters, with_status: bool):
    now = clock.now()
    parts = []
    if with_status and filters.status:
        parts.append(DatabaseRecord.status == filters.status)
    if filters.host:
        parts.append(DatabaseRecord.host_id == filters.host)
    if filters.plan:
        parts.append(DatabaseRecord.plan == filters.plan)
    if filters.ref:
        parts.append(DatabaseRecord.ref.startswith(filters.ref))
    if filters.min_age_h is not None:
        parts.append(DatabaseRecord.created_at <= now - timedelta(hours=filters.min_age_h))
    if filters.max_age_h is not None:
        parts.append(DatabaseRecord.created_at >= now - timedelta(hours=filters.max_age_h))
    condition = None
    for part in parts:
        condition = part if condition is None else condition & part
    return condition


def page(filters: Filters, limit: int = DEFAULT_LIMIT, cursor: str | None = None) -> Page:
    """One bounded page (see the module docstring): at most `limit` items read."""
    start = _start(cursor, filters.status)
    if filters.status in INDEXED:
        result = DatabaseRecord.by_due.query(
            filters.status,
            filter_condition=_condition(filters, with_status=False),
            page_size=limit,
            last_evaluated_key=start,
        )
        source = "index by_due"
    else:
        result = DatabaseRecord.scan(
            filter_condition=_condition(filters, with_status=True), page_size=limit, last_evaluated_key=start
        )
        source = "scan"
    try:
        raw = next(result.page_iter)
    except StopIteration:
        return Page([], None, source)
    found = [DatabaseRecord.from_raw_data(item) for item in raw.get("Items", [])]
    found.sort(key=lambda r: r.created_at, reverse=True)  # newest first within the page
    return Page(found, _cursor(result.page_iter.last_evaluated_key), source)


# -- one database ------------------------------------------------------------------


def require(database_id: str) -> DatabaseRecord:
    record = records.find(database_id)
    if record is None:
        raise NotFound("Database not found", hint="No record has this id (a tombstone lasts a few days).")
    return record


def history(database_id: str, limit: int = audit.DEFAULT_PAGE, cursor: str | None = None) -> audit.Page:
    """The database's audit events, newest first (also after its tombstone is gone)."""
    events = audit.page(database_id, limit, cursor)
    if not events.events and cursor is None and records.find(database_id) is None:
        raise NotFound("Database not found", hint="No record and no audit events have this id.")
    return events


def force_delete(ctx: Context, database_id: str, actor: str, ip: str | None, claimed: bool = False) -> None:
    """Drop a database now and leave a DELETED tombstone. A claimed one only with `claimed=True`."""
    record = require(database_id)
    if record.status in records.ENDED or records.past_expiry(record):
        raise records.gone(record)
    if record.status in (PROVISIONING, POOLED):
        raise Conflict(
            f"A {record.status} database is not deleted by hand",
            hint="The purge finishes or fails a create; a pooled one goes with its host (`hostctl drain`).",
        )
    if record.owner_id is not None and record.status != DELETING and not claimed:
        raise Conflict(
            "Database is claimed",
            hint="It holds an owner's data: confirm with claimed=true (the form's checkbox) to delete it anyway.",
        )
    if record.status != DELETING:
        audit.record(record.id, audit.ADMIN_DELETE, actor, ip, detail=f"status={record.status}")
        owner = None if record.status == UNCLAIMED else record.owner_id
        if not records.start_delete(ctx, record, owner):
            # A claim, the purge or another delete moved it first: decide again on what it is now.
            return force_delete(ctx, database_id, actor, ip, claimed)
    ownership.finish_delete(ctx, record, actor=actor, ip=ip)


def extend(ctx: Context, database_id: str, hours: object, actor: str, ip: str | None) -> DatabaseRecord:
    """Push an unclaimed database's expiry back by `hours` (1 to MAX_EXTEND_H, at most that far from now)."""
    if isinstance(hours, bool) or not isinstance(hours, int) or not 1 <= hours <= MAX_EXTEND_H:
        raise Invalid(f"Field 'hours' must be an integer from 1 to {MAX_EXTEND_H}", hint="E.g. 24.")
    record = require(database_id)
    if record.status in records.ENDED or records.past_expiry(record):
        raise records.gone(record)
    if record.status != UNCLAIMED or record.expires_at is None:
        raise Conflict(f"A {record.status} database has no expiry to extend", hint="Only unclaimed databases expire.")
    now = clock.now()
    new = min(record.expires_at + timedelta(hours=hours), now + timedelta(hours=MAX_EXTEND_H))
    audit.record(record.id, audit.ADMIN_EXTEND, actor, ip, detail=f"+{hours}h to {clock.iso(new)}")
    if not records.extend_expiry(record, new):
        raise Conflict("Database changed meanwhile", hint="It was claimed, deleted or expired; reload it.")
    return records.require(record.id)


def _live(record: DatabaseRecord) -> None:
    if record.status in records.ENDED or records.past_expiry(record):
        raise records.gone(record)
    if record.status not in (UNCLAIMED, CLAIMED):
        raise Conflict(f"A {record.status} database cannot be locked or unlocked", hint="Retry when it settles.")


def lock(ctx: Context, database_id: str, actor: str, ip: str | None) -> DatabaseRecord:
    """Lock the tenant out until an operator unlocks it, through quotas' one lock path; idempotent."""
    record = require(database_id)
    _live(record)
    if record.locked_reason == OPERATOR_LOCK:
        return record
    audit.record(record.id, audit.ADMIN_LOCK, actor, ip, detail=f"was={record.locked_reason or 'unlocked'}")
    try:
        quotas.lock(ctx, ctx.hosts.get(record.host_id), record, OPERATOR_LOCK, f"by {actor}")
    except (postgres.HostUnavailable, hostlib.CredentialsError):
        raise Unavailable("Database host unavailable", hint="Nothing was locked; retry in a few seconds.") from None
    return records.require(record.id)


def unlock(ctx: Context, database_id: str, actor: str, ip: str | None) -> DatabaseRecord:
    """Lift any lock (an operator's or a quota's; one still over its quota is locked again by the next run)."""
    record = require(database_id)
    _live(record)
    if not record.locked_reason:
        return record
    audit.record(record.id, audit.ADMIN_UNLOCK, actor, ip, detail=f"was={record.locked_reason}")
    try:
        quotas.unlock(ctx, ctx.hosts.get(record.host_id), record, f"by {actor}")
    except (postgres.HostUnavailable, hostlib.CredentialsError):
        raise Unavailable("Database host unavailable", hint="Nothing was unlocked; retry in a few seconds.") from None
    return records.require(record.id)
