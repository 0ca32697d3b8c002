"""Clients that must work on the strings the API hands out (issue 14 §8), through the real PgBouncer.

Pooled string (transaction pooling): node `pg` Pool with its default max 10, 100 concurrent short-lived
connections, psycopg with prepare_threshold=None (PgBouncer 1.18 has no protocol-level prepared
statements), SQLAlchemy. Direct string: alembic migrations, LISTEN/NOTIFY, pg_dump (the embedded
server's own, 18: Debian 12's pg_dump 15 refuses a newer server).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psycopg
import pytest

from tests.conftest import post_json

ROOT = Path(__file__).resolve().parent.parent
NODE_PG_DIR = Path(os.environ.get("NODE_PG_DIR", Path.home() / ".cache" / "instapg" / "node-pg"))


@pytest.fixture(scope="module")
def node_pg() -> Path:
    """node and the `pg` driver (tools/dev/install-node-pg.sh, which make test runs; run here when missing)."""
    if not (NODE_PG_DIR / "node_modules" / "pg" / "package.json").exists() or shutil.which("node") is None:
        subprocess.run(["sh", str(ROOT / "tools/dev/install-node-pg.sh")], check=True, timeout=600)
    return NODE_PG_DIR / "node_modules"


@pytest.fixture
def database(pooled_client) -> dict:
    response = post_json(pooled_client, "/api/v1/database", {"ref": "clients"})
    assert response.status_code == 201, response.json_body
    return response.json_body


NODE_POOL = """
const { Pool } = require('pg');
const pool = new Pool({ connectionString: process.env.DATABASE_URL });  // default max: 10
Promise.all(Array.from({ length: 10 }, (_, i) =>
  pool.query('SELECT $1::int + 1 AS n, pg_sleep(0.05)', [i]).then(r => r.rows[0].n)))
  .then(async (ns) => { console.log(JSON.stringify({ ns, max: pool.options.max })); await pool.end(); })
  .catch(async (e) => { console.log(JSON.stringify({ error: e.code || String(e) })); process.exit(1); });
"""


def test_node_pg_pool_of_ten_concurrent_queries_on_the_pooled_string(database, node_pg):
    # The plan allows 5 connections: straight to Postgres, half of these would fail with 53300.
    env = {**os.environ, "NODE_PATH": str(node_pg), "DATABASE_URL": database["connection_string"]}
    result = subprocess.run(["node", "-e", NODE_POOL], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    out = json.loads(result.stdout)
    assert out["max"] == 10 and sorted(out["ns"]) == list(range(1, 11))


def test_hundred_concurrent_short_lived_connections_on_the_pooled_string(database):
    def one(i: int) -> int:
        with psycopg.connect(database["connection_string"], prepare_threshold=None, connect_timeout=30) as conn:
            return conn.execute("SELECT %s::int", (i,)).fetchone()[0]

    with ThreadPoolExecutor(max_workers=100) as pool:
        futures = [pool.submit(one, i) for i in range(100)]
        errors = [f.exception(timeout=120) for f in futures if f.exception(timeout=120)]
    assert errors == []
    assert sorted(f.result() for f in futures) == list(range(100))


def test_psycopg_and_sqlalchemy_on_the_pooled_string(database):
    import sqlalchemy as sa

    url = database["connection_string"]
    with psycopg.connect(url, prepare_threshold=None, autocommit=True, connect_timeout=10) as conn:
        conn.execute("CREATE TABLE notes (id serial PRIMARY KEY, body text)")
        for i in range(12):  # past psycopg's default prepare threshold (5): prepare_threshold=None avoids it
            conn.execute("INSERT INTO notes (body) VALUES (%s)", (f"n{i}",))
    engine = sa.create_engine(
        url.replace("postgresql://", "postgresql+psycopg://", 1), connect_args={"prepare_threshold": None}
    )
    try:
        notes = sa.Table("notes", sa.MetaData(), autoload_with=engine)
        with engine.begin() as conn:
            for i in range(10):
                conn.execute(notes.insert().values(body=f"s{i}"))
            count = conn.execute(sa.select(sa.func.count()).select_from(notes)).scalar_one()
    finally:
        engine.dispose()
    assert count == 22


def test_alembic_migrations_on_the_direct_string(database, tmp_path):
    from alembic import command
    from alembic.config import Config

    versions = tmp_path / "versions"
    versions.mkdir()
    (tmp_path / "env.py").write_text(
        "import sqlalchemy as sa\nfrom alembic import context\n"
        "engine = sa.create_engine(context.config.get_main_option('sqlalchemy.url'))\n"
        "with engine.connect() as conn:\n"
        "    context.configure(connection=conn, target_metadata=None)\n"
        "    with context.begin_transaction():\n"
        "        context.run_migrations()\n"
        "engine.dispose()\n"
    )
    (tmp_path / "script.py.mako").write_text("")
    (versions / "0001_first.py").write_text(
        "import sqlalchemy as sa\nfrom alembic import op\n"
        "revision = '0001'\ndown_revision = None\nbranch_labels = None\ndepends_on = None\n"
        "def upgrade():\n"
        "    op.create_table('accounts', sa.Column('id', sa.Integer, primary_key=True), sa.Column('email', sa.Text))\n"
        "    op.create_index('accounts_email', 'accounts', ['email'], unique=True)\n"
        "def downgrade():\n    op.drop_table('accounts')\n"
    )
    config = Config()
    config.set_main_option("script_location", str(tmp_path))
    url = database["direct_connection_string"].replace("postgresql://", "postgresql+psycopg://", 1)
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    command.upgrade(config, "head")
    with psycopg.connect(database["direct_connection_string"]) as conn:
        assert conn.execute("SELECT version_num FROM alembic_version").fetchone() == ("0001",)
        assert conn.execute("SELECT count(*) FROM pg_indexes WHERE indexname = 'accounts_email'").fetchone() == (1,)


def test_listen_notify_on_the_direct_string(database):
    url = database["direct_connection_string"]
    with psycopg.connect(url, autocommit=True, connect_timeout=10) as listener:
        listener.execute("LISTEN events")
        with psycopg.connect(url, autocommit=True, connect_timeout=10) as sender:
            sender.execute("NOTIFY events, 'ready'")
        assert [n.payload for n in listener.notifies(timeout=5, stop_after=1)] == ["ready"]


def test_pg_dump_on_the_direct_string(database):
    from tools.dev import pgserver

    url = database["direct_connection_string"]
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("CREATE TABLE kept (id int PRIMARY KEY, name text)")
        conn.execute("INSERT INTO kept VALUES (1, 'dumped')")
    pg_dump = pgserver._bin("pg_dump")  # 18, as the server: an older pg_dump refuses it
    result = subprocess.run([pg_dump, "--no-owner", url], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "CREATE TABLE public.kept" in result.stdout and "dumped" in result.stdout
