"""Issue 18 §1: logical replication that works, and nothing physical (docs/replication.md).

Real clients against the embedded server (wal_level=logical) through a real
replication gateway process (tools/replication/gateway.py, the session's
`replication_gateway` fixture): pg_recvlogical from the wheel, psycopg on a
`replication=database` connection, a real subscription; pg8000 for the
SQLSTATE of a refused login. Tenants connect with their own passwords.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import time
from pathlib import Path

import psycopg
import pytest
from psycopg import sql

from tests.test_expiry import age, catalog, url
from tests.test_tls import tls  # noqa: F401  (the TLS endpoint fixture)


@pytest.fixture
def logical_host(host, service, pg, replication_gateway):
    """The session's Postgres registered again, as a host that offers logical replication through the gateway."""
    from chalicelib import hosts

    try:
        record, _ = hosts.register(
            service.settings,
            "local-1",
            pg.host,
            pg.port,
            host.credentials,
            capacity=1000,
            sslmode="disable",
            logical_replication=True,
            replication_endpoint=(replication_gateway.host, replication_gateway.port),
        )
    except ValueError as exc:
        if not os.environ.get("INSTAPG_TEST_PG_DSN"):
            raise  # the embedded server always offers it
        pytest.skip(f"the external server does not offer logical replication: {exc}")
    service.hosts.invalidate()
    return record


def create(service, logical: bool = True):
    from chalicelib import creation
    from chalicelib.records import Requester
    from chalicelib.schemas import CreateDatabase

    return creation.create(service, CreateDatabase(ref="repl", enable_logical_replication=logical), Requester())


def repl_url(service, tenant, password: str | None = None) -> str:
    """The database's replication_connection_string, as the API hands it out (the gateway's)."""
    from chalicelib import views

    host = service.hosts.get(tenant.record.host_id)
    found = views.replication_url(tenant.record, host, password or tenant.password)
    assert found is not None and "replication=database" in found
    return found


def tool(name: str) -> str:
    from tools.dev import pgserver

    return pgserver._bin(name)


def recvlogical(dsn: str, slot: str, *args: str, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run(
        [tool("pg_recvlogical"), "-d", dsn, "--slot", slot, *args],
        capture_output=True,
        timeout=timeout,
    )


def start_stream(dsn: str, slot: str, publication: str) -> subprocess.Popen:
    """pg_recvlogical streaming `slot` with pgoutput, as a subscriber would, until killed."""
    return subprocess.Popen(
        [tool("pg_recvlogical"), "-d", dsn, "--slot", slot, "--start", "-f", "-", "--no-loop",
         "-o", "proto_version=1", "-o", f"publication_names={publication}"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )  # fmt: skip


def wait_for(predicate, timeout: float = 10.0) -> None:
    give_up = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < give_up, "condition not reached in time"
        time.sleep(0.05)


def slot_names(pg) -> set[str]:
    with psycopg.connect(pg.superuser_dsn) as conn:
        return {name for (name,) in conn.execute("SELECT slot_name FROM pg_replication_slots").fetchall()}


def physical_slots(pg) -> set[str]:
    with psycopg.connect(pg.superuser_dsn) as conn:
        rows = conn.execute("SELECT slot_name FROM pg_replication_slots WHERE slot_type = 'physical'").fetchall()
        return {name for (name,) in rows}


def walsenders(pg, role: str) -> list[tuple[int, str]]:
    with psycopg.connect(pg.superuser_dsn) as conn:
        return conn.execute(
            "SELECT pid, query FROM pg_stat_activity WHERE backend_type = 'walsender' AND usename = %s", (role,)
        ).fetchall()


def walsender(service, tenant) -> psycopg.Connection:
    """A logical walsender session through the gateway.

    psycopg sends a query without parameters as a simple 'Q', unless it prepares a query it saw
    often: a walsender speaks no extended protocol, so never.
    """
    return psycopg.connect(repl_url(service, tenant), autocommit=True, connect_timeout=10, prepare_threshold=None)


def gateway_login(service, tenant, password: str | None = None) -> str | None:
    """The SQLSTATE of a replication login through the gateway (None: it worked)."""
    from tests.pgwire import login_sqlstate

    return login_sqlstate(repl_url(service, tenant, password), replication="database")


def make_slot(service, tenant, name: str) -> None:
    with walsender(service, tenant) as conn:
        conn.execute(sql.SQL("CREATE_REPLICATION_SLOT {} LOGICAL pgoutput").format(sql.Identifier(name)))


def test_a_tenant_streams_its_own_inserts_and_never_another_tenants(service, pg, logical_host):
    mine, other = create(service), create(service)
    mine_url, other_url = url(service, mine), url(service, other)
    for dsn in (mine_url, other_url):
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute("CREATE TABLE todo (id serial PRIMARY KEY, title text)")
            conn.execute("CREATE PUBLICATION pub FOR TABLE todo")  # on its own table: it owns it
    mine_repl, other_repl = repl_url(service, mine), repl_url(service, other)
    created = recvlogical(mine_repl, "mine", "--create-slot", "--plugin", "pgoutput")
    assert created.returncode == 0, created.stderr
    assert recvlogical(other_repl, "other", "--create-slot", "--plugin", "pgoutput").returncode == 0

    with psycopg.connect(mine_url, autocommit=True) as conn:
        conn.execute("INSERT INTO todo (title) VALUES ('hello-mine')")
    with psycopg.connect(other_url, autocommit=True) as conn:
        conn.execute("INSERT INTO todo (title) VALUES ('hello-other')")
        end = conn.execute("SELECT pg_current_wal_lsn()::text").fetchone()[0]

    # A walsender with replication=database through the gateway, decoding with pgoutput.
    got = recvlogical(
        mine_repl, "mine", "--start", "--no-loop", "-f", "-", "--endpos", end, "-o", "proto_version=1", "-o", "publication_names=pub"
    )
    assert got.returncode == 0, got.stderr
    assert b"hello-mine" in got.stdout
    assert b"hello-other" not in got.stdout
    # Another database's slot cannot be read from here.
    theirs = recvlogical(mine_repl, "other", "--start", "--no-loop", "-f", "-", "--endpos", end, "-o", "proto_version=1",
                         "-o", "publication_names=pub")  # fmt: skip
    assert theirs.returncode != 0 and b"hello-other" not in theirs.stdout


def test_a_database_without_the_flag_gets_no_replication(service, pg, logical_host):
    from chalicelib import replication, views

    plain = create(service, logical=False)
    host = service.hosts.get(plain.record.host_id)
    assert views.replication_url(plain.record, host, plain.password) is None
    assert catalog(pg, replication.companion(plain.record.role_name)) == (False, False)
    with psycopg.connect(url(service, plain), autocommit=True) as conn:
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("SELECT pg_create_logical_replication_slot('nope', 'pgoutput')")


def test_the_tenant_role_cannot_replicate_and_its_companion_only_through_the_gateway(service, pg, logical_host):
    from chalicelib import replication
    from tests.pgwire import login_sqlstate

    tenant = create(service)
    dsn = url(service, tenant)
    # The tenant role has no REPLICATION: a direct logical walsender login is refused by Postgres.
    assert login_sqlstate(dsn, replication="database") == "42501"
    # replication=true matches only `replication` lines in pg_hba.conf, and there are none.
    assert login_sqlstate(dsn, replication="true") == "28000"
    # The companion has the tenant's password, but pg_hba.conf refuses it over TCP: only the gateway's socket.
    params = psycopg.conninfo.conninfo_to_dict(dsn)
    as_companion = psycopg.conninfo.make_conninfo(**{**params, "user": replication.companion(params["user"])})
    assert login_sqlstate(as_companion, replication="database") == "28000"
    assert login_sqlstate(as_companion) == "28000"
    # Through the gateway, the tenant's own string works.
    with walsender(service, tenant) as conn:
        assert conn.execute("IDENTIFY_SYSTEM").fetchone()[3] == tenant.record.db_name
        assert conn.execute("SELECT current_user").fetchone()[0] == replication.companion(tenant.record.role_name)


def test_the_gateway_refuses_what_is_not_a_tenants_logical_walsender(service, logical_host, replication_gateway):
    from tests.pgwire import login_sqlstate

    tenant = create(service)
    gateway = psycopg.conninfo.make_conninfo(
        url(service, tenant), host=replication_gateway.host, port=replication_gateway.port
    )
    assert login_sqlstate(gateway) == "08004"  # a plain session: use the direct or pooled string
    assert login_sqlstate(gateway, replication="true") == "08004"
    params = psycopg.conninfo.conninfo_to_dict(gateway)
    for user in ("postgres", "instapg_admin", tenant.record.role_name + "_repl"):
        stranger = psycopg.conninfo.make_conninfo(**{**params, "user": user})
        assert login_sqlstate(stranger, replication="database") == "28000"
    wrong = psycopg.conninfo.make_conninfo(**{**params, "password": "not-the-password"})
    assert login_sqlstate(wrong, replication="database") == "28P01"  # Postgres's own SCRAM check, relayed
    # The companion may connect to its tenant's database only (CONNECT comes with the tenant's ownership).
    other = create(service)
    for dbname in (other.record.db_name, "postgres", "template1"):
        elsewhere = psycopg.conninfo.make_conninfo(**{**params, "dbname": dbname})
        assert login_sqlstate(elsewhere, replication="database") == "42501"


PHYSICAL = [
    "START_REPLICATION 0/0",
    "START_REPLICATION PHYSICAL 0/0",
    'START_REPLICATION SLOT "logical" PHYSICAL 0/0',
    "BASE_BACKUP (LABEL 'x')",
    "CREATE_REPLICATION_SLOT phys PHYSICAL RESERVE_WAL",
    "CREATE_REPLICATION_SLOT phys TEMPORARY PHYSICAL",
    "READ_REPLICATION_SLOT phys",
    "UPLOAD_MANIFEST",
    "base_backup",
]


def test_physical_commands_are_refused_through_the_gateway_and_the_connection_goes_on(service, pg, logical_host):
    tenant = create(service)
    before = physical_slots(pg)
    with walsender(service, tenant) as conn:
        for command in PHYSICAL:
            with pytest.raises(psycopg.errors.InsufficientPrivilege, match="not allowed through the replication gateway"):
                conn.execute(command)
            # Still usable: a replication command and plain SQL answer after each refusal.
            assert conn.execute("IDENTIFY_SYSTEM").fetchone()[3] == tenant.record.db_name
        assert conn.execute("SELECT 1").fetchone() == (1,)
        # The SQL functions that make physical slots are revoked in every tenant database.
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("SELECT pg_create_physical_replication_slot('phys2')")
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("SELECT pg_copy_physical_replication_slot('a', 'b')")
    assert physical_slots(pg) == before
    assert not {"phys", "phys2", "b"} & slot_names(pg)


def test_a_tenant_cannot_drop_or_alter_another_tenants_slot(service, pg, logical_host):
    a, b = create(service), create(service)
    make_slot(service, b, "b_slot")
    with walsender(service, a) as conn:
        for command in ("DROP_REPLICATION_SLOT b_slot", 'DROP_REPLICATION_SLOT "b_slot" WAIT',
                        "ALTER_REPLICATION_SLOT b_slot (FAILOVER true)"):  # fmt: skip
            with pytest.raises(psycopg.errors.InsufficientPrivilege, match="not a slot of this database"):
                conn.execute(command)
        # As the companion (REPLICATION) in SQL: the functions that take any slot are revoked.
        for statement in ("SELECT pg_drop_replication_slot('b_slot')",
                          "SELECT pg_replication_slot_advance('b_slot', pg_current_wal_lsn())",
                          "SELECT pg_copy_logical_replication_slot('b_slot', 'stolen')"):  # fmt: skip
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute(statement)
    with psycopg.connect(url(service, a), autocommit=True) as conn:
        # Directly, as the tenant role; and through a function of its own that runs as its owner.
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("SELECT pg_drop_replication_slot('b_slot')")
        conn.execute(
            "CREATE FUNCTION steal() RETURNS void LANGUAGE sql SECURITY DEFINER "
            "AS $$ SELECT pg_drop_replication_slot('b_slot') $$"
        )
    with walsender(service, a) as conn, pytest.raises(psycopg.errors.InsufficientPrivilege):
        conn.execute("SELECT steal()")
    assert "b_slot" in slot_names(pg)
    # B drops its own slot through the gateway.
    with walsender(service, b) as conn:
        conn.execute("DROP_REPLICATION_SLOT b_slot")
    assert "b_slot" not in slot_names(pg)


def test_a_subscription_copies_the_table_then_streams_through_the_gateway(service, pg, logical_host):
    tenant = create(service)
    with psycopg.connect(url(service, tenant), autocommit=True) as conn:
        conn.execute("CREATE TABLE todo (id int PRIMARY KEY, title text)")
        conn.execute("INSERT INTO todo VALUES (1, 'before')")
        conn.execute("CREATE PUBLICATION pub FOR TABLE todo")
    # The subscriber is another database of the same server; on one server the slot is made
    # beforehand (CREATE SUBSCRIPTION would wait for its own transaction otherwise).
    make_slot(service, tenant, "sub")
    subscriber = "sub_" + tenant.record.db_name[-12:]
    sub_dsn = pg.superuser_dsn.replace("dbname=postgres", f"dbname={subscriber}")
    with psycopg.connect(pg.superuser_dsn, autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(subscriber)))
    try:
        with psycopg.connect(sub_dsn, autocommit=True) as conn:
            conn.execute("CREATE TABLE todo (id int PRIMARY KEY, title text)")
            conn.execute(
                sql.SQL("CREATE SUBSCRIPTION sub CONNECTION {} PUBLICATION pub WITH (create_slot = false)").format(
                    sql.Literal(repl_url(service, tenant))
                )
            )
            wait_for(lambda: conn.execute("SELECT title FROM todo").fetchall() == [("before",)], timeout=30)
            with psycopg.connect(url(service, tenant), autocommit=True) as publisher:
                publisher.execute("INSERT INTO todo VALUES (2, 'after')")
            wait_for(lambda: conn.execute("SELECT count(*) FROM todo").fetchone()[0] == 2, timeout=30)
            # DROP SUBSCRIPTION drops its slot on the publisher: DROP_REPLICATION_SLOT through the gateway.
            conn.execute("DROP SUBSCRIPTION sub")
        assert "sub" not in slot_names(pg)
    finally:
        with psycopg.connect(pg.superuser_dsn, autocommit=True) as admin:
            admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(subscriber)))


def test_lock_rotate_and_drop_act_on_the_companion(service, pg, logical_host):
    from chalicelib import access, replication

    tenant = create(service)
    record, host = tenant.record, service.hosts.get(tenant.record.host_id)
    companion = replication.companion(record.role_name)
    make_slot(service, tenant, "kept")
    stream = walsender(service, tenant)
    try:
        assert access.lock(service, host, record) >= 1  # the companion's walsender ended too
        with pytest.raises(psycopg.OperationalError):
            stream.execute("SELECT 1")
    finally:
        stream.close()
    assert gateway_login(service, tenant) == "28000"  # NOLOGIN, through the gateway
    access.unlock(service, host, record, service.settings.plan(record.plan))
    assert gateway_login(service, tenant) is None

    access.rotate(service, host, record, service.settings.plan(record.plan), "a-new-password-for-both-roles")
    assert gateway_login(service, tenant) == "28P01"  # the old password, on the companion too
    assert gateway_login(service, tenant, "a-new-password-for-both-roles") is None

    assert access.drop(service, host, record.role_name, record.db_name, keep_claimed=False)
    assert catalog(pg, companion) == (False, False) and catalog(pg, record.role_name) == (False, False)
    assert "kept" not in slot_names(pg)


def test_a_companion_without_its_tenant_is_an_orphan(instapg_env, pg, logical_host):
    from chalicelib import hosts as hostlib
    from chalicelib import provisioning, replication
    from chalicelib.identifiers import tenant_name
    from tests.test_expiry import purge, reconfigure

    service = reconfigure(instapg_env, INSTAPG_ORPHAN_GRACE_SECONDS=0)
    kept = create(service)
    lost = tenant_name(service.settings.name_prefix)
    target = hostlib.target(logical_host, service.settings)
    provisioning.create_tenant(target, lost, lost, "orphan-password-123", service.settings.plan("unclaimed"),
                               logical_replication=True)  # fmt: skip
    # No record knows it, and its tenant went first: the companion alone is left.
    with psycopg.connect(pg.superuser_dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE {}").format(sql.Identifier(lost)))
        conn.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(lost)))
    companion = replication.companion(lost)
    assert catalog(pg, companion) == (True, False)
    summary = purge(service)
    assert summary.orphans_seen == 1 and summary.orphans_dropped == 1
    assert catalog(pg, companion) == (False, False)
    assert catalog(pg, replication.companion(kept.record.role_name)) == (True, False)  # a live record's stays


@pytest.mark.parametrize(
    ("command", "physical"),
    [
        ('START_REPLICATION SLOT "mine" LOGICAL 0/0 ("proto_version" \'1\')', False),
        ("start_replication slot s logical 0/16B3748", False),
        ('CREATE_REPLICATION_SLOT "s" TEMPORARY LOGICAL "pgoutput"', False),
        ("CREATE_REPLICATION_SLOT s LOGICAL test_decoding", False),
        ("IDENTIFY_SYSTEM", False),
        ("SELECT 1", False),
        ("START_REPLICATION 0/0", True),
        ("START_REPLICATION PHYSICAL 0/0", True),
        ('START_REPLICATION SLOT "logical" PHYSICAL 0/0', True),
        ("START_REPLICATION SLOT logical 0/0 TIMELINE 1", True),
        ("CREATE_REPLICATION_SLOT logical PHYSICAL RESERVE_WAL", True),
        ("  base_backup (LABEL 'x')", True),
        ("READ_REPLICATION_SLOT s", True),
        ("TIMELINE_HISTORY 1", True),
    ],
)
def test_which_walsender_commands_count_as_physical(command, physical):
    from chalicelib.replication import is_physical_command

    assert is_physical_command(command) is physical


@pytest.mark.parametrize(
    ("command", "action"),
    [
        (b'START_REPLICATION SLOT "mine" LOGICAL 0/0 ("proto_version" \'1\')', "forward"),
        (b"START_REPLICATION SLOT mine LOGICAL 0/16B3748", "forward"),
        (b'CREATE_REPLICATION_SLOT "s" TEMPORARY LOGICAL "pgoutput"', "forward"),
        (b"CREATE_REPLICATION_SLOT s LOGICAL test_decoding (SNAPSHOT 'use')", "forward"),
        (b"IDENTIFY_SYSTEM", "forward"),
        (b"SHOW wal_level", "forward"),
        (b"TIMELINE_HISTORY 1", "forward"),
        (b"SELECT 1; SELECT 2", "forward"),  # SQL: Postgres's SQL parser, never a replication command
        (b"/* c */ BASE_BACKUP", "forward"),  # the replication scanner skips no comment: SQL (a syntax error)
        (b"BASE_BACKUPS", "forward"),  # a longer identifier, not the keyword
        (b"DROP_REPLICATION_SLOT Mine WAIT", "check_slot"),
        (b"ALTER_REPLICATION_SLOT mine (FAILOVER true)", "check_slot"),
        (b"START_REPLICATION 0/0", "refuse"),
        (b"START_REPLICATION PHYSICAL 0/0", "refuse"),
        (b'START_REPLICATION SLOT "logical" PHYSICAL 0/0', "refuse"),
        (b"START_REPLICATION SLOT logical 0/0 TIMELINE 1", "refuse"),
        (b"start_replication slot s logical 0/0", "refuse"),  # Postgres reads it as SQL; refusing is the safe side
        (b"CREATE_REPLICATION_SLOT logical PHYSICAL RESERVE_WAL", "refuse"),
        (b"CREATE_REPLICATION_SLOT s TEMPORARY PHYSICAL", "refuse"),
        (b" \t\n\x0bBASE_BACKUP (LABEL 'x')", "refuse"),
        (b"READ_REPLICATION_SLOT s", "refuse"),
        (b"UPLOAD_MANIFEST", "refuse"),
        (b"IDENTIFY_SYSTEM\0BASE_BACKUP", "forward"),  # Postgres reads up to the first NUL, as the gateway
        (b"BASE_BACKUP\0IDENTIFY_SYSTEM", "refuse"),
        (b"DROP_REPLICATION_SLOT \"a'b\"", "refuse"),  # not a valid slot name
        (b"CREATE_REPLICATION_SLOT 's LOGICAL", "refuse"),  # unterminated
    ],
)
def test_how_the_gateway_classifies_a_query(command, action):
    from tools.replication.gateway import classify

    assert classify(command).action == action


def test_the_gateway_and_the_service_agree_on_the_companions_name():
    from chalicelib import replication
    from tools.replication import gateway

    assert gateway.COMPANION_SUFFIX == replication.COMPANION_SUFFIX
    assert gateway.classify(b"DROP_REPLICATION_SLOT Mine").slot == "mine"  # unquoted names are folded


def test_slots_past_the_count_or_the_wal_limit_are_dropped_with_an_audit_event(service, pg, logical_host):
    from chalicelib import audit, replication
    from chalicelib.models import DatabaseRecord

    tenant = create(service)
    for name in ("s1", "s2", "s3"):
        make_slot(service, tenant, name)
    target = service.target(service.hosts.get(tenant.record.host_id))
    records = [DatabaseRecord.get(tenant.record.id)]

    summary = replication.guard(dataclasses.replace(service.settings, slots_per_database=2), target, records)
    assert summary["slots_dropped"] == 1
    assert {"s1", "s2", "s3"} & slot_names(pg) == {"s1", "s2"}

    # s1 lags: WAL written since it was made is more than a limit of 0 MB.
    with psycopg.connect(url(service, tenant), autocommit=True) as conn:
        conn.execute("CREATE TABLE t AS SELECT generate_series(1, 1000) AS n")
    summary = replication.guard(dataclasses.replace(service.settings, slot_max_retained_mb=0), target, records)
    assert summary["slots_dropped"] == 2
    assert not {"s1", "s2"} & slot_names(pg)
    events = [e for e in audit.page(tenant.record.id).events if e.action == replication.SLOT_DROPPED]
    assert len(events) == 3 and all(e.actor == audit.SYSTEM for e in events)
    assert any("over 0 MB" in e.detail for e in events) and any("more than 2" in e.detail for e in events)


def test_the_guard_still_drops_a_physical_slot_nobody_should_have(service, pg, logical_host):
    """Defence in depth: a physical slot (here the superuser's) is dropped at the next run, unless its prefix is kept."""
    from chalicelib import quotas
    from chalicelib.clock import Deadline

    with psycopg.connect(pg.superuser_dsn, autocommit=True) as conn:
        conn.execute("SELECT pg_create_physical_replication_slot('stray_phys', true)")
    summary = quotas.enforce(service, Deadline.after(30))
    assert summary["physical_slots_dropped"] == 1
    assert "stray_phys" not in slot_names(pg)


def test_expiry_drops_the_slots_then_the_database_while_a_stream_is_open(service, pg, logical_host):
    from chalicelib import expiry, replication
    from chalicelib.clock import Deadline

    tenant = create(service)
    with psycopg.connect(url(service, tenant), autocommit=True) as conn:
        conn.execute("CREATE TABLE t (n int)")
        conn.execute("CREATE PUBLICATION pub FOR TABLE t")
    make_slot(service, tenant, "idle")
    repl = repl_url(service, tenant)
    assert recvlogical(repl, "live", "--create-slot", "--plugin", "pgoutput").returncode == 0
    stream = start_stream(repl, "live", "pub")
    companion = replication.companion(tenant.record.role_name)
    try:
        wait_for(lambda: bool(walsenders(pg, companion)))
        age(tenant.record)
        summary = expiry.run_scheduled(service, Deadline.after(30))
        assert summary.expired_dropped == 1
        assert catalog(pg, tenant.record.db_name) == (False, False)
        assert catalog(pg, companion) == (False, False)
        assert not {"idle", "live"} & slot_names(pg)
        stream.wait(timeout=10)
    finally:
        stream.kill()
        stream.wait()


def test_a_logical_stream_survives_the_scheduled_job(service, pg, instapg_env, logical_host):
    from chalicelib import quotas, replication
    from chalicelib.clock import Deadline
    from tests.test_expiry import reconfigure

    service = reconfigure(instapg_env, INSTAPG_UNCLAIMED_STATEMENT_TIMEOUT_SECONDS=1)
    tenant = create(service)
    dsn = url(service, tenant)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE t (n int)")
        conn.execute("CREATE PUBLICATION pub FOR TABLE t")
    repl = repl_url(service, tenant)
    assert recvlogical(repl, "live", "--create-slot", "--plugin", "pgoutput").returncode == 0
    stream = start_stream(repl, "live", "pub")
    companion = replication.companion(tenant.record.role_name)
    try:
        wait_for(lambda: bool(walsenders(pg, companion)))
        time.sleep(1.2)  # streaming for longer than the plan's statement time
        summary = quotas.enforce(service, Deadline.after(30))
        assert summary["walsenders_ended"] == 0 and summary["terminated"] == 0
        assert stream.poll() is None and walsenders(pg, companion)
    finally:
        stream.kill()
        stream.wait()


def test_databases_without_the_flag_go_to_hosts_without_replication_while_one_has_room(service):
    from datetime import UTC, datetime

    from chalicelib import hosts
    from chalicelib.models import HOST_ACTIVE, HostRecord

    def host(host_id: str, logical: bool, capacity: int) -> HostRecord:
        record = HostRecord(
            id=host_id, status=HOST_ACTIVE, hostname="h", port=5432, sslmode="disable", credentials="env:X",
            admin_dbname="postgres", capacity=capacity, allocated=0, logical_replication=logical,
            created_at=datetime.now(UTC),
        )  # fmt: skip
        record.save()
        return record

    roomy_logical, small_plain = host("logical", True, 100), host("plain", False, 1)
    both = [roomy_logical, small_plain]
    assert hosts.reserve(both).id == "plain"  # despite less room
    assert hosts.reserve(both).id == "logical"  # the plain host is full: the fallback
    assert hosts.reserve(both, logical_replication=True).id == "logical"
    assert [h.id for h in hosts.by_free_capacity(both)] == ["logical", "plain"]


def test_a_host_whose_admin_cannot_grant_replication_is_not_registered_as_offering_it(service, pg, instapg_env):
    from psycopg import sql

    from chalicelib import hosts
    from tests.conftest import ADMIN_ENV

    with psycopg.connect(pg.superuser_dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("ALTER ROLE {} NOREPLICATION").format(sql.Identifier(pg.admin_user)))
    try:
        with pytest.raises(ValueError, match="needs REPLICATION"):
            hosts.register(
                service.settings, "local-9", pg.host, pg.port, f"env:{ADMIN_ENV}", capacity=1, sslmode="disable",
                logical_replication=True,
            )  # fmt: skip
    finally:
        with psycopg.connect(pg.superuser_dsn, autocommit=True) as conn:
            conn.execute(sql.SQL("ALTER ROLE {} REPLICATION").format(sql.Identifier(pg.admin_user)))


def test_the_api_hands_out_the_gateways_string_for_a_database_with_logical_replication(
    client, logical_host, replication_gateway
):
    from tests.conftest import post_json

    created = post_json(client, "/api/v1/database", {"ref": "repl", "enable_logical_replication": True})
    assert created.status_code == 201, created.json_body
    replication_url = created.json_body["replication_connection_string"]
    params = psycopg.conninfo.conninfo_to_dict(replication_url)
    assert (params["host"], int(params["port"])) == (replication_gateway.host, replication_gateway.port)
    assert params["replication"] == "database"
    direct = psycopg.conninfo.conninfo_to_dict(created.json_body["direct_connection_string"])
    assert (params["user"], params["dbname"], params["password"]) == (direct["user"], direct["dbname"], direct["password"])
    with psycopg.connect(replication_url, autocommit=True, prepare_threshold=None) as conn:
        assert conn.execute("IDENTIFY_SYSTEM").fetchone()[3] == direct["dbname"]
    plain = post_json(client, "/api/v1/database", {"ref": "plain"})
    assert plain.status_code == 201 and plain.json_body["replication_connection_string"] is None


def test_the_gateway_bounds_logins_connections_and_messages_and_logs_no_password(service, pg, logical_host, tmp_path):
    import socket

    from tools.dev import replgateway

    tenant = create(service)
    gateway = replgateway.start(pg.socket_dir, pg.port, tmp_path / "gateway.log", "--login-timeout", "0.5",
                                "--max-connections", "1", "--max-message-bytes", "1024")  # fmt: skip
    try:
        with socket.create_connection((gateway.host, gateway.port), timeout=10) as idle:
            # The one connection allowed is taken (by a client that never logs in): the next is refused.
            with socket.create_connection((gateway.host, gateway.port), timeout=10) as second:
                refused = second.recv(4096)
            assert refused[:1] == b"E" and b"C53300" in refused
            assert idle.recv(4096) == b""  # closed by the gateway: it never sent a startup message
        dsn = psycopg.conninfo.make_conninfo(repl_url(service, tenant), host=gateway.host, port=gateway.port)
        with psycopg.connect(dsn, autocommit=True, prepare_threshold=None) as conn:
            assert conn.execute("IDENTIFY_SYSTEM").fetchone()[3] == tenant.record.db_name
            with pytest.raises(psycopg.OperationalError):
                conn.execute("SELECT '" + "x" * 2000 + "'")  # past --max-message-bytes: the connection ends
    finally:
        gateway.stop()
    logged = gateway.log.read_text()
    assert "replication session of" in logged and tenant.record.role_name in logged
    assert tenant.password not in logged


def test_the_name_prefix_leaves_room_for_the_companion():
    from chalicelib import replication, settings
    from chalicelib.identifiers import tenant_name

    longest = settings.load({"INSTAPG_NAME_PREFIX": "p" * 31}).name_prefix
    assert len(replication.companion(tenant_name(longest))) == 63
    for bad in ("p" * 32, "Ipg", "1pg", "ipg-dev"):
        with pytest.raises(ValueError, match="INSTAPG_NAME_PREFIX"):
            settings.load({"INSTAPG_NAME_PREFIX": bad})


def test_a_gateway_without_postgres_answers_with_an_error(service, logical_host, tmp_path):
    from tests.pgwire import login_sqlstate
    from tools.dev import replgateway

    tenant = create(service)
    nowhere = tmp_path / "no-socket-here"
    nowhere.mkdir()
    gateway = replgateway.start(nowhere, 5432, tmp_path / "gateway.log")
    try:
        dsn = psycopg.conninfo.make_conninfo(repl_url(service, tenant), host=gateway.host, port=gateway.port)
        assert login_sqlstate(dsn, replication="database") == "08006"
    finally:
        gateway.stop()


def test_a_killed_gateway_releases_the_stream_and_its_slot(service, pg, logical_host, tmp_path):
    import signal

    from chalicelib import replication
    from tools.dev import replgateway

    tenant = create(service)
    with psycopg.connect(url(service, tenant), autocommit=True) as conn:
        conn.execute("CREATE TABLE t (n int)")
        conn.execute("CREATE PUBLICATION pub FOR TABLE t")
    slot = "killed_" + tenant.record.db_name[-8:]  # slot names are the whole server's
    make_slot(service, tenant, slot)
    gateway = replgateway.start(pg.socket_dir, pg.port, tmp_path / "gateway.log")
    companion = replication.companion(tenant.record.role_name)
    dsn = psycopg.conninfo.make_conninfo(repl_url(service, tenant), host=gateway.host, port=gateway.port)
    stream = start_stream(dsn, slot, "pub")
    try:
        wait_for(lambda: bool(walsenders(pg, companion)))
        gateway.process.send_signal(signal.SIGKILL)
        gateway.process.wait()
        # Postgres sees its socket close: the walsender ends and the slot is free for the next consumer.
        wait_for(lambda: not walsenders(pg, companion))
        stream.wait(timeout=10)
        assert stream.returncode != 0
    finally:
        stream.kill()
        stream.wait()
        gateway.stop()
    with psycopg.connect(pg.superuser_dsn) as conn:
        assert conn.execute("SELECT active_pid FROM pg_replication_slots WHERE slot_name = %s", (slot,)).fetchone() == (None,)
    got = recvlogical(repl_url(service, tenant), slot, "--start", "--no-loop", "-f", "-", "--endpos", "0/1",
                      "-o", "proto_version=1", "-o", "publication_names=pub")  # fmt: skip
    assert got.returncode == 0, got.stderr  # the session's gateway serves the same slot at once


def test_the_gateway_speaks_tls_to_clients_and_to_postgres(service, pg, logical_host, tls, tmp_path):  # noqa: F811
    from tests.pgwire import login_sqlstate
    from tools.dev import replgateway

    proxy, ca, _ = tls
    tenant = create(service)
    certs = ["--tls-cert", str(ca.parent / "server.pem"), "--tls-key", str(ca.parent / "server.key")]
    gateway = replgateway.start(pg.socket_dir, pg.port, tmp_path / "gateway.log", *certs)
    try:
        dsn = psycopg.conninfo.make_conninfo(repl_url(service, tenant), host="localhost", port=gateway.port)
        verified = psycopg.conninfo.make_conninfo(dsn, sslmode="verify-full", sslrootcert=str(ca))
        with psycopg.connect(verified, autocommit=True, prepare_threshold=None) as conn:
            assert conn.pgconn.ssl_in_use
            assert conn.execute("IDENTIFY_SYSTEM").fetchone()[3] == tenant.record.db_name
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute("BASE_BACKUP")
        assert login_sqlstate(dsn, replication="database") == "28000"  # sslmode=disable: TLS is required
    finally:
        gateway.stop()
    # Towards Postgres by host name (RDS): its TLS, verified. Here a TLS endpoint in front of the embedded
    # server, reached over TCP, where pg_hba.conf refuses companions: TLS worked, then the login is refused.
    handshakes = proxy.handshakes
    upstream = ["--postgres-sslmode", "verify-full", "--postgres-sslrootcert", str(ca)]
    gateway = replgateway.start("localhost", proxy.port, tmp_path / "gateway2.log", *upstream)
    try:
        dsn = psycopg.conninfo.make_conninfo(repl_url(service, tenant), host=gateway.host, port=gateway.port)
        assert login_sqlstate(dsn, replication="database") == "28000"
        assert proxy.handshakes == handshakes + 1
    finally:
        gateway.stop()


def test_sql_through_the_gateway_has_the_plans_time_limits(service, pg, instapg_env, logical_host):
    import threading

    from chalicelib import quotas, replication
    from chalicelib.clock import Deadline
    from tests.test_expiry import reconfigure

    service = reconfigure(instapg_env, INSTAPG_UNCLAIMED_STATEMENT_TIMEOUT_SECONDS=1)
    tenant = create(service)
    companion = replication.companion(tenant.record.role_name)
    with walsender(service, tenant) as conn:
        assert conn.execute("SHOW statement_timeout").fetchone() == ("1s",)  # the plan's default, as the tenant's
        conn.execute("SET statement_timeout = 0")  # which a tenant may lift: the scheduled job is what holds
        failed: list[BaseException] = []

        def sleep() -> None:
            try:
                conn.execute("SELECT pg_sleep(30)")
            except psycopg.Error as exc:
                failed.append(exc)

        sleeper = threading.Thread(target=sleep)
        sleeper.start()
        wait_for(lambda: any("pg_sleep" in q for _, q in walsenders(pg, companion)))
        time.sleep(1.2)  # past the plan's statement time
        summary = quotas.enforce(service, Deadline.after(30))
        sleeper.join(timeout=10)
        assert summary["terminated"] == 1 and failed and not sleeper.is_alive()


def test_the_guard_ends_a_companions_physical_walsender_opened_around_the_gateway(service, pg, logical_host):
    """Defence in depth: on a host whose companions can reach Postgres without the gateway (here the
    socket itself, as a misconfigured pg_hba.conf or a public RDS would allow), the job ends physical streams."""
    from chalicelib import quotas, replication
    from chalicelib.clock import Deadline

    tenant = create(service)
    companion = replication.companion(tenant.record.role_name)
    around = psycopg.conninfo.make_conninfo(
        host=pg.socket_dir, port=pg.port, user=companion, password=tenant.password, dbname=tenant.record.db_name,
        replication="database",
    )  # fmt: skip
    slot = "phys_" + tenant.record.db_name[-8:]
    streamer = psycopg.connect(around, autocommit=True, prepare_threshold=None)
    try:
        streamer.execute(f"CREATE_REPLICATION_SLOT {slot} PHYSICAL RESERVE_WAL")  # Postgres itself allows it
        streamer.execute("START_REPLICATION PHYSICAL 0/0")  # returns; the server streams into the socket
        assert [q for _, q in walsenders(pg, companion)] == ["START_REPLICATION PHYSICAL 0/0"]
        summary = quotas.enforce(service, Deadline.after(30))
        assert summary["walsenders_ended"] == 1 and summary["physical_slots_dropped"] >= 1
        assert slot not in slot_names(pg)
        wait_for(lambda: not walsenders(pg, companion))
    finally:
        streamer.close()


def test_a_gateway_whose_parent_is_killed_stops_by_itself(pg, tmp_path):
    import signal
    import sys

    # A parent that starts a gateway and is then killed -9 (a test run the OOM killer ends).
    script = (
        "import sys, time; from pathlib import Path; from tools.dev import replgateway; "
        f"g = replgateway.start({str(pg.socket_dir)!r}, {pg.port}, Path({str(tmp_path / 'g.log')!r})); "
        "print(g.process.pid, flush=True); time.sleep(60)"
    )
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        gateway_pid = int(parent.stdout.readline())
        parent.send_signal(signal.SIGKILL)
        parent.wait()

        def gone() -> bool:
            try:
                os.kill(gateway_pid, 0)
            except ProcessLookupError:
                return True
            return Path(f"/proc/{gateway_pid}/stat").read_text().split(") ")[1].startswith("Z")

        wait_for(gone, timeout=15)
    finally:
        parent.kill()
        parent.wait()
