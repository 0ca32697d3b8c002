"""The warm pool: ready databases per host, so a create is one write and one ALTER ROLE.

A pooled database is a DatabaseRecord with status POOLED, keyed by an id that
has never been shown to anyone, in the `by_due` bucket `POOLED#<host>`. Its
role is NOLOGIN. It counts against the host's `allocated` like any database.

The refill (`add`) gives the role the password it will be handed out with
(sealed in the record, never shown before a take). A create *takes* one
(`take`) with one transaction: the conditional write POOLED -> UNCLAIMED
(`records.take_pooled`, so two creates can never get the same one), the
audit event and the client IP's rate count; the record id becomes the public
id, and `provisioning.open_tenant` then gives the role LOGIN. ("Claim" is something else: an account
making an unclaimed database its own, chalicelib.ownership.)

`refill` tops the pools up (`add`) and empties draining hosts' (`discard`)
within a deadline: the scheduled job, the stream handler right after creates
took from a pool (so a burst finds it full again within seconds, not at the
next scheduled run), and `make dev`. A per-host lease (`hosts.lease_refill`)
keeps two refills from filling the same gap. Status changes are written by
chalicelib.records.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Collection, Iterable
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from chalicelib import expiry, postgres, provisioning, records, tombstones
from chalicelib import hosts as hostlib
from chalicelib.clock import Deadline
from chalicelib.identifiers import tenant_password, uuid7
from chalicelib.models import HOST_ACTIVE, POOLED, DatabaseRecord, HostRecord
from chalicelib.pooled import bucket, pooled
from chalicelib.records import Provisioned, Requester
from chalicelib.settings import TRIAL_PLAN, Plan

if TYPE_CHECKING:
    from chalicelib.abuse import RateCount
    from chalicelib.context import Context

log = logging.getLogger(__name__)

# A refill holds a host's lease for this long and renews it before each
# database it adds or drops, so a holder that died (or lost DynamoDB and could
# not give the lease back) blocks other refills for seconds, not minutes. One
# CREATE DATABASE takes well under it; should one take longer, a second
# refill may add one database too many, which the next refill discards.
LEASE_S = 30


@dataclass
class RefillSummary:
    added: int = 0
    discarded: int = 0
    failed: int = 0
    hosts_full: list[str] = field(default_factory=list)
    hosts_unavailable: list[str] = field(default_factory=list)
    hosts_busy: list[str] = field(default_factory=list)  # another refill held the host's lease
    stopped_early: bool = False
    duration_ms: int = 0


def refill(
    ctx: Context, deadline: Deadline, size: int | None = None, host_ids: Collection[str] | None = None
) -> RefillSummary:
    """Top up every active host's pool (or those in `host_ids`) to `size` (settings.pool_size); empty DRAINING hosts' pools.

    No new database is started after `deadline`. A host that fails is skipped; the others still
    get their pool. A host whose lease another refill holds is skipped too (`hosts_busy`).
    """
    started = time.monotonic()
    size = ctx.settings.pool_size if size is None else size
    summary = RefillSummary()
    for host in ctx.hosts.all(fresh=True):
        if host_ids is not None and host.id not in host_ids:
            continue
        if deadline.passed():
            summary.stopped_early = True
            break
        lease = _Lease(host.id)
        if not lease.take():
            summary.hosts_busy.append(host.id)
            continue
        try:
            _refill_host(ctx, host, size if host.status == HOST_ACTIVE else 0, deadline, summary, lease)
        except postgres.HostUnavailable as exc:
            log.error("pool refill: host %s unavailable: %s", host.id, exc)
            ctx.hosts.mark_down(host.id, ctx.settings.host_retry_s)
            summary.hosts_unavailable.append(host.id)
            summary.failed += 1
        except Exception as exc:  # one host's trouble must not stop the others
            log.error("pool refill: host %s failed: %s", host.id, type(exc).__name__)
            summary.failed += 1
        finally:
            _end_lease(host.id, lease.until)
    summary.duration_ms = int((time.monotonic() - started) * 1000)
    # The local stack refills every few seconds: say something only when something happened.
    level = logging.INFO if summary.added or summary.discarded or summary.failed else logging.DEBUG
    log.log(level, json.dumps({"event": "pool_refill", **asdict(summary)}))
    return summary


class _Lease:
    """One host's refill lease, renewed as the refill goes."""

    def __init__(self, host_id: str) -> None:
        self.host_id = host_id
        self.until = 0.0

    def take(self) -> bool:
        until = time.time() + LEASE_S
        if hostlib.lease_refill(self.host_id, until):
            self.until = until
            return True
        return False

    def renew(self) -> bool:
        """Push the lease LEASE_S ahead; False when it was lost (expired and taken by another refill)."""
        until = time.time() + LEASE_S
        if hostlib.renew_refill(self.host_id, self.until, until):
            self.until = until
            return True
        log.warning("pool refill: lease on host %s lost, stopping", self.host_id)
        return False


def _end_lease(host_id: str, until: float) -> None:
    try:
        hostlib.end_refill(host_id, until)
    except Exception as exc:  # the lease then ends at `until` by itself
        log.warning("pool refill: lease on host %s not given back: %s", host_id, type(exc).__name__)


def hosts_taken_from(events: Iterable[dict[str, Any]]) -> set[str]:
    """Hosts whose pooled records changed in these stream records (a create took one, or a refill dropped one)."""
    hosts: set[str] = set()
    for event in events:
        if event.get("eventName") != "MODIFY":
            continue
        old = (event.get("dynamodb") or {}).get("OldImage") or {}
        if (old.get("status") or {}).get("S") == POOLED and (old.get("host_id") or {}).get("S"):
            hosts.add(old["host_id"]["S"])
    return hosts


def refill_after_takes(ctx: Context, events: Iterable[dict[str, Any]], deadline: Deadline) -> RefillSummary | None:
    """The stream handler's part: top up the pools that these records show creates took from.

    Never raises: the batch's other work is done, and a pool left short is
    topped up by the next take's batch or the scheduled job.
    """
    hosts = hosts_taken_from(events)
    if not hosts:
        return None
    try:
        return refill(ctx, deadline, host_ids=hosts)
    except Exception as exc:
        log.error("pool refill after takes failed: %s", type(exc).__name__)
        return None


def _refill_host(ctx: Context, host, size: int, deadline: Deadline, summary: RefillSummary, lease: _Lease) -> None:
    current = pooled(host.id)
    # Too many (the size went down, or the host is draining): give slots back.
    for record in current[size:]:
        if deadline.passed():
            summary.stopped_early = True
            return
        if not lease.renew():
            return
        if discard(ctx, record, host):
            summary.discarded += 1
    for _ in range(size - len(current)):
        if deadline.passed():
            summary.stopped_early = True
            return
        if not lease.renew():
            return
        try:
            add(ctx, host)
        except hostlib.NoCapacity:
            summary.hosts_full.append(host.id)
            return
        summary.added += 1


# -- taking, adding, discarding ----------------------------------------------------


def take(
    ctx: Context,
    hosts: list[HostRecord],
    plan: Plan,
    ref: str | None,
    requester: Requester,
    creator_hash: str | None,
    rate: RateCount | None = None,
) -> Provisioned | None:
    """Take a pooled database on the active host with the most room that has one; None when none is left.

    `rate` (the client's per-IP count) is written in the take's transaction;
    a full window raises RateLimited before anything is taken.
    """
    for host in hostlib.by_free_capacity(hosts, logical_last=True):  # pooled databases never replicate
        if ctx.hosts.is_down(host.id):
            continue
        record = _take_any(ctx, host, plan, ref, requester, creator_hash, rate)
        if record is None:
            continue
        try:
            provisioning.open_tenant(ctx.target(host), record.role_name, plan)
        except Exception as exc:
            log.error("taking pooled %s on host %s failed: %s", record.id, host.id, records.reason(exc))
            if isinstance(exc, postgres.HostUnavailable):
                ctx.hosts.mark_down(host.id, ctx.settings.host_retry_s)
            # FAILED and due: the purge drops it, and its password with it
            # (a pooled database is never handed out twice).
            tombstones.fail(ctx, record, records.reason(exc), was=records.UNCLAIMED, dropped=False)
            continue
        ctx.guard.note_unclaimed(host.id)
        log.info("created database %s on host %s from the pool for ref %r", record.id, host.id, record.ref)
        return Provisioned(record, plan, host, records.password(ctx, record), created=True)
    return None


def _take_any(
    ctx: Context,
    host: HostRecord,
    plan: Plan,
    ref: str | None,
    requester: Requester,
    creator_hash: str | None,
    rate: RateCount | None,
) -> DatabaseRecord | None:
    queries = 0
    while True:
        candidate = ctx.pool.pop(host.id)
        if candidate is None:
            # Under many concurrent creates every candidate seen may go to
            # others first; read the index a few times before giving up.
            if queries == 3 or not ctx.pool.load(host.id):
                return None
            queries += 1
            continue
        if records.take_pooled(ctx, candidate, plan, ref, requester, creator_hash, rate):
            return candidate


def add(ctx: Context, host: HostRecord) -> DatabaseRecord:
    """One ready database on `host`: PROVISIONING first (as any create), then POOLED.

    Raises hostlib.NoCapacity when the host is full, and the DDL's error
    (after marking the record FAILED) when the host fails.
    """
    hostlib.reserve([host])
    plan = ctx.plan(TRIAL_PLAN)
    # The password the database will be handed out with, made for it alone:
    # the role is NOLOGIN until a take, which only grants LOGIN (the server's
    # ~5 ms check of a new verifier happens here, off the create path). It is
    # sealed like any secret, never logged, never shown before the take; a
    # pooled database that fails or is discarded is dropped with it.
    password = tenant_password()
    verifier = postgres.scram_verifier(password)
    record = records.new(ctx, str(uuid7()), host, plan, password)
    record.save(condition=DatabaseRecord.id.does_not_exist())
    try:
        provisioning.create_tenant(
            ctx.target(host), record.role_name, record.db_name, password, plan, login=False, verifier=verifier
        )
    except Exception as exc:
        log.error("provisioning %s on host %s failed: %s", record.id, host.id, records.reason(exc))
        dropped = False
        try:
            provisioning.drop_tenant(ctx.target(host), record.role_name, record.db_name)
            dropped = True
        except Exception as cleanup:  # the host may be down: the purge retries later
            log.warning("cleanup of %s failed, left for the purge: %s", record.id, type(cleanup).__name__)
        tombstones.fail(ctx, record, records.reason(exc), was=records.PROVISIONING, dropped=dropped)
        if dropped:
            hostlib.release(host.id)
        raise
    records.mark_pooled(record, bucket(host.id))
    return record


def discard(ctx: Context, record: DatabaseRecord, host: HostRecord) -> bool:
    """Drop a pooled database nobody took (its host drains, or the pool shrank); False if it was taken.

    The conditional write POOLED -> FAILED is also the purge's lease
    (see `tombstones.lease`): if the drop fails or this process dies, the record
    is due again when the lease ends and the purge drops it and frees the slot.
    """
    if not tombstones.discard_pooled(ctx, record):
        return False
    try:
        provisioning.drop_tenant(ctx.target(host), record.role_name, record.db_name)
    except provisioning.ClaimedTenant as exc:  # a restored table's POOLED record, a claimed database
        expiry.report_claimed_kept(record, str(exc), "pool")
        tombstones.hold_claimed(ctx, record)
        return False
    tombstones.finish_cleanup(ctx, record)
    return True
