"""All configuration, read once from the environment.

Every limit and knob lives here; other modules take a `Settings` and never
read `os.environ` themselves. The README's configuration table mirrors
`ENVIRONMENT` below.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

from chalicelib import envparse

# Plans live in chalicelib.plans; imported from here as they always were.
from chalicelib.plans import FREE_PLAN as FREE_PLAN
from chalicelib.plans import TRIAL_PLAN as TRIAL_PLAN
from chalicelib.plans import Plan as Plan
from chalicelib.plans import from_settings as plans_from_settings

# `import app` must work without configuration; a deployment sets the real ARN.
STREAM_ARN_PLACEHOLDER = "arn:aws:dynamodb:us-east-2:000000000000:table/instapg-databases/stream/unset"


@dataclass(frozen=True)
class Settings:
    stage: str
    region: str
    table_prefix: str
    dynamodb_endpoint: str | None
    public_url: str | None
    keyring: str = field(repr=False)
    keyring_secret_arn: str | None
    name_prefix: str
    plans: Mapping[str, Plan]
    tombstone_ttl_s: int
    provisioning_timeout_s: int
    max_body_bytes: int
    pg_connect_timeout_s: int
    creates_per_minute: int
    creates_per_day: int
    max_unclaimed_per_host: int
    idempotency_ttl_s: int
    # Expiry and cleanup (chalicelib.expiry).
    stream_arn: str = ""
    purge_rate_minutes: int = 1
    purge_time_fraction: float = 0.8
    orphan_grace_s: int = 3600
    local_purge_interval_s: int = 15
    purge_sessions_per_host: int = 16
    local_ttl_sweep_s: int = 5
    local_logical_replication: bool = True
    open_signup: bool = True
    # The warm pool and multi-host placement (chalicelib.pool, chalicelib.hosts).
    pool_size: int = 10
    host_retry_s: int = 30
    # Logical replication (chalicelib.replication): the scheduled job's bounds.
    slots_per_database: int = 2
    slot_max_retained_mb: int = 1024
    keep_physical_slots: tuple[str, ...] = ()
    # TLS to the hosts (chalicelib.hosts.target): a CA bundle means verify-full.
    pg_sslrootcert: str | None = None
    # Web hardening (chalicelib.web): origins whose browser requests pass the
    # cross-site check, failed authentications per IP and hour, and whether
    # a claim needs the creator token (not only the id).
    allowed_origins: tuple[str, ...] = ()
    auth_failures_per_hour: int = 30
    # The operator's dashboard (chalicelib.operators): how long a login lasts.
    admin_session_s: int = 1800
    claim_requires_token: bool = False
    # Running in Lambda (AWS_LAMBDA_FUNCTION_NAME): INSTAPG_PUBLIC_URL is required.
    deployed: bool = False
    # Timeouts and deadlines (chalicelib.reliability).
    request_deadline_s: int = 10
    pg_statement_timeout_s: int = 60
    aws_connect_timeout_s: int = 2
    aws_read_timeout_s: int = 2
    aws_max_attempts: int = 2
    # Copies (chalicelib.copies) and regions (chalicelib.hosts), issue 18.
    databases_per_account: int = 10
    copy_strategy: str = "file_copy"
    copy_deadline_s: int = 15
    default_region: str = "us-east-2"

    def plan(self, name: str) -> Plan:
        return self.plans[name]

    def table_name(self, suffix: str) -> str:
        return f"{self.table_prefix}-{suffix}"


# name, default, description: the README table is generated from this list
# (`python -m tools.dev.configdoc`), so the two cannot drift apart.
ENVIRONMENT: list[tuple[str, str, str]] = [
    ("INSTAPG_STAGE", "prod", "Stage name; `dev` for the local stack."),
    ("AWS_REGION", "us-east-2", "Region of the DynamoDB tables (falls back to AWS_DEFAULT_REGION)."),
    (
        "INSTAPG_TABLE_PREFIX",
        "instapg",
        "Prefix of the DynamoDB table names (`<prefix>-databases`, `-hosts`, `-counters`, `-idempotency`).",
    ),
    ("INSTAPG_DYNAMODB_ENDPOINT", "", "DynamoDB endpoint URL; empty for AWS, moto's server locally."),
    (
        "INSTAPG_PUBLIC_URL",
        "",
        "Public base URL (`https://host[:port][/path]`) for `claim_url` and the cross-site check; required when deployed "
        "(in Lambda every request answers 503 without it); empty locally: a sane `Host` header, else `http://localhost`.",
    ),
    (
        "INSTAPG_ALLOWED_ORIGINS",
        "",
        "Comma-separated origins (`https://app.example.com`) whose browser requests pass the cross-site check "
        "and get `Access-Control-Allow-Origin`; every other site's browser POST/DELETE is a 403.",
    ),
    (
        "INSTAPG_KEYRING",
        "",
        "Credential encryption keys, `kid:base64key,...` (32-byte keys); the first is primary, the rest only decrypt.",
    ),
    (
        "INSTAPG_KEYRING_SECRET_ARN",
        "",
        "Secrets Manager secret holding the key ring (production); when set, INSTAPG_KEYRING is ignored.",
    ),
    (
        "INSTAPG_NAME_PREFIX",
        "ipg",
        "Prefix of tenant role and database names (1-31 lower-case letters, digits or _); reconciliation only ever "
        "touches names with it.",
    ),
    ("INSTAPG_UNCLAIMED_LIFETIME_SECONDS", "259200", "How long an unclaimed database lives (72 hours)."),
    ("INSTAPG_UNCLAIMED_STORAGE_MB", "100", "Storage limit of an unclaimed database."),
    ("INSTAPG_UNCLAIMED_CONNECTIONS", "5", "Connection limit of an unclaimed database's role."),
    ("INSTAPG_UNCLAIMED_STATEMENT_TIMEOUT_SECONDS", "300", "Longest statement an unclaimed tenant may run."),
    (
        "INSTAPG_UNCLAIMED_IDLE_IN_TRANSACTION_SECONDS",
        "60",
        "An unclaimed tenant's session idle inside a transaction longer than this is ended.",
    ),
    ("INSTAPG_UNCLAIMED_TEMP_FILE_LIMIT_MB", "1024", "temp_file_limit of an unclaimed tenant role (where settable)."),
    (
        "INSTAPG_UNCLAIMED_TRANSFER_MB",
        "1024",
        "Bytes in plus out through the pooler an unclaimed database may move per calendar month (UTC) "
        "before the scheduled job locks it.",
    ),
    ("INSTAPG_CLAIMED_STORAGE_MB", "512", "Storage limit of a claimed database."),
    ("INSTAPG_CLAIMED_CONNECTIONS", "20", "Connection limit of a claimed database's role."),
    ("INSTAPG_CLAIMED_STATEMENT_TIMEOUT_SECONDS", "3600", "Longest statement a claimed tenant may run."),
    (
        "INSTAPG_CLAIMED_IDLE_IN_TRANSACTION_SECONDS",
        "600",
        "A claimed tenant's session idle inside a transaction longer than this is ended.",
    ),
    ("INSTAPG_CLAIMED_TEMP_FILE_LIMIT_MB", "4096", "temp_file_limit of a claimed tenant role (where settable)."),
    (
        "INSTAPG_CLAIMED_TRANSFER_MB",
        "10240",
        "Bytes in plus out through the pooler a claimed database may move per calendar month (UTC).",
    ),
    (
        "INSTAPG_TOMBSTONE_TTL_SECONDS",
        "604800",
        "How long an EXPIRED/DELETED/FAILED record is kept so GET can say 410 (7 days).",
    ),
    (
        "INSTAPG_PROVISIONING_TIMEOUT_SECONDS",
        "600",
        "A record still PROVISIONING after this long is considered crashed.",
    ),
    ("INSTAPG_MAX_BODY_BYTES", "16384", "Largest request body accepted (413 above)."),
    ("INSTAPG_PG_CONNECT_TIMEOUT_SECONDS", "5", "Connect timeout for the service's connections to Postgres hosts."),
    (
        "INSTAPG_PG_SSLROOTCERT",
        "",
        "CA bundle (a path; relative to the app's folder) the service's own connections to hosts verify against "
        "with sslmode=verify-full: `chalicelib/certs/rds-ca-bundle.pem` in production (`make rds-ca`). "
        "Empty: each host's own sslmode. Tenants' connection strings keep the host's sslmode either way.",
    ),
    (
        "INSTAPG_PG_STATEMENT_TIMEOUT_SECONDS",
        "60",
        "statement_timeout of the service's own Postgres sessions; during an API request cut to the time left before its deadline.",
    ),
    (
        "INSTAPG_REQUEST_DEADLINE_SECONDS",
        "10",
        "Every API request answers within this (503 with Retry-After when a dependency is down); keep it below the API function's timeout.",
    ),
    ("INSTAPG_AWS_CONNECT_TIMEOUT_SECONDS", "2", "Connect timeout of every DynamoDB and Secrets Manager call."),
    ("INSTAPG_AWS_READ_TIMEOUT_SECONDS", "2", "Read timeout of every DynamoDB and Secrets Manager call."),
    ("INSTAPG_AWS_MAX_ATTEMPTS", "2", "Attempts per AWS call, the first included (standard retry mode)."),
    ("INSTAPG_CREATES_PER_MINUTE", "10", "Creates allowed per client IP per minute (429 above)."),
    ("INSTAPG_CREATES_PER_DAY", "100", "Creates allowed per client IP per UTC day (429 above)."),
    (
        "INSTAPG_MAX_UNCLAIMED_PER_HOST",
        "500",
        "Live unclaimed databases one host may carry; creates beyond it on every host get 503 No capacity.",
    ),
    (
        "INSTAPG_AUTH_FAILURES_PER_HOUR",
        "30",
        "Failed authentications (API key or creator token) allowed per client IP per clock hour; then 429 with Retry-After.",
    ),
    (
        "INSTAPG_ADMIN_SESSION_SECONDS",
        "1800",
        "How long an operator's dashboard login lasts (the signed session cookie); revoking the key ends it sooner.",
    ),
    (
        "INSTAPG_CLAIM_REQUIRES_TOKEN",
        "false",
        "`true`: claiming an unclaimed database needs its creator token besides an API key (the id alone no longer "
        "claims; breaks Neon's get-db, whose claim link carries only the id).",
    ),
    ("INSTAPG_IDEMPOTENCY_TTL_SECONDS", "86400", "How long an Idempotency-Key returns the first result (24 hours)."),
    (
        "INSTAPG_STREAM_ARN",
        STREAM_ARN_PLACEHOLDER,
        "Stream ARN of the databases table; read at `chalice package` time for the REMOVE handler.",
    ),
    (
        "INSTAPG_PURGE_RATE_MINUTES",
        "1",
        "How often the scheduled job runs (EventBridge rate, minutes); a run works at most this long. "
        "With the drop backoff's 90 s cap, leftovers go within 2.5 minutes of their host's return.",
    ),
    (
        "INSTAPG_PURGE_TIME_FRACTION",
        "0.8",
        "A purge run (and the stream handler's pool refill) stops taking new work after this fraction of the Lambda's remaining time.",
    ),
    (
        "INSTAPG_PURGE_SESSIONS_PER_HOST",
        "16",
        "Admin sessions a purge run opens per host to drop databases in parallel (each DROP DATABASE waits for a "
        "checkpoint; parallel drops share one). They count against the host's `max_connections` during a run.",
    ),
    (
        "INSTAPG_ORPHAN_GRACE_SECONDS",
        "3600",
        "A prefixed database or role no record references is dropped once reconciliation has seen it this long "
        "(never one marked claimed); keep it above the table's worst replication or restore lag.",
    ),
    (
        "INSTAPG_LOCAL_PURGE_INTERVAL_SECONDS",
        "15",
        "Local stack only (`chalice local` runs no schedules): seconds between purge runs.",
    ),
    ("INSTAPG_LOCAL_LOGICAL_REPLICATION", "1", "Local stack only: 1 starts the replication gateway beside PgBouncer and registers the embedded host as offering logical replication through it (physical commands refused: docs/replication.md); 0 offers none."),
    ("INSTAPG_LOCAL_TTL_SWEEP_SECONDS", "5", "Local stack only (moto never expires items): seconds between its emulation of DynamoDB's TTL deletion, whose REMOVE stream records go to the same `drop_removed` handler as in production."),
    ("INSTAPG_LOGICAL_SLOTS_PER_DATABASE", "2", "Replication slots a database with logical replication may keep; the scheduled job drops the extra ones (inactive first) with an audit event."),
    ("INSTAPG_LOGICAL_SLOT_MAX_RETAINED_MB", "1024", "A tenant's replication slot keeping more WAL than this (its consumer lags or is gone) is dropped by the scheduled job, with an audit event, before it fills the host's disk."),
    ("INSTAPG_KEEP_PHYSICAL_SLOTS", "", "Comma-separated name prefixes of the operator's own physical slots on logical-replication hosts; every other physical slot there is dropped by the scheduled job (tenants may not keep one: docs/replication.md)."),
    (
        "INSTAPG_OPEN_SIGNUP",
        "true",
        "`true`: anyone may create an account (POST /api/v1/accounts, the claim page); "
        "`false`: only `python -m tools.ops.accountctl create` does.",
    ),
    (
        "INSTAPG_POOL_SIZE",
        "10",
        "Ready (POOLED) databases kept on each active host, topped up right after creates take from it (stream handler) and by the scheduled job; 0 turns the warm pool off.",
    ),
    (
        "INSTAPG_DATABASES_PER_ACCOUNT",
        "10",
        "Live databases one account may own (claimed ones and copies); a copy beyond it is a 403.",
    ),
    (
        "INSTAPG_COPY_STRATEGY",
        "file_copy",
        "How CREATE DATABASE ... TEMPLATE copies a database (PostgreSQL 15+): `file_copy` (files copied, two "
        "checkpoints) or `wal_log` (through the WAL, no checkpoint; 2.6x slower at 500 MB here); docs/copies.md.",
    ),
    (
        "INSTAPG_COPY_DEADLINE_SECONDS",
        "15",
        "A copy or reset runs in its request for at most this long (instead of INSTAPG_REQUEST_DEADLINE_SECONDS; "
        "a 509 MB copy took 7.6 s here); keep it below the API function's timeout (20 s).",
    ),
    (
        "INSTAPG_DEFAULT_REGION",
        "",
        "Region of a host registered without `--region` and of a create that names none; empty: the AWS region.",
    ),
    (
        "INSTAPG_HOST_RETRY_SECONDS",
        "30",
        "After a host fails to answer, how long one process skips it when placing new databases.",
    ),
]
_DEFAULTS = {name: default for name, default, _ in ENVIRONMENT}


def _int(env: Mapping[str, str], name: str) -> int:
    return envparse.integer(name, env.get(name) or _DEFAULTS[name])


def _bool(env: Mapping[str, str], name: str) -> bool:
    return envparse.boolean(name, env.get(name) or _DEFAULTS[name])


def _fraction(env: Mapping[str, str], name: str) -> float:
    return envparse.fraction(name, env.get(name) or _DEFAULTS[name])


def _name_prefix(raw: str) -> str:
    # Tenant names are <prefix>_<26 chars>, and a replicating tenant's companion adds "_repl":
    # 31 characters keep that within Postgres's 63 (chalicelib.replication; the gateway checks the same shape).
    if not re.fullmatch(r"[a-z][a-z0-9_]{0,30}", raw):
        raise ValueError(f"INSTAPG_NAME_PREFIX must be 1-31 lower-case letters, digits or _, starting with a letter, got {raw!r}")
    return raw


def load(env: Mapping[str, str] | None = None) -> Settings:
    """Build settings from an environment mapping (os.environ by default)."""
    env = os.environ if env is None else env

    def get(name: str) -> str:
        return env.get(name) or _DEFAULTS[name]

    plans = plans_from_settings(lambda name: _int(env, name))
    region = env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or _DEFAULTS["AWS_REGION"]
    return Settings(
        stage=get("INSTAPG_STAGE"),
        region=region,
        table_prefix=get("INSTAPG_TABLE_PREFIX"),
        dynamodb_endpoint=env.get("INSTAPG_DYNAMODB_ENDPOINT") or None,
        public_url=envparse.public_url(env.get("INSTAPG_PUBLIC_URL") or ""),
        keyring=env.get("INSTAPG_KEYRING", ""),
        keyring_secret_arn=env.get("INSTAPG_KEYRING_SECRET_ARN") or None,
        name_prefix=_name_prefix(get("INSTAPG_NAME_PREFIX")),
        plans=plans,
        tombstone_ttl_s=_int(env, "INSTAPG_TOMBSTONE_TTL_SECONDS"),
        provisioning_timeout_s=_int(env, "INSTAPG_PROVISIONING_TIMEOUT_SECONDS"),
        max_body_bytes=_int(env, "INSTAPG_MAX_BODY_BYTES"),
        pg_connect_timeout_s=_int(env, "INSTAPG_PG_CONNECT_TIMEOUT_SECONDS"),
        creates_per_minute=_int(env, "INSTAPG_CREATES_PER_MINUTE"),
        creates_per_day=_int(env, "INSTAPG_CREATES_PER_DAY"),
        max_unclaimed_per_host=_int(env, "INSTAPG_MAX_UNCLAIMED_PER_HOST"),
        idempotency_ttl_s=_int(env, "INSTAPG_IDEMPOTENCY_TTL_SECONDS"),
        stream_arn=get("INSTAPG_STREAM_ARN"),
        purge_rate_minutes=_int(env, "INSTAPG_PURGE_RATE_MINUTES"),
        purge_time_fraction=_fraction(env, "INSTAPG_PURGE_TIME_FRACTION"),
        orphan_grace_s=_int(env, "INSTAPG_ORPHAN_GRACE_SECONDS"),
        local_purge_interval_s=_int(env, "INSTAPG_LOCAL_PURGE_INTERVAL_SECONDS"),
        purge_sessions_per_host=max(1, _int(env, "INSTAPG_PURGE_SESSIONS_PER_HOST")),
        local_ttl_sweep_s=_int(env, "INSTAPG_LOCAL_TTL_SWEEP_SECONDS"),
        local_logical_replication=_bool(env, "INSTAPG_LOCAL_LOGICAL_REPLICATION"),
        slots_per_database=_int(env, "INSTAPG_LOGICAL_SLOTS_PER_DATABASE"),
        slot_max_retained_mb=_int(env, "INSTAPG_LOGICAL_SLOT_MAX_RETAINED_MB"),
        keep_physical_slots=tuple(filter(None, (p.strip() for p in get("INSTAPG_KEEP_PHYSICAL_SLOTS").split(",")))),
        open_signup=_bool(env, "INSTAPG_OPEN_SIGNUP"),
        pool_size=_int(env, "INSTAPG_POOL_SIZE"),
        host_retry_s=_int(env, "INSTAPG_HOST_RETRY_SECONDS"),
        pg_sslrootcert=envparse.app_path(env.get("INSTAPG_PG_SSLROOTCERT") or ""),
        allowed_origins=envparse.origins(env.get("INSTAPG_ALLOWED_ORIGINS") or ""),
        auth_failures_per_hour=_int(env, "INSTAPG_AUTH_FAILURES_PER_HOUR"),
        admin_session_s=_int(env, "INSTAPG_ADMIN_SESSION_SECONDS"),
        claim_requires_token=_bool(env, "INSTAPG_CLAIM_REQUIRES_TOKEN"),
        deployed=bool(env.get("AWS_LAMBDA_FUNCTION_NAME")),
        request_deadline_s=_int(env, "INSTAPG_REQUEST_DEADLINE_SECONDS"),
        pg_statement_timeout_s=_int(env, "INSTAPG_PG_STATEMENT_TIMEOUT_SECONDS"),
        aws_connect_timeout_s=_int(env, "INSTAPG_AWS_CONNECT_TIMEOUT_SECONDS"),
        aws_read_timeout_s=_int(env, "INSTAPG_AWS_READ_TIMEOUT_SECONDS"),
        aws_max_attempts=_int(env, "INSTAPG_AWS_MAX_ATTEMPTS"),
        databases_per_account=_int(env, "INSTAPG_DATABASES_PER_ACCOUNT"),
        copy_strategy=envparse.copy_strategy(get("INSTAPG_COPY_STRATEGY")),
        copy_deadline_s=_int(env, "INSTAPG_COPY_DEADLINE_SECONDS"),
        default_region=(env.get("INSTAPG_DEFAULT_REGION") or "").strip() or region,
    )
