"""Claiming a database, and what its creator and its owner may do with it.

A claim: UNCLAIMED -> CLAIMING (expiry removed) -> role limits raised ->
CLAIMED. The owner reads, rotates and deletes; the creator (with the creator
token, never the id alone) may delete an unclaimed database early. Status
changes are conditional writes in chalicelib.records.
"""

from __future__ import annotations

import hmac
import logging
import time
from typing import TYPE_CHECKING

from chalicelib import access, audit, metrics, postgres, provisioning, quotas, records, tombstones
from chalicelib import hosts as hostlib
from chalicelib.clock import Deadline
from chalicelib.errors import Conflict, Forbidden, Gone, NotFound, Unauthenticated, Unavailable
from chalicelib.identifiers import tenant_password, token_hash
from chalicelib.models import (
    CLAIMED,
    CLAIMING,
    DELETED,
    DELETING,
    EXPIRED,
    FAILED,
    PROVISIONING,
    UNCLAIMED,
    DatabaseRecord,
)
from chalicelib.records import Provisioned, Requester
from chalicelib.settings import FREE_PLAN, Plan

if TYPE_CHECKING:
    from chalicelib.context import Context

log = logging.getLogger(__name__)


def _not_yours() -> NotFound:
    return NotFound("Database not found", hint="List your databases with GET /api/v1/databases.")


# -- claiming ------------------------------------------------------------------------


def claim(
    ctx: Context, database_id: str, account_id: str, requester: Requester, creator_token: str | None = None
) -> Provisioned:
    """Make `account_id` the owner. Safe to retry; racing claimers get one winner.

    Order matters. 1. UNCLAIMED -> CLAIMING removes `expires_at` and takes
    the record out of the purge's UNCLAIMED bucket in the same conditional
    write, so neither TTL nor the purge (which writes on status ==
    UNCLAIMED) can act once the claim has started; a claim that loses to
    the purge sees EXPIRED and answers 410. 2. The role gets the claimed
    plan's limits in Postgres (idempotent). 3. CLAIMING -> CLAIMED. A
    failure after 1 leaves CLAIMING, in due bucket "CLAIMING": the same
    account's retry finishes it (`finish_claim`), and a sweep can too.
    Never CLAIMED with unclaimed limits, since 3 happens only after 2.
    """
    record = records.require(database_id)
    if records.claimable(record):
        check_claim_token(ctx, record, creator_token, requester)
        if not records.start_claim(ctx, record, account_id):
            record = records.require(database_id)  # someone else moved it: answer from what it is now
    if record.status == CLAIMING and record.owner_id == account_id:
        claimed = finish_claim(ctx, record, requester)
        metrics.count("Claims")
        return claimed
    if record.status == CLAIMED and record.owner_id == account_id:
        return _owned_view(ctx, record)
    if record.status in (CLAIMING, CLAIMED, DELETING):
        raise Conflict("Database already claimed", hint="Another account owns this database.")
    if record.status == PROVISIONING:
        raise records.still_creating()
    # UNCLAIMED past its expiry, or a tombstone.
    raise records.gone(record)


def check_claim_token(ctx: Context, record: DatabaseRecord, token: str | None, requester: Requester) -> None:
    """A creator token, when given, must be this database's; with INSTAPG_CLAIM_REQUIRES_TOKEN it must be given."""
    if token is None or token == "":
        if ctx.settings.claim_requires_token and record.creator_token_hash is not None:
            raise Forbidden(
                "Creator token required",
                hint="This deployment claims a database only with the creator token its create returned.",
            )
        return
    check_creator(ctx, record, token, requester)


def check_creator(ctx: Context, record: DatabaseRecord, token: str | None, requester: Requester) -> None:
    """Unauthenticated/Forbidden unless `token` is the record's creator token; failures count against the IP."""
    if not token:
        raise Unauthenticated(
            "Missing creator token",
            hint="Send 'Authorization: Bearer <creator_token>', the token the create returned once.",
            challenge='Bearer realm="instapg"',
        )
    ctx.guard.check_auth(requester.ip)
    expected = record.creator_token_hash or ""
    if not expected or not hmac.compare_digest(expected, token_hash(token.strip())):
        ctx.guard.auth_failed(requester.ip)
        raise Forbidden(
            "Creator token does not match",
            hint="Use the creator_token the create of this database returned; the id alone is not enough.",
        )


def finish_claim(ctx: Context, record: DatabaseRecord, requester: Requester | None = None) -> Provisioned:
    """Steps 2 and 3 of a claim whose record is CLAIMING (a retry or a sweep calls this)."""
    plan = ctx.plan(FREE_PLAN)
    host = ctx.hosts.get(record.host_id)
    try:
        provisioning.apply_plan(ctx.target(host), record.role_name, plan, claimed=True)
        if not record.locked_reason:  # a locked one is published by its unlock
            access.publish(ctx, host, record, plan)  # the claimed plan's pool size
    except Exception as exc:  # host down or DDL refused: the record stays CLAIMING for a retry
        log.warning("claim of %s on host %s left CLAIMING: %s", record.id, host.id, type(exc).__name__)
        raise Unavailable(
            "Database host unavailable",
            hint="The claim is recorded and nothing will expire; retry the claim to finish it.",
            retry_after=5,
        ) from None
    if not records.end_claim(record, plan):
        # A concurrent retry of the same claim finished first.
        record = records.require(record.id)
        if record.status != CLAIMED:
            raise Conflict("Claim not finished", hint=f"Retry POST /api/v1/database/{record.id}/claim to finish it.")
        return _owned_view(ctx, record)
    log.info("database %s claimed by account %s", record.id, record.owner_id)
    audit.record_quietly(record.id, audit.CLAIMED, record.owner_id, requester.ip if requester else None)
    _unlock_after_claim(ctx, record, plan)
    return _owned_view(ctx, record)


def _unlock_after_claim(ctx: Context, record: DatabaseRecord, plan: Plan) -> None:
    """A database locked for outgrowing the unclaimed plan may fit the claimed one (issue 5's storage lock).

    Only once CLAIMED: the quota code writes only on live (UNCLAIMED/CLAIMED)
    records. If this fails, the next quota pass lifts the lock instead.
    """
    if not record.locked_reason:
        return
    try:
        quotas.unlock_if_fits(ctx, record, plan)
    except Exception as exc:
        log.warning("claim of %s: storage lock left for the quota pass: %s", record.id, type(exc).__name__)


def _owned_view(ctx: Context, record: DatabaseRecord) -> Provisioned:
    # The owner sees the claim's result; connection strings have their own audited endpoint.
    return Provisioned(record, ctx.plan(record.plan), None, None, created=False)


# -- the creator's early delete, and the refused extend --------------------------------


def delete_unclaimed(ctx: Context, database_id: str, token: str | None, requester: Requester) -> None:
    """The creator drops an unclaimed database early (creator token, never the id alone); DELETED tombstone."""
    record = records.require(database_id)
    if record.status in records.ENDED or records.past_expiry(record):
        raise records.gone(record)
    if record.status == PROVISIONING:
        raise records.still_creating()
    check_creator(ctx, record, token, requester)  # first: without the token nothing more is said (401)
    if record.owner_id is not None:
        raise Conflict(
            "Database is claimed",
            hint=f"Its owner deletes it with DELETE /api/v1/databases/{record.id} and their API key.",
        )
    if record.status == UNCLAIMED and not records.start_delete(ctx, record, None):
        # A claim, the purge or another delete got there first.
        return delete_unclaimed(ctx, database_id, token, requester)
    finish_delete(ctx, record, actor=audit.CREATOR, ip=requester.ip)


def extend(ctx: Context, database_id: str) -> None:
    """Unclaimed databases are not extended: claiming is the way to keep one. Always an error."""
    record = records.require(database_id)
    if record.status in records.ENDED or records.past_expiry(record):
        raise records.gone(record)
    if record.owner_id is not None:
        raise Conflict("Claimed databases do not expire", hint="There is nothing to extend.")
    raise Conflict(
        "Unclaimed databases cannot be extended",
        hint=f"Claim it to keep it: a claimed database never expires. Open /claim/{record.id}, "
        f"or POST /api/v1/database/{record.id}/claim with an API key.",
    )


# -- the owner's endpoints ---------------------------------------------------------------


def owned(ctx: Context, database_id: str, account_id: str, ended_ok: bool = False) -> DatabaseRecord:
    """A database of `account_id`. Someone else's, or none, is NotFound (existence is not revealed).

    `ended_ok`: a deleted one too, while its tombstone lasts (its audit log stays readable).
    """
    record = records.find(database_id)
    if record is None or record.owner_id != account_id:
        raise _not_yours()
    if ended_ok:
        return record
    if record.status in (DELETED, EXPIRED, FAILED):
        raise records.gone(record)
    if record.status == DELETING:
        raise Gone("Database deleted", hint="Its deletion is under way; DELETE it again to finish.")
    if record.status == CLAIMING:
        raise Conflict("Claim not finished", hint=f"Retry POST /api/v1/database/{record.id}/claim to finish it.")
    if record.status == PROVISIONING:  # a copy being made (chalicelib.copies)
        raise records.still_creating()
    return record


def list_owned(account_id: str) -> list[DatabaseRecord]:
    """The account's live databases, oldest first."""
    found = DatabaseRecord.by_owner.query(account_id)
    # The index orders by id, and a client-chosen id (v4) says nothing of age.
    return sorted((r for r in found if r.status in (CLAIMING, CLAIMED)), key=lambda r: r.created_at)


def usage(ctx: Context, record: DatabaseRecord) -> postgres.Usage:
    try:
        return postgres.usage(ctx.target(ctx.hosts.get(record.host_id)), record.role_name, record.db_name)
    except postgres.HostUnavailable:
        raise Unavailable("Database host unavailable", hint="Retry in a few seconds.") from None


def connection(ctx: Context, record: DatabaseRecord, requester: Requester) -> Provisioned:
    """The connection strings of an owned database; audited before they are returned."""
    try:
        audit.record(record.id, audit.CONNECTION_STRING_VIEWED, record.owner_id, requester.ip)
    except Exception as exc:  # no unaudited disclosure
        log.error("audit write for %s failed, connection string withheld: %s", record.id, type(exc).__name__)
        raise Unavailable("Audit log unavailable", hint="Retry in a few seconds.") from None
    plan = ctx.plan(record.plan)
    return Provisioned(record, plan, ctx.hosts.get(record.host_id), records.password(ctx, record), created=False)


def rotate_password(ctx: Context, record: DatabaseRecord, requester: Requester) -> Provisioned:
    """A new password: Postgres first (old sessions end), then the sealed copy.

    If the second write fails, the stored password is stale until the
    owner rotates again; a retry heals it. Two rotations racing can leave
    the same state, healed the same way.
    """
    host = ctx.hosts.get(record.host_id)
    password = tenant_password()
    try:
        verifier = access.rotate(ctx, host, record, ctx.plan(record.plan), password)
    except postgres.HostUnavailable:
        raise Unavailable(
            "Database host unavailable", hint="The password was not changed; retry in a few seconds."
        ) from None
    if not records.new_secret(ctx, record, password, verifier):
        # A DELETE won the race; the new password dies with the database.
        raise Gone("Database deleted", hint="It was deleted while the password was being rotated.")
    audit.record_quietly(record.id, audit.PASSWORD_ROTATED, record.owner_id, requester.ip)
    return Provisioned(record, ctx.plan(record.plan), host, password, created=False)


def delete(ctx: Context, database_id: str, account_id: str, requester: Requester) -> None:
    """Drop an owned database and leave a DELETED tombstone. A retry finishes a half-done delete."""
    record = records.find(database_id)
    if record is None or record.owner_id != account_id:
        raise _not_yours()
    if record.status in (DELETED, EXPIRED, FAILED):
        raise records.gone(record)
    if record.status == PROVISIONING:  # a copy being made: it ends CLAIMED or FAILED, then it can go
        raise records.still_creating()
    if record.status in (CLAIMING, CLAIMED) and not records.start_delete(ctx, record, account_id):
        return delete(ctx, database_id, account_id, requester)  # a racing DELETE moved it
    finish_delete(ctx, record, actor=account_id, ip=requester.ip)


def finish_delete(ctx: Context, record: DatabaseRecord, actor: str, ip: str | None = None) -> None:
    """Drop the tenant of a DELETING record and make it a tombstone (idempotent)."""
    host = ctx.hosts.get(record.host_id)
    try:
        # The owner's own delete: the one drop that may remove a claimed database.
        access.drop(ctx, host, record.role_name, record.db_name, keep_claimed=False)
    except Exception as exc:  # host down or DDL refused: the record stays DELETING for a retry
        log.warning("delete of %s on host %s left DELETING: %s", record.id, host.id, type(exc).__name__)
        raise Unavailable(
            "Database host unavailable", hint="The database is being deleted; retry the DELETE to finish it."
        ) from None
    if not tombstones.mark_deleted(ctx, record):
        return  # a racing DELETE wrote the tombstone (and released the slot)
    hostlib.release(host.id)
    log.info("database %s deleted by %s", record.id, actor)
    audit.record_quietly(record.id, audit.DELETED, actor, ip)


def finish_stalled(ctx: Context, deadline: Deadline, limit: int = 25) -> int:
    """Finish claims and deletes that stopped halfway (host down, Lambda killed).

    For the scheduled job: bounded by `limit` records and by `deadline`
    and resumable since each record is finished
    with the same idempotent steps a retry uses. Returns how many it finished.
    """
    finished = 0
    now = int(time.time())
    for bucket in (CLAIMING, DELETING):
        for record in DatabaseRecord.by_due.query(bucket, DatabaseRecord.due_at <= now, limit=limit):
            if finished >= limit or deadline.passed():
                return finished
            try:
                if record.status == CLAIMING:
                    finish_claim(ctx, record)
                elif record.status == DELETING:
                    finish_delete(ctx, record, actor=audit.SYSTEM)
                finished += 1
            except Unavailable:
                log.warning("stalled %s %s: host still unavailable", record.status, record.id)
    return finished
