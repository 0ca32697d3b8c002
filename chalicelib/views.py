"""Response shaping: what a database looks like to clients."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from chalicelib import hosts as hostlib
from chalicelib import postgres
from chalicelib.models import DatabaseRecord, HostRecord
from chalicelib.settings import Plan


def iso(dt: datetime | None) -> str | None:
    """ISO 8601 UTC with milliseconds, as Instagres writes it: 2026-02-01T12:00:00.000Z."""
    if dt is None:
        return None
    return dt.strftime("%Y-%m-%dT%H:%M:%S.") + f"{dt.microsecond // 1000:03d}Z"


def database(
    record: DatabaseRecord,
    plan: Plan,
    claim_base: str,
    host: HostRecord | None = None,
    password: str | None = None,
) -> dict[str, Any]:
    """The public view of a database; connection strings only when a password is given."""
    pooled_url = direct_url = None
    if host is not None and password is not None:
        (pooled_host, pooled_port), (direct_host, direct_port) = hostlib.endpoints(host)
        pooled_url = postgres.connection_url(
            pooled_host, pooled_port, record.role_name, password, record.db_name, host.sslmode
        )
        direct_url = postgres.connection_url(
            direct_host, direct_port, record.role_name, password, record.db_name, host.sslmode
        )
    return {
        "id": record.id,
        "status": record.status,
        "connection_string": pooled_url,
        "direct_connection_string": direct_url,
        "claim_url": f"{claim_base}/claim/{record.id}",
        "expires_at": iso(record.expires_at) if record.status != "CLAIMED" else None,
        "created_at": iso(record.created_at),
        "updated_at": iso(record.updated_at),
        "limits": plan.public(),
        "quota": quota(record, plan),
    }


def quota(record: DatabaseRecord, plan: Plan) -> dict[str, Any]:
    """What the scheduled job measured and whether it locked the database (additive to Instagres' shape)."""
    locked = None
    if record.locked_reason:
        locked = {
            "reason": record.locked_reason,
            "since": iso(record.locked_at),
            "hint": "The database is over its plan's storage limit; its role cannot log in. "
            "Claim it for a larger plan, or create a new one.",
        }
    return {
        "size_bytes": int(record.size_bytes) if record.size_bytes is not None else None,
        "size_checked_at": iso(record.size_checked_at),
        "storage_limit_bytes": plan.storage_bytes,
        "statement_timeout_s": plan.statement_timeout_s,
        "idle_in_transaction_timeout_s": plan.idle_in_transaction_s,
        "locked": locked,
    }
