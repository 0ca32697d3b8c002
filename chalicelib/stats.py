"""The dashboard's figures, read without scanning the databases table.

- Creates per hour (on demand vs from the pool) and top referrers: counted by
  the create path itself, one atomic `ADD` per create on one of the hour's
  SHARDS items in the counters table (`stats#<hour epoch>#<shard>`: `count`,
  `od`, `pl`, and `r:<ref>` per referrer), which expire by TTL after 8 days.
  A summary reads the last 24 hours' items (and each hour's unsharded
  `stats#<hour epoch>`, written before the shards were) with three
  BatchGetItems: the cost of a page view does not grow with the fleet. The count goes in the create's own transaction (the
  pooled take's, or the on-demand create's last status write), so a create
  is counted once and a cancelled one not at all; should the hour's item
  refuse (at 400 KB, or busy on DynamoDB), the create goes through without it
  and the count follows on its own, best effort: a figure never fails a create.
- Databases by status and pool level per host: counted from the sparse
  `by_due` index (PROVISIONING, UNCLAIMED, CLAIMING, DELETING, `POOLED#<host>`),
  projected to `host_id`: one read per live record, bounded by the unclaimed
  cap (chalicelib.abuse) and the pool size, and cut at READ_BUDGET items (the
  summary then says `partial`).
- Claimed databases (no index holds them all): per host, `allocated` (the
  databases placed there and not dropped, kept by conditional writes) minus
  the live ones counted above, so no other step has to keep a counter right.
- Host fill: `allocated / capacity` from the hosts table (a handful of items).
"""

from __future__ import annotations

import logging
import random
import time
from collections import Counter
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from pynamodb.attributes import NumberAttribute
from pynamodb.expressions.operand import Path, Value
from pynamodb.expressions.update import Action

from chalicelib.models import CLAIMED, CLAIMING, DELETING, PROVISIONING, UNCLAIMED, DatabaseRecord, RateCounter
from chalicelib.pooled import bucket as pool_bucket

if TYPE_CHECKING:
    from chalicelib.context import Context

log = logging.getLogger(__name__)

HOURS = 24
TOP_REFS = 10
KEEP_S = 8 * 86400
READ_BUDGET = 20_000  # index items one summary may read
SHARDS = 8  # items per hour a create's count may go to
_REF = "r:"
LIVE_BUCKETS = (PROVISIONING, UNCLAIMED, CLAIMING, DELETING)


def _hour(now: float) -> int:
    return int(now // 3600 * 3600)


def _one() -> Value:
    return Value(1, attribute=NumberAttribute())


@dataclass
class CreateCount:
    """One create's count on its hour's item, not sent yet: the create's own transaction carries it
    (`records.take_pooled`, `records.mark_unclaimed`), so a create is counted exactly when it happens."""

    item: RateCounter
    actions: list[Action]
    pooled: bool
    ref: str | None
    now: float


def _ref_attribute(ref: str | None) -> str:
    """The attribute a ref is counted under: pynamodb reads brackets in a path as list
    indexes, so a ref with one is counted as (other)."""
    name = _REF + (ref or "")
    return _REF + "(other)" if "[" in name or "]" in name else name


def create_count(pooled: bool, ref: str | None, now: float | None = None) -> CreateCount:
    """The UpdateItem that counts one create in its hour (`ADD`s only: it has no condition to fail)."""
    now = time.time() if now is None else now
    hour = _hour(now)
    actions = [
        RateCounter.count.add(1),
        Path(["pl" if pooled else "od"]).add(_one()),
        RateCounter.expires_at.set(datetime.fromtimestamp(hour + KEEP_S, UTC)),
        Path([_ref_attribute(ref)]).add(_one()),
    ]
    # A shard at random: on DynamoDB, transactions that write the same item at once cancel each
    # other (TransactionConflict), and every create of the hour would otherwise write this one.
    shard = random.randrange(SHARDS)
    return CreateCount(RateCounter(key=f"stats#{hour}#{shard}"), actions, pooled, ref, now)


def count_create(pooled: bool, ref: str | None, now: float | None = None) -> None:
    """Count one create in its hour on its own (never raises: a figure must not fail a create).

    For a create whose transaction could not carry the count (`CreateCount`).
    """
    tally = create_count(pooled, ref, now)
    for name in dict.fromkeys((_ref_attribute(ref), _REF + "(other)")):
        try:
            tally.item.update(actions=[*tally.actions[:-1], Path([name]).add(_one())])
            return
        except Exception as exc:  # noqa: BLE001 - an item at 400 KB: count the ref as (other), once
            log.warning(
                "create not counted under %s: %s",
                "its ref" if name != _REF + "(other)" else "(other)",
                type(exc).__name__,
            )


def creates(now: float | None = None) -> list[dict[str, Any]]:
    """The last HOURS hours, oldest first: {"hour", "on_demand", "pooled", "refs": {ref: n}}."""
    end = _hour(time.time() if now is None else now)
    hours = [end - 3600 * i for i in range(HOURS - 1, -1, -1)]
    # Each hour's shards, and its one unsharded item (written before the shards were).
    names = {h: [f"stats#{h}", *(f"stats#{h}#{k}" for k in range(SHARDS))] for h in hours}
    found = _items([key for keys in names.values() for key in keys])
    rows = []
    for hour in hours:
        raw: Counter[str] = Counter()
        for key in names[hour]:
            raw.update(found.get(key, {}))
        rows.append(
            {
                "hour": datetime.fromtimestamp(hour, UTC),
                "on_demand": raw.get("od", 0),
                "pooled": raw.get("pl", 0),
                "total": raw.get("count", 0),
                "refs": {k[len(_REF) :]: v for k, v in raw.items() if k.startswith(_REF)},
            }
        )
    return rows


def _items(keys: list[str]) -> dict[str, dict[str, int]]:
    """{key: {attribute: number}} of the counter items that exist, with their undeclared
    attributes (the model drops those, so this reads below it): one BatchGetItem per 100 keys."""
    connection = RateCounter._get_connection()
    found: dict[str, dict[str, int]] = {}
    items: list[dict[str, Any]] = []
    for start in range(0, len(keys), 100):  # BatchGetItem's limit
        batch = keys[start : start + 100]
        response = connection.batch_get_item([{"key": {"S": k}} for k in batch])
        got = list(response.get("Responses", {}).get(RateCounter.Meta.table_name, []))
        if response.get("UnprocessedKeys"):  # throttled: the rest one by one
            done = {item["key"]["S"] for item in got}
            got += [i["Item"] for k in batch if k not in done and (i := connection.get_item(k)).get("Item")]
        items += got
    for item in items:
        found[item["key"]["S"]] = {name: int(value["N"]) for name, value in item.items() if "N" in value}
    return found


def _count_buckets(ctx: Context, host_ids: list[str]) -> tuple[dict[str, Counter[str]], bool]:
    """{status: Counter(host id)} from the by_due index; False when READ_BUDGET cut it short."""
    counts: dict[str, Counter[str]] = {}
    left = READ_BUDGET
    buckets = [(status, status) for status in LIVE_BUCKETS] + [("POOLED", pool_bucket(h)) for h in host_ids]
    for status, name in buckets:
        counter = counts.setdefault(status, Counter())
        for record in DatabaseRecord.by_due.query(name, attributes_to_get=["host_id"], limit=left):
            counter[record.host_id] += 1
            left -= 1
            if left <= 0:
                return counts, False
    return counts, True


def summary(ctx: Context, now: float | None = None) -> dict[str, Any]:
    """Everything the dashboard's charts show, and the JSON route returns."""
    hosts = ctx.hosts.all(fresh=True)
    counts, complete = _count_buckets(ctx, [h.id for h in hosts])
    by_status: Counter[str] = Counter({status: sum(c.values()) for status, c in counts.items()})
    host_rows = []
    for host in hosts:
        allocated = int(host.allocated or 0)
        live = sum(c[host.id] for c in counts.values())
        claimed = max(0, allocated - live)
        by_status[CLAIMED] += claimed
        host_rows.append(
            {
                "id": host.id,
                "status": host.status,
                "capacity": int(host.capacity),
                "allocated": allocated,
                "fill_percent": round(100 * allocated / int(host.capacity), 1) if host.capacity else None,
                "pool_ready": counts.get("POOLED", Counter())[host.id],
                "pool_target": ctx.settings.pool_size,
                "unclaimed": counts[UNCLAIMED][host.id],
                "claimed": claimed,
            }
        )
    hourly = creates(now)
    refs: Counter[str] = Counter()
    for row in hourly:
        refs.update(row["refs"])
    return {
        "by_status": {status: by_status[status] for status in (*LIVE_BUCKETS, "POOLED", CLAIMED)},
        "creates_per_hour": [{k: v for k, v in row.items() if k != "refs"} for row in hourly],
        "top_referrers": [{"ref": ref, "creates": n} for ref, n in refs.most_common(TOP_REFS)],
        "hosts": host_rows,
        "complete": complete,
    }
