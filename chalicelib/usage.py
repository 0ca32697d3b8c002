"""Usage over time (issue 18 §4): one row per database per UTC day, about a month of them.

Written by the scheduled job (chalicelib.metering), read by the owner's
details, the claim page's chart and the CLI. Per row:
- `size_bytes`: the day's last measured size;
- `connections_peak`: the highest of the day's samples, one sample per
  scheduled run (every minute) of the database's open backends (direct
  clients plus the pooler's server connections), so a burst between two
  runs is not seen;
- `transfer_in_bytes` / `transfer_out_bytes`: bytes through the pooler that
  day, added in the same transaction as the record's period totals.
Rows carry a TTL KEEP_DAYS + 2 days after their day: the table holds at most
~32 rows per database, and the routes show the last KEEP_DAYS.
"""

from __future__ import annotations

import logging
from datetime import UTC, date, datetime, timedelta
from typing import TYPE_CHECKING, Any

from pynamodb.exceptions import UpdateError

from chalicelib.models import UsageDay

if TYPE_CHECKING:
    from chalicelib.models import DatabaseRecord

log = logging.getLogger(__name__)

KEEP_DAYS = 30
_TTL_DAYS = KEEP_DAYS + 2  # a day stays a little past the window it is shown in


def day_key(now: datetime) -> str:
    return now.astimezone(UTC).strftime("%Y-%m-%d")


def expires(day: str) -> datetime:
    """When DynamoDB's TTL may remove a day's row."""
    start = datetime.combine(date.fromisoformat(day), datetime.min.time(), tzinfo=UTC)
    return start + timedelta(days=_TTL_DAYS)


def transfer_actions(delta_in: int, delta_out: int, day: str) -> list:
    """What a metering write adds to the day's row (inside its transaction)."""
    return [
        UsageDay.transfer_in_bytes.add(delta_in),
        UsageDay.transfer_out_bytes.add(delta_out),
        UsageDay.expires_at.set(expires(day)),
    ]


def sample(records: list[DatabaseRecord], sizes: dict[str, int], connections: dict[str, int], now: datetime) -> int:
    """Write today's size and connection peak for each record whose row changed; returns rows written.

    One batched read of today's rows first, so an idle database costs no
    write: most runs change nothing.
    """
    day = day_key(now)
    wanted = [r for r in records if r.db_name in sizes]
    if not wanted:
        return 0
    rows = {row.database_id: row for row in UsageDay.batch_get([(r.id, day) for r in wanted])}
    written = 0
    for record in wanted:
        size, seen = sizes[record.db_name], connections.get(record.db_name, 0)
        row = rows.get(record.id)
        peak = int(row.connections_peak) if row is not None and row.connections_peak is not None else None
        unchanged = row is not None and row.size_bytes is not None and int(row.size_bytes) == size
        if unchanged and peak is not None and seen <= peak:
            continue
        new_peak = max(seen, peak or 0)
        item = UsageDay(record.id, day)
        try:
            # A concurrent run may have written a higher peak: never lower it.
            item.update(
                actions=[
                    UsageDay.size_bytes.set(size),
                    UsageDay.connections_peak.set(new_peak),
                    UsageDay.expires_at.set(expires(day)),
                ],
                condition=UsageDay.connections_peak.does_not_exist() | (UsageDay.connections_peak <= new_peak),
            )
            written += 1
        except UpdateError as exc:
            if exc.cause_response_code != "ConditionalCheckFailedException":
                raise
    return written


def last_days(database_id: str, now: datetime | None = None, days: int = KEEP_DAYS) -> list[dict[str, Any]]:
    """The last `days` UTC days, oldest first, today included; a day with no row has nulls."""
    now = now or datetime.now(UTC)
    keys = [day_key(now - timedelta(days=n)) for n in range(days - 1, -1, -1)]
    rows = {row.day: row for row in UsageDay.query(database_id, UsageDay.day >= keys[0], consistent_read=True)}
    return [_view(key, rows.get(key)) for key in keys]


def _num(value: Any) -> int | None:
    return int(value) if value is not None else None


def _view(day: str, row: UsageDay | None) -> dict[str, Any]:
    if row is None:
        return {
            "day": day,
            "size_bytes": None,
            "connections_peak": None,
            "transfer_in_bytes": 0,
            "transfer_out_bytes": 0,
        }
    return {
        "day": day,
        "size_bytes": _num(row.size_bytes),
        "connections_peak": _num(row.connections_peak),
        "transfer_in_bytes": _num(row.transfer_in_bytes) or 0,
        "transfer_out_bytes": _num(row.transfer_out_bytes) or 0,
    }
