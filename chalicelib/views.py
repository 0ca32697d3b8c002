"""Response shaping: what a database looks like to clients."""

from __future__ import annotations

from typing import Any

from chalicelib import clock
from chalicelib import hosts as hostlib
from chalicelib.clock import iso  # noqa: F401  (views.iso: the wire format, also for app.py)
from chalicelib.models import DatabaseRecord, HostRecord
from chalicelib.settings import Plan


def connection_urls(record: DatabaseRecord, host: HostRecord, password: str) -> tuple[str, str]:
    """(pooled, direct) connection strings of a database (chalicelib.hosts.connection_urls)."""
    return hostlib.connection_urls(host, record.role_name, password, record.db_name)


def replication_url(record: DatabaseRecord, host: HostRecord, password: str) -> str | None:
    """The `replication=database` string of a database with logical replication (its host's gateway); else None."""
    if not record.logical_replication:
        return None
    return hostlib.replication_url(host, record.role_name, password, record.db_name)


def database(
    record: DatabaseRecord,
    plan: Plan,
    claim_base: str,
    host: HostRecord | None = None,
    password: str | None = None,
    creator_token: str | None = None,
    region: str | None = None,
) -> dict[str, Any]:
    """The public view of a database; connection strings only when a password is given.

    `creator_token` only in the answer that created it (it is stored hashed). `region`: its host's
    (Context.region), so a client sees where its data lives (docs/regions.md).
    """
    pooled_url = direct_url = replication = None
    if host is not None and password is not None:
        pooled_url, direct_url = connection_urls(record, host, password)
        replication = replication_url(record, host, password)
    body = {
        "id": record.id,
        "status": record.status,
        "region": region,
        "connection_string": pooled_url,
        "direct_connection_string": direct_url,
        "replication_connection_string": replication,
        "claim_url": f"{claim_base}/claim/{record.id}",
        "expires_at": iso(record.expires_at) if record.status != "CLAIMED" else None,
        "created_at": iso(record.created_at),
        "updated_at": iso(record.updated_at),
        "limits": plan.public(),
        "quota": quota(record, plan),
    }
    if creator_token is not None:
        body["creator_token"] = creator_token
    return body


_LOCK_HINTS = {
    "storage": "The database is over its plan's storage limit; its role cannot log in. "
    "Claim it for a larger plan, or create a new one.",
    "transfer": "The database moved more data through the pooler this month (UTC) than its plan allows; "
    "its role cannot log in until the month ends or the limit is raised. An unclaimed one: claim it for "
    "the larger plan, or create a new one.",
}


def transfer(record: DatabaseRecord, plan: Plan) -> dict[str, Any]:
    """Bytes through the pooler this period (a UTC month) and the plan's limit (chalicelib.metering)."""
    current = clock.period(clock.now())
    same = record.transfer_period == current
    return {
        "period": current,
        "in_bytes": int(record.transfer_in_bytes or 0) if same else 0,
        "out_bytes": int(record.transfer_out_bytes or 0) if same else 0,
        "limit_bytes": plan.transfer_bytes,
        "checked_at": iso(record.transfer_checked_at),
    }


def quota(record: DatabaseRecord, plan: Plan) -> dict[str, Any]:
    """What the scheduled job measured and whether it locked the database (additive to Instagres' shape)."""
    locked = None
    if record.locked_reason:
        locked = {
            "reason": record.locked_reason,
            "since": iso(record.locked_at),
            "hint": _LOCK_HINTS.get(record.locked_reason, "The scheduled job locked the database."),
        }
    return {
        "size_bytes": int(record.size_bytes) if record.size_bytes is not None else None,
        "size_checked_at": iso(record.size_checked_at),
        "storage_limit_bytes": plan.storage_bytes,
        "statement_timeout_s": plan.statement_timeout_s,
        "idle_in_transaction_timeout_s": plan.idle_in_transaction_s,
        "transfer": transfer(record, plan),
        "locked": locked,
    }


# -- issue 4: accounts, owners, audit ------------------------------------------


def account(record, api_key: str | None = None) -> dict[str, Any]:
    """An account; `api_key` only in the answer that created it."""
    body: dict[str, Any] = {"id": record.id, "email": record.email, "created_at": iso(record.created_at)}
    if api_key is not None:
        body["api_key"] = api_key
    return body


def owned_database(
    record: DatabaseRecord, plan: Plan, usage=None, days: list | None = None, region: str | None = None
) -> dict[str, Any]:
    """What the owner sees of a database (connection strings have their own audited endpoint).

    `days`: the details' usage over time (chalicelib.usage.last_days); `region`: its host's.
    """
    body: dict[str, Any] = {
        "id": record.id,
        "status": record.status,
        "region": region,
        "plan": plan.name,
        "limits": plan.public(),
        "created_at": iso(record.created_at),
        "claimed_at": iso(record.claimed_at),
        "updated_at": iso(record.updated_at),
        "source_id": record.source_id,  # a copy's source (issue 18 §2); null for the rest
        "quota": quota(record, plan),
    }
    if usage is not None:
        body["size_bytes"] = usage.size_bytes
        body["connections"] = usage.connections
    if days is not None:
        body["usage"] = days
    return body


def copy(record: DatabaseRecord, plan: Plan, host: HostRecord, password: str, region: str | None) -> dict[str, Any]:
    """A new copy: what the owner sees of it, with its connection strings (shown here, and audited later)."""
    return {**owned_database(record, plan, region=region), **connection(record, host, password)}


def connection(record: DatabaseRecord, host: HostRecord, password: str) -> dict[str, Any]:
    pooled, direct = connection_urls(record, host, password)
    return {
        "id": record.id,
        "connection_string": pooled,
        "direct_connection_string": direct,
        "replication_connection_string": replication_url(record, host, password),
    }


def audit_event(event) -> dict[str, Any]:
    return {
        "id": event.event_id,
        "action": event.action,
        "at": iso(event.at),
        "actor": event.actor,
        "ip": event.ip,
        "detail": event.detail,
    }


def admin_database(record: DatabaseRecord) -> dict[str, Any]:
    """What the operator's dashboard shows of a record: everything but secrets and hashes."""
    return {
        "id": record.id,
        "status": record.status,
        "plan": record.plan,
        "host_id": record.host_id,
        "db_name": record.db_name,
        "ref": record.ref,
        "owner_id": record.owner_id,
        "created_ip": record.created_ip,
        "created_at": iso(record.created_at),
        "updated_at": iso(record.updated_at),
        "expires_at": iso(record.expires_at) if record.status != "CLAIMED" else None,
        "claimed_at": iso(record.claimed_at),
        "ended_at": iso(record.ended_at),
        "size_bytes": int(record.size_bytes) if record.size_bytes is not None else None,
        "locked": {"reason": record.locked_reason, "since": iso(record.locked_at)} if record.locked_reason else None,
    }


def admin_summary(summary: dict[str, Any]) -> dict[str, Any]:
    """chalicelib.stats.summary on the wire (times as ISO 8601)."""
    hourly = [{**row, "hour": iso(row["hour"])} for row in summary["creates_per_hour"]]
    return {**summary, "creates_per_hour": hourly}
