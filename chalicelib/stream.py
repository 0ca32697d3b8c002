"""The databases table's stream: drop what a REMOVE (TTL, or a delete by hand) took away.

DynamoDB deletes expired items up to ~48 h late, and an operator may delete a
record by hand: if the removed record still had a database, a tombstone is
written back (GET says 410, not 404) and the database is dropped, under the
same rules as the purge (chalicelib.expiry): never a database a live record
holds, never one Postgres marks claimed.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from chalicelib import expiry, metrics, postgres, provisioning, records, tombstones
from chalicelib.models import TOMBSTONES, DatabaseRecord

if TYPE_CHECKING:
    from chalicelib.context import Context

log = logging.getLogger(__name__)

_TTL_PRINCIPAL = "dynamodb.amazonaws.com"

@dataclass
class StreamSummary:
    dropped: int = 0
    skipped: int = 0
    ignored: int = 0
    failed: int = 0
    claimed_kept: int = 0  # the record said droppable, Postgres said claimed
    # SequenceNumbers of the records to retry (Lambda's partial batch response).
    retry: list[str] = field(default_factory=list)

    def batch_item_failures(self) -> dict[str, list[dict[str, str]]]:
        """The handler's answer under ReportBatchItemFailures: Lambda retries from the first of these."""
        return {"batchItemFailures": [{"itemIdentifier": seq} for seq in self.retry]}


def handle_stream(ctx: Context, events: Iterable[dict[str, Any]]) -> StreamSummary:
    """Drop the databases of REMOVEd records that still had one (a TTL deletion or any other delete).

    `events` are the raw stream records (`{"eventName", "dynamodb": {"OldImage", ...}, "userIdentity"?}`).
    A drop that fails is left to the purge through a tombstone written back;
    a record for which even that write failed is listed in `retry`, never
    raised: the mapping retries it a bounded number of times, then sends it to
    the failure queue, and reconciliation drops its database as an orphan.
    """
    summary = StreamSummary()
    down: set[str] = set()  # hosts that refused a connection in this batch
    for event in events:
        try:
            outcome = _handle_remove(ctx, event, down)
        except Exception as exc:  # one bad record must not hide the others
            log.error("stream record %s failed: %s", event.get("eventID"), expiry.describe(exc))
            summary.failed += 1
            summary.retry.append(str((event.get("dynamodb") or {}).get("SequenceNumber")))
            continue
        setattr(summary, outcome, getattr(summary, outcome) + 1)
    log.info(json.dumps({"event": "stream", **asdict(summary)}))
    if summary.dropped or summary.failed:
        metrics.emit({"Drops": summary.dropped, "Failures": summary.failed})
    return summary


def _handle_remove(ctx: Context, event: dict[str, Any], down: set[str]) -> str:
    event_id = event.get("eventID")
    if event.get("eventName") != "REMOVE":
        return "ignored"
    image = (event.get("dynamodb") or {}).get("OldImage")
    if not image:
        log.warning("stream record %s: REMOVE without an old image, cannot tell what it held: skipped", event_id)
        return "skipped"
    try:
        old = DatabaseRecord.from_raw_data(image)
    except Exception as exc:
        log.warning("stream record %s: old image unreadable (%s): skipped", event_id, type(exc).__name__)
        return "skipped"
    identity = event.get("userIdentity") or {}
    how = "TTL" if identity.get("principalId") == _TTL_PRINCIPAL else "delete"
    if not expiry.has_live_database(old):
        why = "claimed" if old.status not in TOMBSTONES else "a tombstone whose database is already dropped"
        log.info("REMOVE (%s) of %s skipped: status %s, %s", how, old.id, old.status, why)
        return "skipped"
    # A replayed or odd event must not drop a database its record still holds
    # (CLAIMED, or UNCLAIMED and left to the purge). Only our own tombstone
    # with the drop pending (an earlier delivery of this event) lets it through.
    current = records.find(old.id)
    if current is not None and current.db_name == old.db_name:
        if not (current.status in TOMBSTONES and current.due_bucket is not None):
            log.info("REMOVE (%s) of %s skipped: the record still exists, status %s", how, old.id, current.status)
            return "skipped"

    tombstone = None
    try:
        tombstone = tombstones.write_back_tombstone(ctx, old)
    except Exception as exc:
        log.warning("REMOVE (%s) of %s: tombstone not written back: %s", how, old.id, expiry.describe(exc))
    try:
        if old.host_id in down:
            # One connect timeout per host per batch is enough; the
            # tombstone leaves the rest to the purge.
            raise postgres.HostUnavailable(f"host {old.host_id} unavailable earlier in this batch")
        expiry.drop_database(ctx, old)
    except provisioning.ClaimedTenant as exc:
        expiry.report_claimed_kept(old, str(exc), "stream")
        if tombstone is not None:
            tombstones.hold_claimed(ctx, tombstone)
        return "claimed_kept"
    except Exception as exc:
        if isinstance(exc, postgres.HostUnavailable):
            down.add(old.host_id)
        if tombstone is None:
            raise  # nothing left to retry from: let Lambda retry the batch
        log.warning("REMOVE (%s) of %s: drop failed (%s), left for the purge", how, old.id, expiry.describe(exc))
        expiry.retry_later_quietly(ctx, tombstone)
        return "failed"
    if tombstone is not None:
        tombstones.finish_cleanup(ctx, tombstone)
    log.info("REMOVE (%s) of %s (%s): database dropped", how, old.id, old.status)
    return "dropped"
