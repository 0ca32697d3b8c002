"""What the service says to a Postgres host about its tenants: create, plan, lock, open, rotate, drop.

All DDL here works for an admin role that is not a superuser (CREATEROLE,
CREATEDB; RDS's master user), and every identifier goes through
`sql.Identifier`. Passwords are sent as SCRAM verifiers (chalicelib.postgres),
so the plaintext never reaches the server's logs or pg_stat_statements.
Dropping survives a hostile tenant, and refuses a database marked claimed.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import TYPE_CHECKING

from chalicelib import replication
from chalicelib.postgres import CLAIMED_MARKER, Target, _first_line, reopen, scram_verifier

if TYPE_CHECKING:  # psycopg is imported lazily to keep cold starts cheap
    import psycopg

    from chalicelib.settings import Plan

log = logging.getLogger(__name__)


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
    logical_replication: bool = False,
) -> None:
    """Create the role and database of one tenant, hardened.

    `login=False` makes a warm-pool tenant: ready, with the password it will
    be handed out with, but nobody can log in until `open_tenant` gives it
    LOGIN. `verifier` is `scram_verifier(password)` when the caller has
    computed it already.
    `logical_replication`: the tenant gets a companion role that may stream
    its database's changes through the replication gateway; the tenant role
    itself never has REPLICATION (chalicelib.replication; only on hosts that
    offer it).
    """
    from psycopg import sql

    role_id, db_id = sql.Identifier(role), sql.Identifier(dbname)
    verifier = verifier or scram_verifier(password)
    with target.connect() as conn:
        conn.execute(
            sql.SQL(
                "CREATE ROLE {} {} NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION "
                "NOBYPASSRLS NOINHERIT CONNECTION LIMIT {} PASSWORD {}"
            ).format(
                role_id,
                sql.SQL("LOGIN" if login else "NOLOGIN"),
                sql.Literal(plan.connections),
                sql.Literal(verifier),
            )
        )
        conn.execute(_membership_grant(conn, role))
        if logical_replication:
            companion = replication.create_companion(conn, role, verifier, plan.connections, login=login)
            _apply_role_defaults(conn, companion, plan)  # its SQL through the gateway has the plan's limits too
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


# The claimed marker (postgres.CLAIMED_MARKER): a comment on the tenant's role,
# written in the same transaction that gives it the claimed plan. A role may
# not comment on itself (COMMENT ON ROLE needs CREATEROLE), so a tenant can
# neither forge nor remove it, while the database's own comment and settings
# are the tenant's (it owns the database). Anyone can read it
# (pg_shdescription): it says nothing personal.
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
        for name in _with_companion(conn, role):
            conn.execute(
                sql.SQL("ALTER ROLE {} CONNECTION LIMIT {}").format(sql.Identifier(name), sql.Literal(plan.connections))
            )
        if claimed:
            conn.execute(sql.SQL("COMMENT ON ROLE {} IS {}").format(role_id, sql.Literal(CLAIMED_MARKER)))
        for name in _with_companion(conn, role):
            _apply_role_defaults(conn, name, plan)


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


def _with_companion(conn: psycopg.Connection, role: str) -> list[str]:
    """`role`, and its replication companion when it has one: what every change to a tenant's login acts on."""
    try:
        name = replication.companion(role)
    except ValueError:
        return [role]  # a companion itself, or a name too long to have one
    found = conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (name,)).fetchone()
    return [role, name] if found else [role]


def lock_role(target: Target, role: str) -> int:
    """Lock a tenant out: NOLOGIN (only a CREATEROLE role may undo it), then end its sessions.

    Its replication companion too (its walsenders included).
    """
    from psycopg import sql

    with target.connect() as conn:
        names = _with_companion(conn, role)
        for name in names:
            conn.execute(sql.SQL("ALTER ROLE {} NOLOGIN").format(sql.Identifier(name)))
        return sum(_terminate_role(conn, name) for name in names)


def unlock_role(target: Target, role: str) -> None:
    from psycopg import sql

    with target.connect() as conn:
        for name in _with_companion(conn, role):
            conn.execute(sql.SQL("ALTER ROLE {} LOGIN").format(sql.Identifier(name)))


def set_password(target: Target, role: str, password: str, verifier: str | None = None) -> None:
    """Give the role a new password and end its sessions (they used the old one).

    `verifier` is `scram_verifier(password)` when the caller needs the same
    one (the pooler's auth source must hold exactly what Postgres stores).
    """
    from psycopg import sql

    verifier = verifier or scram_verifier(password)
    with target.connect() as conn:
        # The companion gets the same verifier: the gateway relays the tenant's password to it.
        for name in _with_companion(conn, role):
            conn.execute(sql.SQL("ALTER ROLE {} PASSWORD {}").format(sql.Identifier(name), sql.Literal(verifier)))
            _terminate_role(conn, name)


def set_verifier(target: Target, role: str, verifier: str) -> None:
    """Store a new verifier of the role's same password (sessions go on: the password did not change)."""
    from psycopg import sql

    with target.connect() as conn:
        for name in _with_companion(conn, role):
            conn.execute(sql.SQL("ALTER ROLE {} PASSWORD {}").format(sql.Identifier(name), sql.Literal(verifier)))


def open_tenant(target: Target, role: str, plan: Plan) -> None:
    """Hand out a pooled tenant: LOGIN (and the plan's connection limit) in one statement.

    The role got its password when the pool was refilled (`create_tenant`
    with `login=False`): a password made for this database alone, sealed in
    its record and never shown before this take. Setting it here would cost
    the server's check of the new verifier against the empty password, a
    full 4096-round SCRAM computation (~5 ms); LOGIN alone is a catalog
    write (~0.2 ms). The role was NOLOGIN, so no session of it can exist.
    """
    import psycopg
    from psycopg import sql

    statement = sql.SQL("ALTER ROLE {} LOGIN CONNECTION LIMIT {}").format(
        sql.Identifier(role), sql.Literal(plan.connections)
    )
    try:
        with target.session() as conn:
            conn.execute(statement)
    except psycopg.OperationalError:
        # A kept-open connection the server closed meanwhile (restart, idle
        # timeout): once more on a new one. The statement is idempotent.
        with target.session() as conn:
            conn.execute(statement)


def _terminate_role(conn: psycopg.Connection, role: str) -> int:
    cur = conn.execute(
        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE usename = %s AND pid <> pg_backend_pid()",
        (role,),
    )
    return cur.fetchone()[0]


def drop_tenant(
    target: Target, role: str, dbname: str, keep_claimed: bool = True, conn: psycopg.Connection | None = None
) -> bool:
    """Drop a tenant's database and role, whatever the tenant did to them.

    Idempotent: dropping what is already gone succeeds. Returns whether
    anything existed. The order matters: lock the role out first so no new
    session appears, then clear what would block DROP DATABASE (template
    flag, sessions, prepared transactions), then the role's privileges in
    every database that records them, then the role.

    `keep_claimed` (every automatic path): raise ClaimedTenant, touching
    nothing, when the role carries the claimed marker, whatever DynamoDB
    says. Only the owner's delete passes False.

    `conn`: an admin connection to the target's admin database to use instead
    of a new one (the purge keeps one per worker: a login costs more than the
    statements around the drop). It is left open, outside any transaction.
    """
    if conn is not None:
        return _drop_tenant_on(conn, target, role, dbname, keep_claimed)
    with target.connect() as fresh:
        return _drop_tenant_on(fresh, target, role, dbname, keep_claimed)


def _drop_tenant_on(conn: psycopg.Connection, target: Target, role: str, dbname: str, keep_claimed: bool) -> bool:
    from psycopg import sql

    db_id = sql.Identifier(dbname)
    with conn.transaction():
        _lock_role(conn, role)  # no claim writes its marker between the check and the lockout
        role_exists = conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (role,)).fetchone() is not None
        if role_exists and keep_claimed and _is_marked_claimed(conn, role):
            raise ClaimedTenant(f"role {role} is marked claimed on {target.host}:{target.port}: not dropped")
        # The replication companion goes with its tenant (and alone, when the tenant went first).
        roles = _with_companion(conn, role)
        if not role_exists:
            roles = roles[1:]
        for name in roles:
            conn.execute(sql.SQL("ALTER ROLE {} NOLOGIN CONNECTION LIMIT 0").format(sql.Identifier(name)))
    for name in roles:
        _terminate_role(conn, name)
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
        reopen(conn, database)
        with target.connect(database) as other:
            # Only the preparing role (or a superuser) may roll it back.
            other.execute(sql.SQL("SET ROLE {}").format(sql.Identifier(owner)))
            other.execute(sql.SQL("ROLLBACK PREPARED {}").format(sql.Literal(gid)))
    if db_exists:
        # DROP DATABASE fails while a replication slot of it exists (its
        # walsenders were ended with the role's sessions above).
        replication.drop_database_slots(conn, dbname)
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(db_id))
    # The companion before its tenant: it is a member of the tenant role.
    for name in reversed(roles):
        _drop_role(conn, target, name)
    return db_exists or role_exists


def _drop_role(conn: psycopg.Connection, target: Target, role: str) -> None:
    from psycopg import sql

    role_id = sql.Identifier(role)
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
            continue
        try:
            reopen(conn, database)
            with target.connect(database) as other:
                other.execute(sql.SQL("DROP OWNED BY {}").format(role_id))
        except Exception:
            # The purge drops in parallel: a granting tenant's database dropped (or being dropped,
            # datconnlimit -2) meanwhile takes its grants with it. Anything else is an error.
            row = conn.execute("SELECT datconnlimit FROM pg_database WHERE datname = %s", (database,)).fetchone()
            if row is not None and row[0] != -2:
                raise
    conn.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(role_id))


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


# -- copies (issue 18 §2) -------------------------------------------------------------
# A copy is CREATE DATABASE ... TEMPLATE <source>: Postgres copies the files
# (or, with STRATEGY WAL_LOG, the blocks through the WAL), which is far faster
# than pg_dump | pg_restore and needs no binaries in Lambda. It needs the
# source to have no other sessions, so the source database refuses new
# connections (ALLOW_CONNECTIONS false) and its sessions are ended for as
# long as the copy takes; then it is opened again. docs/copies.md has the
# reasoning and the figures.


class SourceBusy(Exception):
    """The source could not be copied: another session (a prepared transaction) still holds it."""


def _copy_from(
    conn: psycopg.Connection, target: Target, source_role: str, source_db: str, role: str, dbname: str, strategy: str
) -> None:
    """CREATE DATABASE `dbname` TEMPLATE `source_db` OWNER `role`, then give `role` every object in it."""
    import psycopg
    from psycopg import sql

    source_id, db_id, role_id = sql.Identifier(source_db), sql.Identifier(dbname), sql.Identifier(role)
    # Serializes with claims, quota locks and drops of the source role (their
    # transaction-level lock on the same key waits for this session's). A wait
    # gives up (LockNotAvailable: busy) well before the statement timeout
    # (QueryCanceled: too slow), so the caller can tell the two apart.
    statement_ms = int(conn.execute("SELECT setting FROM pg_settings WHERE name = 'statement_timeout'").fetchone()[0])
    if statement_ms:
        conn.execute(sql.SQL("SET lock_timeout = {}").format(sql.Literal(max(1, statement_ms // 2))))
    conn.execute("SELECT pg_advisory_lock(hashtext('instapg-role:' || %s))", (source_role,))
    try:
        if conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (source_db,)).fetchone() is None:
            raise SourceBusy(f"source database {source_db} does not exist")
        # Closed at birth: until its REVOKE below, PUBLIC could connect to it, and the copy may hold tables
        # the source granted to PUBLIC (harmless there, where nobody else can connect).
        create = sql.SQL("CREATE DATABASE {} TEMPLATE {} OWNER {} ALLOW_CONNECTIONS false").format(
            db_id, source_id, role_id
        )
        if conn.info.server_version >= 150000:
            create = create + sql.SQL(" STRATEGY {}").format(sql.SQL(strategy.upper()))
        try:
            conn.execute(sql.SQL("ALTER DATABASE {} ALLOW_CONNECTIONS false").format(source_id))
            conn.execute(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                "WHERE datname = %s AND pid <> pg_backend_pid()",
                (source_db,),
            )
            try:
                conn.execute(create)
            except psycopg.errors.ObjectInUse as exc:  # a prepared transaction, or a session that outlived 5 s
                raise SourceBusy(str(exc).splitlines()[0]) from None
        finally:
            # The source's downtime ends here, whatever happened to the copy.
            # Always opened (not "as it was"): a copy whose process died left
            # it closed, and the next copy, reset or the purge must heal that.
            conn.execute(sql.SQL("ALTER DATABASE {} ALLOW_CONNECTIONS true").format(source_id))
    finally:
        conn.execute("SELECT pg_advisory_unlock(hashtext('instapg-role:' || %s))", (source_role,))
    conn.execute(sql.SQL("REVOKE ALL ON DATABASE {} FROM PUBLIC").format(db_id))
    conn.execute(sql.SQL("ALTER DATABASE {} ALLOW_CONNECTIONS true").format(db_id))
    # The copied objects still belong to the source role. REASSIGN OWNED also
    # moves shared objects, and the source database is one: give it back in
    # the same transaction, so no other session ever sees it moved.
    with target.connect(dbname) as inside, inside.transaction():
        inside.execute(sql.SQL("REASSIGN OWNED BY {} TO {}").format(sql.Identifier(source_role), role_id))
        inside.execute(sql.SQL("ALTER DATABASE {} OWNER TO {}").format(source_id, sql.Identifier(source_role)))


def copy_tenant(
    target: Target,
    source_role: str,
    source_db: str,
    role: str,
    dbname: str,
    verifier: str,
    plan: Plan,
    strategy: str = "file_copy",
) -> None:
    """A new tenant (`role`, `dbname`) holding a copy of the source's schema and data as of now.

    `verifier` is `scram_verifier(password)`: the pooler publishes the same one.
    The role is NOLOGIN until the copy is whole, so nobody sees it half-made.
    """
    from psycopg import sql

    role_id = sql.Identifier(role)
    with target.connect() as conn:
        conn.execute(
            sql.SQL(
                "CREATE ROLE {} NOLOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION "
                "NOBYPASSRLS NOINHERIT CONNECTION LIMIT {} PASSWORD {}"
            ).format(role_id, sql.Literal(plan.connections), sql.Literal(verifier))
        )
        conn.execute(_membership_grant(conn, role))
        _apply_role_defaults(conn, role, plan)
        _copy_from(conn, target, source_role, source_db, role, dbname, strategy)
        conn.execute(sql.SQL("ALTER ROLE {} LOGIN").format(role_id))


def reset_copy(
    target: Target,
    source_role: str,
    source_db: str,
    role: str,
    dbname: str,
    scratch: str,
    strategy: str = "file_copy",
    login: bool = True,
) -> None:
    """Replace the copy's database with a fresh copy of its source; its role and password stay.

    The fresh copy is made under the name `scratch` (an unused tenant name)
    first, so a copy that fails leaves the old one whole; then the old one is
    dropped and the new one renamed. Idempotent: a reset that stopped between
    the drop and the rename is finished by running it again (a `scratch`
    database left behind is an orphan reconciliation drops). `login=False`
    leaves the role locked (a quota lock the scheduled job set).
    """
    from psycopg import sql

    role_id, db_id = sql.Identifier(role), sql.Identifier(dbname)
    with target.connect() as conn:
        _copy_from(conn, target, source_role, source_db, role, scratch, strategy)
        with conn.transaction():
            _lock_role(conn, role)
            conn.execute(sql.SQL("ALTER ROLE {} NOLOGIN").format(role_id))
        _terminate_role(conn, role)
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(db_id))
        conn.execute(sql.SQL("ALTER DATABASE {} RENAME TO {}").format(sql.Identifier(scratch), db_id))
        if login:
            conn.execute(sql.SQL("ALTER ROLE {} LOGIN").format(role_id))


def reopen_source(target: Target, source_db: str) -> None:
    """Let connections into a source database again (after a copy whose process died mid-way)."""
    from psycopg import sql

    with target.connect() as conn:
        row = conn.execute("SELECT datallowconn FROM pg_database WHERE datname = %s", (source_db,)).fetchone()
        if row is not None and not row[0]:
            conn.execute(sql.SQL("ALTER DATABASE {} ALLOW_CONNECTIONS true").format(sql.Identifier(source_db)))
