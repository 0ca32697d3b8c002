"""Every ending of a database's record, through one path: `tombstone`.

EXPIRED, DELETED and FAILED records keep no secret and get their own TTL
(GET answers 410 until it passes). While the database may still exist, the
tombstone stays due in the bucket named by its status: the scheduled purge
(chalicelib.expiry) drops it and gives the host slot back.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import TYPE_CHECKING

from pynamodb.exceptions import PutError, TransactWriteError
from pynamodb.transactions import TransactWrite

from chalicelib import clock, hosts, reliability
from chalicelib.identifiers import uuid7
from chalicelib.models import (
    DELETED,
    DELETING,
    EXPIRED,
    FAILED,
    POOLED,
    PROVISIONING,
    UNCLAIMED,
    AuditEvent,
    DatabaseRecord,
    HostRecord,
)
from chalicelib.records import ENDED, conditional, is_conditional_failure, reason

if TYPE_CHECKING:
    from chalicelib.context import Context

# A lease covers one drop, not a whole run: a holder that died frees the
# record within a minute. Should a slow drop outlive it, a second drop
# runs beside it, harmlessly (drops are idempotent, and only one
# `finish_cleanup` wins the slot).
LEASE_S = 60


# -- endings: one tombstone path ---------------------------------------------------
#
# A record whose database must go is first moved, with a conditional write,
# into a state no claim can take (EXPIRED/FAILED) and into a "leftovers" due
# bucket with `due_at` pushed LEASE_S ahead: that write is the lock. Only its
# winner drops the database, and only the winner of the final conditional
# write (`finish_cleanup`) gives the host slot back, so two purge runs, or a
# purge and a stream delivery, never drop or release twice. A run that dies
# mid-way leaves the record due again when the lease ends.


def lease_until(now: datetime) -> int:
    return int(now.timestamp()) + LEASE_S


def tombstone(
    ctx: Context,
    status: str,
    now: datetime,
    ended_at: datetime | None = None,
    failure: str | None = None,
    due_at: int | None = None,
) -> list:
    """Update actions that make a record a tombstone: no secret, its own TTL.

    `due_at`: the database may still exist, so the record stays due at that
    time (in the bucket named by its status): a lease (`lease_until`) when the
    writer drops it itself, now when it leaves the drop to the purge.
    """
    actions = [
        DatabaseRecord.status.set(status),
        DatabaseRecord.ended_at.set(ended_at or now),
        DatabaseRecord.updated_at.set(now),
        DatabaseRecord.secret.remove(),
        DatabaseRecord.secret_key_id.remove(),
        DatabaseRecord.expires_at.set(now + timedelta(seconds=ctx.settings.tombstone_ttl_s)),
    ]
    if failure is not None:
        actions.append(DatabaseRecord.failure.set(failure))
    if due_at is not None:
        return actions + [DatabaseRecord.due_bucket.set(status), DatabaseRecord.due_at.set(due_at)]
    return actions + [DatabaseRecord.due_bucket.remove(), DatabaseRecord.due_at.remove()]


def fail(ctx: Context, record: DatabaseRecord, failure: str, was: str, dropped: bool) -> bool:
    """A create (or a take from the pool) that failed -> FAILED tombstone.

    `dropped`: its leftovers are gone already; otherwise the record is due now
    and the purge drops them. False when the record was no longer `was`.
    """
    now = clock.now()
    due = None if dropped else int(now.timestamp())
    return conditional(record, tombstone(ctx, FAILED, now, failure=failure, due_at=due), DatabaseRecord.status == was)


def expire(ctx: Context, record: DatabaseRecord, now: datetime | None = None) -> bool:
    """UNCLAIMED past expiry -> EXPIRED tombstone with its drop pending; False if a claim (or another run) won."""
    now = now or clock.now()
    expired_at = min(record.expires_at, now) if record.expires_at else now
    return conditional(
        record,
        # GET said "expired at expires_at" before the purge ran; keep saying it.
        tombstone(ctx, EXPIRED, now, ended_at=expired_at, due_at=lease_until(now)),
        (DatabaseRecord.status == UNCLAIMED)
        & (DatabaseRecord.due_bucket == UNCLAIMED)
        & (DatabaseRecord.due_at <= int(now.timestamp())),
    )


def fail_stuck(ctx: Context, record: DatabaseRecord, now: datetime | None = None) -> bool:
    """PROVISIONING past the provisioning timeout (a crashed create) -> FAILED with its drop pending."""
    now = now or clock.now()
    return conditional(
        record,
        tombstone(ctx, FAILED, now, failure="provisioning timed out", due_at=lease_until(now)),
        (DatabaseRecord.status == PROVISIONING)
        & (DatabaseRecord.due_bucket == PROVISIONING)
        & (DatabaseRecord.due_at <= int(now.timestamp())),
    )


def discard_pooled(ctx: Context, record: DatabaseRecord, now: datetime | None = None) -> bool:
    """POOLED -> FAILED with its drop pending under our lease; False if a create took it."""
    now = now or clock.now()
    actions = tombstone(ctx, FAILED, now, failure="discarded from the pool", due_at=lease_until(now))
    return conditional(record, actions, DatabaseRecord.status == POOLED)


def lease(ctx: Context, record: DatabaseRecord, now: datetime | None = None) -> bool:
    """Take a tombstone whose drop is pending (a retry); False if another run holds it."""
    now = now or clock.now()
    if record.status not in ENDED or record.due_bucket is None:
        return False
    return conditional(
        record,
        [DatabaseRecord.due_at.set(lease_until(now)), DatabaseRecord.updated_at.set(now)],
        DatabaseRecord.status.is_in(*ENDED)
        & (DatabaseRecord.due_bucket == record.due_bucket)
        & (DatabaseRecord.due_at == record.due_at),
    )


def retry_later(ctx: Context, record: DatabaseRecord, now: datetime | None = None) -> int | None:
    """A drop under our lease failed: due again after a backoff (seconds, then up to minutes).

    Returns the delay, or None when the lease was lost meanwhile.
    """
    now = now or clock.now()
    attempts = int(record.drop_attempts or 0)
    delay = reliability.drop_backoff_s(attempts)
    done = conditional(
        record,
        [
            DatabaseRecord.due_at.set(int(now.timestamp()) + delay),
            DatabaseRecord.drop_attempts.set(attempts + 1),
            DatabaseRecord.updated_at.set(now),
        ],
        DatabaseRecord.status.is_in(*ENDED) & (DatabaseRecord.due_at == record.due_at),
    )
    return delay if done else None


def hold_claimed(ctx: Context, record: DatabaseRecord, now: datetime | None = None) -> bool:
    """An automatic drop met a database Postgres marks claimed: stop retrying, keep it for a person.

    The record leaves its due bucket but keeps its host slot (the database
    lives on); reconciliation lists the name as a claimed orphan.
    """
    now = now or clock.now()
    return conditional(
        record,
        [
            DatabaseRecord.due_bucket.remove(),
            DatabaseRecord.due_at.remove(),
            DatabaseRecord.failure.set("kept: the host marks this database claimed"),
            DatabaseRecord.updated_at.set(now),
        ],
        DatabaseRecord.status.is_in(*ENDED) & (DatabaseRecord.due_at == record.due_at),
    )


def finish_cleanup(ctx: Context, record: DatabaseRecord, now: datetime | None = None, release: bool = True) -> bool:
    """After the drop: leave the due bucket, and give the host slot back if this run held the lease.

    `release=False`: the caller gives the slots of the records it finished back
    in one write per host (the purge); a crash in between leaves the count one
    high per record until reconciliation's recount.
    """
    now = now or clock.now()
    won = conditional(
        record,
        [DatabaseRecord.due_bucket.remove(), DatabaseRecord.due_at.remove(), DatabaseRecord.updated_at.set(now)],
        DatabaseRecord.status.is_in(*ENDED) & (DatabaseRecord.due_at == record.due_at),
    )
    if won and release:
        hosts.release(record.host_id)
    return won


# TransactWriteItems takes at most 100 items: a record's final write and its audit event are two.
TRANSACT_ITEMS = 100
_FINISH_ATTEMPTS = 4


def finish_batch_size(audited: bool) -> int:
    """Records per `finish_batch` call: its final write and, when audited, its event are one item each."""
    return TRANSACT_ITEMS // (2 if audited else 1)


def finish_batch(
    batch: list[DatabaseRecord], event: Callable[[DatabaseRecord], AuditEvent] | None = None
) -> list[DatabaseRecord]:
    """`finish_cleanup(release=False)` of up to `finish_batch_size` records in one write; the records whose write won.

    One TransactWriteItems: each record's final write, conditional as in
    `finish_cleanup`, and `event(record)` beside it, so a record's event is
    written exactly when its final write is. A record whose condition failed
    (another run holds it now) leaves the batch, which is sent again without
    it (DynamoDB's cancellation reasons name it); a conflict with a write in
    flight sends it again as it is. The caller gives the slots of the
    returned records back. Raises what DynamoDB raises otherwise: nothing of
    the batch was written, and its records stay due (their lease ends; the
    next run drops them again, idempotent, and finishes them).
    """
    for attempt in range(_FINISH_ATTEMPTS):
        if not batch:
            return []
        now = clock.now()
        events = [event(record) for record in batch] if event is not None else []
        try:
            with TransactWrite(connection=DatabaseRecord._get_connection().connection) as write:
                for item in events:
                    write.save(item)
                for record in batch:
                    write.update(
                        record,
                        [DatabaseRecord.due_bucket.remove(), DatabaseRecord.due_at.remove(), DatabaseRecord.updated_at.set(now)],
                        condition=DatabaseRecord.status.is_in(*ENDED) & (DatabaseRecord.due_at == record.due_at),
                    )
        except TransactWriteError as exc:
            # Reasons come back in the request's order: the puts (events), then the updates.
            codes = [reason.code if reason else None for reason in (exc.cancellation_reasons or [])][len(events) :]
            lost = {i for i, code in enumerate(codes) if code == "ConditionalCheckFailed"}
            if not lost and "TransactionConflict" not in codes:
                raise
            if attempt + 1 == _FINISH_ATTEMPTS:
                raise
            batch = [record for i, record in enumerate(batch) if i not in lost]
            if not lost:
                time.sleep(random.uniform(0.005, 0.02) * (attempt + 1))  # a write in flight: let it land
            continue
        return batch
    return []


def write_back_tombstone(ctx: Context, old: DatabaseRecord, now: datetime | None = None) -> DatabaseRecord | None:
    """After a REMOVE of a record whose database still existed: a tombstone with the drop pending.

    GET then answers 410 instead of 404, and the tombstone is the lease
    for the drop. None when an item with that id exists again.
    """
    now = now or clock.now()
    status = {UNCLAIMED: EXPIRED, PROVISIONING: FAILED}.get(old.status, old.status)
    written = DatabaseRecord(
        id=old.id,
        status=status,
        plan=old.plan,
        host_id=old.host_id,
        role_name=old.role_name,
        db_name=old.db_name,
        logical_replication=old.logical_replication,
        ref=old.ref,
        created_ip=old.created_ip,
        user_agent=old.user_agent,
        created_at=old.created_at,
        updated_at=now,
        ended_at=old.ended_at or (min(old.expires_at, now) if old.expires_at else now),
        failure=old.failure or ("removed while provisioning" if status == FAILED else None),
        expires_at=now + timedelta(seconds=ctx.settings.tombstone_ttl_s),
        due_bucket=status,
        due_at=lease_until(now),
    )
    try:
        written.save(condition=DatabaseRecord.id.does_not_exist())
    except PutError as exc:
        if is_conditional_failure(exc):
            return None
        raise
    return written


def mark_deleted(ctx: Context, record: DatabaseRecord) -> bool:
    """DELETING -> DELETED tombstone (dropped already); False if a racing DELETE wrote it."""
    return conditional(record, tombstone(ctx, DELETED, clock.now()), DatabaseRecord.status == DELETING)


def leftovers(ctx: Context, record: DatabaseRecord, host: HostRecord, cause: Exception) -> None:
    """A FAILED record of its own for leftovers on `host`, due now; it keeps the slot until the purge drops them."""
    now = clock.now()
    DatabaseRecord(
        id=str(uuid7()),
        status=FAILED,
        plan=record.plan,
        host_id=host.id,
        role_name=record.role_name,
        db_name=record.db_name,
        failure=reason(cause),
        created_at=now,
        updated_at=now,
        ended_at=now,
        expires_at=now + timedelta(seconds=ctx.settings.tombstone_ttl_s),
        due_bucket=FAILED,
        due_at=int(now.timestamp()),
    ).save(condition=DatabaseRecord.id.does_not_exist())
