"""Making databases go away: the scheduled purge and reconciliation (the stream handler is chalicelib.stream).

Status changes happen in chalicelib.tombstones (conditional writes); this module
decides what is due and orchestrates. Every automatic path here obeys one
rule: a database is dropped only after a conditional write proved its record
is not CLAIMED (or a CLAIMING in flight), or, for orphans, when no record that
could still be live references the name. A CLAIMED database is never dropped.

One scheduled run, bounded by a deadline, in this order:
  1. UNCLAIMED records past expiry (index `by_due`, bucket UNCLAIMED): drop, tombstone EXPIRED.
  2. PROVISIONING records past the provisioning timeout (a crashed create): FAILED, leftovers dropped.
  3. Tombstones whose drop is still pending (buckets FAILED, EXPIRED, DELETED): the drop retried.
     Then claims and deletes that stopped halfway (buckets CLAIMING, DELETING): finished.
  4. Reconciliation per host: prefixed roles/databases no live record references, seen
     for longer than the grace period, dropped, unless Postgres marks them claimed: those
     are reported and kept for a person. The host's slot count is recounted.
Every drop here refuses a role that carries the claimed marker (provisioning.ClaimedTenant),
whatever the record says: a table restored from an older backup cannot make a
claimed database look droppable. A failed drop is retried with a backoff
(chalicelib.reliability.drop_backoff_s).
Work left when the deadline comes stays due; the next run resumes it.
"""

from __future__ import annotations

import functools
import itertools
import json
import logging
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

from chalicelib import access, audit, copies, ownership, postgres, provisioning, reliability, replication, tombstones
from chalicelib import hosts as hostlib
from chalicelib.clock import Deadline
from chalicelib.droppers import Droppers
from chalicelib.models import (
    CLAIMED,
    DELETED,
    EXPIRED,
    FAILED,
    HOST_ACTIVE,
    HOST_DRAINING,
    PROVISIONING,
    TOMBSTONES,
    UNCLAIMED,
    AuditEvent,
    DatabaseRecord,
    HostRecord,
    OrphanSighting,
)

if TYPE_CHECKING:
    from chalicelib.context import Context

log = logging.getLogger(__name__)

PAGE_SIZE = 100
# Buckets of tombstones whose drop is still pending (see tombstones.lease).
LEFTOVER_BUCKETS = (FAILED, EXPIRED, DELETED)


def _now() -> datetime:
    return datetime.now(UTC)


def has_live_database(record: DatabaseRecord) -> bool:
    """Whether the record's database may still exist and may be dropped by an automatic path.

    A whitelist: PROVISIONING, UNCLAIMED, and tombstones whose drop is still
    pending. CLAIMED, a claim in flight, finished tombstones and any status
    this code does not know are left alone.
    """
    if record.status in (PROVISIONING, UNCLAIMED):
        return True
    return record.status in TOMBSTONES and record.due_bucket is not None


def references_name(record: DatabaseRecord) -> bool:
    """Whether reconciliation must treat the record's names as in use.

    Only finished tombstones (their drop is done) release their names; every
    other status, including ones added later, keeps them.
    """
    return not (record.status in TOMBSTONES and record.due_bucket is None)


def report_claimed_kept(record: DatabaseRecord, why: str, path: str) -> None:
    """One structured line a person can act on: an automatic path met a database Postgres marks claimed."""
    log.error(
        json.dumps(
            {
                "event": "claimed_database_kept",
                "path": path,
                "database_id": record.id,
                "status": record.status,
                "host_id": record.host_id,
                "name": record.db_name,
                "why": why,
            }
        )
    )


def drop_database(ctx: Context, record: DatabaseRecord) -> bool:
    """Drop the record's database and role (idempotent); True when something existed."""
    try:
        host = ctx.hosts.get(record.host_id)
    except KeyError:
        raise postgres.HostUnavailable(f"host {record.host_id} is not registered") from None
    dropped = access.drop(ctx, host, record.role_name, record.db_name)
    if record.source_id and record.status == FAILED:
        copies.reopen_source_of(ctx, record)  # a copy that died half-way may have left its source closed
    return dropped


def _purged_event(record: DatabaseRecord) -> AuditEvent:
    return audit.event(record.id, audit.PURGED, audit.SYSTEM, detail="expired unclaimed")


def retry_later_quietly(ctx: Context, record: DatabaseRecord) -> None:
    try:
        tombstones.retry_later(ctx, record)
    except Exception as exc:  # the lease then ends by itself
        log.warning("retry of %s not scheduled: %s", record.id, describe(exc))


# -- the scheduled run -------------------------------------------------------------


@dataclass
class PurgeSummary:
    expired_dropped: int = 0
    stuck_failed: int = 0
    leftovers_dropped: int = 0
    orphans_seen: int = 0
    orphans_dropped: int = 0
    claimed_orphans: int = 0  # unreferenced names Postgres marks claimed: kept, listed by `tools.ops.hostctl orphans`
    claimed_kept: int = 0  # records due for a drop whose database Postgres marks claimed: kept
    claimed_marked: int = 0  # claimed databases from before markers existed, marked now
    records_without_database: int = 0  # live records whose database is not on the host (see docs/expiry.md)
    slots_corrected: int = 0  # hosts whose allocated count was recounted and fixed
    skipped: int = 0  # lost a conditional write: claimed meanwhile, or another run took it
    failed: int = 0
    hosts_unavailable: list[str] = field(default_factory=list)
    hosts_reconciled: int = 0
    pooler_revoked: int = 0  # pooler entries no live record holds, removed
    pooler_published: int = 0  # live, unlocked records the pooler had lost, published again
    stalled_finished: int = 0  # claims and deletes that stopped halfway, finished (issue 4)
    stopped_early: bool = False
    duration_ms: int = 0


# What became of one due record in a purge run.
NOT_STARTED, SKIPPED, DROPPED, KEPT, FAILED_DROP = "not started", "skipped", "dropped", "kept", "failed"


class _Run:
    def __init__(self, ctx: Context, deadline: Deadline, page_size: int) -> None:
        self.ctx = ctx
        self.settings = ctx.settings
        self.deadline = deadline
        self.page_size = page_size
        self.summary = PurgeSummary()
        self.down: set[str] = set()
        self.droppers = Droppers(ctx, ctx.settings.purge_sessions_per_host)
        self._lock = threading.Lock()

    def time_left(self) -> bool:
        if self.deadline.passed():
            self.summary.stopped_early = True
            return False
        return True

    def due(self, bucket: str) -> Iterator[DatabaseRecord]:
        now = int(time.time())
        # Pages are fetched lazily, so a run that stops early reads no more.
        return DatabaseRecord.by_due.query(bucket, DatabaseRecord.due_at <= now, page_size=self.page_size)

    def process(self, bucket: str, take, counter: str) -> None:
        """Take each due record with `take` (a conditional write), drop its database, finish.

        A page of records at a time, its drops in parallel on each host's
        workers. Each record is taken by its own conditional write right
        before its drop, so the lease covers one drop and a run cut short
        leaves the rest untaken. A page whose drops are done is finished
        while the workers drop the next one (the drops wait on the disk, the
        writes on DynamoDB): its final writes and audit events in
        TransactWriteItems batches (`tombstones.finish_batch`), then one slot
        release per host. A crash anywhere leaves every unfinished record due
        (at once, or when its lease ends): the next run drops again
        (idempotent) and finishes.
        """
        records = iter(self.due(bucket))
        # An expiry's `purged` event goes with its final write; a crash before it leaves the record
        # in the EXPIRED bucket, finished (and audited) there by the next run.
        audited = bucket in (UNCLAIMED, EXPIRED)
        done: list[DatabaseRecord] = []  # the previous page's drops, finished while this page drops
        while self.time_left():
            page = list(itertools.islice(records, self.page_size))
            if not page:
                break
            work = [
                (record, self.droppers.submit(record.host_id, functools.partial(self.take_and_drop, record, take)))
                for record in page
                if record.host_id not in self.down
            ]
            self.finish(done, audited)
            done = []
            for record, future in work:
                outcome = future.result()
                if outcome == SKIPPED:
                    self.summary.skipped += 1
                elif outcome == DROPPED:
                    done.append(record)
            setattr(self.summary, counter, getattr(self.summary, counter) + len(done))
        self.finish(done, audited)

    def take_and_drop(self, record: DatabaseRecord, take) -> str:
        """On a host's worker: the conditional take, then the drop."""
        if record.host_id in self.down or not self.time_left():
            return NOT_STARTED  # still due: the next run takes it
        if not take(record):
            return SKIPPED
        outcome = self.drop(record)
        reliability.pause_point("purge_after_drop")  # the fault suite's kill -9 lands here
        return outcome

    def finish(self, dropped: list[DatabaseRecord], audited: bool) -> None:
        """The final writes of dropped records (with their `purged` events), in batches; then one release per host."""
        if not dropped:
            return
        event = _purged_event if audited else None
        size = tombstones.finish_batch_size(audited)
        won: list[DatabaseRecord] = []
        for start in range(0, len(dropped), size):
            batch = dropped[start : start + size]
            try:
                won += tombstones.finish_batch(batch, event)
            except Exception as exc:  # nothing of this batch was written: its records stay due
                log.error("finishing %d dropped records failed: %s", len(batch), describe(exc))
        reliability.pause_point("purge_after_finish")
        for host_id, count in Counter(record.host_id for record in won).items():
            hostlib.release(host_id, count)

    def drop(self, record: DatabaseRecord) -> str:
        try:
            self.droppers.drop(record)
            if record.source_id and record.status == FAILED:
                copies.reopen_source_of(self.ctx, record)  # a copy that died half-way may have left it closed
            return DROPPED
        except provisioning.ClaimedTenant as exc:
            report_claimed_kept(record, str(exc), "purge")
            tombstones.hold_claimed(self.ctx, record)
            with self._lock:
                self.summary.claimed_kept += 1
            return KEPT
        except postgres.HostUnavailable as exc:
            self.host_down(record.host_id, exc)
        except Exception as exc:
            log.error("drop of %s on %s failed: %s", record.id, record.host_id, describe(exc))
        # Due again after a backoff, not when the lease would have ended.
        retry_later_quietly(self.ctx, record)
        with self._lock:
            self.summary.failed += 1
        return FAILED_DROP

    def host_down(self, host_id: str, exc: Exception) -> None:
        with self._lock:
            if host_id in self.down:
                return
            self.down.add(host_id)
            self.summary.hosts_unavailable.append(host_id)
        log.error("host %s unavailable, skipped for this run: %s", host_id, describe(exc))

    # -- reconciliation --

    def reconcile(self, host: HostRecord) -> None:
        prefix = self.settings.name_prefix + "_"
        try:
            # The slot count before anything else: the recount's write is
            # conditional on it, so a create or drop meanwhile cancels it.
            allocated = int(HostRecord.get(host.id, consistent_read=True).allocated or 0)
            target = self.ctx.target(host)
            # The catalog first, the records second: a create writes its record
            # before its DDL, so every name listed here already has its record.
            found = postgres.inventory(target, prefix)
        except Exception as exc:
            self.host_down(host.id, exc)
            self.summary.failed += 1
            return
        names = found.names
        # The pooler's entries before the records too: an entry with no record holding it is a leftover.
        entries = self.pooler_entries(host)
        holders: dict[str, str] = {}
        referenced: set[str] = set()
        slot_holders = set(found.databases)
        unmarked_claimed: list[str] = []
        missing: list[DatabaseRecord] = []
        for item in DatabaseRecord.by_host.query(host.id, page_size=max(self.page_size, 100)):
            if not self.time_left():
                return  # an incomplete picture: drop nothing on this host this run
            holders[item.db_name] = item.status
            if references_name(item):
                # A replicating tenant's companion role belongs to it; one whose tenant has no record is an orphan.
                referenced.update((item.db_name, item.role_name, item.role_name + replication.COMPANION_SUFFIX))
                slot_holders.add(item.db_name)  # a record holds its slot until its drop is finished
            if item.status == CLAIMED and item.role_name not in found.claimed and item.role_name in names:
                unmarked_claimed.append(item.role_name)
            if item.status in (CLAIMED, UNCLAIMED) and item.db_name not in names:
                missing.append(item)
        self.recount(host, allocated, len(slot_holders))
        self.sync_pooler(host, entries, holders)
        self.report_missing(host, target, prefix, missing)
        if unmarked_claimed:
            # Claimed before the marker existed: mark them now, so Postgres alone can tell.
            try:
                provisioning.mark_claimed(target, unmarked_claimed)
                self.summary.claimed_marked += len(unmarked_claimed)
            except Exception as exc:
                log.error("marking claimed roles on host %s failed: %s", host.id, describe(exc))
        claimed_orphans = (names - referenced) & found.claimed
        for name in sorted(claimed_orphans):
            # Claimed, and no record knows it: the table lost it (a mistaken
            # delete, a restore). Never dropped automatically; a person decides.
            self.summary.claimed_orphans += 1
            log.error(json.dumps({"event": "claimed_orphan", "host_id": host.id, "name": name}))
        # A claimed tenant's companion is kept with it, whatever the records say.
        claimed = found.claimed | {name + replication.COMPANION_SUFFIX for name in found.claimed}
        candidates = names - referenced - claimed

        now = _now()
        sightings = {s.name: s for s in OrphanSighting.query(host.id)}
        for name, sighting in sightings.items():
            if name not in candidates:  # gone, or referenced after all
                sighting.delete()
        grace = timedelta(seconds=self.settings.orphan_grace_s)
        for name in sorted(candidates):
            if not self.time_left():
                return
            sighting = sightings.get(name)
            if sighting is None:
                sighting = OrphanSighting(
                    host_id=host.id, name=name, first_seen=now, expires_at=now + 4 * grace + timedelta(days=1)
                )
                sighting.save()
                self.summary.orphans_seen += 1
                log.info("orphan %s on host %s first seen", name, host.id)
            if now - sighting.first_seen < grace:
                continue
            try:
                existed = access.drop(self.ctx, host, name, name)  # refuses a claimed role, whatever happened since
                if existed and not replication.is_companion(name):
                    # Every tenant instapg makes holds a slot from `hosts.reserve`
                    # until its record's drop gives it back; an orphan's record
                    # was lost before that, so its slot comes back here.
                    hostlib.release(host.id)
            except Exception as exc:
                log.error("orphan %s on host %s not dropped: %s", name, host.id, describe(exc))
                self.summary.failed += 1
                continue
            sighting.delete()
            self.summary.orphans_dropped += 1
            log.info("orphan %s on host %s dropped", name, host.id)
        self.summary.hosts_reconciled += 1

    def pooler_entries(self, host: HostRecord) -> set[str] | None:
        try:
            bouncer = self.ctx.pooler(host)
            return bouncer.published() if bouncer is not None else None
        except Exception as exc:
            log.error("pooler of host %s: entries not read: %s", host.id, describe(exc))
            return None

    def sync_pooler(self, host: HostRecord, entries: set[str] | None, holders: dict[str, str]) -> None:
        """Entries a crash or an unanswered revoke left behind go; live records missing one get it back."""
        if entries is None:
            return
        try:
            revoked, published = access.sync(self.ctx, host, entries, holders)
        except Exception as exc:
            log.error("pooler of host %s: not reconciled: %s", host.id, describe(exc))
            self.summary.failed += 1
            return
        self.summary.pooler_revoked += revoked
        self.summary.pooler_published += published

    def report_missing(self, host: HostRecord, target: postgres.Target, prefix: str, missing: list) -> None:
        """Live records whose database is not on the host: reported, never acted on (docs/expiry.md)."""
        if not missing:
            return
        try:
            # A create that finished after the catalog was read is no case: read it again.
            now_there = postgres.inventory(target, prefix).databases
        except Exception as exc:
            log.error("host %s: recheck of missing databases failed: %s", host.id, describe(exc))
            return
        for item in missing:
            if item.db_name in now_there:
                continue
            self.summary.records_without_database += 1
            log.error(
                json.dumps(
                    {
                        "event": "record_without_database",
                        "database_id": item.id,
                        "host_id": host.id,
                        "status": item.status,
                        "name": item.db_name,
                    }
                )
            )

    def recount(self, host: HostRecord, seen: int, holders: int) -> None:
        """Heal the host's slot count: one per database that exists or record that still holds one.

        A process killed between reserving a slot and saving its record
        leaves the count one too high; nothing else would ever give it back.
        The write is conditional on the count read before the catalog, so a
        create or drop that moved it meanwhile wins, and the next run recounts.
        """
        if holders == seen:
            return
        won = hostlib.set_allocated(host.id, holders, expected=seen)
        if won:
            self.summary.slots_corrected += 1
        log.warning(
            json.dumps({"event": "slot_recount", "host_id": host.id, "was": seen, "counted": holders, "corrected": won})
        )


def run_scheduled(ctx: Context, deadline: Deadline, page_size: int = PAGE_SIZE) -> PurgeSummary:
    """One purge run that takes no new work after `deadline`; logs one JSON summary line.

    The local stack calls this on a timer (`chalice local` runs no schedules).
    """
    started = time.monotonic()
    run = _Run(ctx, deadline, page_size)
    error = None
    try:
        # A warm Lambda keeps its host cache; a run works from the registry as it is now.
        hosts = ctx.hosts.all(fresh=True)
        run.process(UNCLAIMED, functools.partial(tombstones.expire, ctx), "expired_dropped")
        if run.time_left():
            run.process(PROVISIONING, functools.partial(tombstones.fail_stuck, ctx), "stuck_failed")
        for bucket in LEFTOVER_BUCKETS:
            if run.time_left():
                run.process(bucket, functools.partial(tombstones.lease, ctx), "leftovers_dropped")
        if run.time_left():
            run.summary.stalled_finished = ownership.finish_stalled(ctx, run.deadline, limit=page_size)
        if run.time_left():
            for host in hosts:
                if host.status not in (HOST_ACTIVE, HOST_DRAINING) or host.id in run.down:
                    continue
                if not run.time_left():
                    break
                run.reconcile(host)
    except Exception as exc:  # DynamoDB unavailable, say: still one summary line, then fail the run
        error = describe(exc)
        raise
    finally:
        run.droppers.close()
        run.summary.duration_ms = int((time.monotonic() - started) * 1000)
        line = {"event": "purge", **asdict(run.summary)}
        if error:
            line["error"] = error
        (log.error if error else log.info)(json.dumps(line))
    return run.summary


def describe(exc: BaseException) -> str:
    """Type, SQLSTATE and first line: enough to act on, nothing secret (no DSNs or passwords here)."""
    sqlstate = getattr(exc, "sqlstate", None)
    first = (str(exc).strip().splitlines() or [""])[0][:200]
    return f"{type(exc).__name__}{f' [{sqlstate}]' if sqlstate else ''}: {first}"
