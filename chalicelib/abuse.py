"""Abuse limits: per-IP create rates and failed authentications, a per-host cap, idempotency keys.

- Rates: fixed windows (a minute, a UTC day) per client IP, both counted by
  one conditional DynamoDB `ADD` on the IP's item for the day (it adds only
  while both windows are under their limits), which expires by TTL after it.
  A pooled create sends that write in the same transaction as its take.
  Over the limit: 429 with `Retry-After` and the time to retry in the body.
- Cap: live unclaimed databases per host (`INSTAPG_MAX_UNCLAIMED_PER_HOST`).
  A host's `allocated` bounds them, so a host below the cap by it needs no
  read; one at or past it has its records counted from the `by_host` index
  (up to the cap), so no other lifecycle step (claim, expiry, delete) has to
  keep a counter right. It is a soft cap: creates racing at the edge may
  overshoot it by their number. The hard cap stays the host's
  `capacity`, taken with a conditional write in `hosts.reserve`.
- Failed authentications (an API key or a creator token that does not
  match): at most `INSTAPG_AUTH_FAILURES_PER_HOUR` per client IP per clock
  hour, counted with one `ADD` per failure; then 429 (see `check_auth`).
- Idempotency: the same `Idempotency-Key` from the same IP within the TTL
  maps to one database id (conditional put); the response is rebuilt from the
  database record, so no password is stored here. The key is bound to a hash
  of the request it came with: the same key with another request is a 422
  (a client bug: a retry would otherwise silently get a database it did not ask for).
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from collections import Counter
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from pynamodb.attributes import NumberAttribute
from pynamodb.exceptions import DeleteError, PutError, UpdateError
from pynamodb.expressions.condition import Condition
from pynamodb.expressions.operand import Path, Value
from pynamodb.expressions.update import Action

from chalicelib.clock import iso
from chalicelib.errors import Invalid, RateLimited, Refused
from chalicelib.identifiers import uuid7
from chalicelib.models import PROVISIONING, UNCLAIMED, DatabaseRecord, HostRecord, IdempotencyRecord, RateCounter
from chalicelib.settings import Settings

log = logging.getLogger(__name__)

MAX_KEY_LENGTH = 255
# A counter item outlives its window a little, so a late request in the window still finds it.
_COUNTER_GRACE_S = 60


def parse_idempotency_key(raw: str | None) -> str | None:
    """The header's value, or None when absent; 400 when it is not a short printable token."""
    if raw is None or raw == "":
        return None
    if len(raw) > MAX_KEY_LENGTH or not raw.isascii() or not raw.isprintable():
        raise Invalid(
            f"Header 'Idempotency-Key' must be 1 to {MAX_KEY_LENGTH} printable ASCII characters",
            hint="Send a random token, e.g. a UUID, and the same one when you retry.",
        )
    return raw


@dataclass
class RateCount:
    """One create's per-IP count: a conditional UpdateItem on the IP's item for the day (`Guard.rate_count`)."""

    item: RateCounter
    actions: list[Action]
    condition: Condition
    ip: str
    now: float
    day: int
    minute: int
    done: bool = False  # counted: a later `Guard.count` of it does nothing


class Guard:
    # A host near the cap has its unclaimed databases counted from the index,
    # one read per record of the host; a create reuses a count this young.
    # The cap is soft (it may be passed by the creates of one such window);
    # the hard limit is the host's `capacity`, kept by a conditional write.
    COUNT_MAX_AGE_S = 10.0

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._counts: Counter[str] | None = None
        self._counted_hosts: set[str] = set()
        self._counted_at = 0.0
        self._auth_blocked: dict[str, float] = {}  # ip -> epoch second its block ends

    # -- rates -----------------------------------------------------------------

    def rate_count(self, ip: str | None, now: float | None = None) -> RateCount | None:
        """The counter write one create from `ip` makes, not sent yet; None without an IP.

        No IP means no HTTP client: API Gateway (and the local server) always
        set `sourceIp`, so only in-process callers (tools, tests) come without
        one. They are not rate limited; the per-host cap still applies.

        The write adds 1 to the minute and the day only while both are under
        their limits (a conditional UpdateItem), so N concurrent creates from
        one IP at limit L get exactly L successes whatever their order. A
        pooled create sends it in the take's transaction (`records.take_pooled`),
        any other create on its own (`count`).
        """
        if not ip:
            return None
        now = time.time() if now is None else now
        day = int(now // 86400 * 86400)
        minute = int(now - day) // 60
        # One UpdateItem counts the day and the minute (a create is one write,
        # not one per window). The previous minute's attribute goes in the
        # same write, so a client that creates every minute keeps a small
        # item; the minutes of a sporadic client stay until the item expires.
        this_minute = Path(f"m{minute}")
        actions = [
            RateCounter.count.add(1),
            this_minute.add(Value(1, attribute=NumberAttribute())),
            RateCounter.expires_at.set(datetime.fromtimestamp(day + 86400 + _COUNTER_GRACE_S, UTC)),
        ]
        if minute:
            actions.append(Path(f"m{minute - 1}").remove())
        limit = Value(self.settings.creates_per_minute, attribute=NumberAttribute())
        condition = (this_minute.does_not_exist() | (this_minute < limit)) & (
            RateCounter.count.does_not_exist() | (RateCounter.count < self.settings.creates_per_day)
        )
        return RateCount(RateCounter(key=f"{day}#{ip}"), actions, condition, ip, now, day, minute)

    def check_rate(self, ip: str | None, now: float | None = None) -> None:
        """Count one create for `ip`; raise 429 when a window's limit is reached."""
        rate = self.rate_count(ip, now)
        if rate is not None:
            self.count(rate)

    def count(self, rate: RateCount) -> None:
        """Send `rate` on its own (unless a transaction counted it already); 429 when a window is full."""
        if rate.done:
            return
        try:
            rate.item.update(actions=rate.actions, condition=rate.condition)
        except UpdateError as exc:
            if exc.cause_response_code != "ConditionalCheckFailedException":
                raise
            raise self.refused(rate) from None
        rate.done = True

    def refused(self, rate: RateCount) -> RateLimited:
        """The 429 for a create whose count found a window full.

        The refused request counts too (one unconditional write, on this path
        only), as every create request that got this far always has: a client
        that keeps hammering a full minute uses up its day.
        """
        counted = rate.item.update(actions=rate.actions)["Attributes"]
        windows = (
            (
                "minute",
                int(counted[f"m{rate.minute}"]["N"]),
                self.settings.creates_per_minute,
                rate.day + (rate.minute + 1) * 60,
            ),
            ("day", int(counted["count"]["N"]), self.settings.creates_per_day, rate.day + 86400),
        )
        # Normally one window is over; should both be (or, after a race with
        # the minute's end, neither), the later retry time is the honest one.
        over = [w for w in windows if w[1] > w[2]] or [windows[0]]
        name, _, limit, retry_at = max(over, key=lambda w: w[3])
        retry_after = max(1, math.ceil(retry_at - rate.now))
        log.info("rate limit: %s over %d creates per %s", rate.ip, limit, name)
        return RateLimited(
            f"Too many databases created from your address: at most {limit} per {name}",
            hint=f"Retry after {retry_after} seconds, or reuse a database you created.",
            retry_after=retry_after,
            retry_after_s=retry_after,
            retry_at=iso(datetime.fromtimestamp(retry_at, UTC)),
        )

    # -- failed authentications -----------------------------------------------------
    #
    # A failure costs one UpdateItem (ADD) on the IP's counter for the clock
    # hour; nothing is read on success. Once an IP has used up its failures,
    # this process refuses it before looking any key up (no DynamoDB read, no
    # Postgres work) until the hour ends; another process refuses it at its
    # first failure there, whose count is already over.

    def check_auth(self, ip: str | None, now: float | None = None) -> None:
        """429 when `ip` used up its failed authentications this hour (in this process's knowledge)."""
        if not ip:
            return
        now = time.time() if now is None else now
        until = self._auth_blocked.get(ip)
        if until is not None:
            if until > now:
                raise self._auth_limited(until, now)
            del self._auth_blocked[ip]

    def auth_failed(self, ip: str | None, now: float | None = None) -> None:
        """Count one failed authentication of `ip`; 429 once it is over the hour's limit."""
        if not ip:
            return  # in-process callers (tools, tests) are not limited
        now = time.time() if now is None else now
        hour = int(now // 3600 * 3600)
        counted = RateCounter(key=f"auth#{hour}#{ip}").update(
            actions=[
                RateCounter.count.add(1),
                RateCounter.expires_at.set(datetime.fromtimestamp(hour + 3600 + _COUNTER_GRACE_S, UTC)),
            ]
        )["Attributes"]
        count, limit = int(counted["count"]["N"]), self.settings.auth_failures_per_hour
        if count >= limit:
            if len(self._auth_blocked) > 10_000:  # bounded: a flood of addresses must not grow it forever
                self._auth_blocked.clear()
            self._auth_blocked[ip] = hour + 3600
            log.info("auth limit: %s at %d failed authentications this hour", ip, count)
        if count > limit:
            raise self._auth_limited(hour + 3600, now)

    @staticmethod
    def _auth_limited(until: float, now: float) -> RateLimited:
        retry_after = max(1, math.ceil(until - now))
        return RateLimited(
            "Too many failed authentications from your address",
            hint=f"Retry after {retry_after} seconds with a valid key.",
            retry_after=retry_after,
            retry_after_s=retry_after,
            retry_at=iso(datetime.fromtimestamp(until, UTC)),
        )

    # -- per-host cap ------------------------------------------------------------

    def unclaimed_counts(self, host_ids: list[str] | None = None) -> Counter[str]:
        """Live unclaimed (and being created) databases per host id: of `host_ids`, each counted up to the cap.

        Without `host_ids`, every host's full count from the `by_due` index
        (an operator's view; it reads every live unclaimed record).
        """
        counts: Counter[str] = Counter()
        if host_ids is None:
            for bucket in (UNCLAIMED, PROVISIONING):
                for record in DatabaseRecord.by_due.query(bucket, attributes_to_get=["host_id"]):
                    counts[record.host_id] += 1
            return counts
        cap = self.settings.max_unclaimed_per_host
        for host_id in host_ids:
            # The host's own records (`by_host`), stopping at the cap: the read is bounded by the
            # host's capacity and the cap, not by the fleet's unclaimed databases.
            live = DatabaseRecord.by_host.query(
                host_id, filter_condition=DatabaseRecord.status.is_in(UNCLAIMED, PROVISIONING)
            )
            for _ in live:
                counts[host_id] += 1
                if counts[host_id] >= cap:
                    break
        return counts

    def open_hosts(self, hosts: list[HostRecord]) -> list[HostRecord]:
        """The hosts still under the unclaimed cap.

        A host's `allocated` (every database placed there and not dropped:
        claimed and pooled ones too) bounds its unclaimed ones, so a host with
        fewer allocated than the cap is under it with no read at all: the
        usual case, and a cold process's first create. Only hosts at or past
        the cap by that bound are counted (`unclaimed_counts`), by a count at
        most COUNT_MAX_AGE_S old. `allocated` is as fresh as the host list
        (hosts.HostCache) and this process's own placements (hosts.reserve).
        """
        cap = self.settings.max_unclaimed_per_host
        near = {h.id for h in hosts if int(h.allocated or 0) >= cap}
        if not near:
            return list(hosts)
        stale = time.monotonic() - self._counted_at > self.COUNT_MAX_AGE_S
        if self._counts is None or stale or not near <= self._counted_hosts:
            self._counts = self.unclaimed_counts(sorted(near))
            self._counted_hosts = near
            self._counted_at = time.monotonic()
        counts = self._counts
        return [h for h in hosts if h.id not in near or counts[h.id] < cap]

    def note_unclaimed(self, host_id: str) -> None:
        """This process just made one: keep its own count exact between reads."""
        if self._counts is not None:
            self._counts[host_id] += 1

    # -- idempotency -------------------------------------------------------------

    @staticmethod
    def _key_hash(ip: str | None, key: str) -> str:
        return hashlib.sha256(f"{ip or 'unknown'}\n{key}".encode()).hexdigest()

    def reserve_key(self, ip: str | None, key: str, body_hash: str) -> tuple[str, bool, datetime, bool]:
        """The database id for (ip, key): (id, True, now, True) when new, else (first id, False, first time, same).

        `same` says whether the first request had this `body_hash` (keys stored before hashes were: yes).
        """
        now = datetime.now(UTC)
        item = IdempotencyRecord(
            key_hash=self._key_hash(ip, key),
            database_id=str(uuid7()),
            body_hash=body_hash,
            created_at=now,
            expires_at=now + timedelta(seconds=self.settings.idempotency_ttl_s),
        )
        try:
            # DynamoDB deletes expired items up to ~48 h late: an expired one counts as absent.
            item.save(condition=IdempotencyRecord.key_hash.does_not_exist() | (IdempotencyRecord.expires_at < now))
            return item.database_id, True, now, True
        except PutError as exc:
            if exc.cause_response_code != "ConditionalCheckFailedException":
                raise
        first = IdempotencyRecord.get(item.key_hash, consistent_read=True)
        return first.database_id, False, first.created_at, first.body_hash in (None, body_hash)

    @staticmethod
    def key_reused(key: str) -> Refused:
        return Refused(
            f"Idempotency-Key '{key}' was already used with a different request",
            hint="Send the same body and ?referrer= as the first request with this key, "
            "or use a new key for a new request.",
        )

    def forget_key(self, ip: str | None, key: str, database_id: str) -> None:
        """Drop the key when its create made nothing, so a retry starts over."""
        try:
            IdempotencyRecord(key_hash=self._key_hash(ip, key)).delete(
                condition=IdempotencyRecord.database_id == database_id
            )
        except DeleteError as exc:
            if exc.cause_response_code != "ConditionalCheckFailedException":
                raise
