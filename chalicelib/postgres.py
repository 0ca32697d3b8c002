"""Everything the service says to a Postgres host.

All DDL here works for an admin role that is not a superuser (CREATEROLE,
CREATEDB; RDS's master user), and every identifier goes through
`sql.Identifier`. Passwords are sent as SCRAM verifiers computed here, so the
plaintext never reaches the server's logs or pg_stat_statements.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import os
import threading
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING
from urllib.parse import quote

from chalicelib import reliability

if TYPE_CHECKING:  # psycopg is imported lazily to keep cold starts cheap
    import psycopg

    from chalicelib.settings import Plan

log = logging.getLogger(__name__)

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
            connect_timeout=connect_timeout,
            options=options,
            application_name="instapg",
            autocommit=True,
        )

    @contextmanager
    def connect(self, dbname: str | None = None) -> Iterator[psycopg.Connection]:
        import psycopg

        try:
            conn = self._open(self.user, self.password, dbname)
        except psycopg.OperationalError as exc:
            fresh = self.refresh() if self.refresh else None
            if fresh is None or fresh == (self.user, self.password):
                raise HostUnavailable(f"cannot connect to {self.host}:{self.port}: {_first_line(exc)}") from None
            log.info("admin credentials for %s:%s changed; retrying with the new ones", self.host, self.port)
            try:
                conn = self._open(*fresh, dbname)
            except psycopg.OperationalError as exc2:
                raise HostUnavailable(f"cannot connect to {self.host}:{self.port}: {_first_line(exc2)}") from None
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


def _membership_grant(conn: psycopg.Connection, role: str) -> psycopg.sql.Composed:
    from psycopg import sql

    # PostgreSQL 16+ gives a CREATEROLE creator only ADMIN on the new role;
    # creating a database owned by it and dropping what it owns need SET and
    # INHERIT as well. Older servers have no WITH options on GRANT.
    stmt = sql.SQL("GRANT {} TO CURRENT_USER").format(sql.Identifier(role))
    if conn.info.server_version >= 160000:
        stmt = stmt + sql.SQL(" WITH INHERIT TRUE, SET TRUE")
    return stmt


def create_tenant(
    target: Target,
    role: str,
    dbname: str,
    password: str,
    plan: Plan,
    login: bool = True,
    verifier: str | None = None,
) -> None:
    """Create the role and database of one tenant, hardened.

    `login=False` makes a warm-pool tenant: ready, but nobody can log in until
    `open_tenant` gives it LOGIN and a fresh password. `verifier` is
    `scram_verifier(password)` when the caller has computed it already.
    """
    from psycopg import sql

    role_id, db_id = sql.Identifier(role), sql.Identifier(dbname)
    with target.connect() as conn:
        conn.execute(
            sql.SQL(
                "CREATE ROLE {} {} NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION "
                "NOBYPASSRLS NOINHERIT CONNECTION LIMIT {} PASSWORD {}"
            ).format(
                role_id,
                sql.SQL("LOGIN" if login else "NOLOGIN"),
                sql.Literal(plan.connections),
                sql.Literal(verifier or scram_verifier(password)),
            )
        )
        conn.execute(_membership_grant(conn, role))
        conn.execute(sql.SQL("CREATE DATABASE {} OWNER {}").format(db_id, role_id))
        conn.execute(sql.SQL("REVOKE ALL ON DATABASE {} FROM PUBLIC").format(db_id))
        _apply_role_defaults(conn, role, plan)


def _apply_role_defaults(conn: psycopg.Connection, role: str, plan: Plan) -> None:
    import psycopg
    from psycopg import sql

    role_id = sql.Identifier(role)
    # Defaults only: the tenant can override them. The scheduled job enforces
    # (chalicelib.quotas ends backends past the plan's limits).
    conn.execute(
        sql.SQL("ALTER ROLE {} SET statement_timeout = {}").format(role_id, sql.Literal(f"{plan.statement_timeout_s}s"))
    )
    conn.execute(
        sql.SQL("ALTER ROLE {} SET idle_in_transaction_session_timeout = {}").format(
            role_id, sql.Literal(f"{plan.idle_in_transaction_s}s")
        )
    )
    # temp_file_limit is superuser-only (PGC_SUSET): a tenant cannot lift it,
    # and a non-superuser admin may set it only with SET privilege on the
    # parameter (PostgreSQL 15+ GRANT SET ON PARAMETER). Without it, skip.
    try:
        # A savepoint when inside a transaction (apply_plan), so a refusal aborts only this.
        with conn.transaction():
            conn.execute(
                sql.SQL("ALTER ROLE {} SET temp_file_limit = {}").format(
                    role_id, sql.Literal(f"{plan.temp_file_limit_mb}MB")
                )
            )
    except psycopg.errors.InsufficientPrivilege:
        log.info("temp_file_limit not set for %s: the admin may not set it (needs GRANT SET ON PARAMETER)", role)


# The claimed marker: a comment on the tenant's role, written in the same
# transaction that gives it the claimed plan. A role may not comment on itself
# (COMMENT ON ROLE needs CREATEROLE), so a tenant can neither forge nor remove
# it, while the database's own comment and settings are the tenant's (it owns
# the database). Anyone can read it (pg_shdescription): it says nothing personal.
CLAIMED_MARKER = "instapg:claimed"


class ClaimedTenant(Exception):
    """An automatic drop refused: Postgres marks the tenant claimed (message is safe to log)."""


def _lock_role(conn: psycopg.Connection, role: str) -> None:
    """Serialize the service's changes to one role, until the transaction ends.

    Two ALTER ROLE on one role at once fail with 'tuple concurrently updated'
    (a claim retried in parallel); a drop must not pass the marker check while
    a claim writes the marker.
    """
    conn.execute("SELECT pg_advisory_xact_lock(hashtext('instapg-role:' || %s))", (role,))


def _is_marked_claimed(conn: psycopg.Connection, role: str) -> bool:
    row = conn.execute(
        "SELECT shobj_description(oid, 'pg_authid') FROM pg_roles WHERE rolname = %s", (role,)
    ).fetchone()
    return row is not None and row[0] == CLAIMED_MARKER


def apply_plan(target: Target, role: str, plan: Plan, claimed: bool = False) -> None:
    """Give an existing tenant role the limits of `plan` (e.g. after a claim).

    `claimed`: also write the claimed marker, in the same transaction as the
    new limits. Safe to run many times at once for one role.
    """
    from psycopg import sql

    role_id = sql.Identifier(role)
    with target.connect() as conn, conn.transaction():
        _lock_role(conn, role)
        conn.execute(sql.SQL("ALTER ROLE {} CONNECTION LIMIT {}").format(role_id, sql.Literal(plan.connections)))
        if claimed:
            conn.execute(sql.SQL("COMMENT ON ROLE {} IS {}").format(role_id, sql.Literal(CLAIMED_MARKER)))
        _apply_role_defaults(conn, role, plan)


def mark_claimed(target: Target, roles: Iterable[str]) -> None:
    """Write the claimed marker on roles claimed before markers existed (reconciliation backfills)."""
    from psycopg import sql

    with target.connect() as conn:
        for role in roles:
            with conn.transaction():
                _lock_role(conn, role)
                if conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (role,)).fetchone():
                    conn.execute(
                        sql.SQL("COMMENT ON ROLE {} IS {}").format(sql.Identifier(role), sql.Literal(CLAIMED_MARKER))
                    )


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


def database_size(target: Target, dbname: str) -> int | None:
    """Size in bytes of one database; None when it does not exist."""
    with target.connect() as conn:
        row = conn.execute(
            "SELECT pg_database_size(oid) FROM pg_database WHERE datname = %s",
            (dbname,),
        ).fetchone()
    return int(row[0]) if row and row[0] is not None else None


def lock_role(target: Target, role: str) -> int:
    """Lock a tenant out: NOLOGIN (only a CREATEROLE role may undo it), then end its sessions."""
    from psycopg import sql

    with target.connect() as conn:
        conn.execute(sql.SQL("ALTER ROLE {} NOLOGIN").format(sql.Identifier(role)))
        return _terminate_role(conn, role)


def unlock_role(target: Target, role: str) -> None:
    from psycopg import sql

    with target.connect() as conn:
        conn.execute(sql.SQL("ALTER ROLE {} LOGIN").format(sql.Identifier(role)))


@dataclass(frozen=True)
class Backend:
    pid: int
    role: str
    state: str
    seconds: float  # how long the query ran (active) or the transaction sat idle


def tenant_backends(target: Target, prefix: str) -> list[Backend]:
    """Busy tenant sessions: running a query, or idle inside a transaction."""
    with target.connect() as conn:
        rows = conn.execute(
            "SELECT pid, usename, state, extract(epoch FROM now() - "
            "CASE WHEN state = 'active' THEN query_start ELSE state_change END) "
            "FROM pg_stat_activity WHERE starts_with(usename, %s) AND backend_type = 'client backend' "
            "AND state IN ('active', 'idle in transaction', 'idle in transaction (aborted)')",
            (prefix + "_",),
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
        _reopen(conn, prepared.database)
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


def set_password(target: Target, role: str, password: str) -> None:
    """Give the role a new password and end its sessions (they used the old one)."""
    from psycopg import sql

    with target.connect() as conn:
        conn.execute(
            sql.SQL("ALTER ROLE {} PASSWORD {}").format(sql.Identifier(role), sql.Literal(scram_verifier(password)))
        )
        _terminate_role(conn, role)


def open_tenant(target: Target, role: str, verifier: str, meanwhile: Callable[[], object] | None = None) -> None:
    """Hand out a pooled tenant: LOGIN with a new password in one statement.

    `verifier` is `scram_verifier(password)` of the fresh password. The pooled
    role was NOLOGIN, so no session of it can exist, and its earlier password
    is replaced before it can ever log in.

    The server checks a new verifier against the empty password, a full SCRAM
    computation (a few ms). `meanwhile` runs after the statement is sent and
    before its answer is read (pipeline mode), so the caller's own work
    overlaps that wait, in this thread. It runs once, even if the statement
    is sent twice.
    """
    import psycopg
    from psycopg import sql

    statement = sql.SQL("ALTER ROLE {} LOGIN PASSWORD {}").format(sql.Identifier(role), sql.Literal(verifier))
    pending = [meanwhile] if meanwhile else []

    def run(conn: psycopg.Connection) -> None:
        with conn.pipeline():
            conn.execute(statement)
            while pending:
                pending.pop()()

    try:
        with target.session() as conn:
            run(conn)
    except psycopg.OperationalError:
        # A kept-open connection the server closed meanwhile (restart, idle
        # timeout): once more on a new one. The statement is idempotent.
        with target.session() as conn:
            run(conn)


def _terminate_role(conn: psycopg.Connection, role: str) -> int:
    cur = conn.execute(
        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE usename = %s AND pid <> pg_backend_pid()",
        (role,),
    )
    return cur.fetchone()[0]


def drop_tenant(target: Target, role: str, dbname: str, keep_claimed: bool = True) -> bool:
    """Drop a tenant's database and role, whatever the tenant did to them.

    Idempotent: dropping what is already gone succeeds. Returns whether
    anything existed. The order matters: lock the role out first so no new
    session appears, then clear what would block DROP DATABASE (template
    flag, sessions, prepared transactions), then the role's privileges in
    every database that records them, then the role.

    `keep_claimed` (every automatic path): raise ClaimedTenant, touching
    nothing, when the role carries the claimed marker, whatever DynamoDB
    says. Only the owner's delete passes False.
    """
    from psycopg import sql

    role_id, db_id = sql.Identifier(role), sql.Identifier(dbname)
    with target.connect() as conn:
        with conn.transaction():
            _lock_role(conn, role)  # no claim writes its marker between the check and the lockout
            role_exists = conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (role,)).fetchone() is not None
            if role_exists and keep_claimed and _is_marked_claimed(conn, role):
                raise ClaimedTenant(f"role {role} is marked claimed on {target.host}:{target.port}: not dropped")
            if role_exists:
                conn.execute(sql.SQL("ALTER ROLE {} NOLOGIN CONNECTION LIMIT 0").format(role_id))
        if role_exists:
            _terminate_role(conn, role)
        # Read after the lockout, so the tenant cannot set the flag behind us.
        row = conn.execute("SELECT datistemplate FROM pg_database WHERE datname = %s", (dbname,)).fetchone()
        db_exists = row is not None
        if db_exists and row[0]:
            # Only when set: ALTER fails on a database an interrupted (or
            # concurrent) DROP DATABASE left invalid, which DROP still removes.
            conn.execute(sql.SQL("ALTER DATABASE {} IS_TEMPLATE false").format(db_id))
        prepared = conn.execute(
            "SELECT gid, database, owner FROM pg_prepared_xacts WHERE owner = %s OR database = %s",
            (role, dbname),
        ).fetchall()
        for gid, database, owner in prepared:
            _reopen(conn, database)
            with target.connect(database) as other:
                # Only the preparing role (or a superuser) may roll it back.
                other.execute(sql.SQL("SET ROLE {}").format(sql.Identifier(owner)))
                other.execute(sql.SQL("ROLLBACK PREPARED {}").format(sql.Literal(gid)))
        if db_exists:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(db_id))
        if not role_exists:
            return db_exists
        # Privileges other tenants granted to this role live in their
        # databases' catalogs; DROP OWNED must run in each of them. dbid 0
        # means shared objects, handled from the admin database.
        where = conn.execute(
            "SELECT DISTINCT coalesce(d.datname, current_database()) FROM pg_shdepend s "
            "LEFT JOIN pg_database d ON d.oid = s.dbid "
            "WHERE s.refclassid = 'pg_authid'::regclass AND s.refobjid = (SELECT oid FROM pg_roles WHERE rolname = %s)",
            (role,),
        ).fetchall()
        for (database,) in where:
            if database == conn.info.dbname:
                conn.execute(sql.SQL("DROP OWNED BY {}").format(role_id))
            else:
                _reopen(conn, database)
                with target.connect(database) as other:
                    other.execute(sql.SQL("DROP OWNED BY {}").format(role_id))
        conn.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(role_id))
    return True


def _reopen(conn: psycopg.Connection, dbname: str) -> None:
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


def harden_host(target: Target) -> list[str]:
    """Once per host: strangers may not connect to the maintenance databases.

    Returns warnings for what the admin was not allowed to do (on RDS the
    master user owns neither database, so an operator runs it as owner).
    """
    import psycopg
    from psycopg import sql

    warnings: list[str] = []
    # A non-owner's REVOKE only warns (or fails), so look at what PUBLIC holds.
    open_query = (
        "SELECT datname FROM pg_database WHERE datname IN ('postgres', 'template1') AND "
        "(datacl IS NULL OR EXISTS (SELECT 1 FROM aclexplode(datacl) a "
        "WHERE a.grantee = 0 AND a.privilege_type IN ('CONNECT', 'TEMPORARY')))"
    )
    with target.connect() as conn:
        for (dbname,) in conn.execute(open_query).fetchall():
            try:
                conn.execute(
                    sql.SQL("REVOKE CONNECT, TEMPORARY ON DATABASE {} FROM PUBLIC").format(sql.Identifier(dbname))
                )
            except psycopg.Error as exc:
                warnings.append(f"REVOKE on {dbname}: {_first_line(exc)}")
        still_open = conn.execute(open_query).fetchall()
        warnings += [f"PUBLIC can still connect to {name}: run the REVOKE as its owner" for (name,) in still_open]
    return warnings


def check_admin(target: Target) -> None:
    """Refuse a host whose admin cannot create tenants (ValueError says why)."""
    with target.connect() as conn:
        row = conn.execute(
            "SELECT rolsuper, rolcreaterole, rolcreatedb FROM pg_roles WHERE rolname = current_user"
        ).fetchone()
        version = conn.info.server_version
    if version < 130000:
        raise ValueError("PostgreSQL 13 or newer is required (DROP DATABASE ... WITH (FORCE))")
    if not row or not (row[0] or (row[1] and row[2])):
        raise ValueError(f"admin role {target.user!r} needs CREATEROLE and CREATEDB")
