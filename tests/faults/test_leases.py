"""Issue 12.3: leases that do not outlive their holder.

A failed drop (Postgres stopped) is retried after seconds, backing off to a
cap of minutes, and goes once the server is back; a refill lease is given
back when its holder fails and ends by itself within seconds when the
holder is gone.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta

import psycopg


def _create(service):
    from chalicelib import creation
    from chalicelib.records import Requester
    from chalicelib.schemas import CreateDatabase

    return creation.create(service, CreateDatabase(ref="leases"), Requester())


def _expire(record) -> None:
    from chalicelib.models import DatabaseRecord

    past = datetime.now(UTC) - timedelta(minutes=1)
    record.update(actions=[DatabaseRecord.expires_at.set(past), DatabaseRecord.due_at.set(int(past.timestamp()))])


def _fresh(record):
    from chalicelib.models import DatabaseRecord

    return DatabaseRecord.get(record.id, consistent_read=True)


def _exists(stoppable_pg, name: str) -> bool:
    with psycopg.connect(stoppable_pg.superuser_dsn) as conn:
        return conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone() is not None


def test_backoff_starts_in_seconds_and_is_capped_at_minutes():
    from chalicelib.reliability import DROP_BACKOFF_CAP_S, drop_backoff_s

    delays = [drop_backoff_s(n) for n in range(8)]
    assert delays[:3] == [5, 10, 20]
    assert max(delays) == DROP_BACKOFF_CAP_S <= 180 and delays == sorted(delays)


def test_a_drop_that_failed_while_postgres_was_stopped_goes_soon_after_it_returns(service, flaky_host, stoppable_pg):
    from chalicelib import expiry
    from chalicelib.clock import Deadline

    db = _create(service)
    _expire(db.record)
    stoppable_pg.stop()

    down = expiry.run_scheduled(service, Deadline.after(30))
    assert down.failed == 1 and down.hosts_unavailable == ["flaky-1"]
    record = _fresh(db.record)
    assert record.status == "EXPIRED" and record.drop_attempts == 1
    assert 0 < record.due_at - time.time() <= 5  # the first retry in seconds, not after a 15 min lease

    stoppable_pg.start()
    back = time.monotonic()
    while _fresh(db.record).due_bucket is not None:  # what the scheduled job does, run by hand
        assert time.monotonic() - back < 180, "leftovers must be gone within 3 minutes"
        expiry.run_scheduled(service, Deadline.after(30))
        time.sleep(0.5)
    recovered = time.monotonic() - back
    print(f"figure: leftover dropped {recovered:.1f} s after Postgres returned (first backoff 5 s)")
    assert not _exists(stoppable_pg, db.record.db_name)


def test_a_refill_that_fails_gives_its_lease_back(service, flaky_host, stoppable_pg):
    from chalicelib import pool
    from chalicelib.clock import Deadline
    from chalicelib.models import HostRecord

    stoppable_pg.stop()
    summary = pool.refill(service, Deadline.after(20), size=2)
    assert summary.failed == 1
    assert HostRecord.get("flaky-1", consistent_read=True).refill_until is None  # released at once


def test_a_refill_lease_whose_holder_is_gone_ends_within_seconds(service, flaky_host, monkeypatch):
    from chalicelib import pool
    from chalicelib.clock import Deadline
    from chalicelib.models import HostRecord

    monkeypatch.setattr(pool, "LEASE_S", 2)  # 30 s in production; short here so the test waits 2 s, not 30
    assert pool._Lease("flaky-1").take()  # its holder dies without giving it back
    held_until = HostRecord.get("flaky-1", consistent_read=True).refill_until
    assert held_until - time.time() <= pool.LEASE_S
    assert pool.refill(service, Deadline.after(20), size=1).hosts_busy == ["flaky-1"]
    time.sleep(max(0.0, held_until - time.time()) + 0.2)
    after = pool.refill(service, Deadline.after(20), size=1)
    assert after.hosts_busy == [] and after.added == 1


def test_a_stream_drop_that_failed_is_retried_in_seconds_not_after_a_lease(service, flaky_host, stoppable_pg):
    from chalicelib import expiry, stream
    from chalicelib.clock import Deadline
    from tests.streams import TTL_IDENTITY, image, stream_event

    db = _create(service)
    _expire(db.record)
    record = _fresh(db.record)
    old = image(record)
    record.delete()  # TTL removed the expired item
    event = stream_event(service.settings, "REMOVE", record.id, old=old)
    event["userIdentity"] = TTL_IDENTITY
    stoppable_pg.stop()

    assert stream.handle_stream(service, [event]).failed == 1
    tombstone = _fresh(db.record)
    assert tombstone.status == "EXPIRED" and tombstone.drop_attempts == 1
    assert 0 < tombstone.due_at - time.time() <= 5

    stoppable_pg.start()
    back = time.monotonic()
    while _fresh(db.record).due_bucket is not None:
        assert time.monotonic() - back < 180
        expiry.run_scheduled(service, Deadline.after(30))
        time.sleep(0.5)
    assert not _exists(stoppable_pg, db.record.db_name)
