"""The host registry: which Postgres hosts carry tenants, and how to reach them.

Placement reserves a slot on a host with one conditional write on the host's
`allocated` counter, so capacity holds under concurrent creates.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from pynamodb.exceptions import UpdateError

from chalicelib import pooler as pooler_mod
from chalicelib import postgres, provisioning, reliability, replication
from chalicelib.models import HOST_ACTIVE, HostRecord
from chalicelib.settings import Settings

log = logging.getLogger(__name__)


class NoCapacity(Exception):
    """No active host has a free slot."""


class CredentialsError(Exception):
    """A host's admin credentials could not be read (message names the source, never the secret)."""


@dataclass(frozen=True)
class Credentials:
    username: str
    password: str = field(repr=False)


def _read_credentials(source: str, settings: Settings) -> Credentials:
    kind, _, ref = source.partition(":")
    if kind == "env":
        raw = os.environ.get(ref)
        if raw is None:
            raise CredentialsError(f"environment variable {ref} is not set")
    elif kind == "secretsmanager":
        import boto3

        client = boto3.client("secretsmanager", config=reliability.botocore_config(settings))
        raw = client.get_secret_value(SecretId=ref)["SecretString"]
    else:
        raise CredentialsError(f"unknown credentials source kind {kind!r} (use env: or secretsmanager:)")
    try:
        data = json.loads(raw)
        return Credentials(username=data["username"], password=data["password"])
    except (ValueError, KeyError, TypeError):
        raise CredentialsError(f"credentials at {source} are not JSON with username and password") from None


# At most one re-read per source in this many seconds, so a host that is down
# does not turn every request into a Secrets Manager call.
REFRESH_MIN_INTERVAL_S = 10.0


class AdminCredentials:
    """Hosts' admin credentials, cached per source (a Context keeps one for the process)."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings  # its AWS timeouts
        self._cache: dict[str, Credentials] = {}
        self._refreshed_at: dict[str, float] = {}
        self._lock = threading.Lock()

    @property
    def settings(self) -> Settings:
        return self._settings

    def get(self, source: str, refresh: bool = False) -> Credentials:
        """Cached per source; `refresh` reads it again (RDS rotates its master secret)."""
        with self._lock:
            if refresh or source not in self._cache:
                self._cache[source] = _read_credentials(source, self._settings)
            return self._cache[source]

    def forget(self, source: str) -> None:
        with self._lock:
            self._cache.pop(source, None)

    def refresher(self, source: str) -> Callable[[], tuple[str, str] | None]:
        def refresh() -> tuple[str, str] | None:
            with self._lock:
                now = time.monotonic()
                due = now - self._refreshed_at.get(source, float("-inf")) >= REFRESH_MIN_INTERVAL_S
                if due:
                    self._refreshed_at[source] = now
            try:
                # Not due: what the last re-read found (another request's, maybe).
                creds = self.get(source, refresh=due)
            except Exception as exc:  # unreadable now: the caller reports its own connect failure
                log.warning("re-reading admin credentials from %s failed: %s", source, type(exc).__name__)
                return None
            return creds.username, creds.password

        return refresh


def target(
    host: HostRecord,
    settings: Settings,
    credentials: AdminCredentials | None = None,
    sessions: postgres.Sessions | None = None,
) -> postgres.Target:
    """How the admin reaches `host`. Without `credentials` (a tool's one-off call) nothing is cached;
    without `sessions` the hot path opens its own connection."""
    credentials = credentials or AdminCredentials(settings)
    creds = credentials.get(host.credentials)
    return postgres.Target(
        host=host.hostname,
        port=int(host.port),
        user=creds.username,
        password=creds.password,
        dbname=host.admin_dbname,
        # With a CA bundle the service checks the host's certificate and name
        # (an impostor on the path learns no admin password); without, the host's own mode.
        sslmode="verify-full" if settings.pg_sslrootcert else host.sslmode,
        sslrootcert=settings.pg_sslrootcert,
        connect_timeout=settings.pg_connect_timeout_s,
        statement_timeout=settings.pg_statement_timeout_s,
        refresh=credentials.refresher(host.credentials),
        sessions=sessions,
    )


def has_pooler(host: HostRecord) -> bool:
    """Whether the service manages a PgBouncer for this host (publishes, revokes, kills)."""
    return bool(host.pooler_hostname and host.pooler_store and host.pooler_credentials)


def pooler(host: HostRecord, credentials: AdminCredentials) -> pooler_mod.Pooler | None:
    """The host's PgBouncer as the service drives it, or None when the host has none.

    `pooler_store` says where its entries are written: "file:<folder>" (the
    files PgBouncer reads, make dev and the tests), or "table" (production: the
    host's `instapg_pooler` table, which the sync loop beside PgBouncer renders;
    chalicelib.poolerstore, docs/scaling.md).
    """
    if not has_pooler(host):
        return None
    kind, _, where = host.pooler_store.partition(":")
    store: pooler_mod.Store
    if kind == "file" and where:
        store = pooler_mod.FileStore(Path(where))
    elif kind == "table" and not where:
        from chalicelib import poolerstore

        store = poolerstore.TableStore(target(host, credentials.settings, credentials))
    else:
        raise CredentialsError(f"host {host.id}: unknown pooler store {kind!r} (use file:<folder> or table)")
    creds = credentials.get(host.pooler_credentials)
    return pooler_mod.Pooler(
        host=host.pooler_hostname,
        port=int(host.pooler_port or 6432),
        admin_user=creds.username,
        admin_password=creds.password,
        store=store,
        admin_host=host.pooler_admin_hostname or host.pooler_hostname,
        admin_port=int(host.pooler_admin_port) if host.pooler_admin_port else None,
        sslmode=pooler_sslmode(host),
        # The certificate names the public endpoint, not the admin one: encrypted, not verified, inside the VPC.
        admin_sslmode="require" if pooler_sslmode(host).startswith("verify") else None,
    )


def pooler_sslmode(host: HostRecord) -> str:
    return host.pooler_sslmode or host.sslmode


def connection_urls(host: HostRecord, role: str, password: str, dbname: str) -> tuple[str, str]:
    """(pooled, direct) connection strings of a tenant on `host`.

    With a pooler: pooled is its transaction-mode entry; direct is Postgres
    itself, or the pooler's session-mode entry where Postgres is private.
    Without one both are Postgres (or a pooler endpoint the service does not
    manage, `pooler_hostname` alone, as registered before the wiring).
    """
    direct = postgres.connection_url(host.hostname, int(host.port), role, password, dbname, host.sslmode)
    if not host.pooler_hostname:
        return direct, direct
    port, sslmode = int(host.pooler_port or host.port), pooler_sslmode(host)
    pooled = postgres.connection_url(host.pooler_hostname, port, role, password, dbname, sslmode)
    if host.postgres_private and has_pooler(host):
        session = dbname + pooler_mod.SESSION_SUFFIX
        direct = postgres.connection_url(host.pooler_hostname, port, role, password, session, sslmode)
    return pooled, direct


def replication_url(host: HostRecord, role: str, password: str, dbname: str) -> str | None:
    """The `replication=database` string of a tenant on `host`: its replication gateway, None without one.

    The user is the tenant role itself; the gateway logs its companion in.
    """
    if not host.logical_replication or not host.replication_hostname:
        return None
    port, sslmode = int(host.replication_port or 5432), host.replication_sslmode or host.sslmode
    url = postgres.connection_url(host.replication_hostname, port, role, password, dbname, sslmode)
    return url + "&replication=database"


class HostCache:
    """Hosts change rarely; reading them on every GET would double its cost."""

    def __init__(self, ttl_s: float = 30.0) -> None:
        self._ttl = ttl_s
        self._hosts: dict[str, HostRecord] = {}
        self._loaded = 0.0
        # A host that just failed to answer is skipped for a while by this
        # process, so later creates do not each wait for its connect timeout.
        self._down: dict[str, float] = {}

    def all(self, fresh: bool = False) -> list[HostRecord]:
        if fresh or time.monotonic() - self._loaded > self._ttl:
            self._hosts = {h.id: h for h in HostRecord.scan()}
            self._loaded = time.monotonic()
        return list(self._hosts.values())

    def get(self, host_id: str) -> HostRecord:
        if host_id not in self._hosts:
            self.all(fresh=True)
        return self._hosts[host_id]

    def invalidate(self) -> None:
        self._loaded = 0.0

    def mark_down(self, host_id: str, for_s: float) -> None:
        self._down[host_id] = time.monotonic() + for_s

    def is_down(self, host_id: str) -> bool:
        return self._down.get(host_id, 0.0) > time.monotonic()


def offers_logical_replication(hosts: list[HostRecord]) -> bool:
    return any(h.logical_replication and h.status == HOST_ACTIVE for h in hosts)


def region_of(host: HostRecord, settings: Settings) -> str:
    """Where a host runs; one registered without a region is in the deployment's default region."""
    return host.region or settings.default_region


def regions(hosts: list[HostRecord], settings: Settings) -> list[str]:
    """The regions that have an active host: what a create may ask for."""
    return sorted({region_of(h, settings) for h in hosts if h.status == HOST_ACTIVE})


def regions_with_room(hosts: list[HostRecord], settings: Settings) -> list[str]:
    """The regions where an active host has a free slot now (what a refused create is told to try)."""
    return sorted({region_of(h, settings) for h in by_free_capacity(hosts) if int(h.capacity) > int(h.allocated or 0)})


def database_region(cache: HostCache, settings: Settings, host_id: str | None) -> str | None:
    """Where a database lives: its host's region. None while it has no host, or when its host's record
    is gone (hostctl remove): an answer about the database must not fail for want of its region."""
    if not host_id:
        return None
    try:
        return region_of(cache.get(host_id), settings)
    except KeyError:
        return None


def in_region(hosts: list[HostRecord], region: str, settings: Settings) -> list[HostRecord]:
    return [h for h in hosts if region_of(h, settings) == region]


def by_free_capacity(hosts: list[HostRecord], logical_last: bool = False) -> list[HostRecord]:
    """Active hosts, the one with the most room first (DRAINING hosts take no new databases).

    `logical_last`: hosts that offer logical replication after all others, so
    databases that did not ask for it go elsewhere while another host has
    room. The gateway refuses physical commands (docs/replication.md); this
    keeps them apart from replication roles all the same, should a host's
    companions be reachable around it (a misconfigured pg_hba.conf, a public RDS).
    """
    active = [h for h in hosts if h.status == HOST_ACTIVE]
    ranked = sorted(active, key=lambda h: int(h.capacity) - int(h.allocated or 0), reverse=True)
    if logical_last:
        ranked.sort(key=lambda h: bool(h.logical_replication))  # stable: by room within each group
    return ranked


def reserve(
    hosts: list[HostRecord], logical_replication: bool = False, exclude: frozenset[str] | set[str] = frozenset()
) -> HostRecord:
    """Take one slot on the active host with the most room, skipping the hosts in `exclude`."""
    candidates = [
        h
        for h in by_free_capacity(hosts, logical_last=not logical_replication)
        if h.id not in exclude and (h.logical_replication or not logical_replication)
    ]
    for host in candidates:
        try:
            # Update a key-only copy: the cached record is shared by concurrent
            # requests (threads in chalice local), and pynamodb rewrites an
            # updated object's attributes from the response while others sort on them.
            copy = HostRecord(id=host.id)
            copy.update(
                actions=[HostRecord.allocated.add(1)],
                condition=(HostRecord.status == HOST_ACTIVE) & (HostRecord.allocated < HostRecord.capacity),
            )
            # Only the count goes back to the shared record (one attribute
            # assignment), so the next placement in this process sees the
            # slot taken: a burst of creates spreads over the hosts instead
            # of all going to the one that looked emptiest at the last refresh.
            host.allocated = copy.allocated
            return host
        except UpdateError as exc:
            if exc.cause_response_code != "ConditionalCheckFailedException":
                raise
    raise NoCapacity()


def _update_if(host_id: str, actions: list, condition) -> bool:
    """One conditional update of a host record; False when the condition does not hold."""
    try:
        HostRecord(id=host_id).update(actions=actions, condition=condition)
        return True
    except UpdateError as exc:
        if exc.cause_response_code != "ConditionalCheckFailedException":
            raise
        return False


def release(host_id: str, count: int = 1) -> None:
    """Give back `count` slots taken by `reserve` (their databases are gone or never were); never below 0.

    One write for many (the purge releases a batch of drops at once).
    """
    if count <= 0:
        return
    for _ in range(3):
        enough = HostRecord.id.exists() & (HostRecord.allocated >= count)
        if _update_if(host_id, [HostRecord.allocated.add(-count)], enough):
            return
        # Fewer slots counted than given back (a recount moved it): down to 0, no lower.
        if _update_if(host_id, [HostRecord.allocated.set(0)], HostRecord.id.exists() & (HostRecord.allocated < count)):
            return


def set_allocated(host_id: str, count: int, expected: int) -> bool:
    """Set the host's slot count to `count` if it is still `expected` (reconciliation's recount)."""
    return _update_if(host_id, [HostRecord.allocated.set(count)], HostRecord.allocated == expected)


def lease_refill(host_id: str, until: float) -> bool:
    """Take the host's pool-refill lease until `until` (epoch seconds); False when another refill holds it.

    The scheduled job, the stream handler (after takes) and the local stack
    all refill pools; with the lease only one of them fills a given host at a
    time. A lease whose holder died ends at its `until`.
    """
    free = HostRecord.refill_until.does_not_exist() | (HostRecord.refill_until < time.time())
    return _update_if(host_id, [HostRecord.refill_until.set(until)], HostRecord.id.exists() & free)


def renew_refill(host_id: str, held: float, until: float) -> bool:
    """Extend the refill lease taken (or last renewed) with `held` to `until`; False when it is not ours any more."""
    return _update_if(host_id, [HostRecord.refill_until.set(until)], HostRecord.refill_until == held)


def end_refill(host_id: str, until: float) -> None:
    """Give the lease back early, if it is still the one taken with `until`."""
    _update_if(host_id, [HostRecord.refill_until.remove()], HostRecord.refill_until == until)


def register(
    settings: Settings,
    host_id: str,
    hostname: str,
    port: int,
    credentials: str,
    capacity: int,
    sslmode: str = "require",
    pooler_hostname: str | None = None,
    pooler_port: int | None = None,
    admin_dbname: str = "postgres",
    logical_replication: bool = False,
    pooler_admin: tuple[str, int] | None = None,
    pooler_credentials: str | None = None,
    pooler_store: str | None = None,
    pooler_sslmode: str | None = None,
    postgres_private: bool = False,
    region: str | None = None,
    replication_endpoint: tuple[str, int] | None = None,
    replication_sslmode: str | None = None,
) -> tuple[HostRecord, list[str]]:
    """Add or update a host after checking that its admin can do the job.

    `region` None keeps the host's region (none: the deployment's default
    region, INSTAPG_DEFAULT_REGION). `replication_endpoint`: (host, port) of the
    replication gateway clients reach (docs/replication.md). Returns the record and warnings about
    hardening the admin could not do.
    """
    existing = None
    try:
        existing = HostRecord.get(host_id)
    except HostRecord.DoesNotExist:
        pass
    host = HostRecord(
        id=host_id,
        status=existing.status if existing else HOST_ACTIVE,
        hostname=hostname,
        port=port,
        pooler_hostname=pooler_hostname,
        pooler_port=pooler_port,
        pooler_admin_hostname=pooler_admin[0] if pooler_admin else None,
        pooler_admin_port=pooler_admin[1] if pooler_admin else None,
        pooler_credentials=pooler_credentials,
        pooler_store=pooler_store,
        pooler_sslmode=pooler_sslmode,
        postgres_private=postgres_private,
        sslmode=sslmode,
        credentials=credentials,
        admin_dbname=admin_dbname,
        capacity=capacity,
        allocated=int(existing.allocated or 0) if existing else 0,
        logical_replication=logical_replication,
        replication_hostname=replication_endpoint[0] if replication_endpoint else None,
        replication_port=replication_endpoint[1] if replication_endpoint else None,
        replication_sslmode=replication_sslmode,
        region=region or (existing.region if existing else None),
        created_at=existing.created_at if existing else datetime.now(UTC),
    )
    tgt = target(host, settings)  # fresh credentials, never a cached copy
    provisioning.check_admin(tgt)
    if logical_replication:
        replication.check_host(tgt)
    warnings = provisioning.harden_host(tgt)
    bouncer = pooler(host, AdminCredentials(settings))
    if bouncer is not None:
        bouncer.admin("SHOW VERSION")  # its admin console answers with these credentials
    host.save()
    return host, warnings
