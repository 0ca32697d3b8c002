"""Copies of a database (a "branch" in Neon's words): schema and data as of now, on the same host.

    POST /api/v1/databases/{id}/copies   the owner copies a CLAIMED database
    POST /api/v1/databases/{copy}/reset  the copy becomes a fresh copy of its source again
    DELETE /api/v1/databases/{copy}      as any owned database (chalicelib.ownership)

A copy is a database of its own: its own role, password and database name,
a CLAIMED record owned by the same account with `source_id` naming the
source, under the source's plan, and it counts against the account's
`INSTAPG_DATABASES_PER_ACCOUNT`. The record is written (PROVISIONING) before
any DDL, so a copy whose process dies half-way is found by the purge like any
crashed create: FAILED, its leftovers dropped, the source opened again. The
copy method and the source's downtime are in docs/copies.md.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, NoReturn

from chalicelib import access, audit, metrics, ownership, postgres, provisioning, records, reliability, tombstones
from chalicelib import hosts as hostlib
from chalicelib.errors import Conflict, Forbidden, Unavailable
from chalicelib.identifiers import tenant_name, tenant_password, uuid7
from chalicelib.models import CLAIMED, CLAIMING, PROVISIONING, UNCLAIMED, DatabaseRecord, HostRecord
from chalicelib.records import Provisioned, Requester

if TYPE_CHECKING:
    from chalicelib.context import Context

log = logging.getLogger(__name__)

# What counts against an account's database limit: live and in-the-making.
_COUNTED = (PROVISIONING, CLAIMING, CLAIMED)


def owned_count(account_id: str) -> int:
    """Databases the account owns or is having made (copies under way count, so two at once cannot both pass)."""
    return sum(1 for r in DatabaseRecord.by_owner.query(account_id) if r.status in _COUNTED)


def _source(ctx: Context, database_id: str, account_id: str) -> DatabaseRecord:
    found = records.find(database_id)
    if found is not None and found.status == UNCLAIMED and found.owner_id is None:
        raise Conflict(
            "Unclaimed databases cannot be copied",
            hint=f"Claim it first (POST /api/v1/database/{database_id}/claim), then copy it.",
        )
    return ownership.owned(ctx, database_id, account_id)  # 404 someone else's, 410 gone, 409 mid-claim


def create(ctx: Context, database_id: str, account_id: str, requester: Requester) -> Provisioned:
    """A new CLAIMED database holding the source's schema and data as of now; its password only in this answer."""
    source = _source(ctx, database_id, account_id)
    limit = ctx.settings.databases_per_account
    if owned_count(account_id) >= limit:
        raise Forbidden(
            "Database limit reached",
            hint=f"An account may own {limit} databases, copies included; delete one to make a copy.",
            limit=limit,
        )
    host = ctx.hosts.get(source.host_id)
    try:
        hostlib.reserve([host])  # a copy lives on its source's host (CREATE DATABASE ... TEMPLATE)
    except hostlib.NoCapacity:
        raise Unavailable(
            "No capacity", hint="The host of this database is full or draining; try again later.", retry_after=60
        ) from None
    plan = ctx.plan(source.plan)
    password = tenant_password()
    verifier = postgres.scram_verifier(password)
    copy = records.new(
        ctx,
        str(uuid7()),
        host,
        plan,
        password,
        ref=source.ref,
        requester=requester,
        owner_id=account_id,
        source_id=source.id,
        verifier=verifier,
    )
    try:
        copy.save(condition=DatabaseRecord.id.does_not_exist())
    except Exception:
        hostlib.release(host.id)
        raise
    try:
        # Copying takes seconds per 100 MB, longer than other requests may: its own deadline.
        with reliability.request_deadline(ctx.settings.copy_deadline_s):
            provisioning.copy_tenant(
                ctx.target(host),
                source.role_name,
                source.db_name,
                copy.role_name,
                copy.db_name,
                verifier,
                plan,
                ctx.settings.copy_strategy,
            )
    except Exception as exc:
        _failed(ctx, copy, host, exc)
    if not records.mark_copied(copy):  # the purge failed it meanwhile (a copy slower than the timeout)
        raise Unavailable("Copy not finished", hint="Nothing was kept; try again.")
    try:
        # The claimed marker after the record says CLAIMED: should this fail,
        # reconciliation writes it; written before, a crash here would leave
        # a marked role whose PROVISIONING record the purge may not drop.
        provisioning.mark_claimed(ctx.target(host), [copy.role_name])
    except Exception as exc:
        log.warning("claimed marker of copy %s not written (reconciliation will): %s", copy.id, type(exc).__name__)
    try:
        access.publish(ctx, host, copy, plan, verifier)
    except Exception as exc:  # the copy is whole and claimed: reconciliation publishes what the pooler lacks
        log.warning("copy %s not published on the pooler yet (reconciliation will): %s", copy.id, type(exc).__name__)
    log.info("database %s copied to %s on host %s", source.id, copy.id, host.id)
    audit.record_quietly(source.id, audit.COPIED, account_id, requester.ip, detail=f"copy={copy.id}")
    audit.record_quietly(copy.id, audit.CREATED, account_id, requester.ip, detail=f"copy of {source.id}")
    metrics.count("Copies")
    return Provisioned(copy, plan, host, password, created=True)


def _failed(ctx: Context, copy: DatabaseRecord, host: HostRecord, cause: Exception) -> NoReturn:
    """The copy's DDL failed: drop what it made (or leave it due for the purge), free the slot, say why."""
    log.error("copy %s on host %s failed: %s", copy.id, host.id, records.reason(cause))
    dropped = False
    try:
        access.drop(ctx, host, copy.role_name, copy.db_name)
        dropped = True
    except Exception as exc:  # the host may be down now: the purge drops it later
        log.warning("cleanup of copy %s failed, left for the purge: %s", copy.id, type(exc).__name__)
    tombstones.fail(ctx, copy, records.reason(cause), was=PROVISIONING, dropped=dropped)
    if dropped:
        hostlib.release(host.id)
    if _too_slow(cause):
        raise Unavailable(
            "Copy took too long",
            hint=f"It did not finish within {ctx.settings.copy_deadline_s} s (a large database, or a busy host); "
            "nothing was kept. Retry later, or copy it with pg_dump | pg_restore.",
            retry_after=60,
        ) from None
    if _busy(cause):
        raise Conflict(
            "Database is busy",
            hint="A prepared transaction, a session that would not end, or another change to it (a claim, a quota "
            "lock, a copy) holds it; COMMIT PREPARED or ROLLBACK PREPARED, or wait a moment, then copy again.",
        ) from None
    raise Unavailable("Database host unavailable", hint="Nothing was copied; retry in a few seconds.") from None


def _too_slow(cause: Exception) -> bool:
    import psycopg

    return isinstance(cause, psycopg.errors.QueryCanceled)


def _busy(cause: Exception) -> bool:
    """The source is held: a prepared transaction, or the service's own lock on its role past the lock timeout."""
    import psycopg

    return isinstance(cause, (provisioning.SourceBusy, psycopg.errors.LockNotAvailable))


def reset(ctx: Context, database_id: str, account_id: str, requester: Requester) -> DatabaseRecord:
    """Make the copy a fresh copy of its source again; its role, password and id stay (idempotent)."""
    copy = ownership.owned(ctx, database_id, account_id)
    if copy.source_id is None:
        raise Conflict(
            "Not a copy",
            hint="Only a copy can be reset to its source; make one with POST /api/v1/databases/{id}/copies.",
        )
    source = records.find(copy.source_id)
    if source is None or source.status != CLAIMED or source.owner_id != account_id or source.host_id != copy.host_id:
        raise Conflict("Source database is gone", hint="Its source was deleted; the copy stays as it is.")
    host = ctx.hosts.get(copy.host_id)
    try:
        with reliability.request_deadline(ctx.settings.copy_deadline_s):
            provisioning.reset_copy(
                ctx.target(host),
                source.role_name,
                source.db_name,
                copy.role_name,
                copy.db_name,
                tenant_name(ctx.settings.name_prefix),  # the fresh copy's name until it replaces the old one
                ctx.settings.copy_strategy,
                login=not copy.locked_reason,  # a quota lock stays until the scheduled job lifts it
            )
    except Exception as exc:
        if not _busy(exc):
            log.warning("reset of copy %s on host %s stopped: %s", copy.id, host.id, records.reason(exc))
            error = "Copy took too long" if _too_slow(exc) else "Database host unavailable"
            raise Unavailable(
                error, hint="Retry the reset; until one finishes the copy may have no database."
            ) from None
        raise Conflict(
            "Database is busy",
            hint="A prepared transaction, a session that would not end, or another change holds the source; "
            "the copy is unchanged. End it or wait a moment, then reset again.",
        ) from None
    audit.record_quietly(copy.id, audit.RESET, account_id, requester.ip, detail=f"from {source.id}")
    log.info("copy %s reset from %s", copy.id, source.id)
    return copy


def reopen_source_of(ctx: Context, record: DatabaseRecord) -> None:
    """A failed copy's purge: let connections into its source again (its process may have died mid-copy)."""
    source = records.find(record.source_id) if record.source_id else None
    if source is None or source.host_id != record.host_id:
        return
    provisioning.reopen_source(ctx.target(ctx.hosts.get(source.host_id)), source.db_name)
