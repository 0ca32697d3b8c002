"""Quota enforcement that a tenant cannot undo.

Run from the scheduled job (`enforce`), per host:
- storage: every tenant database is measured in one query; one over its
  plan's `storage_mb` is locked (role NOLOGIN, sessions ended), and the lock
  and its reason are written on the record, which GET shows. A lock lifts when
  the size fits the plan again (`unlock_if_fits`, called by the claim, or the
  next run after a limit was raised).
- time: backends whose query has run longer than the plan's statement time,
  or that sat idle inside a transaction longer than the plan allows, are
  ended; prepared transactions older than that are rolled back. The
  `statement_timeout` role default is only a courtesy: a tenant can `SET` it
  away, it cannot stop `pg_terminate_backend`.

`temp_file_limit` is set per role at creation where the admin may
(chalicelib.postgres).
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from pynamodb.exceptions import UpdateError

from chalicelib import access, audit, postgres, replication
from chalicelib import hosts as hostlib
from chalicelib.clock import Deadline, period
from chalicelib.models import CLAIMED, UNCLAIMED, DatabaseRecord, HostRecord
from chalicelib.settings import TRIAL_PLAN, Plan

if TYPE_CHECKING:
    from chalicelib.context import Context

log = logging.getLogger(__name__)

STORAGE = "storage"
TRANSFER = "transfer"  # locked by chalicelib.metering, through lock() below
_LIVE = (UNCLAIMED, CLAIMED)
# The sealed verifier too: an unlock publishes the tenant to the pooler again.
_PROJECTION = [
    "id", "status", "plan", "host_id", "role_name", "db_name", "size_bytes", "locked_reason",
    "verifier_key_id", "verifier_secret", "secret_key_id", "secret",
]


def live_records(
    deadline: Deadline, projection: list[str] | None = None
) -> tuple[dict[str, list[DatabaseRecord]], bool]:
    """Live records grouped by host (a projected scan; False if the deadline cut it short)."""
    by_host: dict[str, list[DatabaseRecord]] = {}
    for record in DatabaseRecord.scan(
        filter_condition=DatabaseRecord.status.is_in(*_LIVE),
        attributes_to_get=projection or _PROJECTION,
        page_size=500,
    ):
        by_host.setdefault(record.host_id, []).append(record)
        if deadline.passed():
            return by_host, False
    return by_host, True


def _update(record: DatabaseRecord, actions: list) -> bool:
    """Write quota fields on a record that is still live (never recreate a deleted one)."""
    try:
        record.update(actions=actions, condition=DatabaseRecord.status.is_in(*_LIVE))
        return True
    except UpdateError as exc:
        if exc.cause_response_code == "ConditionalCheckFailedException":
            return False
        raise


def lock(ctx: Context, host: HostRecord, record: DatabaseRecord, reason: str, detail: str, actions: list = ()) -> None:
    """The one lock path (storage here, transfer in chalicelib.metering): role NOLOGIN, sessions ended, reason on the record.

    The host's pooler too (chalicelib.access): its entries revoked and its pools killed first.
    """
    ended = access.lock(ctx, host, record)
    now = datetime.now(UTC)
    _update(record, [DatabaseRecord.locked_reason.set(reason), DatabaseRecord.locked_at.set(now), *actions])
    record.locked_reason = reason
    audit.record_quietly(record.id, audit.QUOTA_LOCKED, audit.SYSTEM, detail=f"{reason}: {detail}")
    log.info("locked database %s: %s (%d sessions ended)", record.id, detail, ended)


def unlock(ctx: Context, host: HostRecord, record: DatabaseRecord, detail: str, actions: list = ()) -> None:
    """Lift a lock (whatever its reason): LOGIN again and published on the pooler again, reason removed."""
    access.unlock(ctx, host, record, ctx.plan(record.plan))
    _update(record, [DatabaseRecord.locked_reason.remove(), DatabaseRecord.locked_at.remove(), *actions])
    reason, record.locked_reason = record.locked_reason, None
    audit.record_quietly(record.id, audit.QUOTA_UNLOCKED, audit.SYSTEM, detail=f"{reason}: {detail}")
    log.info("unlocked database %s: %s", record.id, detail)


def _lock(ctx: Context, host: HostRecord, record: DatabaseRecord, size: int, plan: Plan) -> None:
    now = datetime.now(UTC)
    detail = f"{size} bytes over the {plan.name} plan's {plan.storage_mb} MB"
    lock(
        ctx,
        host,
        record,
        STORAGE,
        detail,
        [DatabaseRecord.size_bytes.set(size), DatabaseRecord.size_checked_at.set(now)],
    )


def _unlock(ctx: Context, host: HostRecord, record: DatabaseRecord, size: int) -> None:
    now = datetime.now(UTC)
    actions = [DatabaseRecord.size_bytes.set(size), DatabaseRecord.size_checked_at.set(now)]
    unlock(ctx, host, record, f"{size} bytes fit its plan", actions)


def _enforce_storage(
    ctx: Context, host: HostRecord, target: postgres.Target, records: list[DatabaseRecord], summary: dict[str, Any]
) -> None:
    sizes = postgres.database_sizes(target, ctx.settings.name_prefix)
    now = datetime.now(UTC)
    for record in records:
        size = sizes.get(record.db_name)
        if size is None:
            continue  # not on this host (yet, or any more)
        summary["measured"] += 1
        plan = ctx.settings.plan(record.plan)
        over = size > plan.storage_bytes
        if over and not record.locked_reason:
            _lock(ctx, host, record, size, plan)
            summary["locked"].append(record.id)
        elif record.locked_reason == STORAGE and not over:
            _unlock(ctx, host, record, size)
            summary["unlocked"].append(record.id)
        elif record.size_bytes is None or int(record.size_bytes) != size:
            _update(record, [DatabaseRecord.size_bytes.set(size), DatabaseRecord.size_checked_at.set(now)])


def _enforce_time(
    ctx: Context, target: postgres.Target, records: list[DatabaseRecord], summary: dict[str, Any]
) -> None:
    plans = {r.role_name: ctx.settings.plan(r.plan) for r in records}
    # A replicating tenant's companion (SQL through the gateway) has its tenant's plan.
    plans.update({role + replication.COMPANION_SUFFIX: plan for role, plan in list(plans.items())})
    # A role with no live record (being created, or an orphan) gets the strictest plan.
    default = ctx.settings.plan(TRIAL_PLAN)
    doomed = []
    for backend in postgres.tenant_backends(target, ctx.settings.name_prefix):
        plan = plans.get(backend.role, default)
        limit = plan.statement_timeout_s if backend.state == "active" else plan.idle_in_transaction_s
        if backend.seconds > limit:
            doomed.append(backend.pid)
            log.info(
                "ending backend %d of %s: %s for %.0fs (limit %ds)",
                backend.pid,
                backend.role,
                backend.state,
                backend.seconds,
                limit,
            )
    summary["terminated"] += postgres.terminate(target, doomed, ctx.settings.name_prefix)
    for prepared in postgres.tenant_prepared(target, ctx.settings.name_prefix):
        plan = plans.get(prepared.owner, default)
        if prepared.seconds > plan.idle_in_transaction_s:
            log.info("rolling back prepared transaction of %s after %.0fs", prepared.owner, prepared.seconds)
            postgres.rollback_prepared(target, prepared)
            summary["rolled_back"] += 1


def enforce(ctx: Context, deadline: Deadline) -> dict[str, Any]:
    """One pass over every host, stopping at `deadline`.

    Every step is idempotent, so a pass cut short is finished by the next one.
    Returns a summary for the job's log line.
    """
    summary: dict[str, Any] = {
        "hosts": 0,
        "measured": 0,
        "locked": [],
        "unlocked": [],
        "terminated": 0,
        "rolled_back": 0,
        "errors": [],
        "complete": True,
    }
    by_host, complete = live_records(deadline)
    summary["complete"] = complete
    for host in ctx.hosts.all(fresh=True):
        if deadline.passed():
            summary["complete"] = False
            break
        records = by_host.get(host.id, [])
        try:
            target = ctx.target(host)
            _enforce_time(ctx, target, records, summary)
            _enforce_storage(ctx, host, target, records, summary)
            if host.logical_replication:
                replication.guard(ctx.settings, target, records, summary)
            summary["hosts"] += 1
        except (postgres.HostUnavailable, hostlib.CredentialsError) as exc:
            summary["errors"].append(f"{host.id}: {exc}")
            log.warning("quotas: host %s skipped: %s", host.id, exc)
        except Exception as exc:  # one bad host must not stop the others
            summary["errors"].append(f"{host.id}: {type(exc).__name__}")
            log.warning("quotas: host %s failed: %s", host.id, type(exc).__name__)
    log.info("quota pass: %s", {k: (len(v) if isinstance(v, list) else v) for k, v in summary.items()})
    return summary


def unlock_if_fits(ctx: Context, record: DatabaseRecord, plan: Plan) -> bool:
    """Lift a storage lock when the database fits `plan` (the claim calls this with the claimed plan).

    Returns whether the database is unlocked now (True when it was not locked).
    """
    if not record.locked_reason:
        return True
    host: HostRecord = ctx.hosts.get(record.host_id)
    target = ctx.target(host)
    if record.locked_reason == TRANSFER:
        moved = transfer_this_period(record)
        if moved > plan.transfer_bytes:
            return False
        unlock(ctx, host, record, f"{moved} bytes fit the {plan.name} plan's {plan.transfer_mb} MB")
        return True
    if record.locked_reason != STORAGE:
        return False
    size = postgres.database_size(target, record.db_name)
    if size is None:
        return False
    if size > plan.storage_bytes:
        _update(record, [DatabaseRecord.size_bytes.set(size), DatabaseRecord.size_checked_at.set(datetime.now(UTC))])
        return False
    _unlock(ctx, host, record, size)
    return True


def transfer_this_period(record: DatabaseRecord, now: datetime | None = None) -> int:
    """Bytes in plus out the record holds for the current period (0 once a new one began)."""
    if record.transfer_period != period(now or datetime.now(UTC)):
        return 0
    return int(record.transfer_in_bytes or 0) + int(record.transfer_out_bytes or 0)
