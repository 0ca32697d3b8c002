"""The lifecycle of a tenant database: the only place that changes a status.

    create: PROVISIONING --DDL ok--> UNCLAIMED
                         --DDL fails--> FAILED (leftovers dropped, or left due for the purge)

The record is written before any DDL, so a crash between the two leaves a
trace the scheduled purge finds through the `by_due` index.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from pynamodb.exceptions import PutError, UpdateError

from chalicelib import hosts as hostlib
from chalicelib import pool, postgres
from chalicelib.abuse import Guard
from chalicelib.crypto import KeyRing, Sealed
from chalicelib.errors import Conflict, Gone, NotFound, ServiceUnavailable, Unprocessable
from chalicelib.identifiers import tenant_name, tenant_password, uuid7
from chalicelib.models import (
    DELETED,
    EXPIRED,
    FAILED,
    POOLED,
    PROVISIONING,
    UNCLAIMED,
    DatabaseRecord,
    HostRecord,
)
from chalicelib.schemas import CreateDatabase
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
        if database_id is None and not request.enable_logical_replication:
            taken = self._take_pooled(hosts, plan, request, requester, password)
            if taken is not None:
                return taken
        return self._create_on_demand(hosts, database_id, plan, request, requester, password)

    def _create_on_demand(
        self,
        hosts: list[HostRecord],
        database_id: str | None,
        plan: Plan,
        request: CreateDatabase,
        requester: Requester,
        password: str,
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
            if record is None:
                record = self._new_record(database_id or str(uuid7()), host, plan, request, requester, password)
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
                postgres.create_tenant(self._target(host), record.role_name, record.db_name, password, plan)
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
        database_id, fresh, first_seen = self.guard.reserve_key(requester.ip, key)
        if not fresh:
            record = self.find(database_id)
            if record is not None and record.status != FAILED:
                return self._existing(record)
            stale = _now() - first_seen > timedelta(seconds=self.settings.provisioning_timeout_s)
            if record is None and not stale:
                raise Conflict(
                    "A request with this Idempotency-Key is still being processed",
                    hint="Retry in a second.",
                    headers={"Retry-After": "1"},
                )
            # Its first create failed or died before writing a record: start over.
            self.guard.forget_key(requester.ip, key, database_id)
            database_id, _, _ = self.guard.reserve_key(requester.ip, key)
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

    LEASE_S = 900  # longer than any purge run (the Lambda timeout is at most 900 s)

    def _lease_until(self, now: datetime) -> int:
        return int(now.timestamp()) + self.LEASE_S

    def _tombstone_ttl(self, now: datetime) -> datetime:
        return now + timedelta(seconds=self.settings.tombstone_ttl_s)

    def expire(self, record: DatabaseRecord, now: datetime | None = None) -> bool:
        """UNCLAIMED past expiry -> EXPIRED tombstone with its drop pending; False if a claim (or another run) won."""
        now = now or _now()
        expired_at = min(record.expires_at, now) if record.expires_at else now
        return self._conditional(
            record,
            [
                DatabaseRecord.status.set(EXPIRED),
                # GET said "expired at expires_at" before the purge ran; keep saying it.
                DatabaseRecord.ended_at.set(expired_at),
                DatabaseRecord.updated_at.set(now),
                DatabaseRecord.secret.remove(),
                DatabaseRecord.secret_key_id.remove(),
                DatabaseRecord.expires_at.set(self._tombstone_ttl(now)),
                DatabaseRecord.due_bucket.set(EXPIRED),
                DatabaseRecord.due_at.set(self._lease_until(now)),
            ],
            (DatabaseRecord.status == UNCLAIMED)
            & (DatabaseRecord.due_bucket == UNCLAIMED)
            & (DatabaseRecord.due_at <= int(now.timestamp())),
        )

    def fail_stuck(self, record: DatabaseRecord, now: datetime | None = None) -> bool:
        """PROVISIONING past the provisioning timeout (a crashed create) -> FAILED with its drop pending."""
        now = now or _now()
        return self._conditional(
            record,
            [
                DatabaseRecord.status.set(FAILED),
                DatabaseRecord.failure.set("provisioning timed out"),
                DatabaseRecord.ended_at.set(now),
                DatabaseRecord.updated_at.set(now),
                DatabaseRecord.secret.remove(),
                DatabaseRecord.secret_key_id.remove(),
                DatabaseRecord.expires_at.set(self._tombstone_ttl(now)),
                DatabaseRecord.due_bucket.set(FAILED),
                DatabaseRecord.due_at.set(self._lease_until(now)),
            ],
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
        self, hosts: list[HostRecord], plan: Plan, request: CreateDatabase, requester: Requester, password: str
    ) -> Provisioned | None:
        """Take a pooled database on the active host with the most room that has one; None when none is left."""
        for host in hostlib.by_free_capacity(hosts):
            if self.hosts.is_down(host.id):
                continue
            record = self._claim_any(host, plan, request, requester, password)
            if record is None:
                continue
            try:
                postgres.open_tenant(self._target(host), record.role_name, password)
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
        self, host: HostRecord, plan: Plan, request: CreateDatabase, requester: Requester, password: str
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
            record = self._claim_pooled(candidate, plan, request, requester, password)
            if record is not None:
                return record

    def _claim_pooled(
        self, record: DatabaseRecord, plan: Plan, request: CreateDatabase, requester: Requester, password: str
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
            record,
            [
                DatabaseRecord.status.set(FAILED),
                DatabaseRecord.failure.set("discarded from the pool"),
                DatabaseRecord.ended_at.set(now),
                DatabaseRecord.updated_at.set(now),
                DatabaseRecord.secret.remove(),
                DatabaseRecord.secret_key_id.remove(),
                DatabaseRecord.expires_at.set(self._tombstone_ttl(now)),
                DatabaseRecord.due_bucket.set(FAILED),
                DatabaseRecord.due_at.set(self._lease_until(now)),
            ],
            DatabaseRecord.status == POOLED,
        )
        if not taken:
            return False
        postgres.drop_tenant(self._target(host), record.role_name, record.db_name)
        self.finish_cleanup(record)
        return True
