"""Transfer metering (issue 14 §6) and the daily usage samples (issue 18 §4), a step of the scheduled job.

Per host, each run reads the pooler's counters (`Pooler.stats()`: bytes
received from and sent to clients per tenant database since PgBouncer
started) and, per live database, writes the delta against the reading kept
on the record (`pooler_seen_in/out`). A reading smaller than the kept one
means PgBouncer restarted: the delta is the new reading itself (counted from
zero; the bytes between the last reading and the restart are lost).

Each database's write is one DynamoDB transaction: the record's period
totals (ADD), its new kept reading, and the usage table's day row (ADD), on
condition that the kept reading is still the one the delta was taken
against. So:
- two runs reading the same counters cannot both add: the second one's
  condition fails (exactly once per reading, never double counted);
- a run that dies between reading and writing has written nothing, and the
  next run's delta covers the same bytes (the counters are cumulative), so
  nothing is lost either; a run cut short by its deadline is the same case.
A database over its plan's transfer limit this period is locked through
quotas' lock path (reason "transfer"); the lock lifts when a new period
starts, when the limit is raised, or when a claim gives it a larger plan.

Not metered: connections that do not go through the pooler (the direct
string where it points at Postgres itself), and hosts without a pooler.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from pynamodb.exceptions import TransactWriteError
from pynamodb.transactions import TransactWrite

from chalicelib import clock, pooler, postgres, quotas, reliability, usage
from chalicelib import hosts as hostlib
from chalicelib.clock import Deadline
from chalicelib.models import CLAIMED, UNCLAIMED, DatabaseRecord, HostRecord, UsageDay

if TYPE_CHECKING:
    from chalicelib.context import Context

log = logging.getLogger(__name__)

_LIVE = (UNCLAIMED, CLAIMED)
_PROJECTION = [
    "id",
    "status",
    "plan",
    "host_id",
    "role_name",
    "db_name",
    "locked_reason",
    "transfer_period",
    "transfer_in_bytes",
    "transfer_out_bytes",
    "pooler_seen_in",
    "pooler_seen_out",
]


@dataclass(frozen=True)
class Delta:
    """What one reading adds to one database, and the kept reading it was taken against."""

    database_id: str
    reading: tuple[int, int]  # the pooler's (in, out) counters now
    seen: tuple[int, int] | None  # the kept reading; None before the first
    old_period: str | None
    period: str
    day: str
    added: tuple[int, int]
    restarted: bool


def delta(record: DatabaseRecord, reading: tuple[int, int], now: datetime) -> Delta | None:
    """The write one reading calls for; None when there is nothing to write."""
    seen = None
    if record.pooler_seen_in is not None and record.pooler_seen_out is not None:
        seen = (int(record.pooler_seen_in), int(record.pooler_seen_out))
    restarted = seen is not None and (reading[0] < seen[0] or reading[1] < seen[1])
    if seen is None or restarted:
        added = reading  # first reading, or PgBouncer restarted: its counters began at zero
    else:
        added = (reading[0] - seen[0], reading[1] - seen[1])
    period = clock.period(now)
    if added == (0, 0) and seen == reading and record.transfer_period == period:
        return None
    return Delta(record.id, reading, seen, record.transfer_period, period, usage.day_key(now), added, restarted)


def apply(record: DatabaseRecord, change: Delta, now: datetime) -> bool:
    """Write `change` in one transaction; False when another run already moved the kept reading.

    Updates `record` in memory to what was written.
    """
    condition = DatabaseRecord.status.is_in(*_LIVE)
    if change.seen is None:
        condition &= DatabaseRecord.pooler_seen_in.does_not_exist()
    else:
        condition &= (DatabaseRecord.pooler_seen_in == change.seen[0]) & (
            DatabaseRecord.pooler_seen_out == change.seen[1]
        )
    if change.old_period is None:
        condition &= DatabaseRecord.transfer_period.does_not_exist()
    else:
        condition &= DatabaseRecord.transfer_period == change.old_period
    actions = [
        DatabaseRecord.pooler_seen_in.set(change.reading[0]),
        DatabaseRecord.pooler_seen_out.set(change.reading[1]),
        DatabaseRecord.transfer_checked_at.set(now),
    ]
    if change.old_period == change.period:
        actions += [
            DatabaseRecord.transfer_in_bytes.add(change.added[0]),
            DatabaseRecord.transfer_out_bytes.add(change.added[1]),
        ]
        totals = (
            int(record.transfer_in_bytes or 0) + change.added[0],
            int(record.transfer_out_bytes or 0) + change.added[1],
        )
    else:  # a new period starts from this delta
        actions += [
            DatabaseRecord.transfer_period.set(change.period),
            DatabaseRecord.transfer_in_bytes.set(change.added[0]),
            DatabaseRecord.transfer_out_bytes.set(change.added[1]),
        ]
        totals = change.added
    try:
        with TransactWrite(connection=DatabaseRecord._get_connection().connection) as tx:
            tx.update(record, actions=actions, condition=condition)
            if change.added != (0, 0):
                tx.update(UsageDay(record.id, change.day), actions=usage.transfer_actions(*change.added, change.day))
    except TransactWriteError as exc:
        if any(r is not None and r.code == "ConditionalCheckFailed" for r in exc.cancellation_reasons or []):
            return False
        raise
    record.pooler_seen_in, record.pooler_seen_out = change.reading
    record.transfer_period = change.period
    record.transfer_in_bytes, record.transfer_out_bytes = totals
    return True


def _enforce(ctx: Context, host: HostRecord, record: DatabaseRecord, now: datetime, summary: dict) -> None:
    """Lock a database over its plan's transfer this period; unlock one that fits again."""
    plan = ctx.plan(record.plan)
    moved = quotas.transfer_this_period(record, now)
    if moved > plan.transfer_bytes and not record.locked_reason:
        detail = f"{moved} bytes moved this period, over the {plan.name} plan's {plan.transfer_mb} MB"
        quotas.lock(ctx, host, record, quotas.TRANSFER, detail)
        summary["locked"].append(record.id)
    elif record.locked_reason == quotas.TRANSFER and moved <= plan.transfer_bytes:
        # The whole record: an unlock may need more than this scan projected (the pooler's verifier).
        full = DatabaseRecord.get(record.id, consistent_read=True)
        quotas.unlock(ctx, host, full, f"{moved} bytes fit the {plan.name} plan's {plan.transfer_mb} MB")
        record.locked_reason = None
        summary["unlocked"].append(record.id)


def _meter_host(
    ctx: Context, host: HostRecord, records: list[DatabaseRecord], deadline: Deadline, summary: dict
) -> None:
    target = ctx.target(host)
    bouncer = ctx.pooler(host)
    readings = bouncer.stats() if bouncer is not None else {}
    now = datetime.now(UTC)
    reliability.pause_point("metering_after_read")  # the fault suite's kill -9 lands here
    for record in records:
        if deadline.passed():
            summary["complete"] = False
            return
        reading = readings.get(record.db_name)
        change = delta(record, reading, now) if reading is not None else None
        if change is not None:
            if apply(record, change, now):
                summary["metered"] += 1
                summary["restarts"] += int(change.restarted)
            else:
                summary["conflicts"] += 1  # another run counted this reading
                continue
        _enforce(ctx, host, record, now, summary)
    prefix = ctx.settings.name_prefix
    sizes, connections = postgres.database_sizes(target, prefix), postgres.connection_counts(target, prefix)
    summary["sampled"] += usage.sample(records, sizes, connections, now)


def run(ctx: Context, deadline: Deadline) -> dict[str, Any]:
    """One pass over every host, stopping at `deadline`; a summary for the job's log line.

    Resumable: the pooler's counters are cumulative, so a database skipped
    this run is counted in full by the next one.
    """
    summary: dict[str, Any] = {
        "hosts": 0,
        "metered": 0,
        "restarts": 0,
        "conflicts": 0,
        "sampled": 0,
        "locked": [],
        "unlocked": [],
        "errors": [],
        "complete": True,
    }
    by_host, summary["complete"] = quotas.live_records(deadline, _PROJECTION)
    for host in ctx.hosts.all(fresh=True):
        records = by_host.get(host.id)
        if not records:
            continue
        if deadline.passed():
            summary["complete"] = False
            break
        try:
            _meter_host(ctx, host, records, deadline, summary)
            summary["hosts"] += 1
        except (postgres.HostUnavailable, hostlib.CredentialsError, pooler.PoolerError) as exc:
            summary["errors"].append(f"{host.id}: {exc}")
            log.warning("metering: host %s skipped: %s", host.id, exc)
        except Exception as exc:  # one bad host (or pooler) must not stop the others
            summary["errors"].append(f"{host.id}: {type(exc).__name__}")
            log.warning("metering: host %s failed: %s", host.id, type(exc).__name__)
    log.info("metering pass: %s", {k: (len(v) if isinstance(v, list) else v) for k, v in summary.items()})
    return summary
