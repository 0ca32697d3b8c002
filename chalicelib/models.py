"""pynamodb models: the service's metadata in DynamoDB.

Table names and the endpoint come from settings at run time through
`configure()`, not at class definition, so tests and the local stack can point
the same classes at moto.
"""

from __future__ import annotations

import threading

from pynamodb.attributes import (
    BinaryAttribute,
    BooleanAttribute,
    NumberAttribute,
    TTLAttribute,
    UnicodeAttribute,
    UTCDateTimeAttribute,
)
from pynamodb.connection import Connection, TableConnection
from pynamodb.indexes import AllProjection, GlobalSecondaryIndex, IncludeProjection
from pynamodb.models import Model

from chalicelib.settings import Settings

# Database statuses. Only chalicelib.records and chalicelib.tombstones change them.
PROVISIONING = "PROVISIONING"
UNCLAIMED = "UNCLAIMED"
CLAIMED = "CLAIMED"
EXPIRED = "EXPIRED"
DELETED = "DELETED"
FAILED = "FAILED"
# Claim and delete are two-step (DynamoDB, then Postgres, then DynamoDB): these
# mark a record between the steps, so a retry (or a sweep) can finish it.
CLAIMING = "CLAIMING"
DELETING = "DELETING"
# A ready database in the warm pool: no public id handed out yet, role NOLOGIN.
POOLED = "POOLED"
TOMBSTONES = frozenset({EXPIRED, DELETED, FAILED})

# Host statuses.
HOST_ACTIVE = "ACTIVE"
HOST_DRAINING = "DRAINING"


class DueIndex(GlobalSecondaryIndex):
    """Sparse index of records that need the scheduled job at some time.

    `due_bucket` is the status that makes a record due (UNCLAIMED: expiry;
    PROVISIONING: the provisioning timeout; POOLED#<host>: the warm pool of a
    host, oldest first) and `due_at` the epoch second it
    falls due, so the purge queries `due_bucket = X AND due_at <= now` with no
    scan. Records in no bucket (claimed, tombstones) are not in the index.
    """

    class Meta:
        index_name = "by_due"
        projection = AllProjection()
        billing_mode = "PAY_PER_REQUEST"

    due_bucket = UnicodeAttribute(hash_key=True)
    due_at = NumberAttribute(range_key=True)


class HostIndex(GlobalSecondaryIndex):
    """Every record by host and database name, for reconciliation and the unclaimed cap.

    Reconciliation compares a host's catalog with the names records on that
    host still reference; this index answers with one paginated query per
    host instead of a table scan. It carries only what that decision needs,
    which includes the status the unclaimed cap (chalicelib.abuse) counts by
    on a host near the cap.
    """

    class Meta:
        index_name = "by_host"
        projection = IncludeProjection(["status", "role_name", "due_bucket"])
        billing_mode = "PAY_PER_REQUEST"

    host_id = UnicodeAttribute(hash_key=True)
    db_name = UnicodeAttribute(range_key=True)


class OwnerIndex(GlobalSecondaryIndex):
    """Sparse index of claimed databases by owner, oldest first (ids are uuid7)."""

    class Meta:
        index_name = "by_owner"
        projection = AllProjection()
        billing_mode = "PAY_PER_REQUEST"

    owner_id = UnicodeAttribute(hash_key=True)
    id = UnicodeAttribute(range_key=True)


class DatabaseRecord(Model):
    class Meta:
        table_name = "instapg-databases"
        billing_mode = "PAY_PER_REQUEST"
        stream_view_type = "NEW_AND_OLD_IMAGES"

    id = UnicodeAttribute(hash_key=True)
    status = UnicodeAttribute()
    plan = UnicodeAttribute()
    host_id = UnicodeAttribute()
    role_name = UnicodeAttribute()
    db_name = UnicodeAttribute()
    # AES-GCM sealed tenant password (chalicelib.crypto); never plaintext.
    secret_key_id = UnicodeAttribute(null=True)
    secret = BinaryAttribute(legacy_encoding=False, null=True)
    logical_replication = BooleanAttribute(default=False)
    ref = UnicodeAttribute(null=True)
    created_ip = UnicodeAttribute(null=True)
    user_agent = UnicodeAttribute(null=True)
    created_at = UTCDateTimeAttribute()
    updated_at = UTCDateTimeAttribute()
    # DynamoDB TTL: when an unclaimed database (or later its tombstone) goes.
    expires_at = TTLAttribute(null=True)
    ended_at = UTCDateTimeAttribute(null=True)
    failure = UnicodeAttribute(null=True)
    due_bucket = UnicodeAttribute(null=True)
    due_at = NumberAttribute(null=True)
    by_due = DueIndex()
    # Quotas (chalicelib.quotas): the last measured size, and a lock the
    # scheduled job set (role NOLOGIN) with why, e.g. "storage".
    size_bytes = NumberAttribute(null=True)
    size_checked_at = UTCDateTimeAttribute(null=True)
    locked_reason = UnicodeAttribute(null=True)
    locked_at = UTCDateTimeAttribute(null=True)
    # Transfer through the pooler (chalicelib.metering): bytes in/out this
    # period (a UTC month, "2026-12"), and the pooler's counters at the last
    # reading, which each reading's delta is taken against (in the same write).
    transfer_period = UnicodeAttribute(null=True)
    transfer_in_bytes = NumberAttribute(null=True)
    transfer_out_bytes = NumberAttribute(null=True)
    transfer_checked_at = UTCDateTimeAttribute(null=True)
    pooler_seen_in = NumberAttribute(null=True)
    pooler_seen_out = NumberAttribute(null=True)
    by_host = HostIndex()
    # Issue 4 (claiming): the owning account once a claim started, and when it ended.
    owner_id = UnicodeAttribute(null=True)
    claimed_at = UTCDateTimeAttribute(null=True)
    by_owner = OwnerIndex()
    # Issue 19: SHA-256 of the creator token handed out once at create time
    # (never the token itself); it proves the creator to claim and to delete early.
    creator_token_hash = UnicodeAttribute(null=True)
    # The role's SCRAM verifier, sealed as the password is: what the pooler's
    # auth source needs to publish the tenant again (a claim's new pool size,
    # an unlock, a reconciliation) with exactly the verifier Postgres stores.
    verifier_key_id = UnicodeAttribute(null=True)
    verifier_secret = BinaryAttribute(legacy_encoding=False, null=True)
    # Failed drops of a tombstone so far: the next retry's backoff (tombstones.retry_later).
    drop_attempts = NumberAttribute(null=True)
    # Issue 18 §2: a copy's source database (its id); a reset copies it again.
    source_id = UnicodeAttribute(null=True)


class HostRecord(Model):
    """A Postgres host that carries tenant databases."""

    class Meta:
        table_name = "instapg-hosts"
        billing_mode = "PAY_PER_REQUEST"

    id = UnicodeAttribute(hash_key=True)
    status = UnicodeAttribute(default=HOST_ACTIVE)
    hostname = UnicodeAttribute()
    port = NumberAttribute(default=5432)
    # The host's PgBouncer (chalicelib.pooler), when it has one: the endpoint
    # clients reach, its admin console as the service reaches it, the admin's
    # credentials (a source as `credentials`), where its entries are written
    # ("file:<folder>"), and the sslmode of its strings.
    pooler_hostname = UnicodeAttribute(null=True)
    pooler_port = NumberAttribute(null=True)
    pooler_admin_hostname = UnicodeAttribute(null=True)
    pooler_admin_port = NumberAttribute(null=True)
    pooler_credentials = UnicodeAttribute(null=True)
    pooler_store = UnicodeAttribute(null=True)
    pooler_sslmode = UnicodeAttribute(null=True)
    # Postgres is not reachable by clients (RDS in a private subnet): the
    # direct string is the pooler's session-mode entry instead.
    postgres_private = BooleanAttribute(default=False)
    sslmode = UnicodeAttribute(default="require")
    # Where the admin credentials live: "env:VAR" or "secretsmanager:ARN"; the
    # value is JSON {"username": ..., "password": ...} (RDS's secret format).
    credentials = UnicodeAttribute()
    admin_dbname = UnicodeAttribute(default="postgres")
    capacity = NumberAttribute()
    # Databases placed on the host and not yet dropped; raised with a
    # conditional write so that two creates cannot both take the last slot.
    allocated = NumberAttribute(default=0)
    logical_replication = BooleanAttribute(default=False)
    # The replication gateway clients reach for `replication=database`
    # (tools/replication/gateway.py; docs/replication.md), and its sslmode.
    replication_hostname = UnicodeAttribute(null=True)
    replication_port = NumberAttribute(null=True)
    replication_sslmode = UnicodeAttribute(null=True)
    # Issue 18 §5: where the host runs; None (hosts registered before regions) means settings.default_region.
    region = UnicodeAttribute(null=True)
    created_at = UTCDateTimeAttribute()
    # Epoch seconds until which one process tops up this host's warm pool
    # (`hosts.lease_refill`): two refills at once would both fill the gap.
    refill_until = NumberAttribute(null=True)


class RateCounter(Model):
    """Creates per client IP in one UTC day, raised with one atomic ADD per create.

    `key` is "<day start epoch>#<ip>"; `count` counts the day. The minutes of
    the day are counted in the same item, in attributes named "m<minute of the
    day>" that the model does not declare (see `abuse.Guard.check_rate`), so
    one UpdateItem counts both windows. The item expires by TTL soon after its
    day ends, so the table never grows.
    """

    class Meta:
        table_name = "instapg-counters"
        billing_mode = "PAY_PER_REQUEST"

    key = UnicodeAttribute(hash_key=True)
    count = NumberAttribute(default=0)
    expires_at = TTLAttribute(null=True)


class IdempotencyRecord(Model):
    """An Idempotency-Key seen on POST /api/v1/database: which database it made.

    Keyed by a hash of (client IP, key), so the raw key is not stored; holds
    only the database id: the response is rebuilt from the database record.
    `body_hash` (SHA-256 of the canonical request) tells a retry from a
    different request under the same key; items written before it existed have none.
    """

    class Meta:
        table_name = "instapg-idempotency"
        billing_mode = "PAY_PER_REQUEST"

    key_hash = UnicodeAttribute(hash_key=True)
    database_id = UnicodeAttribute()
    body_hash = UnicodeAttribute(null=True)
    created_at = UTCDateTimeAttribute()
    expires_at = TTLAttribute()


class OrphanSighting(Model):
    """When reconciliation first saw a prefixed name on a host that no record references.

    A non-superuser admin cannot read when a database or role was created
    (pg_stat_file needs superuser), so the age of an orphan is measured from
    its first sighting; it is dropped only after the grace period.
    """

    class Meta:
        table_name = "instapg-orphans"
        billing_mode = "PAY_PER_REQUEST"

    host_id = UnicodeAttribute(hash_key=True)
    name = UnicodeAttribute(range_key=True)
    first_seen = UTCDateTimeAttribute()
    # Sightings of names that went away on their own are cleaned up by TTL too.
    expires_at = TTLAttribute(null=True)


# Account statuses.
ACCOUNT_ACTIVE = "ACTIVE"
ACCOUNT_REVOKED = "REVOKED"


class AccountRecord(Model):
    """Someone who can own databases. Authenticates with API keys (ApiKeyRecord)."""

    class Meta:
        table_name = "instapg-accounts"
        billing_mode = "PAY_PER_REQUEST"

    id = UnicodeAttribute(hash_key=True)
    email = UnicodeAttribute()
    status = UnicodeAttribute(default=ACCOUNT_ACTIVE)
    created_at = UTCDateTimeAttribute()
    revoked_at = UTCDateTimeAttribute(null=True)


class ApiKeyRecord(Model):
    """An API key, keyed by its SHA-256 so a request finds it with one consistent read.

    The key itself (256 random bits) is shown once and never stored; a hash
    without salt or stretching is enough because the key is not guessable.
    """

    class Meta:
        table_name = "instapg-api-keys"
        billing_mode = "PAY_PER_REQUEST"

    key_hash = UnicodeAttribute(hash_key=True)
    account_id = UnicodeAttribute()
    created_at = UTCDateTimeAttribute()
    revoked_at = UTCDateTimeAttribute(null=True)


class AuditEvent(Model):
    """What happened to a database, newest first by `event_id` (a uuid7, so time-ordered)."""

    class Meta:
        table_name = "instapg-audit"
        billing_mode = "PAY_PER_REQUEST"

    database_id = UnicodeAttribute(hash_key=True)
    event_id = UnicodeAttribute(range_key=True)
    action = UnicodeAttribute()
    at = UTCDateTimeAttribute()
    actor = UnicodeAttribute()  # an account id, "anonymous" or "system"
    ip = UnicodeAttribute(null=True)
    detail = UnicodeAttribute(null=True)


class OperatorKeyRecord(Model):
    """An operator key (the dashboard's credential), keyed by its SHA-256 like ApiKeyRecord.

    A table of its own: an account key is never looked up here, nor an
    operator key in `api-keys`, so neither can stand in for the other.
    `key_id` (the hash's first 12 hex digits) names the key in audit events
    and to `tools.ops.operatorctl revoke`.
    """

    class Meta:
        table_name = "instapg-operator-keys"
        billing_mode = "PAY_PER_REQUEST"

    key_hash = UnicodeAttribute(hash_key=True)
    key_id = UnicodeAttribute()
    name = UnicodeAttribute()
    created_at = UTCDateTimeAttribute()
    revoked_at = UTCDateTimeAttribute(null=True)


class UsageDay(Model):
    """One database's usage on one UTC day (chalicelib.usage), written by the scheduled job.

    Kept about a month: DynamoDB's TTL removes a day USAGE_KEEP_DAYS after it
    (deleted within a few days of that), so the table's size is bounded by
    live databases x ~30.
    """

    class Meta:
        table_name = "instapg-usage"
        billing_mode = "PAY_PER_REQUEST"

    database_id = UnicodeAttribute(hash_key=True)
    day = UnicodeAttribute(range_key=True)  # "2026-12-02"
    size_bytes = NumberAttribute(null=True)  # the last sample of the day
    connections_peak = NumberAttribute(null=True)  # highest of the day's samples (one per run)
    transfer_in_bytes = NumberAttribute(null=True)
    transfer_out_bytes = NumberAttribute(null=True)
    expires_at = TTLAttribute(null=True)


MODELS: tuple[type[Model], ...] = (
    DatabaseRecord,
    HostRecord,
    OrphanSighting,
    RateCounter,
    IdempotencyRecord,
    AccountRecord,
    ApiKeyRecord,
    AuditEvent,
    OperatorKeyRecord,
    UsageDay,
)
# One botocore client for every model. pynamodb gives each model its own
# Connection, so each model's first call built a botocore session and client
# and parsed DynamoDB's service model again (~0.1 s each on a quiet machine,
# several per cold start: the first create touches four tables).
_shared: dict[tuple, Connection] = {}
_shared_lock = threading.Lock()


def _get_connection(cls: type[Model]) -> TableConnection:
    table = Model._get_connection.__func__(cls)  # pynamodb's, cached per model until `configure`
    meta = cls.Meta
    key = (meta.host, meta.region, meta.connect_timeout_seconds, meta.read_timeout_seconds, meta.max_retry_attempts)
    with _shared_lock:
        shared = _shared.setdefault(key, table.connection)
        if table.connection is not shared:
            if cls.Meta.table_name not in shared._tables:
                shared.add_meta_table(table.connection.get_meta_table(cls.Meta.table_name))
            table.connection = shared
    return table


for _model in MODELS:
    _model._get_connection = classmethod(_get_connection)

_SUFFIXES = {
    DatabaseRecord: "databases",
    HostRecord: "hosts",
    OrphanSighting: "orphans",
    RateCounter: "counters",
    IdempotencyRecord: "idempotency",
    AccountRecord: "accounts",
    ApiKeyRecord: "api-keys",
    AuditEvent: "audit",
    OperatorKeyRecord: "operator-keys",
    UsageDay: "usage",
}


def configure(settings: Settings) -> None:
    """Point every model at the tables and endpoint that `settings` name."""
    for model in MODELS:
        meta = model.Meta
        wanted = (
            settings.table_name(_SUFFIXES[model]),
            settings.dynamodb_endpoint,
            settings.region,
            # Bounded waits (chalicelib.reliability): pynamodb builds its botocore Config from these.
            settings.aws_connect_timeout_s,
            settings.aws_read_timeout_s,
            settings.aws_max_attempts - 1,
        )
        fields = (
            "table_name",
            "host",
            "region",
            "connect_timeout_seconds",
            "read_timeout_seconds",
            "max_retry_attempts",
        )
        if tuple(getattr(meta, name, None) for name in fields) == wanted:
            # Same table, endpoint and timeouts: keep the connection (a new one
            # builds a botocore session, ~0.1 s a model; tests configure once a test).
            continue
        for name, value in zip(fields, wanted, strict=True):
            setattr(meta, name, value)
        model._connection = None


def create_tables(wait: bool = True) -> None:
    """Create missing tables with TTL enabled (local stack and tests; see tools/ for AWS)."""
    for model in MODELS:
        if not model.exists():
            model.create_table(wait=wait, billing_mode="PAY_PER_REQUEST")
