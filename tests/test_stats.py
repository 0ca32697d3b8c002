"""The dashboard's create counter (chalicelib.stats) rides in the create's own transaction.

A pooled create is counted in its take's TransactWriteItems, an on-demand one
in its last status write: counted exactly once when the create happens, and
not at all when the transaction is cancelled (a full rate window, a pooled
record another create took, a record the purge took meanwhile).
"""

from __future__ import annotations

import time

import pytest

from tests.conftest import post_json


def _counted() -> tuple[int, int, int, dict[str, int]]:
    """(total, pooled, on demand, refs) over the last 24 hours: a test may straddle an hour."""
    from chalicelib import stats

    total = pooled = on_demand = 0
    refs: dict[str, int] = {}
    for row in stats.creates():
        total, pooled, on_demand = total + row["total"], pooled + row["pooled"], on_demand + row["on_demand"]
        for ref, n in row["refs"].items():
            refs[ref] = refs.get(ref, 0) + n
    return total, pooled, on_demand, refs


def _settings(env, **values) -> None:
    from chalicelib import context

    for name, value in values.items():
        env.setenv(name, str(value))
    context.reset()


def test_pooled_and_on_demand_creates_are_counted_once(client, service):
    from chalicelib import pool
    from chalicelib.clock import Deadline

    pool.refill(service, Deadline.after(60), size=1)
    assert post_json(client, "/api/v1/database", {"ref": "from-pool"}).status_code == 201
    assert _counted() == (1, 1, 0, {"from-pool": 1})
    assert post_json(client, "/api/v1/database", {"ref": "on-demand"}).status_code == 201
    assert _counted() == (2, 1, 1, {"from-pool": 1, "on-demand": 1})


def test_cancelled_takes_count_nothing(client, instapg_env):
    from chalicelib import context, pool, records
    from chalicelib.clock import Deadline
    from chalicelib.records import Requester
    from chalicelib.settings import TRIAL_PLAN
    from tests.test_abuse import _away_from_a_minute_edge

    _settings(instapg_env, INSTAPG_CREATES_PER_MINUTE=1)
    service = context.get()
    pool.refill(service, Deadline.after(60), size=3)
    _away_from_a_minute_edge()
    assert post_json(client, "/api/v1/database", {"ref": "r"}).status_code == 201
    assert post_json(client, "/api/v1/database", {"ref": "r"}).status_code == 429  # the window's condition failed
    assert _counted() == (1, 1, 0, {"r": 1})
    assert len(pool.pooled("local-1")) == 2  # the refused create took nothing
    # A take that loses its record to another create (the record's condition fails) counts nothing.
    first, stale = pool.pooled("local-1")[0], pool.pooled("local-1")[0]
    plan = service.plan(TRIAL_PLAN)
    assert records.take_pooled(service, first, plan, "won", Requester())
    assert not records.take_pooled(service, stale, plan, "lost", Requester())
    assert _counted() == (2, 2, 0, {"r": 1, "won": 1})


def test_on_demand_record_taken_meanwhile_counts_nothing(service, host):
    from chalicelib import audit, records, stats
    from chalicelib.errors import Unavailable
    from chalicelib.models import AuditEvent, DatabaseRecord
    from chalicelib.records import Requester
    from chalicelib.settings import TRIAL_PLAN

    plan = service.plan(TRIAL_PLAN)
    record = records.new(service, "0190c0de-0000-7000-8000-00000000abcd", host, plan, "pw", "late", Requester())
    record.save(condition=DatabaseRecord.id.does_not_exist())
    record.update(actions=[DatabaseRecord.status.set("FAILED")])  # the purge's provisioning timeout
    event = audit.event(record.id, audit.CREATED, audit.ANONYMOUS, detail="ref=late")
    with pytest.raises(Unavailable):
        records.mark_unclaimed(record, plan, event, stats.create_count(False, "late"))
    assert _counted() == (0, 0, 0, {})
    assert list(AuditEvent.query(record.id)) == []
    assert DatabaseRecord.get(record.id).status == "FAILED"


def test_an_hour_item_at_its_size_limit_never_fails_a_create(client, service):
    """DynamoDB cancels a transaction whose update would pass 400 KB: the take goes
    through without the count, which then lands under (other)."""
    from pynamodb.attributes import NumberAttribute, UnicodeAttribute
    from pynamodb.expressions.operand import Path, Value

    from chalicelib import pool, stats
    from chalicelib.clock import Deadline
    from chalicelib.models import RateCounter

    pool.refill(service, Deadline.after(60), size=1)
    if time.time() % 3600 > 3590:  # the take must count in the hour filled here
        time.sleep(3601 - time.time() % 3600)
    hour = int(time.time() // 3600 * 3600)
    # Every attribute a pooled count adds is there already, and 70 bytes are left under the
    # limit (moto's: 405,000 bytes, between DynamoDB's documented 400 KB and its measured
    # 409 KB): counting one more (other) fits, a new 128-character ref does not. On every
    # shard of the hour: the create picks one at random.
    for shard in range(stats.SHARDS):
        key = f"stats#{hour}#{shard}"
        numbers = {"count": 1, "pl": 1, "expires_at": int(time.time()) + 86400, "r:(other)": 1}
        used = len("key") + len(key) + sum(len(name) + len(str(n)) for name, n in numbers.items()) + len("pad")
        RateCounter(key=key).update(
            actions=[Path([name]).set(Value(n, attribute=NumberAttribute())) for name, n in numbers.items()]
            + [Path(["pad"]).set(Value("x" * (405_000 - 70 - used), attribute=UnicodeAttribute()))]
        )
    assert post_json(client, "/api/v1/database", {"ref": "r" * 128}).status_code == 201
    shards = stats.SHARDS
    assert _counted() == (shards + 1, shards + 1, 0, {"(other)": shards + 1})


def test_an_hour_sums_its_shards_and_its_item_from_before_the_shards(aws):
    from pynamodb.attributes import NumberAttribute
    from pynamodb.expressions.operand import Path, Value

    from chalicelib import stats
    from chalicelib.models import RateCounter

    now = time.time()
    hour = int(now // 3600 * 3600)
    # What the release before the shards wrote: one item per hour.
    old = {"count": 2, "od": 2, "r:old": 2}
    RateCounter(key=f"stats#{hour}").update(
        actions=[Path([name]).add(Value(n, attribute=NumberAttribute())) for name, n in old.items()]
    )
    for _ in range(3 * stats.SHARDS):  # most shards get at least one
        stats.count_create(True, "new", now)
    assert _counted() == (2 + 3 * stats.SHARDS, 3 * stats.SHARDS, 2, {"old": 2, "new": 3 * stats.SHARDS})
    # A ref pynamodb would read as a list index is counted as (other).
    stats.count_create(False, "app[0]", now)
    assert _counted()[3] == {"old": 2, "new": 3 * stats.SHARDS, "(other)": 1}
