"""The pooler engine (chalicelib.pooler) against a real PgBouncer and the embedded Postgres.

One PgBouncer per session (conftest `pgbouncer`); each test makes its own
tenants with the service's own DDL and SCRAM verifiers. Refused logins are
asserted by SQLSTATE (tests/pgwire.py reads them off the wire).
"""

from __future__ import annotations

import dataclasses
import os
import secrets
import shutil
import stat
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import psycopg
import pytest
from psycopg import sql

from tests.pgwire import login_sqlstate

# PgBouncer 1.18 refuses every login it decides itself (wrong password, unknown
# user or database) with 08P01; 28xxx codes come only from Postgres.
POOLER_REFUSED = "08P01"


@dataclass
class Made:
    tenant: object  # chalicelib.pooler.Tenant
    password: str
    pooled: str
    session: str
    direct: str


def _plan(connections: int = 5):
    from chalicelib.settings import TRIAL_PLAN, load

    return dataclasses.replace(load({}).plan(TRIAL_PLAN), connections=connections)


@pytest.fixture(scope="module")
def target(pg):
    from chalicelib import postgres

    return postgres.Target(pg.host, pg.port, pg.admin_user, pg.admin_password, "postgres", "disable")


@pytest.fixture
def make_tenant(pg, pgbouncer, target):
    """Create a tenant as the service does and publish it to the pooler; dropped afterwards."""
    from chalicelib import pooler, postgres, provisioning
    from chalicelib.identifiers import tenant_name, tenant_password

    made: list[Made] = []
    prefix = "ipgpool" + secrets.token_hex(2)

    def make(connections: int = 5, publish: bool = True) -> Made:
        name, password = tenant_name(prefix), tenant_password()
        verifier = postgres.scram_verifier(password)
        provisioning.create_tenant(target, name, name, password, _plan(connections), verifier=verifier)
        tenant = pooler.Tenant(name, name, verifier, connections, pg.host, pg.port)
        bouncer = pgbouncer.pooler()
        if publish:
            bouncer.publish(tenant)
        item = Made(
            tenant,
            password,
            bouncer.pooled_url(name, password, name),
            bouncer.session_url(name, password, name),
            postgres.connection_url(pg.host, pg.port, name, password, name, "disable"),
        )
        made.append(item)
        return item

    yield make
    bouncer = pgbouncer.pooler()
    for item in made:
        bouncer.revoke(item.tenant.role, item.tenant.dbname)
        provisioning.drop_tenant(target, item.tenant.role, item.tenant.dbname, keep_claimed=False)


def _pooled(url: str, **kwargs) -> psycopg.Connection:
    # Transaction pooling on PgBouncer 1.18: no protocol-level prepared statements.
    return psycopg.connect(url, prepare_threshold=None, connect_timeout=10, **kwargs)


def test_published_tenant_connects_at_once_with_scram_and_no_plaintext(make_tenant, pgbouncer):
    t = make_tenant()
    with _pooled(t.pooled) as conn:
        assert conn.execute("SELECT current_user, current_database()").fetchone() == (t.tenant.role, t.tenant.dbname)
    with psycopg.connect(t.session, connect_timeout=10) as conn:
        assert conn.execute("SELECT current_user").fetchone() == (t.tenant.role,)
    # The auth source holds the verifier Postgres stores, never the password, and only its owner reads it.
    from chalicelib import pooler

    auth = pgbouncer.state_dir / pooler.AUTH_FILE
    text = auth.read_text()
    assert f'"{t.tenant.role}" "{t.tenant.verifier}"' in text
    assert t.password not in text and pgbouncer.admin_password not in text
    assert stat.S_IMODE(os.stat(auth).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(pgbouncer.state_dir / pooler.DATABASES_FILE).st_mode) == 0o600


def test_wrong_password_and_unpublished_tenant_are_refused(make_tenant, pgbouncer):
    t = make_tenant()
    wrong = pgbouncer.pooler().pooled_url(t.tenant.role, "not-" + t.password, t.tenant.dbname)
    assert login_sqlstate(wrong) == POOLER_REFUSED
    hidden = make_tenant(publish=False)
    assert login_sqlstate(hidden.direct) is None  # the role works on Postgres ...
    assert login_sqlstate(hidden.pooled) == POOLER_REFUSED  # ... but the pooler does not know it


def test_hundred_concurrent_short_connections_on_five_server_connections(make_tenant, pg, pgbouncer):
    t = make_tenant(connections=5)  # role CONNECTION LIMIT 5, pool_size 5
    entries = {row["name"]: row for row in pgbouncer.pooler().admin("SHOW DATABASES")}
    pooled, session = entries[t.tenant.dbname], entries[t.tenant.dbname + "_session"]
    assert (pooled["pool_mode"], pooled["pool_size"], pooled["max_connections"]) == ("transaction", 5, 5)
    assert (session["pool_mode"], session["pool_size"], session["max_connections"]) == ("session", 5, 5)

    def one(i: int) -> int:
        with _pooled(t.pooled) as conn:
            return conn.execute("SELECT %s::int + 1 FROM pg_sleep(0.01)", (i,)).fetchone()[0]

    with ThreadPoolExecutor(max_workers=100) as pool:
        futures = [pool.submit(one, i) for i in range(100)]
        results, errors = [], []
        for future in futures:
            try:
                results.append(future.result(timeout=60))
            except Exception as exc:  # noqa: BLE001 - counted, then asserted as 0
                errors.append(exc)
    assert errors == []
    assert sorted(results) == list(range(1, 101))
    # Served by at most the plan's server connections.
    with psycopg.connect(pg.superuser_dsn) as conn:
        backends = conn.execute("SELECT count(*) FROM pg_stat_activity WHERE usename = %s", (t.tenant.role,)).fetchone()
    assert backends[0] <= 5


def test_psycopg_parameterised_queries_repeat_on_the_pooled_string(make_tenant):
    t = make_tenant()
    with _pooled(t.pooled, autocommit=True) as conn:
        conn.execute("CREATE TABLE items (id int PRIMARY KEY, name text)")
        for i in range(20):  # past psycopg's default prepare threshold (5)
            conn.execute("INSERT INTO items VALUES (%s, %s)", (i, f"n{i}"))
        assert conn.execute("SELECT count(*) FROM items WHERE id >= %s", (0,)).fetchone() == (20,)


@pytest.mark.parametrize("path", ["session", "direct"])
def test_listen_notify_and_prepared_statements_on_the_session_paths(make_tenant, path):
    t = make_tenant()
    url = getattr(t, path)
    with psycopg.connect(url, autocommit=True, prepare_threshold=0, connect_timeout=10) as listener:
        listener.execute("LISTEN jobs")
        with psycopg.connect(url, autocommit=True, connect_timeout=10) as sender:
            sender.execute("SELECT pg_notify('jobs', 'hello')")
        notes = [n.payload for n in listener.notifies(timeout=5, stop_after=1)]
        assert notes == ["hello"]
        for i in range(3):  # prepare_threshold=0: a server-side prepared statement, reused
            assert listener.execute("SELECT %s::int * 2", (i,)).fetchone() == (i * 2,)
        listener.execute("PREPARE twice(int) AS SELECT $1 * 2")
        assert listener.execute("EXECUTE twice(21)").fetchone() == (42,)


def test_revoke_refuses_a_locked_tenant_despite_a_warm_server_connection(make_tenant, pgbouncer, target):
    from chalicelib import provisioning

    t = make_tenant()
    bouncer = pgbouncer.pooler()
    held = _pooled(t.pooled, autocommit=True)
    held.execute("SELECT 1")  # a warm server connection in the tenant's pool
    with _pooled(t.pooled) as conn:
        conn.execute("SELECT 1")
    with target.connect() as conn:  # NOLOGIN only, leaving the pooler's server connection alive
        conn.execute(sql.SQL("ALTER ROLE {} NOLOGIN").format(sql.Identifier(t.tenant.role)))
    # The pitfall the revoke exists for: NOLOGIN alone does not stop the pooler.
    assert login_sqlstate(t.pooled) is None
    bouncer.revoke(t.tenant.role, t.tenant.dbname)
    assert login_sqlstate(t.pooled) == POOLER_REFUSED
    assert login_sqlstate(t.session) == POOLER_REFUSED
    assert login_sqlstate(t.direct) == "28000"  # and Postgres refuses the role itself
    with pytest.raises(psycopg.OperationalError):  # the held client was ended too
        held.execute("SELECT 1")
    held.close()
    assert t.tenant.dbname not in bouncer.published()
    provisioning.lock_role(target, t.tenant.role)  # idempotent: a second revoke too
    bouncer.revoke(t.tenant.role, t.tenant.dbname)
    # Unlocked (quota back under the limit): published again, it connects, not waits on a killed entry.
    provisioning.unlock_role(target, t.tenant.role)
    bouncer.publish(t.tenant)
    with _pooled(t.pooled) as conn:
        assert conn.execute("SELECT current_user").fetchone() == (t.tenant.role,)
    with psycopg.connect(t.session, connect_timeout=10) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)


def test_rotate_refuses_the_old_password_and_ends_sessions(make_tenant, pgbouncer, target):
    from chalicelib import postgres

    t = make_tenant()
    held = _pooled(t.pooled, autocommit=True)
    held.execute("SELECT 1")
    new_password = secrets.token_urlsafe(24)
    verifier = postgres.scram_verifier(new_password)
    with target.connect() as conn:
        conn.execute(sql.SQL("ALTER ROLE {} PASSWORD {}").format(sql.Identifier(t.tenant.role), sql.Literal(verifier)))
    bouncer = pgbouncer.pooler()
    bouncer.rotate(dataclasses.replace(t.tenant, verifier=verifier))
    assert login_sqlstate(t.pooled) == POOLER_REFUSED
    assert login_sqlstate(t.session) == POOLER_REFUSED
    assert login_sqlstate(t.direct) == "28P01"
    with _pooled(bouncer.pooled_url(t.tenant.role, new_password, t.tenant.dbname)) as conn:
        assert conn.execute("SELECT current_user").fetchone() == (t.tenant.role,)
    with pytest.raises(psycopg.OperationalError):
        held.execute("SELECT 1")
    held.close()
    # Rotating a revoked (locked) tenant does not let it back into the pooler.
    bouncer.revoke(t.tenant.role, t.tenant.dbname)
    bouncer.rotate(dataclasses.replace(t.tenant, verifier=verifier))
    assert t.tenant.dbname not in bouncer.published()
    assert login_sqlstate(bouncer.pooled_url(t.tenant.role, new_password, t.tenant.dbname)) == POOLER_REFUSED
    with pytest.raises(ValueError):  # never the pooler's own admin, never a name that is not generated
        bouncer.revoke(bouncer.admin_user, t.tenant.dbname)
    with pytest.raises(ValueError):
        bouncer.revoke(t.tenant.role, "x; SHUTDOWN")


def test_transfer_bytes_grow_after_a_query(make_tenant, pgbouncer):
    t = make_tenant()
    bouncer = pgbouncer.pooler()
    before = bouncer.stats().get(t.tenant.dbname, (0, 0))
    with _pooled(t.pooled) as conn:
        conn.execute("SELECT repeat('x', 100000)").fetchone()
    with psycopg.connect(t.session, connect_timeout=10) as conn:
        conn.execute("SELECT repeat('y', 50000)").fetchone()
    received, sent = bouncer.stats()[t.tenant.dbname]
    assert sent - before[1] >= 150000
    assert received > before[0]


def test_a_client_beyond_a_busy_pool_gets_an_error_not_a_hang(make_tenant):
    t = make_tenant(connections=1)
    busy = _pooled(t.pooled)
    busy.execute("SELECT 1")  # an open transaction holds the pool's only server connection
    outcome: list[BaseException | None] = []

    def waiter() -> None:
        try:
            with _pooled(t.pooled) as conn:
                conn.execute("SELECT 1")
            outcome.append(None)
        except psycopg.Error as exc:
            outcome.append(exc)

    thread = threading.Thread(target=waiter, daemon=True)
    started = time.monotonic()
    thread.start()
    thread.join(timeout=30)  # query_wait_timeout is 3 s in the test PgBouncer
    busy.rollback()
    busy.close()
    assert not thread.is_alive() and time.monotonic() - started < 30
    assert isinstance(outcome[0], psycopg.OperationalError)
    assert outcome[0].sqlstate == "08P01"


def test_config_refuses_names_that_are_not_generated(pg):
    from chalicelib import pooler, postgres

    verifier = postgres.scram_verifier("x")
    for role in ("Bad-Name", "a b", "x\ny", 'q"'):
        with pytest.raises(ValueError):
            pooler.Tenant(role, "ok", verifier, 5, pg.host, pg.port)
    with pytest.raises(ValueError):
        pooler.Tenant("ok", "ok", "plaintext", 5, pg.host, pg.port)


def test_publishing_again_applies_a_new_pool_size(make_tenant, pgbouncer):
    t = make_tenant(connections=2)
    bouncer = pgbouncer.pooler()
    with _pooled(t.pooled) as conn:
        conn.execute("SELECT 1")
    bouncer.publish(dataclasses.replace(t.tenant, pool_size=7))  # a claim: the claimed plan's connections
    entries = {row["name"]: row for row in bouncer.admin("SHOW DATABASES")}
    assert (entries[t.tenant.dbname]["pool_size"], entries[t.tenant.dbname]["max_connections"]) == (7, 7)
    with _pooled(t.pooled) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)


def test_clients_beyond_max_client_conn_are_refused_at_once(make_tenant):
    from tools.dev import pgbouncer as local_pgbouncer
    from tools.dev import pgserver

    root = pgserver.private_dir("instapg-pgbouncer-limit-")
    small = local_pgbouncer.start(root / "pgbouncer", settings={"max_client_conn": "3"})
    try:
        t = make_tenant(publish=False)
        bouncer = small.pooler()
        bouncer.publish(t.tenant)
        url = bouncer.pooled_url(t.tenant.role, t.password, t.tenant.dbname)
        held = [_pooled(url) for _ in range(3)]
        try:
            started = time.monotonic()
            assert login_sqlstate(url) == POOLER_REFUSED
            assert time.monotonic() - started < 10  # refused, not queued
        finally:
            for conn in held:
                conn.close()
        bouncer.revoke(t.tenant.role, t.tenant.dbname)
    finally:
        small.stop()
        shutil.rmtree(root, ignore_errors=True)
