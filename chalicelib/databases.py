"""The lifecycle of a tenant database: the only place that changes a status.

    create: PROVISIONING --DDL ok--> UNCLAIMED
                         --DDL fails--> FAILED (leftovers dropped, or left due for the purge)
    claim:  UNCLAIMED --(expiry removed)--> CLAIMING --(role limits raised)--> CLAIMED
    delete: CLAIMED --> DELETING --(dropped)--> DELETED (tombstone)

The record is written before any DDL, so a crash between the two leaves a
trace the scheduled purge finds through the `by_due` index.
"""

from __future__ import annotations

import dataclasses
import functools
import hmac
import logging
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from pynamodb.exceptions import PutError, UpdateError

from chalicelib import audit, metrics, pool, postgres, reliability
from chalicelib import hosts as hostlib
from chalicelib.abuse import Guard
from chalicelib.crypto import KeyRing, Sealed
from chalicelib.errors import Conflict, Forbidden, Gone, NotFound, ServiceUnavailable, Unauthorized, Unprocessable
from chalicelib.identifiers import creator_token, tenant_name, tenant_password, token_hash, uuid7
from chalicelib.models import (
    CLAIMED,
    CLAIMING,
    DELETED,
    DELETING,
    EXPIRED,
    FAILED,
    POOLED,
    PROVISIONING,
    UNCLAIMED,
    DatabaseRecord,
    HostRecord,
)
from chalicelib.schemas import CreateDatabase
from chalicelib.settings import CLAIMED as CLAIMED_PLAN
from chalicelib.settings import UNCLAIMED as UNCLAIMED_PLAN
from chalicelib.settings import Plan, Settings
from chalicelib.views import iso as _iso

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Requester:
    ip: str | None = None
    user_agent: str | None = None
    idempotency_key: str | None = None


@dataclass(frozen=True)
class Provisioned:
    """A database and what the caller may see of it."""

    record: DatabaseRecord
    plan: Plan
    host: HostRecord | None
    password: str | None  # None when the caller gets no connection string
    created: bool
    creator_token: str | None = None  # only in the answer that created the database


def _now() -> datetime:
    return datetime.now(UTC)


def _reason(cause: Exception) -> str:
    """What a failure may say in logs and records: the safe message of HostUnavailable, else the type."""
    if isinstance(cause, postgres.HostUnavailable):
        return str(cause).splitlines()[0][:200]
    return type(cause).__name__


def _is_conditional_failure(exc: PutError | UpdateError) -> bool:
    return exc.cause_response_code == "ConditionalCheckFailedException"


class DatabaseService:
    def __init__(self, settings: Settings, keyring: KeyRing, hosts: hostlib.HostCache | None = None) -> None:
        self.settings = settings
        self.keyring = keyring
        self.hosts = hosts or hostlib.HostCache()
        self.pool = pool.Candidates()
        self.guard = Guard(settings)

    # -- reading -------------------------------------------------------------

    def find(self, database_id: str) -> DatabaseRecord | None:
        try:
            record = DatabaseRecord.get(database_id, consistent_read=True)
        except DatabaseRecord.DoesNotExist:
            return None
        # A pooled database's id has never been handed out: it does not exist yet.
        return None if record.status == POOLED else record

    def get(self, database_id: str) -> Provisioned:
        """A database as its public GET shows it; tombstones raise 410."""
        record = self.find(database_id)
        if record is None:
            raise NotFound("Database not found", hint="Check the id, or create a new database.")
        return self._visible(record, created=False)

    def _visible(self, record: DatabaseRecord, created: bool) -> Provisioned:
        plan = self.settings.plan(record.plan)
        if record.status in (EXPIRED, DELETED, FAILED) or self._past_expiry(record):
            raise self._gone(record)
        if record.status == UNCLAIMED:
            return Provisioned(record, plan, self.hosts.get(record.host_id), self.password(record), created)
        # PROVISIONING and CLAIMED carry no connection string on the public API.
        return Provisioned(record, plan, None, None, created)

    def _past_expiry(self, record: DatabaseRecord) -> bool:
        # The purge may not have run yet; to the client it is expired already.
        return record.status == UNCLAIMED and record.expires_at is not None and record.expires_at <= _now()

    @staticmethod
    def _gone(record: DatabaseRecord) -> Gone:
        if record.status == DELETED:
            return Gone(
                "Database deleted",
                hint="Its owner deleted it. Create a new database.",
                deleted_at=_iso(record.ended_at),
            )
        if record.status == FAILED:
            return Gone("Database creation failed", hint="Create a new database (with another id).")
        return Gone(
            "Database expired",
            hint="Unclaimed databases expire; create a new one, and claim it to keep it.",
            expired_at=_iso(record.ended_at or record.expires_at),
        )

    def password(self, record: DatabaseRecord) -> str:
        return self.keyring.decrypt(Sealed(record.secret_key_id, record.secret), context=record.id)

    # -- creating ------------------------------------------------------------

    def create(self, request: CreateDatabase, requester: Requester, database_id: str | None = None) -> Provisioned:
        """Provision a database; with a client-chosen id, repeat calls return the first one.

        A pooled database is taken when there is one (server-chosen ids only),
        otherwise one is created on demand; the response is the same. A host
        that fails is skipped and the create goes to the next one: the caller
        gets a 503 only when no host with room answers.
        """
        if database_id is None and requester.idempotency_key:
            return self._create_idempotent(request, requester)
        if database_id is not None:
            existing = self.find(database_id)
            if existing is not None:
                return self._existing(existing)
        hosts = self.hosts.all()
        if request.enable_logical_replication and not hostlib.offers_logical_replication(hosts):
            raise Unprocessable(
                "Logical replication is not available on this deployment",
                hint="Create the database without enable_logical_replication, or ask the operator for a host that offers it.",
            )
        # Abuse limits (chalicelib.abuse): a request that gets this far counts.
        self.guard.check_rate(requester.ip)
        hosts = self.guard.open_hosts(hosts)
        plan = self.settings.plan(UNCLAIMED_PLAN)
        password = tenant_password()
        verifier = postgres.scram_verifier(password)  # once, for whichever way the database comes
        token = creator_token()  # handed out once; the record keeps its hash
        if database_id is None and not request.enable_logical_replication:
            taken = self._take_pooled(hosts, plan, request, requester, password, verifier, token_hash(token))
            if taken is not None:
                metrics.emit({"Creates": 1, "PoolTakes": 1})
                return dataclasses.replace(taken, creator_token=token)
        result = self._create_on_demand(
            hosts, database_id, plan, request, requester, password, verifier, token_hash(token)
        )
        if result.created:
            self._note_created(result.record, requester)
            metrics.emit({"Creates": 1, "OnDemandCreates": 1})
            return dataclasses.replace(result, creator_token=token)
        return result

    def _note_created(self, record: DatabaseRecord, requester: Requester) -> None:
        self.guard.note_unclaimed(record.host_id)
        audit.record_quietly(record.id, audit.CREATED, audit.ANONYMOUS, requester.ip, detail=f"ref={record.ref}")

    def _create_on_demand(
        self,
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
            down = {h.id for h in hosts if self.hosts.is_down(h.id)}
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
                self.hosts.invalidate()
                if record is None:
                    raise ServiceUnavailable(
                        "No capacity",
                        hint="Every database host is full; try again in a few minutes.",
                        headers={"Retry-After": "60"},
                    ) from None
                self._give_up(record)
                raise ServiceUnavailable(
                    "Database host unavailable",
                    hint="Nothing was created; retry in a few seconds.",
                    headers={"Retry-After": "5"},
                ) from None
            tried.add(host.id)
            reliability.pause_point("after_reserve")  # the fault suite's kill -9 lands here
            if record is None:
                record = self._new_record(
                    database_id or str(uuid7()), host, plan, request, requester, password, creator_hash
                )
                try:
                    record.save(condition=DatabaseRecord.id.does_not_exist())
                except PutError as exc:
                    hostlib.release(host.id)
                    if database_id is not None and _is_conditional_failure(exc):
                        # Lost a race with the same client-chosen id: answer with the winner.
                        return self._existing(self.find(database_id))
                    raise
            else:
                self._move(record, host)
            try:
                postgres.create_tenant(
                    self._target(host), record.role_name, record.db_name, password, plan, verifier=verifier
                )
                break
            except Exception as exc:
                self._attempt_failed(record, host, exc)
        self._mark_unclaimed(record, plan)
        log.info("created database %s on host %s for ref %r", record.id, host.id, record.ref)
        return Provisioned(record, plan, host, password, created=True)

    def _mark_unclaimed(self, record: DatabaseRecord, plan: Plan) -> None:
        now = _now()
        expires = now + timedelta(seconds=plan.lifetime_s)
        record.update(
            actions=[
                DatabaseRecord.status.set(UNCLAIMED),
                DatabaseRecord.expires_at.set(expires),
                DatabaseRecord.due_bucket.set(UNCLAIMED),
                DatabaseRecord.due_at.set(int(expires.timestamp())),
                DatabaseRecord.updated_at.set(now),
            ],
            condition=DatabaseRecord.status == PROVISIONING,
        )

    def _attempt_failed(self, record: DatabaseRecord, host: HostRecord, cause: Exception) -> None:
        """One host failed a create: clean up there (or leave a trace for the purge) and free the slot."""
        log.error("provisioning %s on host %s failed: %s", record.id, host.id, _reason(cause))
        if isinstance(cause, postgres.HostUnavailable):
            # The connection never opened, so nothing was created there.
            self.hosts.mark_down(host.id, self.settings.host_retry_s)
            hostlib.release(host.id)
            return
        try:
            postgres.drop_tenant(self._target(host), record.role_name, record.db_name)
        except Exception as exc:  # the host may be down now: the purge drops it later
            log.warning("cleanup of %s failed, left for the purge: %s", record.id, type(exc).__name__)
            self._leave_for_purge(record, host, cause)
            return
        hostlib.release(host.id)

    def _leave_for_purge(self, record: DatabaseRecord, host: HostRecord, cause: Exception) -> None:
        """A FAILED record of its own for leftovers on `host`, due now; it keeps the slot until the purge drops them."""
        now = _now()
        DatabaseRecord(
            id=str(uuid7()),
            status=FAILED,
            plan=record.plan,
            host_id=host.id,
            role_name=record.role_name,
            db_name=record.db_name,
            failure=_reason(cause),
            created_at=now,
            updated_at=now,
            ended_at=now,
            expires_at=now + timedelta(seconds=self.settings.tombstone_ttl_s),
            due_bucket=FAILED,
            due_at=int(now.timestamp()),
        ).save(condition=DatabaseRecord.id.does_not_exist())

    def _move(self, record: DatabaseRecord, host: HostRecord) -> None:
        """Point a PROVISIONING record at another host, with fresh names (the old ones may linger there)."""
        name = tenant_name(self.settings.name_prefix)
        record.update(
            actions=[
                DatabaseRecord.host_id.set(host.id),
                DatabaseRecord.role_name.set(name),
                DatabaseRecord.db_name.set(name),
                DatabaseRecord.updated_at.set(_now()),
            ],
            condition=DatabaseRecord.status == PROVISIONING,
        )

    def _give_up(self, record: DatabaseRecord) -> None:
        """Every host failed; each attempt already cleaned up after itself."""
        now = _now()
        record.update(
            actions=[
                DatabaseRecord.status.set(FAILED),
                DatabaseRecord.failure.set("no host answered"),
                DatabaseRecord.ended_at.set(now),
                DatabaseRecord.updated_at.set(now),
                DatabaseRecord.secret.remove(),
                DatabaseRecord.due_bucket.remove(),
                DatabaseRecord.due_at.remove(),
                DatabaseRecord.expires_at.set(now + timedelta(seconds=self.settings.tombstone_ttl_s)),
            ],
            condition=DatabaseRecord.status == PROVISIONING,
        )

    def _create_idempotent(self, request: CreateDatabase, requester: Requester) -> Provisioned:
        """Same Idempotency-Key from the same IP: the first database, not a second one."""
        key = requester.idempotency_key
        body_hash = request.fingerprint()
        database_id, fresh, first_seen, same = self.guard.reserve_key(requester.ip, key, body_hash)
        if not fresh:
            record = self.find(database_id)
            if record is not None and record.status != FAILED:
                if not same:  # the key made a database for another request
                    raise self.guard.key_reused(key)
                return self._existing(record)
            stale = _now() - first_seen > timedelta(seconds=self.settings.provisioning_timeout_s)
            if record is None and not stale:
                if not same:
                    raise self.guard.key_reused(key)
                raise Conflict(
                    "A request with this Idempotency-Key is still being processed",
                    hint="Retry in a second.",
                    headers={"Retry-After": "1"},
                )
            # Its first create failed or died before writing a record: start over.
            self.guard.forget_key(requester.ip, key, database_id)
            database_id, _, _, _ = self.guard.reserve_key(requester.ip, key, body_hash)
        try:
            return self.create(request, requester, database_id=database_id)
        except Exception:
            record = self.find(database_id)
            if record is None or record.status == FAILED:
                self.guard.forget_key(requester.ip, key, database_id)
            raise

    def _new_record(
        self,
        database_id: str,
        host: HostRecord,
        plan: Plan,
        request: CreateDatabase,
        requester: Requester,
        password: str,
        creator_hash: str | None = None,
    ) -> DatabaseRecord:
        now = _now()
        sealed = self.keyring.encrypt(password, context=database_id)
        name = tenant_name(self.settings.name_prefix)
        return DatabaseRecord(
            id=database_id,
            status=PROVISIONING,
            plan=plan.name,
            host_id=host.id,
            role_name=name,
            db_name=name,
            secret_key_id=sealed.key_id,
            secret=sealed.blob,
            logical_replication=request.enable_logical_replication,
            ref=request.ref,
            created_ip=requester.ip,
            user_agent=(requester.user_agent or "")[:256] or None,
            created_at=now,
            updated_at=now,
            due_bucket=PROVISIONING,
            due_at=int(time.time()) + self.settings.provisioning_timeout_s,
            creator_token_hash=creator_hash,
        )

    def _existing(self, record: DatabaseRecord) -> Provisioned:
        if record.status == PROVISIONING:
            raise Conflict("Database is still being created", hint="Retry in a second.", headers={"Retry-After": "1"})
        return self._visible(record, created=False)

    def _target(self, host: HostRecord) -> postgres.Target:
        return hostlib.target(host, self.settings)

    def _fail(self, record: DatabaseRecord, host: HostRecord, cause: Exception) -> None:
        """Mark a create that failed; drop what it left, or leave it due for the purge."""
        reason = _reason(cause)
        log.error("provisioning %s on host %s failed: %s", record.id, host.id, reason)
        cleaned = False
        try:
            postgres.drop_tenant(self._target(host), record.role_name, record.db_name)
            cleaned = True
        except Exception as exc:  # the host may be down: the purge retries later
            log.warning("cleanup of %s failed, left for the purge: %s", record.id, type(exc).__name__)
        now = _now()
        actions = [
            DatabaseRecord.status.set(FAILED),
            DatabaseRecord.failure.set(reason),
            DatabaseRecord.ended_at.set(now),
            DatabaseRecord.updated_at.set(now),
            DatabaseRecord.secret.remove(),
        ]
        if cleaned:
            actions += [
                DatabaseRecord.due_bucket.remove(),
                DatabaseRecord.due_at.remove(),
                DatabaseRecord.expires_at.set(now + timedelta(seconds=self.settings.tombstone_ttl_s)),
            ]
            hostlib.release(host.id)
        else:
            actions += [DatabaseRecord.due_bucket.set(FAILED), DatabaseRecord.due_at.set(int(now.timestamp()))]
        record.update(actions=actions, condition=DatabaseRecord.status == PROVISIONING)

    # -- expiry and cleanup: the status changes chalicelib.expiry orchestrates --
    #
    # A record whose database must go is first moved, with a conditional
    # write, into a state no claim can take (EXPIRED/FAILED) and into a
    # "leftovers" due bucket with `due_at` pushed LEASE_S ahead: that write is
    # the lock. Only its winner drops the database, and only the winner of
    # the final conditional write (`finish_cleanup`) gives the host slot
    # back, so two purge runs, or a purge and a stream delivery, never drop
    # or release twice. A run that dies mid-way leaves the record due again
    # when the lease ends.

    # A lease covers one drop, not a whole run: a holder that died frees the
    # record within a minute. Should a slow drop outlive it, a second drop
    # runs beside it, harmlessly (drops are idempotent, and only one
    # `finish_cleanup` wins the slot).
    LEASE_S = 60

    def _lease_until(self, now: datetime) -> int:
        return int(now.timestamp()) + self.LEASE_S

    def retry_later(self, record: DatabaseRecord, now: datetime | None = None) -> int | None:
        """A drop under our lease failed: due again after a backoff (seconds, then up to minutes).

        Returns the delay, or None when the lease was lost meanwhile.
        """
        from chalicelib import reliability

        now = now or _now()
        attempts = int(record.drop_attempts or 0)
        delay = reliability.drop_backoff_s(attempts)
        done = self._conditional(
            record,
            [
                DatabaseRecord.due_at.set(int(now.timestamp()) + delay),
                DatabaseRecord.drop_attempts.set(attempts + 1),
                DatabaseRecord.updated_at.set(now),
            ],
            DatabaseRecord.status.is_in(EXPIRED, DELETED, FAILED) & (DatabaseRecord.due_at == record.due_at),
        )
        return delay if done else None

    def hold_claimed(self, record: DatabaseRecord, now: datetime | None = None) -> bool:
        """An automatic drop met a database Postgres marks claimed: stop retrying, keep it for a person.

        The record leaves its due bucket but keeps its host slot (the database
        lives on); reconciliation lists the name as a claimed orphan.
        """
        now = now or _now()
        return self._conditional(
            record,
            [
                DatabaseRecord.due_bucket.remove(),
                DatabaseRecord.due_at.remove(),
                DatabaseRecord.failure.set("kept: the host marks this database claimed"),
                DatabaseRecord.updated_at.set(now),
            ],
            DatabaseRecord.status.is_in(EXPIRED, DELETED, FAILED) & (DatabaseRecord.due_at == record.due_at),
        )

    def _tombstone_ttl(self, now: datetime) -> datetime:
        return now + timedelta(seconds=self.settings.tombstone_ttl_s)

    def _tombstone(
        self,
        status: str,
        now: datetime,
        ended_at: datetime | None = None,
        failure: str | None = None,
        drop_pending: bool = True,
    ) -> list:
        """Update actions that make a record a tombstone: no secret, its own TTL.

        `drop_pending`: the database may still exist, so the record stays due
        (in the bucket named by its status) under a lease; see `lease`.
        """
        actions = [
            DatabaseRecord.status.set(status),
            DatabaseRecord.ended_at.set(ended_at or now),
            DatabaseRecord.updated_at.set(now),
            DatabaseRecord.secret.remove(),
            DatabaseRecord.secret_key_id.remove(),
            DatabaseRecord.expires_at.set(self._tombstone_ttl(now)),
        ]
        if failure is not None:
            actions.append(DatabaseRecord.failure.set(failure))
        if drop_pending:
            return actions + [DatabaseRecord.due_bucket.set(status), DatabaseRecord.due_at.set(self._lease_until(now))]
        return actions + [DatabaseRecord.due_bucket.remove(), DatabaseRecord.due_at.remove()]

    def expire(self, record: DatabaseRecord, now: datetime | None = None) -> bool:
        """UNCLAIMED past expiry -> EXPIRED tombstone with its drop pending; False if a claim (or another run) won."""
        now = now or _now()
        expired_at = min(record.expires_at, now) if record.expires_at else now
        return self._conditional(
            record,
            # GET said "expired at expires_at" before the purge ran; keep saying it.
            self._tombstone(EXPIRED, now, ended_at=expired_at),
            (DatabaseRecord.status == UNCLAIMED)
            & (DatabaseRecord.due_bucket == UNCLAIMED)
            & (DatabaseRecord.due_at <= int(now.timestamp())),
        )

    def fail_stuck(self, record: DatabaseRecord, now: datetime | None = None) -> bool:
        """PROVISIONING past the provisioning timeout (a crashed create) -> FAILED with its drop pending."""
        now = now or _now()
        return self._conditional(
            record,
            self._tombstone(FAILED, now, failure="provisioning timed out"),
            (DatabaseRecord.status == PROVISIONING)
            & (DatabaseRecord.due_bucket == PROVISIONING)
            & (DatabaseRecord.due_at <= int(now.timestamp())),
        )

    def lease(self, record: DatabaseRecord, now: datetime | None = None) -> bool:
        """Take a tombstone whose drop is pending (a retry); False if another run holds it."""
        now = now or _now()
        if record.status not in (EXPIRED, DELETED, FAILED) or record.due_bucket is None:
            return False
        return self._conditional(
            record,
            [DatabaseRecord.due_at.set(self._lease_until(now)), DatabaseRecord.updated_at.set(now)],
            DatabaseRecord.status.is_in(EXPIRED, DELETED, FAILED)
            & (DatabaseRecord.due_bucket == record.due_bucket)
            & (DatabaseRecord.due_at == record.due_at),
        )

    def drop_database(self, record: DatabaseRecord) -> bool:
        """Drop the record's database and role (idempotent); True when something existed."""
        try:
            host = self.hosts.get(record.host_id)
        except KeyError:
            raise postgres.HostUnavailable(f"host {record.host_id} is not registered") from None
        return postgres.drop_tenant(self._target(host), record.role_name, record.db_name)

    def finish_cleanup(self, record: DatabaseRecord, now: datetime | None = None) -> bool:
        """After the drop: leave the due bucket, and give the host slot back if this run held the lease."""
        now = now or _now()
        won = self._conditional(
            record,
            [
                DatabaseRecord.due_bucket.remove(),
                DatabaseRecord.due_at.remove(),
                DatabaseRecord.updated_at.set(now),
            ],
            DatabaseRecord.status.is_in(EXPIRED, DELETED, FAILED) & (DatabaseRecord.due_at == record.due_at),
        )
        if won:
            hostlib.release(record.host_id)
        return won

    def write_back_tombstone(self, old: DatabaseRecord, now: datetime | None = None) -> DatabaseRecord | None:
        """After a REMOVE of a record whose database still existed: a tombstone with the drop pending.

        GET then answers 410 instead of 404, and the tombstone is the lease
        for the drop. None when an item with that id exists again.
        """
        now = now or _now()
        status = {UNCLAIMED: EXPIRED, PROVISIONING: FAILED}.get(old.status, old.status)
        tombstone = DatabaseRecord(
            id=old.id,
            status=status,
            plan=old.plan,
            host_id=old.host_id,
            role_name=old.role_name,
            db_name=old.db_name,
            logical_replication=old.logical_replication,
            ref=old.ref,
            created_ip=old.created_ip,
            user_agent=old.user_agent,
            created_at=old.created_at,
            updated_at=now,
            ended_at=old.ended_at or (min(old.expires_at, now) if old.expires_at else now),
            failure=old.failure or ("removed while provisioning" if status == FAILED else None),
            expires_at=self._tombstone_ttl(now),
            due_bucket=status,
            due_at=self._lease_until(now),
        )
        try:
            tombstone.save(condition=DatabaseRecord.id.does_not_exist())
        except PutError as exc:
            if _is_conditional_failure(exc):
                return None
            raise
        return tombstone

    @staticmethod
    def _conditional(record: DatabaseRecord, actions: list, condition) -> bool:
        try:
            record.update(actions=actions, condition=condition)
        except UpdateError as exc:
            if _is_conditional_failure(exc):
                return False
            raise
        return True

    # -- claiming (issue 4) --------------------------------------------------

    def claim(
        self, database_id: str, account_id: str, requester: Requester, creator_token: str | None = None
    ) -> Provisioned:
        """Make `account_id` the owner. Safe to retry; racing claimers get one winner.

        Order matters. 1. UNCLAIMED -> CLAIMING removes `expires_at` and takes
        the record out of the purge's UNCLAIMED bucket in the same conditional
        write, so neither TTL nor the purge (which writes on status ==
        UNCLAIMED) can act once the claim has started; a claim that loses to
        the purge sees EXPIRED and answers 410. 2. The role gets the claimed
        plan's limits in Postgres (idempotent). 3. CLAIMING -> CLAIMED. A
        failure after 1 leaves CLAIMING, in due bucket "CLAIMING": the same
        account's retry finishes it (`finish_claim`), and a sweep can too.
        Never CLAIMED with unclaimed limits, since 3 happens only after 2.
        """
        record = self._require(database_id)
        if record.status == UNCLAIMED and not self._past_expiry(record):
            self.check_claim_token(record, creator_token, requester)
            now = _now()
            try:
                record.update(
                    actions=[
                        DatabaseRecord.status.set(CLAIMING),
                        DatabaseRecord.owner_id.set(account_id),
                        DatabaseRecord.expires_at.remove(),
                        DatabaseRecord.due_bucket.set(CLAIMING),
                        DatabaseRecord.due_at.set(int(now.timestamp()) + self.settings.provisioning_timeout_s),
                        DatabaseRecord.updated_at.set(now),
                    ],
                    # The expiry check is in the condition too: the purge may not have run.
                    condition=(DatabaseRecord.status == UNCLAIMED) & (DatabaseRecord.expires_at > now),
                )
            except UpdateError as exc:
                if not _is_conditional_failure(exc):
                    raise
                record = self._require(database_id)  # someone else moved it: answer from what it is now
        if record.status == CLAIMING and record.owner_id == account_id:
            claimed = self.finish_claim(record, requester)
            metrics.count("Claims")
            return claimed
        if record.status == CLAIMED and record.owner_id == account_id:
            return self._owned_view(record)
        if record.status in (CLAIMING, CLAIMED, DELETING):
            raise Conflict("Database already claimed", hint="Another account owns this database.")
        if record.status == PROVISIONING:
            raise Conflict("Database is still being created", hint="Retry in a second.", headers={"Retry-After": "1"})
        # UNCLAIMED past its expiry, or a tombstone.
        raise self._gone(record) if record.status != UNCLAIMED else self._expired(record)

    def check_claim_token(self, record: DatabaseRecord, token: str | None, requester: Requester) -> None:
        """A creator token, when given, must be this database's; with INSTAPG_CLAIM_REQUIRES_TOKEN it must be given."""
        if token is None or token == "":
            if self.settings.claim_requires_token and record.creator_token_hash is not None:
                raise Forbidden(
                    "Creator token required",
                    hint="This deployment claims a database only with the creator token its create returned.",
                )
            return
        self.check_creator(record, token, requester)

    def check_creator(self, record: DatabaseRecord, token: str | None, requester: Requester) -> None:
        """401/403 unless `token` is the record's creator token; failures count against the IP (chalicelib.abuse)."""
        if not token:
            raise Unauthorized(
                "Missing creator token",
                hint="Send 'Authorization: Bearer <creator_token>', the token the create returned once.",
                headers={"WWW-Authenticate": 'Bearer realm="instapg"'},
            )
        self.guard.check_auth(requester.ip)
        expected = record.creator_token_hash or ""
        if not expected or not hmac.compare_digest(expected, token_hash(token.strip())):
            self.guard.auth_failed(requester.ip)
            raise Forbidden(
                "Creator token does not match",
                hint="Use the creator_token the create of this database returned; the id alone is not enough.",
            )

    def delete_unclaimed(self, database_id: str, token: str | None, requester: Requester) -> None:
        """The creator drops an unclaimed database early (creator token, never the id alone); DELETED tombstone."""
        record = self._require(database_id)
        if record.status in (EXPIRED, DELETED, FAILED) or self._past_expiry(record):
            raise self._gone(record) if record.status != UNCLAIMED else self._expired(record)
        if record.owner_id is not None:
            raise Conflict(
                "Database is claimed",
                hint=f"Its owner deletes it with DELETE /api/v1/databases/{record.id} and their API key.",
            )
        if record.status == PROVISIONING:
            raise Conflict("Database is still being created", hint="Retry in a second.", headers={"Retry-After": "1"})
        self.check_creator(record, token, requester)
        if record.status == UNCLAIMED:
            now = _now()
            moved = self._conditional(
                record,
                [
                    DatabaseRecord.status.set(DELETING),
                    DatabaseRecord.updated_at.set(now),
                    DatabaseRecord.due_bucket.set(DELETING),
                    DatabaseRecord.due_at.set(int(now.timestamp()) + self.settings.provisioning_timeout_s),
                ],
                (DatabaseRecord.status == UNCLAIMED) & (DatabaseRecord.expires_at > now),
            )
            if not moved:  # a claim, the purge or another delete got there first
                return self.delete_unclaimed(database_id, token, requester)
        self.finish_delete(record, actor=audit.CREATOR, ip=requester.ip)

    def extend(self, database_id: str) -> None:
        """Unclaimed databases are not extended: claiming is the way to keep one. Always an error."""
        record = self._require(database_id)
        if record.status in (EXPIRED, DELETED, FAILED) or self._past_expiry(record):
            raise self._gone(record) if record.status != UNCLAIMED else self._expired(record)
        if record.owner_id is not None:
            raise Conflict("Claimed databases do not expire", hint="There is nothing to extend.")
        raise Conflict(
            "Unclaimed databases cannot be extended",
            hint=f"Claim it to keep it: a claimed database never expires. Open /claim/{record.id}, "
            f"or POST /api/v1/database/{record.id}/claim with an API key.",
        )

    def claimable(self, record: DatabaseRecord) -> bool:
        return record.status == UNCLAIMED and not self._past_expiry(record)

    def finish_claim(self, record: DatabaseRecord, requester: Requester | None = None) -> Provisioned:
        """Steps 2 and 3 of a claim whose record is CLAIMING (a retry or a sweep calls this)."""
        plan = self.settings.plan(CLAIMED_PLAN)
        host = self.hosts.get(record.host_id)
        try:
            postgres.apply_plan(self._target(host), record.role_name, plan, claimed=True)
        except Exception as exc:  # host down or DDL refused: the record stays CLAIMING for a retry
            log.warning("claim of %s on host %s left CLAIMING: %s", record.id, host.id, type(exc).__name__)
            raise ServiceUnavailable(
                "Database host unavailable",
                hint="The claim is recorded and nothing will expire; retry the claim to finish it.",
                headers={"Retry-After": "5"},
            ) from None
        now = _now()
        try:
            record.update(
                actions=[
                    DatabaseRecord.status.set(CLAIMED),
                    DatabaseRecord.plan.set(plan.name),
                    DatabaseRecord.claimed_at.set(now),
                    DatabaseRecord.updated_at.set(now),
                    DatabaseRecord.due_bucket.remove(),
                    DatabaseRecord.due_at.remove(),
                ],
                condition=(DatabaseRecord.status == CLAIMING) & (DatabaseRecord.owner_id == record.owner_id),
            )
        except UpdateError as exc:
            if not _is_conditional_failure(exc):
                raise
            # A concurrent retry of the same claim finished first.
            record = self._require(record.id)
            if record.status != CLAIMED:
                raise
            return self._owned_view(record)
        log.info("database %s claimed by account %s", record.id, record.owner_id)
        audit.record_quietly(record.id, audit.CLAIMED, record.owner_id, requester.ip if requester else None)
        self._unlock_after_claim(record, plan)
        return self._owned_view(record)

    def _unlock_after_claim(self, record: DatabaseRecord, plan: Plan) -> None:
        """A database locked for outgrowing the unclaimed plan may fit the claimed one (issue 5's storage lock).

        Only once CLAIMED: the quota code writes only on live (UNCLAIMED/CLAIMED)
        records. If this fails, the next quota pass lifts the lock instead.
        """
        if not record.locked_reason:
            return
        from chalicelib import quotas

        try:
            quotas.unlock_if_fits(self, record, plan)
        except Exception as exc:
            log.warning("claim of %s: storage lock left for the quota pass: %s", record.id, type(exc).__name__)

    def _require(self, database_id: str) -> DatabaseRecord:
        record = self.find(database_id)
        if record is None:
            raise NotFound("Database not found", hint="Check the id, or create a new database.")
        return record

    @staticmethod
    def _expired(record: DatabaseRecord) -> Gone:
        return Gone(
            "Database expired",
            hint="Unclaimed databases expire; create a new one, and claim it to keep it.",
            expired_at=_iso(record.expires_at),
        )

    def _owned_view(self, record: DatabaseRecord) -> Provisioned:
        # The owner sees the claim's result; connection strings have their own audited endpoint.
        return Provisioned(record, self.settings.plan(record.plan), None, None, created=False)

    # -- the owner's endpoints -----------------------------------------------

    def owned(self, database_id: str, account_id: str, ended_ok: bool = False) -> DatabaseRecord:
        """A database of `account_id`. Someone else's, or none, is 404 (existence is not revealed).

        `ended_ok`: a deleted one too, while its tombstone lasts (its audit log stays readable).
        """
        record = self.find(database_id)
        if record is None or record.owner_id != account_id:
            raise NotFound("Database not found", hint="List your databases with GET /api/v1/databases.")
        if ended_ok:
            return record
        if record.status in (DELETED, EXPIRED, FAILED):
            raise self._gone(record)
        if record.status == DELETING:
            raise Gone("Database deleted", hint="Its deletion is under way; DELETE it again to finish.")
        if record.status == CLAIMING:
            raise Conflict("Claim not finished", hint=f"Retry POST /api/v1/database/{record.id}/claim to finish it.")
        return record

    def list_owned(self, account_id: str) -> list[DatabaseRecord]:
        """The account's live databases, oldest first."""
        records = DatabaseRecord.by_owner.query(account_id)
        # The index orders by id, and a client-chosen id (v4) says nothing of age.
        return sorted((r for r in records if r.status in (CLAIMING, CLAIMED)), key=lambda r: r.created_at)

    def usage(self, record: DatabaseRecord) -> postgres.Usage:
        try:
            return postgres.usage(self._target(self.hosts.get(record.host_id)), record.role_name, record.db_name)
        except postgres.HostUnavailable:
            raise ServiceUnavailable("Database host unavailable", hint="Retry in a few seconds.") from None

    def connection(self, record: DatabaseRecord, requester: Requester) -> Provisioned:
        """The connection strings of an owned database; audited before they are returned."""
        try:
            audit.record(record.id, audit.CONNECTION_STRING_VIEWED, record.owner_id, requester.ip)
        except Exception as exc:  # no unaudited disclosure
            log.error("audit write for %s failed, connection string withheld: %s", record.id, type(exc).__name__)
            raise ServiceUnavailable("Audit log unavailable", hint="Retry in a few seconds.") from None
        plan = self.settings.plan(record.plan)
        return Provisioned(record, plan, self.hosts.get(record.host_id), self.password(record), created=False)

    def rotate_password(self, record: DatabaseRecord, requester: Requester) -> Provisioned:
        """A new password: Postgres first (old sessions end), then the sealed copy.

        If the second write fails, the stored password is stale until the
        owner rotates again; a retry heals it. Two rotations racing can leave
        the same state, healed the same way.
        """
        host = self.hosts.get(record.host_id)
        password = tenant_password()
        try:
            postgres.set_password(self._target(host), record.role_name, password)
        except postgres.HostUnavailable:
            raise ServiceUnavailable(
                "Database host unavailable", hint="The password was not changed; retry in a few seconds."
            ) from None
        sealed = self.keyring.encrypt(password, context=record.id)
        try:
            record.update(
                actions=[
                    DatabaseRecord.secret_key_id.set(sealed.key_id),
                    DatabaseRecord.secret.set(sealed.blob),
                    DatabaseRecord.updated_at.set(_now()),
                ],
                condition=(DatabaseRecord.status == CLAIMED) & (DatabaseRecord.owner_id == record.owner_id),
            )
        except UpdateError as exc:
            if not _is_conditional_failure(exc):
                raise
            # A DELETE won the race; the new password dies with the database.
            raise Gone("Database deleted", hint="It was deleted while the password was being rotated.") from None
        audit.record_quietly(record.id, audit.PASSWORD_ROTATED, record.owner_id, requester.ip)
        return Provisioned(record, self.settings.plan(record.plan), host, password, created=False)

    def delete(self, database_id: str, account_id: str, requester: Requester) -> None:
        """Drop an owned database and leave a DELETED tombstone. A retry finishes a half-done delete."""
        record = self.find(database_id)
        if record is None or record.owner_id != account_id:
            raise NotFound("Database not found", hint="List your databases with GET /api/v1/databases.")
        if record.status in (DELETED, EXPIRED, FAILED):
            raise self._gone(record)
        if record.status in (CLAIMING, CLAIMED):
            now = _now()
            try:
                record.update(
                    actions=[
                        DatabaseRecord.status.set(DELETING),
                        DatabaseRecord.updated_at.set(now),
                        # A sweep finishes a delete whose drop failed (after the
                        # in-flight request has had its chance).
                        DatabaseRecord.due_bucket.set(DELETING),
                        DatabaseRecord.due_at.set(int(now.timestamp()) + self.settings.provisioning_timeout_s),
                    ],
                    condition=DatabaseRecord.status.is_in(CLAIMING, CLAIMED) & (DatabaseRecord.owner_id == account_id),
                )
            except UpdateError as exc:
                if not _is_conditional_failure(exc):
                    raise
                return self.delete(database_id, account_id, requester)  # a racing DELETE moved it
        self.finish_delete(record, actor=account_id, ip=requester.ip)

    def finish_delete(self, record: DatabaseRecord, actor: str, ip: str | None = None) -> None:
        """Drop the tenant of a DELETING record and make it a tombstone (idempotent)."""
        host = self.hosts.get(record.host_id)
        try:
            # The owner's own delete: the one drop that may remove a claimed database.
            postgres.drop_tenant(self._target(host), record.role_name, record.db_name, keep_claimed=False)
        except Exception as exc:  # host down or DDL refused: the record stays DELETING for a retry
            log.warning("delete of %s on host %s left DELETING: %s", record.id, host.id, type(exc).__name__)
            raise ServiceUnavailable(
                "Database host unavailable", hint="The database is being deleted; retry the DELETE to finish it."
            ) from None
        now = _now()
        try:
            record.update(
                actions=self._tombstone(DELETED, now, drop_pending=False),
                condition=DatabaseRecord.status == DELETING,
            )
        except UpdateError as exc:
            if not _is_conditional_failure(exc):
                raise
            return  # a racing DELETE wrote the tombstone (and released the slot)
        hostlib.release(host.id)
        log.info("database %s deleted by %s", record.id, actor)
        audit.record_quietly(record.id, audit.DELETED, actor, ip)

    def finish_stalled(self, deadline: float, limit: int = 25) -> int:
        """Finish claims and deletes that stopped halfway (host down, Lambda killed).

        For the scheduled job: bounded by `limit` records and by `deadline`
        (a time.monotonic() value), and resumable since each record is finished
        with the same idempotent steps a retry uses. Returns how many it finished.
        """
        finished = 0
        now = int(time.time())
        for bucket in (CLAIMING, DELETING):
            for record in DatabaseRecord.by_due.query(bucket, DatabaseRecord.due_at <= now, limit=limit):
                if finished >= limit or time.monotonic() >= deadline:
                    return finished
                try:
                    if record.status == CLAIMING:
                        self.finish_claim(record)
                    elif record.status == DELETING:
                        self.finish_delete(record, actor=audit.SYSTEM)
                    finished += 1
                except ServiceUnavailable:
                    log.warning("stalled %s %s: host still unavailable", record.status, record.id)
        return finished

    # -- the warm pool (chalicelib.pool finds records and refills; statuses change here) --

    def add_to_pool(self, host: HostRecord) -> DatabaseRecord:
        """One ready database on `host`: PROVISIONING first (as any create), then POOLED.

        Raises hostlib.NoCapacity when the host is full, and the DDL's error
        (after marking the record FAILED) when the host fails.
        """
        hostlib.reserve([host])
        plan = self.settings.plan(UNCLAIMED_PLAN)
        # A password nobody will ever use: the role is NOLOGIN until taken, and
        # the take replaces it. It is sealed like any secret, never logged.
        password = tenant_password()
        record = self._new_record(str(uuid7()), host, plan, CreateDatabase(ref=""), Requester(), password)
        record.ref = None  # set by the create that takes it
        record.save(condition=DatabaseRecord.id.does_not_exist())
        try:
            postgres.create_tenant(self._target(host), record.role_name, record.db_name, password, plan, login=False)
        except Exception as exc:
            self._fail(record, host, exc)
            raise
        now = _now()
        record.update(
            actions=[
                DatabaseRecord.status.set(POOLED),
                DatabaseRecord.due_bucket.set(pool.bucket(host.id)),
                DatabaseRecord.due_at.set(int(now.timestamp())),
                DatabaseRecord.updated_at.set(now),
            ],
            condition=DatabaseRecord.status == PROVISIONING,
        )
        return record

    def _take_pooled(
        self,
        hosts: list[HostRecord],
        plan: Plan,
        request: CreateDatabase,
        requester: Requester,
        password: str,
        verifier: str,
        creator_hash: str | None = None,
    ) -> Provisioned | None:
        """Take a pooled database on the active host with the most room that has one; None when none is left."""
        for host in hostlib.by_free_capacity(hosts):
            if self.hosts.is_down(host.id):
                continue
            record = self._claim_any(host, plan, request, requester, password, creator_hash)
            if record is None:
                continue
            # The audit event is written while Postgres checks the new password.
            # Should the ALTER fail, the event stays with a record that turns
            # FAILED: an unclaimed database's log has no reader.
            noted = functools.partial(self._note_created, record, requester)
            try:
                postgres.open_tenant(self._target(host), record.role_name, verifier, meanwhile=noted)
            except Exception as exc:
                log.error("taking pooled %s on host %s failed: %s", record.id, host.id, _reason(exc))
                if isinstance(exc, postgres.HostUnavailable):
                    self.hosts.mark_down(host.id, self.settings.host_retry_s)
                self._abandon_taken(record, exc)
                continue
            log.info("created database %s on host %s from the pool for ref %r", record.id, host.id, record.ref)
            return Provisioned(record, plan, host, password, created=True)
        return None

    def _claim_any(
        self,
        host: HostRecord,
        plan: Plan,
        request: CreateDatabase,
        requester: Requester,
        password: str,
        creator_hash: str | None = None,
    ) -> DatabaseRecord | None:
        queries = 0
        while True:
            candidate = self.pool.pop(host.id)
            if candidate is None:
                # Under many concurrent creates every candidate seen may go to
                # others first; read the index a few times before giving up.
                if queries == 3 or not self.pool.load(host.id):
                    return None
                queries += 1
                continue
            record = self._claim_pooled(candidate, plan, request, requester, password, creator_hash)
            if record is not None:
                return record

    def _claim_pooled(
        self,
        record: DatabaseRecord,
        plan: Plan,
        request: CreateDatabase,
        requester: Requester,
        password: str,
        creator_hash: str | None = None,
    ) -> DatabaseRecord | None:
        """The one conditional write that makes a pooled database ours: POOLED -> UNCLAIMED.

        It goes straight to UNCLAIMED, before the password is set, to keep the
        take at one write: if the process dies before `open_tenant`, the record
        is an UNCLAIMED database whose role cannot log in (NOLOGIN), whose
        credentials nobody received, and which expires like any other.
        """
        now = _now()
        expires = now + timedelta(seconds=plan.lifetime_s)
        sealed = self.keyring.encrypt(password, context=record.id)
        # A conditional put of the whole item: as atomic as an update, and
        # the pooled record's other attributes never change while it is POOLED.
        record.status = UNCLAIMED
        record.plan = plan.name
        record.secret_key_id, record.secret = sealed.key_id, sealed.blob
        record.ref = request.ref
        record.created_ip = requester.ip
        record.user_agent = (requester.user_agent or "")[:256] or None
        record.created_at = record.updated_at = now
        record.expires_at = expires
        record.due_bucket, record.due_at = UNCLAIMED, int(expires.timestamp())
        record.creator_token_hash = creator_hash
        try:
            record.save(condition=DatabaseRecord.status == POOLED)
        except PutError as exc:
            if _is_conditional_failure(exc):
                return None  # another create took it first (or it is gone)
            raise
        return record

    def _abandon_taken(self, record: DatabaseRecord, cause: Exception) -> None:
        """The host failed while handing out a pooled database: FAILED and due, the purge drops it."""
        now = _now()
        record.update(
            actions=[
                DatabaseRecord.status.set(FAILED),
                DatabaseRecord.failure.set(_reason(cause)),
                DatabaseRecord.ended_at.set(now),
                DatabaseRecord.updated_at.set(now),
                DatabaseRecord.expires_at.set(now + timedelta(seconds=self.settings.tombstone_ttl_s)),
                DatabaseRecord.secret.remove(),
                DatabaseRecord.due_bucket.set(FAILED),
                DatabaseRecord.due_at.set(int(now.timestamp())),
            ],
            condition=DatabaseRecord.status == UNCLAIMED,
        )

    def discard_pooled(self, record: DatabaseRecord, host: HostRecord) -> bool:
        """Drop a pooled database nobody took (its host drains, or the pool shrank); False if it was taken.

        The conditional write POOLED -> FAILED is also the purge's lease
        (see `lease`): if the drop fails or this process dies, the record is
        due again when the lease ends and the purge drops it and frees the slot.
        """
        now = _now()
        taken = self._conditional(
            record, self._tombstone(FAILED, now, failure="discarded from the pool"), DatabaseRecord.status == POOLED
        )
        if not taken:
            return False
        try:
            postgres.drop_tenant(self._target(host), record.role_name, record.db_name)
        except postgres.ClaimedTenant as exc:  # a restored table's POOLED record, a claimed database
            from chalicelib import expiry

            expiry.report_claimed_kept(record, str(exc), "pool")
            self.hold_claimed(record)
            return False
        self.finish_cleanup(record)
        return True
