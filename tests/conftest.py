"""Real services for the tests: one embedded Postgres per session, moto per test.

Set INSTAPG_TEST_PG_DSN to a superuser DSN to run against another server; the
suite then creates its non-superuser admin role there.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest

# Before anything imports boto3/pynamodb: fake credentials, and moto's
# DynamoDB Streams endpoint (boto3 1.44 would use an account endpoint).
os.environ.update(
    AWS_ACCESS_KEY_ID="testing",
    AWS_SECRET_ACCESS_KEY="testing",
    AWS_SESSION_TOKEN="testing",
    AWS_DEFAULT_REGION="us-east-2",
    AWS_REGION="us-east-2",
    AWS_ACCOUNT_ID_ENDPOINT_MODE="disabled",
)
os.environ.pop("INSTAPG_DYNAMODB_ENDPOINT", None)

ADMIN_ENV = "INSTAPG_TEST_HOST_ADMIN"


def pytest_sessionstart(session):  # noqa: ARG001 - pytest's hook signature
    """Servers and folders a killed run left (its owner is dead) are stopped and removed first
    (tools/dev/reaper.py); every pytest worker does it, and none touches a live owner's."""
    from tools.dev import reaper

    reaper.reap_and_say("tests")


@dataclass
class PgServer:
    host: str
    port: int
    superuser_dsn: str
    admin_user: str
    admin_password: str
    socket_dir: str | None = None  # the embedded server's Unix socket folder (the replication gateway's way in)

    def admin_json(self) -> str:
        return json.dumps({"username": self.admin_user, "password": self.admin_password})


def _tmp_root() -> Path:
    """On tmpfs where there is one, owned by the server's user (never a folder of ours opened up)."""
    from tools.dev import pgserver

    return pgserver.private_dir("instapg-tests-")


@pytest.fixture(scope="session")
def pg():
    """A running Postgres with a non-superuser admin role (CREATEROLE, CREATEDB)."""
    external = os.environ.get("INSTAPG_TEST_PG_DSN")
    if external:
        import psycopg
        from psycopg import sql

        from tools.dev.pgserver import ADMIN_ROLE

        password = secrets.token_urlsafe(18)
        with psycopg.connect(external, autocommit=True) as conn:
            exists = conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (ADMIN_ROLE,)).fetchone()
            verb = "ALTER" if exists else "CREATE"
            conn.execute(
                sql.SQL(verb + " ROLE {} LOGIN CREATEROLE CREATEDB NOSUPERUSER PASSWORD {}").format(
                    sql.Identifier(ADMIN_ROLE), sql.Literal(password)
                )
            )
            host, port = conn.info.host, conn.info.port  # read while open: closed, they raise
        with psycopg.connect(external, dbname="template1", autocommit=True) as conn:
            from chalicelib.extensions import PREINSTALLED_EXTENSIONS  # as the local server's start does

            for name in PREINSTALLED_EXTENSIONS:
                conn.execute(sql.SQL("CREATE EXTENSION IF NOT EXISTS {}").format(sql.Identifier(name)))
        yield PgServer(host, port, external, ADMIN_ROLE, password)
        return

    from tools.dev import pgserver

    root = _tmp_root()
    server = pgserver.start(root / "pg", settings={"max_prepared_transactions": "10", "fsync": "off"})
    try:
        yield PgServer(
            "127.0.0.1", server.port, server.superuser_dsn, pgserver.ADMIN_ROLE, server.admin_password,
            str(server.socket_dir),
        )  # fmt: skip
    finally:
        server.stop()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def instapg_env(pg, monkeypatch):
    """Environment of one test: fresh key ring, its own name prefix, host admin credentials."""
    from chalicelib import context
    from chalicelib.crypto import new_key_spec

    monkeypatch.setenv("INSTAPG_KEYRING", new_key_spec("test1"))
    monkeypatch.setenv("INSTAPG_TABLE_PREFIX", "instapg-test")
    # Each test gets its own tenant name prefix, so one test's leftovers are
    # never another's orphans.
    monkeypatch.setenv("INSTAPG_NAME_PREFIX", "ipgt" + secrets.token_hex(3))
    monkeypatch.setenv(ADMIN_ENV, pg.admin_json())
    monkeypatch.delenv("INSTAPG_PUBLIC_URL", raising=False)
    context.reset()
    yield monkeypatch
    context.reset()


@pytest.fixture
def aws(instapg_env):
    """moto's DynamoDB, in process, with the tables created: clean for every test."""
    from moto import mock_aws

    from tools.dev import motoatomic

    motoatomic.install()  # DynamoDB's conditional writes are atomic; moto's are not across threads
    with mock_aws():
        from chalicelib import context, models

        settings = context.get().settings
        models.configure(settings)
        _create_tables(settings.region)
        yield


# The empty tables as models.create_tables() made them, per set of table names, once per worker.
_EMPTY_TABLES: dict[tuple[str, ...], dict] = {}


def _create_tables(region: str) -> None:
    """models.create_tables() the first time; then a copy of the same empty tables (streams, TTL, indexes).

    Creating ten tables through the API (create, describe, wait, TTL) cost 130-240 ms a test here;
    a copy of moto's empty Table objects costs a few ms and is the same state.
    """
    import copy

    from moto.core import DEFAULT_ACCOUNT_ID
    from moto.dynamodb.models import dynamodb_backends

    from chalicelib import models

    names = tuple(sorted(model.Meta.table_name for model in models.MODELS))
    backend = dynamodb_backends[DEFAULT_ACCOUNT_ID][region]
    empty = _EMPTY_TABLES.get(names)
    if empty is None or any(name in backend.tables for name in names):
        models.create_tables()
        _EMPTY_TABLES[names] = copy.deepcopy({name: backend.tables[name] for name in names})
    else:
        backend.tables.update(copy.deepcopy(empty))


@pytest.fixture
def service(aws):
    from chalicelib import context

    return context.get()


@pytest.fixture
def host(service, pg):
    """The session's Postgres registered as the one host."""
    from chalicelib import hosts

    record, _ = hosts.register(
        service.settings, "local-1", pg.host, pg.port, f"env:{ADMIN_ENV}", capacity=1000, sslmode="disable"
    )
    service.hosts.invalidate()
    return record


@pytest.fixture
def client(host):
    from chalice.test import Client

    from app import app

    with Client(app) as test_client:
        yield test_client


def post_json(client, path: str, body, headers: dict | None = None):
    raw = body if isinstance(body, (str, bytes)) else json.dumps(body)
    return client.http.post(path, body=raw, headers={"Content-Type": "application/json", **(headers or {})})


ADMIN_ENV_2 = "INSTAPG_TEST_HOST_ADMIN_2"


@pytest.fixture(scope="session")
def pg2():
    """A second embedded Postgres, for the multi-host tests."""
    from tools.dev import pgserver

    root = _tmp_root()
    server = pgserver.start(root / "pg", settings={"fsync": "off"})
    try:
        yield PgServer("127.0.0.1", server.port, server.superuser_dsn, pgserver.ADMIN_ROLE, server.admin_password)
    finally:
        server.stop()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def second_host(host, service, pg2, instapg_env):
    """pg2 registered as host `local-2`, next to `local-1`."""
    from chalicelib import hosts

    instapg_env.setenv(ADMIN_ENV_2, pg2.admin_json())
    record, _ = hosts.register(
        service.settings, "local-2", pg2.host, pg2.port, f"env:{ADMIN_ENV_2}", capacity=1000, sslmode="disable"
    )
    service.hosts.invalidate()
    return record


@pytest.fixture(scope="session")
def pgbouncer(pg):
    """One real PgBouncer (Debian's, tools/dev/install-pgbouncer.sh) in front of `pg` for the session.

    A short query_wait_timeout so the test of a saturated pool waits seconds, not the default 30.
    """
    from tools.dev import pgbouncer as local_pgbouncer
    from tools.dev import pgserver

    if local_pgbouncer.binary() is None:
        pytest.skip("pgbouncer is not installed (make test installs it: tools/dev/install-pgbouncer.sh)")
    root = pgserver.private_dir("instapg-pgbouncer-")
    bouncer = local_pgbouncer.start(root / "pgbouncer", settings={"query_wait_timeout": "3"})
    try:
        yield bouncer
    finally:
        bouncer.stop()
        shutil.rmtree(root, ignore_errors=True)


POOLER_ENV = "INSTAPG_TEST_POOLER_ADMIN"


def register_pooled(service, pg, bouncer, monkeypatch, host_id: str = "local-1", **options):
    """Register `pg` as a host with `bouncer` (a tools.dev.pgbouncer.LocalPgBouncer) as its pooler."""
    from chalicelib import hosts

    monkeypatch.setenv(POOLER_ENV, bouncer.admin_json())
    record, _ = hosts.register(
        service.settings,
        host_id,
        pg.host,
        pg.port,
        f"env:{ADMIN_ENV}",
        capacity=1000,
        sslmode="disable",
        pooler_hostname="127.0.0.1",
        pooler_port=bouncer.port,
        pooler_credentials=f"env:{POOLER_ENV}",
        pooler_store=f"file:{bouncer.state_dir}",
        **options,
    )
    service.hosts.invalidate()
    return record


@pytest.fixture
def pooled_host(service, pg, pgbouncer, instapg_env):
    """The session's Postgres registered as the one host, with the session's PgBouncer as its pooler:
    the API hands out pooled strings, as `make dev` does."""
    return register_pooled(service, pg, pgbouncer, instapg_env)


@pytest.fixture(scope="session")
def replication_gateway(pg):
    """One real replication gateway (tools/replication/gateway.py) in front of `pg`'s Unix socket, per worker."""
    from tools.dev import pgserver, replgateway

    if pg.socket_dir is None:
        pytest.skip("the replication gateway needs the embedded server's Unix socket")
    root = pgserver.private_dir("instapg-gateway-")
    gateway = replgateway.start(pg.socket_dir, pg.port, root / "gateway.log")
    try:
        yield gateway
    finally:
        gateway.stop()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def pooled_client(pooled_host):
    from chalice.test import Client

    from app import app

    with Client(app) as test_client:
        yield test_client
