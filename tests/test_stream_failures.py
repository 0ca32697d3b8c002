"""Issue 16: a stream record the handler cannot process does not block the shard, and its database still goes.

The real `drop_removed` handler (through chalice's test client), the real
purge and reconciliation, embedded Postgres and moto. The poison record is
one whose tombstone DynamoDB refuses (the item would pass 400 KB) while its
host does not answer: nothing is left to retry from but the record itself.
"""

from __future__ import annotations

from tests.streams import TTL_IDENTITY, image, stream_event
from tests.test_expiry import allocated, catalog, create, fresh, reconfigure


def _remove(settings, record, old_image=None) -> dict:
    event = stream_event(settings, "REMOVE", record.id, old=old_image or image(record))
    event["userIdentity"] = TTL_IDENTITY
    return event


def test_a_poison_record_is_reported_alone_and_its_database_is_dropped_by_reconciliation(
    client, instapg_env, host, pg
):
    import time

    from chalicelib.clock import Deadline
    from chalicelib.models import DatabaseRecord, HostRecord

    service = reconfigure(instapg_env, INSTAPG_ORPHAN_GRACE_SECONDS=0, INSTAPG_POOL_SIZE=0)
    batch = create(service, 3)
    records = [fresh(db.record) for db in batch]
    for record in records:
        record.delete()  # what TTL does
    events = [_remove(service.settings, r) for r in records]
    # The middle record is near DynamoDB's 400 KB item limit: its tombstone
    # (a few attributes more) cannot be written.
    poison_image = image(records[1])
    poison_image["user_agent"] = {"S": "x" * (400 * 1024 - 600)}
    events[1] = _remove(service.settings, records[1], poison_image)
    host.update(actions=[HostRecord.port.set(1)])  # and the host does not answer
    service.hosts.all(fresh=True)
    before = allocated()

    response = client.lambda_.invoke("drop_removed", {"Records": events})

    # Only the poison record is reported; the others are done with (tombstones left for the purge).
    poison_seq = events[1]["dynamodb"]["SequenceNumber"]
    assert response.payload == {"batchItemFailures": [{"itemIdentifier": poison_seq}]}
    for i in (0, 2):
        tombstone = fresh(records[i])
        assert (tombstone.status, tombstone.due_bucket) == ("EXPIRED", "EXPIRED")
    assert DatabaseRecord.count(records[1].id) == 0  # nothing in DynamoDB refers to the poison's database
    assert all(catalog(pg, r.db_name) == (True, True) for r in records)

    # Lambda retries it up to MaximumRetryAttempts, then sends it to the SQS
    # queue and moves on; the host comes back and the scheduled job runs.
    host.update(actions=[HostRecord.port.set(pg.port)])
    service.hosts.all(fresh=True)
    for i in (0, 2):
        fresh(records[i]).update(actions=[DatabaseRecord.due_at.set(int(time.time()) - 1)])  # lease over
    from chalicelib import expiry

    summary = expiry.run_scheduled(service, Deadline.after(120))
    assert summary.leftovers_dropped == 2
    assert summary.orphans_dropped == 1  # the poison's database (and its role, same name)
    assert all(catalog(pg, r.db_name) == (False, False) for r in records)
    assert allocated() == before - 3


def test_a_batch_without_failures_reports_none(client, service, pg):
    (db,) = create(service)
    record = fresh(db.record)
    record.delete()
    response = client.lambda_.invoke("drop_removed", {"Records": [_remove(service.settings, record)]})
    assert response.payload == {"batchItemFailures": []}
    assert catalog(pg, record.db_name) == (False, False)
