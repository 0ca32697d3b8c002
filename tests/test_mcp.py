"""`instapg-mcp` driven as an agent's MCP client drives it: the SDK's client, the server a real subprocess
(stdio, and streamable HTTP), against the local stack (the app over HTTP, moto, embedded Postgres)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
import psycopg
import pytest
from instapg_cli.api import ApiError
from instapg_cli.api import Client as ApiClient

from tests.test_client import http_app  # noqa: F401  (the session's local server)

ACCOUNT_TOOLS = {"list_databases", "rotate_password", "create_copy", "reset_copy"}
PUBLIC_TOOLS = {"create_database", "get_database", "run_sql", "describe_schema", "claim_url", "delete_database"}


def _command() -> str:
    """The console script `pip install instapg[mcp]` puts next to python (make test installs it)."""
    script = Path(sys.executable).with_name("instapg-mcp")
    return str(script) if script.exists() else shutil.which("instapg-mcp") or "instapg-mcp"


@pytest.fixture
def server(host, http_app):  # noqa: F811
    return http_app


@asynccontextmanager
async def stdio_session(url: str, api_key: str | None = None, *extra: str):
    from mcp import Client, StdioServerParameters

    env = {"INSTAPG_URL": url}
    if api_key:
        env["INSTAPG_API_KEY"] = api_key
    params = StdioServerParameters(command=_command(), args=list(extra), env=env)
    async with Client(params, read_timeout_seconds=60) as client:
        yield client


async def call(client, tool: str, **arguments) -> dict:
    """The tool's structured answer; AssertionError with the text when the tool failed."""
    result = await client.call_tool(tool, arguments)
    assert not result.is_error, result.content[0].text
    assert result.structured_content == json.loads(result.content[0].text)  # both forms, for every client
    return result.structured_content


async def fail(client, tool: str, **arguments) -> str:
    result = await client.call_tool(tool, arguments)
    assert result.is_error, result
    return result.content[0].text


def _account(server: str) -> str:
    from instapg_cli.api import _request

    return _request("POST", f"{server}/api/v1/accounts", {"email": "agent@example.com"}, 30)[1]["api_key"]


def test_an_agent_creates_queries_and_hands_over_a_database(server):
    async def scenario():
        async with stdio_session(server, None, "--statement-timeout", "1") as client:
            tools = {t.name: t for t in (await client.list_tools()).tools}
            assert set(tools) == PUBLIC_TOOLS  # no account tools without a key
            assert "expires" in tools["create_database"].description.lower()
            assert "secret" in tools["create_database"].description.lower()
            assert tools["run_sql"].description.startswith("Run one SQL statement")
            assert "no API key needed" in tools["delete_database"].description
            assert "claim" in (client.instructions or "")

            db = await call(client, "create_database", ref="test-agent")
            assert db["expires_at"] and db["claim_url"].endswith(f"/claim/{db['id']}")
            with psycopg.connect(db["connection_string"]) as conn:  # the agent's string connects
                assert conn.execute("SELECT 1").fetchone() == (1,)

            # Writes only when asked for, several statements in one transaction.
            out = await call(
                client,
                "run_sql",
                database_id=db["id"],
                read_write=True,
                sql="CREATE TABLE todos (id serial PRIMARY KEY, title text NOT NULL);"
                "INSERT INTO todos (title) VALUES ('a; b'), ('c') RETURNING id, title;",
            )
            assert out["rows"] == [[1, "a; b"], [2, "c"]] and out["read_only"] is False

            out = await call(client, "run_sql", database_id=db["id"], sql="SELECT title FROM todos ORDER BY id")
            assert out["rows"] == [["a; b"], ["c"]] and out["columns"] == [{"name": "title", "type": "text"}]

            # Read-only by default, and one statement cannot get out of the read-only transaction.
            text = await fail(client, "run_sql", database_id=db["id"], sql="INSERT INTO todos (title) VALUES ('x')")
            assert "SQLSTATE 25006" in text and "read_write=true" in text
            text = await fail(client, "run_sql", database_id=db["id"], sql="COMMIT; DELETE FROM todos")
            assert "one statement" in text
            text = await fail(
                client, "run_sql", database_id=db["id"], sql="SET TRANSACTION READ WRITE"
            )  # refused: a query already ran in this transaction
            assert "SQLSTATE 25001" in text
            out = await call(client, "run_sql", database_id=db["id"], sql="SELECT count(*) FROM todos")
            assert out["rows"] == [[2]]

            # Bounded rows and time.
            out = await call(
                client, "run_sql", database_id=db["id"], sql="SELECT g FROM generate_series(1, 100000) g", max_rows=5
            )
            assert out["rows"] == [[1], [2], [3], [4], [5]] and out["truncated"] is True
            started = time.monotonic()
            text = await fail(client, "run_sql", database_id=db["id"], sql="SELECT pg_sleep(30)")
            assert "SQLSTATE 57014" in text and time.monotonic() - started < 20

            schema = await call(client, "describe_schema", database_id=db["id"])
            (todos,) = [t for t in schema["tables"] if t["name"] == "todos"]
            assert [c["name"] for c in todos["columns"]] == ["id", "title"]
            assert todos["columns"][1] == {"name": "title", "type": "text", "nullable": False, "default": None}
            assert any(c["definition"] == "PRIMARY KEY (id)" for c in todos["constraints"])

            info = await call(client, "get_database", database_id=db["id"])
            assert info["status"] == "UNCLAIMED" and info["created_by_this_session"] is True
            assert "connection_string" not in info and "direct_connection_string" not in info
            claim = await call(client, "claim_url", database_id=db["id"])
            assert claim["claim_url"] == db["claim_url"] and claim["expires_at"] == db["expires_at"]

            # A database this session did not create is out of reach, even with its id.
            other = ApiClient(server).create("someone-else")
            text = await fail(client, "run_sql", database_id=other["id"], sql="SELECT 1")
            assert "not created in this session" in text
            text = await fail(client, "describe_schema", database_id=other["id"])
            assert "not created in this session" in text
            text = await fail(client, "get_database", database_id="../accounts")
            assert "is not a database id" in text

            # Without an API key, delete_database deletes what this session created (the creator token
            # the create returned, kept by the server, never shown), and nothing else.
            assert "creator_token" not in db
            text = await fail(client, "delete_database", database_id=other["id"])
            assert "not created in this session" in text and "INSTAPG_API_KEY" in text
            assert ApiClient(server).get(other["id"])["status"] == "UNCLAIMED"
            assert await call(client, "delete_database", database_id=db["id"]) == {"id": db["id"], "deleted": True}
            text = await fail(client, "get_database", database_id=db["id"])
            assert "Database deleted (HTTP 410)" in text
            with pytest.raises(psycopg.OperationalError):
                psycopg.connect(db["direct_connection_string"], connect_timeout=5).close()

    anyio.run(scenario)


def test_account_tools_with_an_api_key(server):
    key = _account(server)
    api = ApiClient(server, api_key=key)
    owned = api.create("owner")
    from instapg_cli.api import _request

    _request("POST", f"{server}/api/v1/database/{owned['id']}/claim", {}, 30, key)
    old_url = owned["direct_connection_string"]

    async def scenario():
        async with stdio_session(server, key) as client:
            names = {t.name for t in (await client.list_tools()).tools}
            assert names == PUBLIC_TOOLS | ACCOUNT_TOOLS
            listed = await call(client, "list_databases")
            assert [d["id"] for d in listed["databases"]] == [owned["id"]]

            # The account's database is reachable (its string is fetched, audited, by the server).
            out = await call(client, "run_sql", database_id=owned["id"], sql="SELECT current_database() IS NOT NULL")
            assert out["rows"] == [[True]]

            stranger = ApiClient(server).create("someone-else")  # neither created here nor owned
            text = await fail(client, "run_sql", database_id=stranger["id"], sql="SELECT 1")
            assert "not created in this session or that your account owns" in text

            rotated = await call(client, "rotate_password", database_id=owned["id"])
            assert rotated["direct_connection_string"] != old_url
            with pytest.raises(psycopg.OperationalError):
                psycopg.connect(old_url, connect_timeout=5).close()
            with psycopg.connect(rotated["direct_connection_string"]) as conn:
                assert conn.execute("SELECT 1").fetchone() == (1,)
            out = await call(client, "run_sql", database_id=owned["id"], sql="SELECT 2")
            assert out["rows"] == [[2]]

            assert await call(client, "delete_database", database_id=owned["id"]) == {
                "id": owned["id"],
                "deleted": True,
            }
            text = await fail(client, "get_database", database_id=owned["id"])
            assert text.endswith("Database deleted (HTTP 410). Its owner deleted it. Create a new database.")
            text = await fail(client, "run_sql", database_id=owned["id"], sql="SELECT 1")
            assert "Database deleted (HTTP 410)" in text

    anyio.run(scenario)


def test_copies_with_an_api_key(server):
    """create_copy and reset_copy: the same auth as the account's other tools (the key's account only)."""
    from instapg_cli.api import _request

    key = _account(server)
    source = ApiClient(server, api_key=key).create("owner")
    with psycopg.connect(source["direct_connection_string"]) as conn:
        conn.execute("CREATE TABLE t (v text)")
        conn.execute("INSERT INTO t VALUES ('source')")
    stranger_key = _request("POST", f"{server}/api/v1/accounts", {"email": "other@example.com"}, 30)[1]["api_key"]

    async def scenario():
        async with stdio_session(server, key) as client:
            text = await fail(client, "create_copy", database_id=source["id"])
            assert "Unclaimed databases cannot be copied (HTTP 409)" in text
            _request("POST", f"{server}/api/v1/database/{source['id']}/claim", {}, 30, key)

            copy = await call(client, "create_copy", database_id=source["id"])
            assert copy["source_id"] == source["id"] and copy["id"] != source["id"]
            assert copy["region"] == source["region"] and copy["region"]
            assert "secrets" in copy["note"]
            copy_id.append(copy["id"])
            assert (await call(client, "get_database", database_id=copy["id"]))["region"] == copy["region"]
            # The copy is reachable at once, holds the source's data, and changes stay in it.
            out = await call(client, "run_sql", database_id=copy["id"], sql="DELETE FROM t RETURNING v", read_write=True)
            assert out["rows"] == [["source"]]
            listed = {d["id"]: d for d in (await call(client, "list_databases"))["databases"]}
            assert listed[copy["id"]]["source_id"] == source["id"] and listed[copy["id"]]["region"] == copy["region"]

            reset = await call(client, "reset_copy", database_id=copy["id"])
            assert reset["id"] == copy["id"] and reset["source_id"] == source["id"]
            out = await call(client, "run_sql", database_id=copy["id"], sql="SELECT v FROM t")
            assert out["rows"] == [["source"]]
            text = await fail(client, "reset_copy", database_id=source["id"])
            assert "Not a copy (HTTP 409)" in text

        async with stdio_session(server, stranger_key) as client:  # another account's key: not found
            text = await fail(client, "create_copy", database_id=source["id"])
            assert "HTTP 404" in text
            text = await fail(client, "reset_copy", database_id=copy_id[0])
            assert "HTTP 404" in text

        async with stdio_session(server, None) as client:  # no key: no copy tools at all
            assert not {"create_copy", "reset_copy"} & {t.name for t in (await client.list_tools()).tools}

    copy_id: list[str] = []
    anyio.run(scenario)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_streamable_http_keeps_each_session_to_its_own_databases(server):
    port = _free_port()
    env = {**os.environ, "INSTAPG_URL": server}
    env.pop("INSTAPG_API_KEY", None)
    proc = subprocess.Popen(
        [_command(), "--http", "--port", str(port)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert proc.poll() is None, proc.stderr.read().decode()
                assert time.monotonic() < deadline, "instapg-mcp --http did not listen within 30 s"
                time.sleep(0.1)

        async def scenario():
            from mcp import Client

            url = f"http://127.0.0.1:{port}/mcp"
            # Clients of the 2026 protocol keep no session: the access_token is what proves creation.
            async with Client(url) as first, Client(url) as second:
                db = await call(first, "create_database", ref="hosted-agent")
                token = db["access_token"]
                out = await call(first, "run_sql", database_id=db["id"], sql="SELECT 40 + 2", access_token=token)
                assert out["rows"] == [[42]]
                text = await fail(first, "run_sql", database_id=db["id"], sql="SELECT 1")
                assert "pass the access_token" in text
                text = await fail(second, "run_sql", database_id=db["id"], sql="SELECT 1", access_token="0" * 64)
                assert "not created in this session" in text
                # Deleting takes the same proof: a wrong access_token is refused, the right one deletes.
                text = await fail(second, "delete_database", database_id=db["id"], access_token="0" * 64)
                assert "not created in this session" in text
                text = await fail(first, "delete_database", database_id=db["id"])
                assert "not created in this session" in text
                assert ApiClient(server).get(db["id"])["status"] == "UNCLAIMED"
                gone = await call(first, "delete_database", database_id=db["id"], access_token=token)
                assert gone == {"id": db["id"], "deleted": True}
                with pytest.raises(ApiError) as deleted:
                    ApiClient(server).get(db["id"])
                assert deleted.value.status == 410
            # Clients that keep an MCP session (Mcp-Session-Id) need no token, and sessions stay apart.
            async with Client(url, mode="legacy") as first, Client(url, mode="legacy") as second:
                db = await call(first, "create_database", ref="hosted-agent")
                out = await call(first, "describe_schema", database_id=db["id"])
                assert out["tables"] == []
                text = await fail(second, "describe_schema", database_id=db["id"])
                assert "not created in this session" in text
                text = await fail(second, "delete_database", database_id=db["id"])
                assert "not created in this session" in text
                assert await call(first, "delete_database", database_id=db["id"]) == {"id": db["id"], "deleted": True}

        anyio.run(scenario)
        proc.terminate()
        _, stderr = proc.communicate(timeout=10)
        assert b"postgresql://" not in stderr  # connection strings go to the agent, never to the server's log
        assert b"ipgc_" not in stderr  # nor the creator tokens it keeps for delete_database
    finally:
        if proc.poll() is None:
            proc.terminate()
            proc.wait(timeout=10)
