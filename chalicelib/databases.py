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
from chalicelib import postgres
from chalicelib.abuse import Guard
from chalicelib.crypto import KeyRing, Sealed
from chalicelib.errors import Conflict, Gone, NotFound, ServiceUnavailable, Unprocessable
from chalicelib.identifiers import tenant_name, tenant_password, uuid7
from chalicelib.models import (
    DELETED,
    EXPIRED,
    FAILED,
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


def _is_conditional_failure(exc: PutError | UpdateError) -> bool:
    return exc.cause_response_code == "ConditionalCheckFailedException"


class DatabaseService:
    def __init__(self, settings: Settings, keyring: KeyRing, hosts: hostlib.HostCache | None = None) -> None:
        self.settings = settings
        self.keyring = keyring
        self.hosts = hosts or hostlib.HostCache()
        self.guard = Guard(settings)

    # -- reading -------------------------------------------------------------

    def find(self, database_id: str) -> DatabaseRecord | None:
        try:
            return DatabaseRecord.get(database_id, consistent_read=True)
        except DatabaseRecord.DoesNotExist:
            return None

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
        """Provision a database; with a client-chosen id, repeat calls return the first one."""
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
        try:
            host = hostlib.reserve(hosts, logical_replication=request.enable_logical_replication)
        except hostlib.NoCapacity:
            self.hosts.invalidate()
            raise ServiceUnavailable(
                "No capacity",
                hint="Every database host is full; try again in a few minutes.",
                headers={"Retry-After": "60"},
            ) from None

        plan = self.settings.plan(UNCLAIMED_PLAN)
        password = tenant_password()
        record = self._new_record(database_id or str(uuid7()), host, plan, request, requester, password)
        try:
            record.save(condition=DatabaseRecord.id.does_not_exist())
        except PutError as exc:
            hostlib.release(host.id)
            if database_id is not None and _is_conditional_failure(exc):
                # Lost a race with the same client-chosen id: answer with the winner.
                return self._existing(self.find(database_id))
            raise

        try:
            postgres.create_tenant(self._target(host), record.role_name, record.db_name, password, plan)
        except Exception as exc:
            self._fail(record, host, exc)
            raise ServiceUnavailable(
                "Database host unavailable",
                hint="Nothing was created; retry in a few seconds.",
                headers={"Retry-After": "5"},
            ) from None

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
        log.info("created database %s on host %s for ref %r", record.id, host.id, record.ref)
        return Provisioned(record, plan, host, password, created=True)

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
        reason = (
            str(cause).splitlines()[0][:200] if isinstance(cause, postgres.HostUnavailable) else type(cause).__name__
        )
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
