"""The service's admin sessions on a Postgres host, SCRAM, and what the host's catalog says.

Connections (`Target`, kept-open `Sessions`) are bounded by the request's
deadline. Reads: database sizes, tenant sessions and prepared transactions
(which quotas end), names for reconciliation. What is done to tenants
(create, lock, drop...) is chalicelib.provisioning.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import os
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING
from urllib.parse import quote

from chalicelib import reliability

if TYPE_CHECKING:  # psycopg is imported lazily to keep cold starts cheap
    import psycopg


log = logging.getLogger(__name__)

# The comment on a claimed tenant's role: no automatic drop removes such a role (chalicelib.provisioning).
CLAIMED_MARKER = "instapg:claimed"

# Settings forced on the service's own sessions. A tenant can attach settings
# to its database (ALTER DATABASE ... SET) that would slow down or break the
# admin's work there; connection options take precedence over those. `role`
# too: `ALTER DATABASE own SET role = own` would make the admin act as the
# tenant in that database (tests/test_adversarial.py).
_ADMIN_OPTIONS = (
    "-c statement_timeout=60000 -c lock_timeout=10000 -c default_transaction_read_only=off -c search_path=pg_catalog"
    " -c role=none -c idle_session_timeout=0 -c idle_in_transaction_session_timeout=0"
)


def _bounded_options(options: str, statement_timeout_s: int) -> str:
    """`options` with statement and lock timeouts no longer than the setting, nor the request's time left."""
    statement_ms = int(reliability.bounded(statement_timeout_s) * 1000)
    lock_ms = min(10000, statement_ms)
    return options.replace("statement_timeout=60000", f"statement_timeout={statement_ms}").replace(
        "lock_timeout=10000", f"lock_timeout={lock_ms}"
    )


class HostUnavailable(Exception):
    """The host could not be reached or refused the admin (message is safe to log)."""


@dataclass(frozen=True)
class Target:
    """How the service reaches one host as its admin."""

    host: str
    port: int
    user: str
    password: str = field(repr=False)
    dbname: str
    sslmode: str
    connect_timeout: int = 5
    sslrootcert: str | None = None  # with sslmode=verify-full: the CA bundle the server's certificate must chain to
    statement_timeout: int = 60
    # Reads the admin credentials again, (user, password), or None when they
    # cannot be read. RDS rotates its master password; libpq reports a failed
    # login without a SQLSTATE, so any failed connect asks once for fresh
    # credentials and retries only if they changed.
    refresh: Callable[[], tuple[str, str] | None] | None = field(default=None, repr=False, compare=False)
    # Kept-open admin connections for the hot path (the Context's); None: one connection per use.
    sessions: Sessions | None = field(default=None, repr=False, compare=False)

    def _open(self, user: str, password: str, dbname: str | None, options: str = _ADMIN_OPTIONS) -> psycopg.Connection:
        import psycopg

            # Within a request, what is left of its deadline bounds the connect and every statement.
        connect_timeout = max(1, int(reliability.bounded(self.connect_timeout)))
        options = _bounded_options(options, self.statement_timeout)
        return psycopg.connect(
            host=self.host,
            port=self.port,
            user=user,
            password=password,
            dbname=dbname or self.dbname,
            sslmode=self.sslmode,
            **({"sslrootcert": self.sslrootcert} if self.sslrootcert else {}),
            connect_timeout=connect_timeout,
            options=options,
            application_name="instapg",
            autocommit=True,
        )

    def open(self, dbname: str | None = None) -> psycopg.Connection:
        """An admin connection that the caller closes (`connect` closes it for you)."""
        import psycopg

        try:
            return self._open(self.user, self.password, dbname)
        except psycopg.OperationalError as exc:
            fresh = self.refresh() if self.refresh else None
            if fresh is None or fresh == (self.user, self.password):
                raise HostUnavailable(f"cannot connect to {self.host}:{self.port}: {_first_line(exc)}") from None
            log.info("admin credentials for %s:%s changed; retrying with the new ones", self.host, self.port)
            try:
                return self._open(*fresh, dbname)
            except psycopg.OperationalError as exc2:
                raise HostUnavailable(f"cannot connect to {self.host}:{self.port}: {_first_line(exc2)}") from None

    @contextmanager
    def connect(self, dbname: str | None = None) -> Iterator[psycopg.Connection]:
        conn = self.open(dbname)
        try:
            yield conn
        finally:
            conn.close()

    @contextmanager
    def session(self) -> Iterator[psycopg.Connection]:
        """A kept-open admin connection for the create's hot path (see `Sessions`)."""
        if self.sessions is None:
            conn = _open_hot(self)
            try:
                yield conn
            finally:
                conn.close()
            return
        with self.sessions.use(self) as conn:
            yield conn


# The hot path's own session setting: its one statement (ALTER ROLE on a take)
# does not wait for the WAL flush. If the server crashes within the flush
# delay the change is lost and the role is back to NOLOGIN with its old
# password: the tenant cannot log in, nobody else can either.
_HOT_OPTIONS = _ADMIN_OPTIONS + " -c synchronous_commit=off"


def _open_hot(target: Target) -> psycopg.Connection:
    import psycopg

    try:
        return target._open(target.user, target.password, None, options=_HOT_OPTIONS)
    except psycopg.OperationalError as exc:
        raise HostUnavailable(f"cannot connect to {target.host}:{target.port}: {_first_line(exc)}") from None


class Sessions:
    """Idle admin connections per target, reused across requests (and warm Lambda invocations).

    Opening a connection (TCP, SCRAM, a new backend) costs more than the
    statement a take runs; keeping a few open makes a take one round trip.
    A connection is used by one thread at a time; a broken one is replaced
    once.
    """

    MAX_IDLE = 4

    def __init__(self) -> None:
        self._idle: dict[Target, list[psycopg.Connection]] = {}
        self._lock = threading.Lock()

    @contextmanager
    def use(self, target: Target) -> Iterator[psycopg.Connection]:
        with self._lock:
            idle = self._idle.setdefault(target, [])
            conn = idle.pop() if idle else None
        if conn is None or conn.closed or conn.broken:
            conn = _open_hot(target)
        try:
            yield conn
        except BaseException:
            conn.close()  # its state is unknown after an error
            raise
        with self._lock:
            idle = self._idle.setdefault(target, [])
            if len(idle) < self.MAX_IDLE:
                idle.append(conn)
                return
        conn.close()

    def clear(self) -> None:
        with self._lock:
            conns = [c for idle in self._idle.values() for c in idle]
            self._idle.clear()
        for conn in conns:
            conn.close()


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def scram_verifier(password: str, iterations: int = 4096) -> str:
    """The SCRAM-SHA-256 verifier Postgres stores for `password` (RFC 7677)."""
    salt = os.urandom(16)
    salted = hashlib.pbkdf2_hmac("sha256", password.encode(), salt, iterations)
    client_key = hmac.new(salted, b"Client Key", hashlib.sha256).digest()
    stored_key = hashlib.sha256(client_key).digest()
    server_key = hmac.new(salted, b"Server Key", hashlib.sha256).digest()
    b64 = lambda b: base64.b64encode(b).decode()  # noqa: E731
    return f"SCRAM-SHA-256${iterations}:{b64(salt)}${b64(stored_key)}:{b64(server_key)}"


def connection_url(host: str, port: int, user: str, password: str, dbname: str, sslmode: str) -> str:
    return (
        f"postgresql://{quote(user, safe='')}:{quote(password, safe='')}@{host}:{port}/"
        f"{quote(dbname, safe='')}?sslmode={quote(sslmode, safe='')}"
    )


def ping(target: Target) -> None:
    with target.connect() as conn:
        conn.execute("SELECT 1")


def database_sizes(target: Target, prefix: str) -> dict[str, int]:
    """Size in bytes of every tenant database on the host, in one query.

    Only names with `prefix` + "_" are measured: the service never looks at
    databases it did not make. A database dropped while the query runs
    measures NULL and is left out.
    """
    with target.connect() as conn:
        rows = conn.execute(
            "SELECT datname, pg_database_size(oid) FROM pg_database WHERE starts_with(datname, %s)",
            (prefix + "_",),
        ).fetchall()
    return {name: int(size) for name, size in rows if size is not None}


def connection_counts(target: Target, prefix: str) -> dict[str, int]:
    """Open sessions (backends) per tenant database: direct clients and the pooler's server connections."""
    query = "SELECT datname, count(*) FROM pg_stat_activity WHERE starts_with(datname, %s) GROUP BY datname"
    with target.connect() as conn:
        return {name: int(n) for name, n in conn.execute(query, (prefix + "_",)).fetchall()}


def database_size(target: Target, dbname: str) -> int | None:
    """Size in bytes of one database; None when it does not exist."""
    with target.connect() as conn:
        row = conn.execute(
            "SELECT pg_database_size(oid) FROM pg_database WHERE datname = %s",
            (dbname,),
        ).fetchone()
    return int(row[0]) if row and row[0] is not None else None


@dataclass(frozen=True)
class Backend:
    pid: int
    role: str
    state: str
    seconds: float  # how long the query ran (active) or the transaction sat idle


# A walsender's command that is replication, not SQL (the scanner's first tokens, upper case):
# a stream runs for as long as its subscriber wants, and is bounded by slots, not by time.
_REPLICATION_COMMAND = (
    r"^[[:space:]]*(IDENTIFY_SYSTEM|BASE_BACKUP|START_REPLICATION|CREATE_REPLICATION_SLOT|DROP_REPLICATION_SLOT"
    r"|ALTER_REPLICATION_SLOT|READ_REPLICATION_SLOT|TIMELINE_HISTORY|UPLOAD_MANIFEST|SHOW)([^A-Za-z0-9_$]|$)"
)


def tenant_backends(target: Target, prefix: str) -> list[Backend]:
    """Busy tenant sessions: running a query, or idle inside a transaction.

    SQL on a logical walsender (a replication companion's, through the
    gateway) counts too; its replication commands do not.
    """
    with target.connect() as conn:
        rows = conn.execute(
            "SELECT pid, usename, state, extract(epoch FROM now() - "
            "CASE WHEN state = 'active' THEN query_start ELSE state_change END) "
            "FROM pg_stat_activity WHERE starts_with(usename, %s) "
            "AND (backend_type = 'client backend' OR (backend_type = 'walsender' AND query !~ %s)) "
            "AND state IN ('active', 'idle in transaction', 'idle in transaction (aborted)')",
            (prefix + "_", _REPLICATION_COMMAND),
        ).fetchall()
    return [Backend(pid, role, state, float(secs or 0)) for pid, role, state, secs in rows]


def terminate(target: Target, pids: list[int], prefix: str) -> int:
    """End the given tenant backends; returns how many were signalled.

    The role is checked again, so a pid reused since it was listed is spared.
    """
    if not pids:
        return 0
    with target.connect() as conn:
        return conn.execute(
            "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid)) FROM pg_stat_activity "
            "WHERE pid = ANY(%s) AND starts_with(usename, %s)",
            (pids, prefix + "_"),
        ).fetchone()[0]


@dataclass(frozen=True)
class Prepared:
    gid: str
    database: str
    owner: str
    seconds: float  # since PREPARE TRANSACTION


def tenant_prepared(target: Target, prefix: str) -> list[Prepared]:
    """Prepared transactions of tenant roles: they outlive every session, hold
    locks and keep VACUUM from cleaning up host-wide, so the job rolls back old ones."""
    with target.connect() as conn:
        rows = conn.execute(
            "SELECT gid, database, owner, extract(epoch FROM now() - prepared) FROM pg_prepared_xacts "
            "WHERE starts_with(owner, %s)",
            (prefix + "_",),
        ).fetchall()
    return [Prepared(gid, database, owner, float(secs)) for gid, database, owner, secs in rows]


def rollback_prepared(target: Target, prepared: Prepared) -> None:
    """Roll back one prepared transaction; gone already is fine."""
    import psycopg
    from psycopg import sql

    with target.connect() as conn:
        reopen(conn, prepared.database)
    with target.connect(prepared.database) as other:
        # Only the preparing role (or a superuser) may roll it back.
        other.execute(sql.SQL("SET ROLE {}").format(sql.Identifier(prepared.owner)))
        try:
            other.execute(sql.SQL("ROLLBACK PREPARED {}").format(sql.Literal(prepared.gid)))
        except psycopg.errors.UndefinedObject:
            pass  # committed or rolled back since it was listed


@dataclass(frozen=True)
class Usage:
    size_bytes: int | None  # None: the database does not exist on the host
    connections: int


def usage(target: Target, role: str, dbname: str) -> Usage:
    """Current size of a tenant's database and its role's open sessions."""
    with target.connect() as conn:
        size = conn.execute("SELECT pg_database_size(oid) FROM pg_database WHERE datname = %s", (dbname,)).fetchone()
        sessions = conn.execute("SELECT count(*) FROM pg_stat_activity WHERE usename = %s", (role,)).fetchone()
    return Usage(size_bytes=size[0] if size else None, connections=sessions[0])


def like_prefix(prefix: str) -> str:
    """A LIKE pattern matching names that start with `prefix` literally.

    `_` and `%` are wildcards in LIKE: the tenant name separator `_` must be
    escaped, or prefix `ipg` would also match `ipgx...`.
    """
    escaped = prefix.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return escaped + "%"


def tenant_names(target: Target, prefix: str) -> set[str]:
    """Roles and databases on the host whose names start with `prefix`."""
    pattern = like_prefix(prefix)
    with target.connect() as conn:
        rows = conn.execute(
            "SELECT rolname FROM pg_roles WHERE rolname LIKE %s AND rolname <> current_user "
            "UNION SELECT datname FROM pg_database WHERE datname LIKE %s",
            (pattern, pattern),
        ).fetchall()
    # Belt and braces: nothing outside the prefix, whatever LIKE thought.
    return {name for (name,) in rows if name.startswith(prefix)}


@dataclass(frozen=True)
class Inventory:
    """What reconciliation reads from one host in one go."""

    names: set[str]  # prefixed roles and databases
    databases: set[str]  # prefixed databases only (each holds a host slot)
    claimed: set[str]  # prefixed roles carrying the claimed marker


def inventory(target: Target, prefix: str) -> Inventory:
    """Prefixed roles and databases on the host, and which roles are marked claimed."""
    pattern = like_prefix(prefix)
    with target.connect() as conn:
        roles = conn.execute(
            "SELECT rolname, shobj_description(oid, 'pg_authid') = %s FROM pg_roles "
            "WHERE rolname LIKE %s AND rolname <> current_user",
            (CLAIMED_MARKER, pattern),
        ).fetchall()
        dbs = conn.execute("SELECT datname FROM pg_database WHERE datname LIKE %s", (pattern,)).fetchall()
    role_names = {name for name, _ in roles if name.startswith(prefix)}
    databases = {name for (name,) in dbs if name.startswith(prefix)}
    claimed = {name for name, marked in roles if marked and name.startswith(prefix)}
    return Inventory(names=role_names | databases, databases=databases, claimed=claimed)


def reopen(conn: psycopg.Connection, dbname: str) -> None:
    """Let the admin into another tenant's database before working in it.

    That tenant owns its database and can shut the admin out (CONNECTION
    LIMIT 0, or REVOKE CONNECT from itself, whose rights the admin holds
    through membership). A hostile tenant would so keep a role it once granted
    something to from ever being dropped. The admin acts as the owner here.
    """
    from psycopg import sql

    db_id = sql.Identifier(dbname)
    conn.execute(sql.SQL("ALTER DATABASE {} CONNECTION LIMIT -1").format(db_id))
    conn.execute(sql.SQL("GRANT CONNECT ON DATABASE {} TO CURRENT_USER").format(db_id))
