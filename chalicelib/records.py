"""A database's record: reading it, and its live status changes, each a conditional write.

    create: PROVISIONING --DDL ok--> UNCLAIMED
                         --DDL fails--> FAILED (leftovers dropped, or left due for the purge)
    pool:   PROVISIONING --> POOLED --take--> UNCLAIMED
    claim:  UNCLAIMED --(expiry removed)--> CLAIMING --(role limits raised)--> CLAIMED
    delete: UNCLAIMED/CLAIMING/CLAIMED --> DELETING --(dropped)--> DELETED (tombstone)
    expiry: UNCLAIMED past expiry --> EXPIRED (tombstone, drop pending)

The record is written before any DDL, so a crash between the two leaves a
trace the scheduled purge finds through the `by_due` index. Every ending
(EXPIRED, DELETED, FAILED) is written by chalicelib.tombstones, through one
path. Nothing here talks to Postgres.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING

from pynamodb.exceptions import PutError, TransactWriteError, UpdateError
from pynamodb.transactions import TransactWrite

from chalicelib import audit, clock, stats
from chalicelib.crypto import Sealed
from chalicelib.errors import Conflict, Gone, NotFound, Unavailable
from chalicelib.identifiers import tenant_name
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
    HostRecord,
)
from chalicelib.postgres import HostUnavailable
from chalicelib.settings import Plan

if TYPE_CHECKING:
    from chalicelib.abuse import RateCount
    from chalicelib.audit import AuditEvent
    from chalicelib.context import Context
    from chalicelib.stats import CreateCount

ENDED = (EXPIRED, DELETED, FAILED)


@dataclass(frozen=True)
class Requester:
    ip: str | None = None
    user_agent: str | None = None
    idempotency_key: str | None = None


@dataclass(frozen=True)
class Provisioned:
    """A database and what the caller may see of it."""

    record: DatabaseRecord
    plan: Plan
    host: HostRecord | None
    password: str | None  # None when the caller gets no connection string
    created: bool
    creator_token: str | None = None  # only in the answer that created the database


def reason(cause: Exception) -> str:
    """What a failure may say in logs and records: the safe message of HostUnavailable, else the type."""
    if isinstance(cause, HostUnavailable):
        return str(cause).splitlines()[0][:200]
    return type(cause).__name__


def is_conditional_failure(exc: PutError | UpdateError) -> bool:
    return exc.cause_response_code == "ConditionalCheckFailedException"


def conditional(record: DatabaseRecord, actions: list, condition) -> bool:
    """One conditional update; False when the condition did not hold (someone else moved the record)."""
    try:
        record.update(actions=actions, condition=condition)
    except UpdateError as exc:
        if is_conditional_failure(exc):
            return False
        raise
    return True


# -- reading -------------------------------------------------------------------


def find(database_id: str) -> DatabaseRecord | None:
    try:
        record = DatabaseRecord.get(database_id, consistent_read=True)
    except DatabaseRecord.DoesNotExist:
        return None
    # A pooled database's id has never been handed out: it does not exist yet.
    return None if record.status == POOLED else record


def require(database_id: str) -> DatabaseRecord:
    record = find(database_id)
    if record is None:
        raise NotFound("Database not found", hint="Check the id, or create a new database.")
    return record


def get(ctx: Context, database_id: str) -> Provisioned:
    """A database as its public GET shows it; tombstones raise Gone."""
    return visible(ctx, require(database_id), created=False)


def visible(ctx: Context, record: DatabaseRecord, created: bool) -> Provisioned:
    plan = ctx.plan(record.plan)
    if record.status in ENDED or past_expiry(record):
        raise gone(record)
    if record.status == UNCLAIMED:
        return Provisioned(record, plan, ctx.hosts.get(record.host_id), password(ctx, record), created)
    # PROVISIONING and CLAIMED carry no connection string on the public API.
    return Provisioned(record, plan, None, None, created)


def existing(ctx: Context, record: DatabaseRecord) -> Provisioned:
    if record.status == PROVISIONING:
        raise still_creating()
    return visible(ctx, record, created=False)


def still_creating() -> Conflict:
    return Conflict("Database is still being created", hint="Retry in a second.", retry_after=1)


def past_expiry(record: DatabaseRecord) -> bool:
    # The purge may not have run yet; to the client it is expired already.
    return record.status == UNCLAIMED and record.expires_at is not None and record.expires_at <= clock.now()


def claimable(record: DatabaseRecord) -> bool:
    return record.status == UNCLAIMED and not past_expiry(record)


def gone(record: DatabaseRecord) -> Gone:
    """Why a tombstone (or an UNCLAIMED record past its expiry) is gone."""
    if record.status == UNCLAIMED:
        return Gone(
            "Database expired",
            hint="Unclaimed databases expire; create a new one, and claim it to keep it.",
            expired_at=clock.iso(record.expires_at),
        )
    if record.status == DELETED:
        return Gone(
            "Database deleted",
            hint="Its owner deleted it. Create a new database.",
            deleted_at=clock.iso(record.ended_at),
        )
    if record.status == FAILED:
        return Gone("Database creation failed", hint="Create a new database (with another id).")
    return Gone(
        "Database expired",
        hint="Unclaimed databases expire; create a new one, and claim it to keep it.",
        expired_at=clock.iso(record.ended_at or record.expires_at),
    )


def password(ctx: Context, record: DatabaseRecord) -> str:
    return ctx.keyring.decrypt(Sealed(record.secret_key_id, record.secret), context=record.id)


def seal_verifier(ctx: Context, database_id: str, verifier: str) -> Sealed:
    """The role's SCRAM verifier sealed for the record: as secret as the password it comes from."""
    return ctx.keyring.encrypt(verifier, context=database_id + "#verifier")


def verifier(ctx: Context, record: DatabaseRecord) -> str | None:
    """The role's SCRAM verifier as sealed on the record; None for a record made before it was kept."""
    if not record.verifier_secret:
        return None
    return ctx.keyring.decrypt(Sealed(record.verifier_key_id, record.verifier_secret), context=record.id + "#verifier")


# -- creating --------------------------------------------------------------------


def new(
    ctx: Context,
    database_id: str,
    host: HostRecord,
    plan: Plan,
    password: str,
    ref: str | None = None,
    requester: Requester | None = None,
    logical_replication: bool = False,
    creator_hash: str | None = None,
    verifier: str | None = None,
    owner_id: str | None = None,
    source_id: str | None = None,
) -> DatabaseRecord:
    """A PROVISIONING record (not saved yet), due for the purge if its create never finishes.

    `verifier`: the role's SCRAM verifier, sealed too (the pooler publishes it again later).
    `owner_id` and `source_id`: a copy of an owned database (chalicelib.copies).
    """
    now = clock.now()
    requester = requester or Requester()
    sealed = ctx.keyring.encrypt(password, context=database_id)
    scram = seal_verifier(ctx, database_id, verifier) if verifier else None
    name = tenant_name(ctx.settings.name_prefix)
    return DatabaseRecord(
        id=database_id,
        status=PROVISIONING,
        plan=plan.name,
        host_id=host.id,
        role_name=name,
        db_name=name,
        secret_key_id=sealed.key_id,
        secret=sealed.blob,
        logical_replication=logical_replication,
        ref=ref,
        created_ip=requester.ip,
        user_agent=(requester.user_agent or "")[:256] or None,
        created_at=now,
        updated_at=now,
        due_bucket=PROVISIONING,
        due_at=int(time.time()) + ctx.settings.provisioning_timeout_s,
        creator_token_hash=creator_hash,
        verifier_key_id=scram.key_id if scram else None,
        verifier_secret=scram.blob if scram else None,
        owner_id=owner_id,
        source_id=source_id,
    )


def mark_unclaimed(
    record: DatabaseRecord, plan: Plan, event: AuditEvent | None = None, tally: CreateCount | None = None
) -> None:
    """PROVISIONING -> UNCLAIMED once the database exists; with the create's audit `event` and its count
    (`stats.create_count`) in the same transaction: one round trip, and the count only if the status moved."""
    now = clock.now()
    expires = now + timedelta(seconds=plan.lifetime_s)
    values = {
        "status": UNCLAIMED,
        "expires_at": expires,
        "due_bucket": UNCLAIMED,
        "due_at": int(expires.timestamp()),
        "updated_at": now,
    }
    actions = [getattr(DatabaseRecord, name).set(value) for name, value in values.items()]
    condition = DatabaseRecord.status == PROVISIONING
    if event is None and tally is None:
        record.update(actions=actions, condition=condition)
        return
    codes = _transact(
        lambda write: write.update(record, actions=actions, condition=condition),
        [event] if event is not None else [],
        tally,
    )
    if codes is not None:
        raise Unavailable(  # the purge's provisioning timeout took the record meanwhile
            "The database was not ready in time",
            hint="Nothing was handed out; retry in a few seconds.",
        )
    for name, value in values.items():  # a transaction does not return the item: set what it wrote
        setattr(record, name, value)


def _transact(build, puts: list, tally: CreateCount | None) -> list[str | None] | None:
    """One TransactWriteItems: `build`'s own conditional items first, then `puts`, then the count last.

    None when it was written; the cancellation codes when `build`'s condition failed.
    When only the hour's counter item refused (too large, or busy with another
    transaction on DynamoDB) the write goes again without it and the count is
    sent on its own after (`stats.count_create`, best effort): a figure never
    fails a create.
    """
    for with_count in (tally is not None, False):
        try:
            with TransactWrite(connection=DatabaseRecord._get_connection().connection) as write:
                build(write)
                for item in puts:
                    write.save(item)
                if with_count:
                    write.update(tally.item, actions=tally.actions)
        except TransactWriteError as exc:
            codes = _codes(exc)
            if with_count and len(codes) > 1 and codes[-1] is not None and not any(codes[:-1]):
                continue
            if any(codes):
                return codes
            raise
        if tally is not None and not with_count:
            stats.count_create(tally.pooled, tally.ref, tally.now)
        return None
    raise AssertionError("unreachable")


def _codes(exc: TransactWriteError) -> list[str | None]:
    return [reason.code if reason else None for reason in (exc.cancellation_reasons or [])]


def move(ctx: Context, record: DatabaseRecord, host: HostRecord) -> None:
    """Point a PROVISIONING record at another host, with fresh names (the old ones may linger there)."""
    name = tenant_name(ctx.settings.name_prefix)
    record.update(
        actions=[
            DatabaseRecord.host_id.set(host.id),
            DatabaseRecord.role_name.set(name),
            DatabaseRecord.db_name.set(name),
            DatabaseRecord.updated_at.set(clock.now()),
        ],
        condition=DatabaseRecord.status == PROVISIONING,
    )


def mark_copied(record: DatabaseRecord) -> bool:
    """PROVISIONING -> CLAIMED for a copy whose database is whole (it is born owned); False if it moved."""
    now = clock.now()
    return conditional(
        record,
        [
            DatabaseRecord.status.set(CLAIMED),
            DatabaseRecord.claimed_at.set(now),
            DatabaseRecord.updated_at.set(now),
            DatabaseRecord.due_bucket.remove(),
            DatabaseRecord.due_at.remove(),
        ],
        (DatabaseRecord.status == PROVISIONING) & (DatabaseRecord.owner_id == record.owner_id),
    )


# -- claiming and deleting -----------------------------------------------------------


def start_claim(ctx: Context, record: DatabaseRecord, account_id: str) -> bool:
    """UNCLAIMED -> CLAIMING: expiry removed and out of the purge's bucket in one write; False if it moved."""
    now = clock.now()
    return conditional(
        record,
        [
            DatabaseRecord.status.set(CLAIMING),
            DatabaseRecord.owner_id.set(account_id),
            DatabaseRecord.expires_at.remove(),
            DatabaseRecord.due_bucket.set(CLAIMING),
            DatabaseRecord.due_at.set(int(now.timestamp()) + ctx.settings.provisioning_timeout_s),
            DatabaseRecord.updated_at.set(now),
        ],
        # The expiry check is in the condition too: the purge may not have run.
        (DatabaseRecord.status == UNCLAIMED) & (DatabaseRecord.expires_at > now),
    )


def end_claim(record: DatabaseRecord, plan: Plan) -> bool:
    """CLAIMING -> CLAIMED under the claimed plan; False if a concurrent retry finished first."""
    now = clock.now()
    return conditional(
        record,
        [
            DatabaseRecord.status.set(CLAIMED),
            DatabaseRecord.plan.set(plan.name),
            DatabaseRecord.claimed_at.set(now),
            DatabaseRecord.updated_at.set(now),
            DatabaseRecord.due_bucket.remove(),
            DatabaseRecord.due_at.remove(),
        ],
        (DatabaseRecord.status == CLAIMING) & (DatabaseRecord.owner_id == record.owner_id),
    )


def start_delete(ctx: Context, record: DatabaseRecord, account_id: str | None) -> bool:
    """UNCLAIMED (the creator's, `account_id` None) or CLAIMING/CLAIMED (the owner's) -> DELETING.

    A sweep finishes a delete whose drop failed (after the in-flight request
    has had its chance). False if something else moved the record first.
    """
    now = clock.now()
    if account_id is None:
        condition = (DatabaseRecord.status == UNCLAIMED) & (DatabaseRecord.expires_at > now)
    else:
        condition = DatabaseRecord.status.is_in(CLAIMING, CLAIMED) & (DatabaseRecord.owner_id == account_id)
    return conditional(
        record,
        [
            DatabaseRecord.status.set(DELETING),
            DatabaseRecord.updated_at.set(now),
            DatabaseRecord.due_bucket.set(DELETING),
            DatabaseRecord.due_at.set(int(now.timestamp()) + ctx.settings.provisioning_timeout_s),
        ],
        condition,
    )


def new_secret(ctx: Context, record: DatabaseRecord, password: str, verifier: str) -> bool:
    """Seal a rotated password (and its verifier) into a CLAIMED record; False if a DELETE won the race."""
    sealed = ctx.keyring.encrypt(password, context=record.id)
    scram = seal_verifier(ctx, record.id, verifier)
    return conditional(
        record,
        [
            DatabaseRecord.secret_key_id.set(sealed.key_id),
            DatabaseRecord.secret.set(sealed.blob),
            DatabaseRecord.verifier_key_id.set(scram.key_id),
            DatabaseRecord.verifier_secret.set(scram.blob),
            DatabaseRecord.updated_at.set(clock.now()),
        ],
        (DatabaseRecord.status == CLAIMED) & (DatabaseRecord.owner_id == record.owner_id),
    )


# -- the warm pool ------------------------------------------------------------------


def mark_pooled(record: DatabaseRecord, bucket: str) -> None:
    """PROVISIONING -> POOLED: ready, NOLOGIN, waiting in the host's pool bucket."""
    now = clock.now()
    record.update(
        actions=[
            DatabaseRecord.status.set(POOLED),
            DatabaseRecord.due_bucket.set(bucket),
            DatabaseRecord.due_at.set(int(now.timestamp())),
            DatabaseRecord.updated_at.set(now),
        ],
        condition=DatabaseRecord.status == PROVISIONING,
    )


def take_pooled(
    ctx: Context,
    record: DatabaseRecord,
    plan: Plan,
    ref: str | None,
    requester: Requester,
    creator_hash: str | None = None,
    rate: RateCount | None = None,
) -> bool:
    """The one write that makes a pooled database ours: POOLED -> UNCLAIMED; False if another create took it.

    One TransactWriteItems: the take (a conditional put), the audit event,
    and the client IP's rate count (`abuse.Guard.rate_count`, unless already
    counted) with its own condition. All or nothing: a count that finds a
    window full raises the 429 and takes nothing; a record taken by another
    create counts nothing, so the next candidate can be tried.

    It goes straight to UNCLAIMED, before the role gets LOGIN, to keep the
    take at one write: if the process dies before the role is opened, the
    record is an UNCLAIMED database whose role cannot log in (NOLOGIN), whose
    credentials nobody received, and which expires like any other. The
    password sealed in the record is the one the refill gave the role.
    """
    now = clock.now()
    expires = now + timedelta(seconds=plan.lifetime_s)
    # A conditional put of the whole item: as atomic as an update, and
    # the pooled record's other attributes never change while it is POOLED.
    record.status = UNCLAIMED
    record.plan = plan.name
    record.ref = ref
    record.created_ip = requester.ip
    record.user_agent = (requester.user_agent or "")[:256] or None
    record.created_at = record.updated_at = now
    record.expires_at = expires
    record.due_bucket, record.due_at = UNCLAIMED, int(expires.timestamp())
    record.creator_token_hash = creator_hash
    counted = rate is not None and not rate.done
    tally = stats.create_count(True, ref)

    def build(write: TransactWrite) -> None:
        write.save(record, condition=DatabaseRecord.status == POOLED)
        if counted:
            write.update(rate.item, actions=rate.actions, condition=rate.condition)

    for attempt in range(_TAKE_ATTEMPTS):
        event = audit.event(record.id, audit.CREATED, audit.ANONYMOUS, requester.ip, detail=f"ref={ref}")
        # Reasons come back in the request's order: puts (the record, the event), then updates (the rate, the count).
        codes = _transact(build, [event], tally)
        if codes is None:
            if counted:
                rate.done = True
            return True
        if counted and len(codes) > 2 and codes[2] == "ConditionalCheckFailed":
            raise ctx.guard.refused(rate) from None
        if codes[0] == "ConditionalCheckFailed":
            return False  # another create took it first (or it is gone)
        if "TransactionConflict" in codes and attempt + 1 < _TAKE_ATTEMPTS:
            # DynamoDB cancels transactions that touch an item another
            # one is writing (concurrent creates from one IP share the
            # counter): nothing was written, so try again.
            time.sleep(random.uniform(0.002, 0.01) * (attempt + 1))
            continue
        raise Unavailable(
            "The database could not be handed out",
            hint="Nothing was taken or counted; retry in a second.",
            retry_after=1,
        )
    return False


_TAKE_ATTEMPTS = 4


# -- the operator's dashboard (chalicelib.fleet) -----------------------------------------


def extend_expiry(record: DatabaseRecord, expires_at) -> bool:
    """An unclaimed database's new expiry (and the purge's due time with it); False if it moved meanwhile."""
    now = clock.now()
    return conditional(
        record,
        [
            DatabaseRecord.expires_at.set(expires_at),
            DatabaseRecord.due_at.set(int(expires_at.timestamp())),
            DatabaseRecord.updated_at.set(now),
        ],
        (DatabaseRecord.status == UNCLAIMED) & (DatabaseRecord.expires_at > now),
    )
