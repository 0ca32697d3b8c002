"""Creating a database: from the warm pool when it has one, else on demand; idempotent when asked.

    POST /api/v1/database            server-chosen id: pool first, then on demand
    POST /api/v1/database/{id}       client-chosen id: repeat calls return the first one
    Idempotency-Key                  same key from the same IP: the first database

A host that fails is skipped and the create goes to the next one: the caller
gets Unavailable only when no host with room answers.
"""

from __future__ import annotations

import dataclasses
import logging
from datetime import timedelta
from typing import TYPE_CHECKING

from pynamodb.exceptions import PutError

from chalicelib import (
    access,
    audit,
    clock,
    metrics,
    pool,
    postgres,
    provisioning,
    records,
    reliability,
    stats,
    tombstones,
)
from chalicelib import hosts as hostlib
from chalicelib.errors import Conflict, Refused, Unavailable
from chalicelib.identifiers import creator_token, tenant_password, token_hash, uuid7
from chalicelib.models import FAILED, PROVISIONING, DatabaseRecord, HostRecord
from chalicelib.pooler import PoolerError
from chalicelib.records import Provisioned, Requester
from chalicelib.schemas import CreateDatabase
from chalicelib.settings import TRIAL_PLAN, Plan

if TYPE_CHECKING:
    from chalicelib.context import Context

log = logging.getLogger(__name__)


def create(ctx: Context, request: CreateDatabase, requester: Requester, database_id: str | None = None) -> Provisioned:
    """Provision a database; with a client-chosen id, repeat calls return the first one."""
    if database_id is None and requester.idempotency_key:
        return _create_idempotent(ctx, request, requester)
    if database_id is not None:
        found = records.find(database_id)
        if found is not None:
            return records.existing(ctx, found)
    every_host = ctx.hosts.all()
    hosts = _region_hosts(ctx, every_host, request)
    if request.enable_logical_replication and not hostlib.offers_logical_replication(hosts):
        raise Refused(
            "Logical replication is not available on this deployment",
            hint="Create the database without enable_logical_replication, or ask the operator for a host that offers it.",
        )
    # Abuse limits (chalicelib.abuse): a request that gets this far counts,
    # in the pooled take's transaction or, for any other create, on its own.
    rate = ctx.guard.rate_count(requester.ip)
    hosts = ctx.guard.open_hosts(hosts)
    plan = ctx.plan(TRIAL_PLAN)
    token = creator_token()  # handed out once; the record keeps its hash
    if database_id is None and not request.enable_logical_replication:
        taken = pool.take(ctx, hosts, plan, request.ref, requester, token_hash(token), rate)
        if taken is not None:
            metrics.emit({"Creates": 1, "PoolTakes": 1})  # counted for the dashboard in the take's transaction
            return dataclasses.replace(taken, creator_token=token)
    if rate is not None:
        ctx.guard.count(rate)  # nothing when the take's transaction counted it already
    password = tenant_password()
    verifier = postgres.scram_verifier(password)  # once, for every host this create may try
    try:
        result = _create_on_demand(
            ctx, hosts, database_id, plan, request, requester, password, verifier, token_hash(token)
        )
    except hostlib.NoCapacity:
        raise _no_room(ctx, request) from None
    if result.created:
        note_created(ctx, result.record, requester)
        metrics.emit({"Creates": 1, "OnDemandCreates": 1})
        return dataclasses.replace(result, creator_token=token)
    return result


def _region_hosts(ctx: Context, hosts: list[HostRecord], request: CreateDatabase) -> list[HostRecord]:
    """The hosts of the region the create asked for (or the default region); 422 for a region with no host."""
    region = request.region or ctx.settings.default_region
    if request.region is not None and region not in hostlib.regions(hosts, ctx.settings):
        raise Refused(
            f"Unknown region '{region}'",
            hint="Ask for one of the available regions, or leave 'region' out for the default "
            f"({ctx.settings.default_region}).",
            regions=hostlib.regions_with_room(hosts, ctx.settings),
        )
    return hostlib.in_region(hosts, region, ctx.settings)


def _no_room(ctx: Context, request: CreateDatabase) -> Exception:
    """No host of the region had a slot: 422 when the client chose the region, else 503 (as before regions)."""
    ctx.hosts.invalidate()
    region = request.region or ctx.settings.default_region
    elsewhere = [r for r in hostlib.regions_with_room(ctx.hosts.all(), ctx.settings) if r != region]
    if request.region is not None:
        return Refused(
            f"No capacity in region '{region}'",
            hint="Every host of that region is full; ask for one of the available regions, or retry later.",
            regions=elsewhere,
        )
    return Unavailable(
        "No capacity",
        hint="Every database host is full; try again in a few minutes.",
        retry_after=60,
        regions=elsewhere,
    )


def note_created(ctx: Context, record: DatabaseRecord, requester: Requester) -> None:
    """What follows an on-demand create: this process's unclaimed count (the audit event and the
    dashboard's count went in the record's last write, `records.mark_unclaimed`)."""
    ctx.guard.note_unclaimed(record.host_id)


def _create_on_demand(
    ctx: Context,
    hosts: list[HostRecord],
    database_id: str | None,
    plan: Plan,
    request: CreateDatabase,
    requester: Requester,
    password: str,
    verifier: str,
    creator_hash: str | None = None,
) -> Provisioned:
    tried: set[str] = set()
    record: DatabaseRecord | None = None
    while True:
        # Hosts that failed lately come last, not never: a slow connect
        # under load marks a host down, and a create must not get a 503
        # while some host could still answer it.
        down = {h.id for h in hosts if ctx.hosts.is_down(h.id)}
        try:
            try:
                host = hostlib.reserve(
                    hosts, logical_replication=request.enable_logical_replication, exclude=tried | down
                )
            except hostlib.NoCapacity:
                if not down - tried:
                    raise
                host = hostlib.reserve(hosts, logical_replication=request.enable_logical_replication, exclude=tried)
        except hostlib.NoCapacity:
            ctx.hosts.invalidate()
            if record is None:
                raise  # create() says which regions have room
            # Every host failed; each attempt already cleaned up after itself.
            tombstones.fail(ctx, record, "no host answered", was=PROVISIONING, dropped=True)
            raise Unavailable(
                "Database host unavailable",
                hint="Nothing was created; retry in a few seconds.",
                retry_after=5,
            ) from None
        tried.add(host.id)
        reliability.pause_point("after_reserve")  # the fault suite's kill -9 lands here
        if record is None:
            record = records.new(
                ctx,
                database_id or str(uuid7()),
                host,
                plan,
                password,
                request.ref,
                requester,
                request.enable_logical_replication,
                creator_hash,
                verifier,
            )
            try:
                record.save(condition=DatabaseRecord.id.does_not_exist())
            except PutError as exc:
                hostlib.release(host.id)
                if database_id is not None and records.is_conditional_failure(exc):
                    # Lost a race with the same client-chosen id: answer with the winner.
                    return records.existing(ctx, records.find(database_id))
                raise
        else:
            records.move(ctx, record, host)
        try:
            provisioning.create_tenant(
                ctx.target(host),
                record.role_name,
                record.db_name,
                password,
                plan,
                verifier=verifier,
                logical_replication=request.enable_logical_replication,
            )
            # Before the record says UNCLAIMED: the pooled string works once it is handed out.
            access.publish(ctx, host, record, plan, verifier)
            break
        except Exception as exc:
            _attempt_failed(ctx, record, host, exc)
    # The audit event and the dashboard's count go in the same transaction as the status.
    event = audit.event(record.id, audit.CREATED, audit.ANONYMOUS, requester.ip, detail=f"ref={record.ref}")
    records.mark_unclaimed(record, plan, event, stats.create_count(False, record.ref))
    log.info("created database %s on host %s for ref %r", record.id, host.id, record.ref)
    return Provisioned(record, plan, host, password, created=True)


def _attempt_failed(ctx: Context, record: DatabaseRecord, host: HostRecord, cause: Exception) -> None:
    """One host failed a create: clean up there (or leave a trace for the purge) and free the slot."""
    log.error("provisioning %s on host %s failed: %s", record.id, host.id, records.reason(cause))
    if isinstance(cause, postgres.HostUnavailable):
        # The connection never opened, so nothing was created there.
        ctx.hosts.mark_down(host.id, ctx.settings.host_retry_s)
        hostlib.release(host.id)
        return
    if isinstance(cause, PoolerError):
        # Its pooled string would not work: the next creates try other hosts first.
        ctx.hosts.mark_down(host.id, ctx.settings.host_retry_s)
    try:
        access.drop(ctx, host, record.role_name, record.db_name)
    except Exception as exc:  # the host may be down now: the purge drops it later
        log.warning("cleanup of %s failed, left for the purge: %s", record.id, type(exc).__name__)
        tombstones.leftovers(ctx, record, host, cause)
        return
    hostlib.release(host.id)


def _create_idempotent(ctx: Context, request: CreateDatabase, requester: Requester) -> Provisioned:
    """Same Idempotency-Key from the same IP: the first database, not a second one."""
    guard = ctx.guard
    key = requester.idempotency_key
    body_hash = request.fingerprint()
    database_id, fresh, first_seen, same = guard.reserve_key(requester.ip, key, body_hash)
    if not fresh:
        record = records.find(database_id)
        if record is not None and record.status != FAILED:
            if not same:  # the key made a database for another request
                raise guard.key_reused(key)
            return records.existing(ctx, record)
        stale = clock.now() - first_seen > timedelta(seconds=ctx.settings.provisioning_timeout_s)
        if record is None and not stale:
            if not same:
                raise guard.key_reused(key)
            raise Conflict(
                "A request with this Idempotency-Key is still being processed",
                hint="Retry in a second.",
                retry_after=1,
            )
        # Its first create failed or died before writing a record: start over.
        guard.forget_key(requester.ip, key, database_id)
        database_id, _, _, _ = guard.reserve_key(requester.ip, key, body_hash)
    try:
        return create(ctx, request, requester, database_id=database_id)
    except Exception:
        record = records.find(database_id)
        if record is None or record.status == FAILED:
            guard.forget_key(requester.ip, key, database_id)
        raise
