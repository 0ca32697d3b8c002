"""Issue 18 §1: logical replication that works, and nothing physical (docs/replication.md).

Real clients against the embedded server (wal_level=logical): pg_recvlogical
and pg_receivewal from the wheel, pg8000 for the SQLSTATE of a refused
replication login. Tenants connect over TCP with their passwords.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import time

import psycopg
import pytest

from tests.test_expiry import age, catalog, url


@pytest.fixture
def logical_host(host, service, pg):
    """The session's Postgres registered again, as a host that offers logical replication."""
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


def walsenders(pg, role: str) -> list[tuple[int, str]]:
    with psycopg.connect(pg.superuser_dsn) as conn:
        return conn.execute(
            "SELECT pid, query FROM pg_stat_activity WHERE backend_type = 'walsender' AND usename = %s", (role,)
        ).fetchall()


def test_a_tenant_streams_its_own_inserts_and_never_another_tenants(service, pg, logical_host):
    mine, other = create(service), create(service)
    mine_url, other_url = url(service, mine), url(service, other)
    for dsn in (mine_url, other_url):
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute("CREATE TABLE todo (id serial PRIMARY KEY, title text)")
            conn.execute("CREATE PUBLICATION pub FOR TABLE todo")  # on its own table: it owns it
    created = recvlogical(mine_url, "mine", "--create-slot", "--plugin", "pgoutput")
    assert created.returncode == 0, created.stderr
    assert recvlogical(other_url, "other", "--create-slot", "--plugin", "pgoutput").returncode == 0

    with psycopg.connect(mine_url, autocommit=True) as conn:
        conn.execute("INSERT INTO todo (title) VALUES ('hello-mine')")
    with psycopg.connect(other_url, autocommit=True) as conn:
        conn.execute("INSERT INTO todo (title) VALUES ('hello-other')")
        end = conn.execute("SELECT pg_current_wal_lsn()::text").fetchone()[0]

    # A walsender with replication=database (pg_recvlogical's), decoding with pgoutput.
    got = recvlogical(
        mine_url, "mine", "--start", "--no-loop", "-f", "-", "--endpos", end, "-o", "proto_version=1", "-o", "publication_names=pub"
    )
    assert got.returncode == 0, got.stderr
    assert b"hello-mine" in got.stdout
    assert b"hello-other" not in got.stdout
    # Another database's slot cannot be read from here.
    theirs = recvlogical(mine_url, "other", "--start", "--no-loop", "-f", "-", "--endpos", end, "-o", "proto_version=1",
                         "-o", "publication_names=pub")  # fmt: skip
    assert theirs.returncode != 0 and b"hello-other" not in theirs.stdout


def test_a_database_without_the_flag_gets_no_replication(service, logical_host):
    plain = create(service, logical=False)
    with psycopg.connect(url(service, plain), autocommit=True) as conn:
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("SELECT pg_create_logical_replication_slot('nope', 'pgoutput')")


def test_physical_replication_is_refused_or_ended(service, pg, logical_host):
    from chalicelib import quotas
    from chalicelib.clock import Deadline
    from tests.pgwire import login_sqlstate

    tenant = create(service)
    dsn = url(service, tenant)
    role = tenant.record.role_name
    # replication=true matches only `replication` lines in pg_hba.conf, and there are none.
    assert login_sqlstate(dsn, replication="true") == "28000"
    assert login_sqlstate(dsn, replication="database") is None
    # The SQL functions that make physical slots are revoked from PUBLIC in template1.
    with psycopg.connect(dsn, autocommit=True) as conn:
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("SELECT pg_create_physical_replication_slot('phys')")
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("SELECT pg_copy_physical_replication_slot('a', 'b')")

    # Over its logical walsender PostgreSQL still lets a REPLICATION role make a
    # physical slot and stream physical WAL: the scheduled job ends both.
    params = psycopg.conninfo.conninfo_to_dict(dsn)
    walsender_dsn = psycopg.conninfo.make_conninfo(**params, replication="database")
    made = subprocess.run(
        [tool("psql"), walsender_dsn, "-c", "CREATE_REPLICATION_SLOT phys PHYSICAL RESERVE_WAL"],
        capture_output=True,
        timeout=30,
    )
    assert made.returncode == 0, made.stderr
    # psycopg sends the command and returns; the server is streaming WAL into the socket.
    streamer = psycopg.connect(walsender_dsn, autocommit=True)
    try:
        streamer.execute("START_REPLICATION PHYSICAL 0/0")
        assert [q for _, q in walsenders(pg, role)] == ["START_REPLICATION PHYSICAL 0/0"]
        summary = quotas.enforce(service, Deadline.after(30))
        assert summary["walsenders_ended"] == 1 and summary["physical_slots_dropped"] == 1
        assert "phys" not in slot_names(pg)
        wait_for(lambda: not walsenders(pg, role))
    finally:
        streamer.close()


def test_slots_past_the_count_or_the_wal_limit_are_dropped_with_an_audit_event(service, pg, logical_host):
    from chalicelib import audit, replication
    from chalicelib.models import DatabaseRecord

    tenant = create(service)
    dsn = url(service, tenant)
    with psycopg.connect(dsn, autocommit=True) as conn:
        for name in ("s1", "s2", "s3"):
            conn.execute("SELECT pg_create_logical_replication_slot(%s, 'pgoutput')", (name,))
    target = service.target(service.hosts.get(tenant.record.host_id))
    records = [DatabaseRecord.get(tenant.record.id)]

    summary = replication.guard(dataclasses.replace(service.settings, slots_per_database=2), target, records)
    assert summary["slots_dropped"] == 1
    assert {"s1", "s2", "s3"} & slot_names(pg) == {"s1", "s2"}

    # s1 lags: WAL written since it was made is more than a limit of 0 MB.
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE t AS SELECT generate_series(1, 1000) AS n")
    summary = replication.guard(dataclasses.replace(service.settings, slot_max_retained_mb=0), target, records)
    assert summary["slots_dropped"] == 2
    assert not {"s1", "s2"} & slot_names(pg)
    events = [e for e in audit.page(tenant.record.id).events if e.action == replication.SLOT_DROPPED]
    assert len(events) == 3 and all(e.actor == audit.SYSTEM for e in events)
    assert any("over 0 MB" in e.detail for e in events) and any("more than 2" in e.detail for e in events)


def test_expiry_drops_the_slots_then_the_database_while_a_stream_is_open(service, pg, logical_host):
    from chalicelib import expiry
    from chalicelib.clock import Deadline

    tenant = create(service)
    dsn = url(service, tenant)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE t (n int)")
        conn.execute("CREATE PUBLICATION pub FOR TABLE t")
        conn.execute("SELECT pg_create_logical_replication_slot('idle', 'pgoutput')")
    assert recvlogical(dsn, "live", "--create-slot", "--plugin", "pgoutput").returncode == 0
    stream = start_stream(dsn, "live", "pub")
    try:
        wait_for(lambda: bool(walsenders(pg, tenant.record.role_name)))
        age(tenant.record)
        summary = expiry.run_scheduled(service, Deadline.after(30))
        assert summary.expired_dropped == 1
        assert catalog(pg, tenant.record.db_name) == (False, False)
        assert not {"idle", "live"} & slot_names(pg)
        stream.wait(timeout=10)
    finally:
        stream.kill()
        stream.wait()


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


def test_a_logical_stream_survives_the_scheduled_job(service, pg, instapg_env, logical_host):
    from chalicelib import quotas
    from chalicelib.clock import Deadline
    from tests.test_expiry import reconfigure

    service = reconfigure(instapg_env, INSTAPG_UNCLAIMED_STATEMENT_TIMEOUT_SECONDS=1)
    tenant = create(service)
    dsn = url(service, tenant)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE t (n int)")
        conn.execute("CREATE PUBLICATION pub FOR TABLE t")
    assert recvlogical(dsn, "live", "--create-slot", "--plugin", "pgoutput").returncode == 0
    stream = start_stream(dsn, "live", "pub")
    try:
        wait_for(lambda: bool(walsenders(pg, tenant.record.role_name)))
        time.sleep(1.2)  # streaming for longer than the plan's statement time
        summary = quotas.enforce(service, Deadline.after(30))
        assert summary["walsenders_ended"] == 0 and summary["terminated"] == 0
        assert stream.poll() is None and walsenders(pg, tenant.record.role_name)
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
