"""A hostile tenant against the real embedded Postgres, with a non-superuser admin (as on RDS).

Every attempt connects as a tenant over TCP with its password (scram-sha-256)
and asserts the SQLSTATE the server refuses it with, never the message text.
Tests named `test_gap_*` pin what PostgreSQL cannot close for a tenant; they
are listed in the README's security section.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from dataclasses import dataclass

import psycopg
import pytest
from psycopg import sql

from tests.pgwire import login_sqlstate

INSUFFICIENT_PRIVILEGE = "42501"


@dataclass
class Tenant:
    role: str
    password: str
    url: str

    @property
    def dbname(self) -> str:
        return self.role


@dataclass
class Host:
    target: object
    a: Tenant
    b: Tenant
    b_session: psycopg.Connection
    admin_session: psycopg.Connection
    admin_user: str


def _plan():
    from chalicelib.settings import TRIAL_PLAN, load

    return load({}).plan(TRIAL_PLAN)


def _new_tenant(target, prefix: str, pg) -> Tenant:
    from chalicelib import postgres, provisioning
    from chalicelib.identifiers import tenant_name, tenant_password

    name, password = tenant_name(prefix), tenant_password()
    provisioning.create_tenant(target, name, name, password, _plan())
    url = postgres.connection_url(pg.host, pg.port, name, password, name, "disable")
    return Tenant(name, password, url)


@pytest.fixture(scope="module")
def tenants(pg) -> Iterator[Host]:
    from chalicelib import postgres, provisioning

    target = postgres.Target(pg.host, pg.port, pg.admin_user, pg.admin_password, "postgres", "disable")
    provisioning.harden_host(target)
    prefix = "ipgadv" + secrets.token_hex(3)
    a, b = _new_tenant(target, prefix, pg), _new_tenant(target, prefix, pg)
    b_session = psycopg.connect(b.url, autocommit=True)
    admin_session = psycopg.connect(
        host=pg.host, port=pg.port, user=pg.admin_user, password=pg.admin_password, dbname="postgres"
    )
    try:
        yield Host(target, a, b, b_session, admin_session, pg.admin_user)
    finally:
        b_session.close()
        admin_session.close()
        for tenant in (a, b):
            provisioning.drop_tenant(target, tenant.role, tenant.dbname)


@pytest.fixture
def conn(tenants) -> Iterator[psycopg.Connection]:
    """Tenant A's own session in its own database."""
    with psycopg.connect(tenants.a.url, autocommit=True) as session:
        session.execute("CREATE TABLE IF NOT EXISTS scratch (x text)")
        yield session


def _refused(conn: psycopg.Connection, statement: str) -> str:
    with pytest.raises(psycopg.Error) as exc:
        conn.execute(statement)
    return exc.value.sqlstate


def _ident(name: str) -> str:
    return sql.Identifier(name).as_string()


# (what, SQL with {other_role}/{other_db}/{admin}/{self_role}/{self_db}, expected SQLSTATE)
ATTEMPTS = [
    ("read pg_authid", "SELECT rolpassword FROM pg_authid", INSUFFICIENT_PRIVILEGE),
    ("create a role", "CREATE ROLE evil LOGIN PASSWORD 'x'", INSUFFICIENT_PRIVILEGE),
    ("create a database", "CREATE DATABASE evil", INSUFFICIENT_PRIVILEGE),
    ("ALTER SYSTEM", "ALTER SYSTEM SET work_mem = '1GB'", INSUFFICIENT_PRIVILEGE),
    ("COPY TO PROGRAM", "COPY (SELECT 1) TO PROGRAM 'id'", INSUFFICIENT_PRIVILEGE),
    ("COPY FROM PROGRAM", "COPY scratch FROM PROGRAM 'id'", INSUFFICIENT_PRIVILEGE),
    ("COPY FROM a server file", "COPY scratch FROM '/etc/passwd'", INSUFFICIENT_PRIVILEGE),
    ("COPY TO a server file", "COPY (SELECT 1) TO '/tmp/instapg-evil'", INSUFFICIENT_PRIVILEGE),
    ("lo_import a server file", "SELECT lo_import('/etc/passwd')", INSUFFICIENT_PRIVILEGE),
    ("lo_export to a server file", "SELECT lo_export(lo_create(0), '/tmp/instapg-evil')", INSUFFICIENT_PRIVILEGE),
    ("pg_read_file", "SELECT pg_read_file('postgresql.conf')", INSUFFICIENT_PRIVILEGE),
    ("pg_read_binary_file", "SELECT pg_read_binary_file('/etc/passwd')", INSUFFICIENT_PRIVILEGE),
    ("pg_ls_dir", "SELECT pg_ls_dir('.')", INSUFFICIENT_PRIVILEGE),
    ("pg_stat_file", "SELECT pg_stat_file('postgresql.conf')", INSUFFICIENT_PRIVILEGE),
    ("SET ROLE to another tenant", "SET ROLE {other_role}", INSUFFICIENT_PRIVILEGE),
    ("SET ROLE to the admin", "SET ROLE {admin}", INSUFFICIENT_PRIVILEGE),
    ("SET SESSION AUTHORIZATION", "SET SESSION AUTHORIZATION {other_role}", INSUFFICIENT_PRIVILEGE),
    ("grant itself pg_read_server_files", "GRANT pg_read_server_files TO {self_role}", INSUFFICIENT_PRIVILEGE),
    (
        "grant itself pg_execute_server_program",
        "GRANT pg_execute_server_program TO {self_role}",
        INSUFFICIENT_PRIVILEGE,
    ),
    ("grant itself pg_signal_backend", "GRANT pg_signal_backend TO {self_role}", INSUFFICIENT_PRIVILEGE),
    ("grant itself the admin role", "GRANT {admin} TO {self_role}", INSUFFICIENT_PRIVILEGE),
    ("grant its role to another tenant", "GRANT {self_role} TO {other_role}", INSUFFICIENT_PRIVILEGE),
    ("CREATE EXTENSION dblink", "CREATE EXTENSION dblink", INSUFFICIENT_PRIVILEGE),
    ("CREATE EXTENSION postgres_fdw", "CREATE EXTENSION postgres_fdw", INSUFFICIENT_PRIVILEGE),
    ("CREATE EXTENSION file_fdw", "CREATE EXTENSION file_fdw", INSUFFICIENT_PRIVILEGE),
    (
        "LANGUAGE c",
        "CREATE FUNCTION evil() RETURNS int AS 'libc.so.6', 'getpid' LANGUAGE c",
        INSUFFICIENT_PRIVILEGE,
    ),
    ("raise its own connection limit", "ALTER ROLE {self_role} CONNECTION LIMIT 1000", INSUFFICIENT_PRIVILEGE),
    ("give itself CREATEDB", "ALTER ROLE {self_role} CREATEDB", INSUFFICIENT_PRIVILEGE),
    ("give itself SUPERUSER", "ALTER ROLE {self_role} SUPERUSER", INSUFFICIENT_PRIVILEGE),
    ("give itself REPLICATION", "ALTER ROLE {self_role} REPLICATION", INSUFFICIENT_PRIVILEGE),
    ("give itself BYPASSRLS", "ALTER ROLE {self_role} BYPASSRLS", INSUFFICIENT_PRIVILEGE),
    ("rename its database", "ALTER DATABASE {self_db} RENAME TO evil", INSUFFICIENT_PRIVILEGE),
    ("change another tenant's password", "ALTER ROLE {other_role} PASSWORD 'x'", INSUFFICIENT_PRIVILEGE),
    ("lock another tenant out", "ALTER ROLE {other_role} NOLOGIN", INSUFFICIENT_PRIVILEGE),
    ("alter another tenant's database", "ALTER DATABASE {other_db} CONNECTION LIMIT 0", INSUFFICIENT_PRIVILEGE),
    ("take another tenant's database", "ALTER DATABASE {other_db} OWNER TO {self_role}", INSUFFICIENT_PRIVILEGE),
    ("drop another tenant's database", "DROP DATABASE {other_db}", INSUFFICIENT_PRIVILEGE),
    ("drop another tenant's role", "DROP ROLE {other_role}", INSUFFICIENT_PRIVILEGE),
    ("REASSIGN OWNED of another tenant", "REASSIGN OWNED BY {other_role} TO {self_role}", INSUFFICIENT_PRIVILEGE),
    ("DROP OWNED of another tenant", "DROP OWNED BY {other_role}", INSUFFICIENT_PRIVILEGE),
    ("LOAD a library", "LOAD 'auto_explain'", INSUFFICIENT_PRIVILEGE),
    ("CREATE TABLESPACE", "CREATE TABLESPACE evil LOCATION '/tmp'", INSUFFICIENT_PRIVILEGE),
    (
        "CREATE SUBSCRIPTION",
        "CREATE SUBSCRIPTION evil CONNECTION 'host=127.0.0.1 dbname=postgres' PUBLICATION p WITH (connect = false)",
        INSUFFICIENT_PRIVILEGE,
    ),
    ("CREATE PUBLICATION FOR ALL TABLES", "CREATE PUBLICATION evil FOR ALL TABLES", INSUFFICIENT_PRIVILEGE),
    (
        "logical replication slot",
        "SELECT pg_create_logical_replication_slot('evil', 'pgoutput')",
        INSUFFICIENT_PRIVILEGE,
    ),
    ("physical replication slot", "SELECT pg_create_physical_replication_slot('evil')", INSUFFICIENT_PRIVILEGE),
    ("pg_reload_conf", "SELECT pg_reload_conf()", INSUFFICIENT_PRIVILEGE),
    ("pg_rotate_logfile", "SELECT pg_rotate_logfile()", INSUFFICIENT_PRIVILEGE),
    ("pg_switch_wal", "SELECT pg_switch_wal()", INSUFFICIENT_PRIVILEGE),
    ("CHECKPOINT", "CHECKPOINT", INSUFFICIENT_PRIVILEGE),
    ("size of another tenant's database", "SELECT pg_database_size({other_db_literal})", INSUFFICIENT_PRIVILEGE),
    ("size of the postgres database", "SELECT pg_database_size('postgres')", INSUFFICIENT_PRIVILEGE),
    ("read the data directory path", "SHOW data_directory", INSUFFICIENT_PRIVILEGE),
    ("read pg_hba rules", "SELECT * FROM pg_hba_file_rules", INSUFFICIENT_PRIVILEGE),
    ("lift temp_file_limit", "SET temp_file_limit = -1", INSUFFICIENT_PRIVILEGE),
    ("skip triggers and foreign keys", "SET session_replication_role = replica", INSUFFICIENT_PRIVILEGE),
]


@pytest.mark.parametrize(("what", "statement", "sqlstate"), ATTEMPTS, ids=[a[0] for a in ATTEMPTS])
def test_tenant_is_refused(tenants, conn, what, statement, sqlstate):
    statement = statement.format(
        other_role=_ident(tenants.b.role),
        other_db=_ident(tenants.b.dbname),
        other_db_literal=sql.Literal(tenants.b.dbname).as_string(),
        self_role=_ident(tenants.a.role),
        self_db=_ident(tenants.a.dbname),
        admin=_ident(tenants.admin_user),
    )
    assert _refused(conn, statement) == sqlstate


def test_event_trigger_is_refused(conn):
    conn.execute("CREATE OR REPLACE FUNCTION on_ddl() RETURNS event_trigger LANGUAGE plpgsql AS $$ BEGIN END $$")
    sqlstate = _refused(conn, "CREATE EVENT TRIGGER evil ON ddl_command_start EXECUTE FUNCTION on_ddl()")
    assert sqlstate == INSUFFICIENT_PRIVILEGE


@pytest.mark.parametrize("signal", ["pg_terminate_backend", "pg_cancel_backend"])
def test_cannot_signal_another_tenants_backend(tenants, conn, signal):
    pid = tenants.b_session.info.backend_pid
    assert _refused(conn, f"SELECT {signal}({pid})") == INSUFFICIENT_PRIVILEGE
    assert tenants.b_session.execute("SELECT 1").fetchone() == (1,)


@pytest.mark.parametrize("signal", ["pg_terminate_backend", "pg_cancel_backend"])
def test_cannot_signal_the_admins_backend(tenants, conn, signal):
    pid = tenants.admin_session.info.backend_pid
    assert _refused(conn, f"SELECT {signal}({pid})") == INSUFFICIENT_PRIVILEGE


# -- logins ------------------------------------------------------------------------


def test_login_to_another_tenants_database_is_refused(tenants):
    assert login_sqlstate(tenants.a.url, dbname=tenants.b.dbname) == INSUFFICIENT_PRIVILEGE


@pytest.mark.parametrize("dbname", ["postgres", "template1"])
def test_login_to_maintenance_databases_is_refused(tenants, dbname):
    assert login_sqlstate(tenants.a.url, dbname=dbname) == INSUFFICIENT_PRIVILEGE


def test_login_to_template0_is_refused(tenants):
    assert login_sqlstate(tenants.a.url, dbname="template0") == "55000"  # not accepting connections


def test_wrong_password_is_refused(tenants):
    url = tenants.a.url.replace(tenants.a.password, "not-the-password")
    assert login_sqlstate(url) == "28P01"  # scram-sha-256 really checks it


def test_own_login_works(tenants):
    assert login_sqlstate(tenants.a.url) is None


def test_connection_limit_plus_one_is_refused_even_after_raising_the_database_limit(tenants, pg):
    """The role's limit holds: the tenant can raise its database's limit, not its role's."""
    from chalicelib import provisioning
    tenant = _new_tenant(tenants.target, "ipgadv" + secrets.token_hex(3), pg)
    sessions = []
    try:
        sessions.append(psycopg.connect(tenant.url, autocommit=True))
        sessions[0].execute(sql.SQL("ALTER DATABASE {} CONNECTION LIMIT 1000").format(sql.Identifier(tenant.dbname)))
        limit = _plan().connections
        sessions += [psycopg.connect(tenant.url) for _ in range(limit - 1)]
        assert login_sqlstate(tenant.url) == "53300"  # too_many_connections
    finally:
        for session in sessions:
            session.close()

        provisioning.drop_tenant(tenants.target, tenant.role, tenant.dbname)


def test_login_after_a_storage_lock_is_refused(tenants, pg):
    from chalicelib import provisioning

    tenant = _new_tenant(tenants.target, "ipgadv" + secrets.token_hex(3), pg)
    try:
        session = psycopg.connect(tenant.url, autocommit=True)
        provisioning.lock_role(tenants.target, tenant.role)
        with pytest.raises(psycopg.OperationalError):
            session.execute("SELECT 1")  # its session was ended
        assert login_sqlstate(tenant.url) == "28000"
        session.close()
    finally:
        provisioning.drop_tenant(tenants.target, tenant.role, tenant.dbname)


# -- what a tenant can do: what ORMs need ----------------------------------------------


def test_tenant_can_do_what_orms_do(conn):
    conn.execute("CREATE SCHEMA IF NOT EXISTS drizzle")
    conn.execute("CREATE TABLE IF NOT EXISTS drizzle.users (id uuid PRIMARY KEY DEFAULT gen_random_uuid(), email text)")
    conn.execute("CREATE INDEX IF NOT EXISTS users_email ON drizzle.users (email)")
    for extension in ("citext", "hstore", "pg_trgm"):
        conn.execute(sql.SQL("CREATE EXTENSION IF NOT EXISTS {}").format(sql.Identifier(extension)))
    conn.execute("INSERT INTO drizzle.users (email) VALUES ('a@example.com')")
    assert conn.execute("SELECT count(*) FROM drizzle.users").fetchone() == (1,)


# -- known gaps: PostgreSQL shows these to every role ------------------------------


def test_gap_other_database_names_are_visible(tenants, conn):
    row = conn.execute("SELECT count(*) FROM pg_database WHERE datname = %s", (tenants.b.dbname,)).fetchone()
    assert row == (1,)  # hence opaque random names, nothing personal in them


def test_gap_other_role_names_are_visible(tenants, conn):
    assert conn.execute("SELECT count(*) FROM pg_roles WHERE rolname = %s", (tenants.b.role,)).fetchone() == (1,)


def test_gap_other_sessions_are_visible_but_not_their_queries(tenants, conn):
    pid = tenants.b_session.info.backend_pid
    row = conn.execute("SELECT usename, query, client_addr FROM pg_stat_activity WHERE pid = %s", (pid,)).fetchone()
    assert row[0] == tenants.b.role
    assert row[1] in (None, "<insufficient privilege>") and row[2] is None


def test_gap_tenant_can_override_its_role_defaults(tenants, conn):
    # Defaults are no enforcement: the scheduled job ends long queries instead.
    conn.execute(sql.SQL("ALTER ROLE {} SET statement_timeout = 0").format(sql.Identifier(tenants.a.role)))
    conn.execute("SET statement_timeout = 0")
    assert conn.execute("SHOW statement_timeout").fetchone() == ("0",)
    conn.execute(sql.SQL("ALTER ROLE {} RESET statement_timeout").format(sql.Identifier(tenants.a.role)))


@pytest.mark.parametrize(
    "shut_out",
    [
        "ALTER DATABASE {db} CONNECTION LIMIT 0",
        "REVOKE ALL ON DATABASE {db} FROM {role}",
        "ALTER DATABASE {db} SET role = {role}",
        "ALTER DATABASE {db} SET default_transaction_read_only = on",
        "ALTER DATABASE {db} SET idle_session_timeout = '1ms'",
        "ALTER DATABASE {db} SET session_authorization = {role}",
    ],
    ids=[
        "connection-limit-0",
        "revoke-connect-from-itself",
        "set-role",
        "read-only",
        "idle-session-timeout",
        "session-authorization",
    ],
)
def test_tenant_cannot_keep_another_tenants_role_from_being_dropped(tenants, pg, shut_out):
    """A grants B something in A's database, then shuts the admin out of it or changes its sessions there.

    DROP OWNED BY B must run inside A's database. Before postgres._reopen,
    a connection limit of 0 or a revoked CONNECT kept the admin out; before
    `role=none` in the admin's connection options, `SET role` made the admin
    act as A there. Either way dropping B failed for good and B's role leaked.
    """
    from chalicelib import provisioning

    prefix = "ipgadv" + secrets.token_hex(3)
    a, b = _new_tenant(tenants.target, prefix, pg), _new_tenant(tenants.target, prefix, pg)
    try:
        with psycopg.connect(a.url, autocommit=True) as session:
            session.execute("CREATE TABLE shared (x int)")
            session.execute(sql.SQL("GRANT SELECT ON shared TO {}").format(sql.Identifier(b.role)))
            session.execute(shut_out.format(db=_ident(a.dbname), role=_ident(a.role)))
        assert provisioning.drop_tenant(tenants.target, b.role, b.dbname) is True
        with psycopg.connect(pg.superuser_dsn) as su:
            assert su.execute("SELECT count(*) FROM pg_roles WHERE rolname = %s", (b.role,)).fetchone() == (0,)
    finally:
        provisioning.drop_tenant(tenants.target, b.role, b.dbname)
        provisioning.drop_tenant(tenants.target, a.role, a.dbname)


def test_gap_tenant_can_raise_its_memory_settings(conn):
    # work_mem and friends are user settings: only the host's configuration
    # (and its RAM) bounds what one tenant's query may take.
    conn.execute("SET work_mem = '1GB'")
    conn.execute("SET maintenance_work_mem = '1GB'")
    assert conn.execute("SHOW work_mem").fetchone() == ("1GB",)
