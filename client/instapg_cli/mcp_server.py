"""`instapg-mcp`: instapg as tools for AI agents (Model Context Protocol).

    instapg-mcp                                  # stdio: what agent clients start
    instapg-mcp --http --port 8765               # streamable HTTP at http://127.0.0.1:8765/mcp

It talks to an instapg server over HTTP like the `instapg` command does
(INSTAPG_URL / --url). With INSTAPG_API_KEY (or --api-key) it also offers the
account's tools: list_databases, rotate_password, create_copy, reset_copy; delete_database is always there
(without a key it deletes the unclaimed databases this session created, with the
creator token their create returned, kept in memory like the strings).

run_sql and describe_schema work only on databases this session created (on
stdio the process is the session; over HTTP the MCP session, or, for clients of
the sessionless 2026 protocol, whoever shows the database's access_token) or,
with an API key, on databases the account owns. Connection strings are kept
in this process's memory, never on disk.
"""

import argparse
import hashlib
import hmac
import os
import secrets
import sys
from collections import OrderedDict
from typing import Any

from instapg_cli import __version__
from instapg_cli.api import ApiError, Client, check_id

DEFAULT_URL = "http://127.0.0.1:8000"
DEFAULT_TIMEOUT_S = 10.0

INSTRUCTIONS = """\
instapg hands out PostgreSQL databases with one call, no sign-up.

- create_database gives a new, empty database and its connection strings. It EXPIRES (is deleted
  with all its data) at expires_at, about 72 hours later, unless a person claims it: give them the
  claim_url. Create one database per project and reuse it; do not create one per question.
- Connection strings contain the password: they are secrets. Write them to the project's .env
  (DATABASE_URL) or hand them to the user; do not paste them into chat, commits, logs or issues.
- run_sql is read-only unless you pass read_write=true; rows and time are bounded. Use
  describe_schema before writing queries against tables you have not seen.
- These tools act only on databases this session created, or, with an API key, that the
  account owns. delete_database deletes an unclaimed database this session created without a key.
"""

CREATE = """Create a new, empty PostgreSQL database (PostgreSQL 18) and return its connection strings.

Use this when the user's project needs a Postgres database and has none (no DATABASE_URL in its
.env). Do not call it again for the same project: reuse the database you got (get_database shows
its state).

Returns id, region (where it lives), connection_string (pooled: use it for the app),
direct_connection_string (a direct session: use it for migrations, LISTEN/NOTIFY, pg_dump),
replication_connection_string (only with enable_logical_replication: replication=database, for
pg_recvlogical or CREATE SUBSCRIPTION; else null), claim_url, expires_at, and access_token
(pass it to run_sql/describe_schema only if your client keeps no MCP session; keep it private too).
The database is deleted with all its data at expires_at (about 72 h) unless a person opens claim_url
and claims it into an account; tell the user this, with the link.
The connection strings contain the password: they are secrets. Put them in .env as DATABASE_URL /
DATABASE_URL_DIRECT (and make sure .env is git-ignored); never echo them into chat, commits or logs.

ref: a short name for who is asking, e.g. the project's or tool's name.
region: only when the user asked for one (data residency, latency), e.g. "eu-west-1"; left out, the
server's default region. An unknown or full region is refused with the regions that have room.
enable_logical_replication: only for CDC/replication tools (Debezium, ElectricSQL); refused where
no host offers it."""

GET = """Show a database's state: status (UNCLAIMED, CLAIMED, EXPIRED, DELETED ...), region, expires_at, the size
last measured and the plan's limits, the claim_url, and whether this session created it.
Use it to check whether a database still exists before using it, or how long it has left.
It never returns connection strings."""

RUN_SQL = """Run one SQL statement on a database and return its rows as JSON.

Read-only by default (the transaction is READ ONLY): use it to look at data. Pass read_write=true to
change data or schema (CREATE TABLE, INSERT, ALTER ...); then several statements may be sent at once
and run in one transaction, all or nothing, and the last statement's rows come back.
At most max_rows rows come back (default 100, at most 1000; truncated=true says there were more), and
each call is stopped after the statement time limit: add WHERE/LIMIT rather than fetching a whole table.
Only on databases this session created, or (with an API key) that the account owns. Over HTTP
without an MCP session, pass the access_token that create_database returned.
For a schema overview, describe_schema is cheaper than querying the catalog yourself."""

DESCRIBE = """List the tables and views of a database with their columns (type, nullable, default),
constraints (primary and foreign keys, unique, check), indexes, and the installed extensions.
Use it before writing SQL against a database whose schema you have not seen.
schema: limit to one schema (e.g. "public"); default: all user schemas."""

CLAIM = """Get the claim URL of a database, for a person to open in a browser.

Claiming moves the database into the person's instapg account: it then never expires and gets the
account's plan. An agent cannot claim on its own behalf; give the link to the user, and say the
database is deleted at expires_at if nobody claims it."""

LIST = """List the databases owned by the account of the configured API key (claimed databases),
with status, region, plan and creation time; a copy has source_id, the database it was copied from.
Databases created but not yet claimed are not in it."""

COPY = """Copy a database the account owns (claimed): a new database with the source's schema and data
as of now, in the same region, with its own role and password. Use it for a branch to test a
migration or an experiment against real data without touching the source.
The source's open sessions are ended and it refuses connections while it is copied (usually seconds
for a small database): do not copy a production database in use without the user's agreement.
Returns the copy's id, source_id, region and its connection strings (secrets: put them in .env, e.g.
DATABASE_URL_COPY, not in chat). run_sql and describe_schema work on the copy at once.
Each copy counts against the account's database limit; delete_database removes it."""

RESET = """Make a copy (a database create_copy made) a fresh copy of its source again: everything done in the
copy since is lost, and its open sessions are ended; its connection strings stay the same.
Use it to rerun a migration test from a clean start. Only on a copy (source_id set), never on a source."""

DELETE = """Delete a database with all its data, now. This cannot be undone.
Only do this when the user asked for it (an unclaimed database is deleted at expires_at anyway).
Works on a database this session created and nobody has claimed yet (no API key needed; over HTTP
without an MCP session, pass the access_token create_database returned), and, with an API key, on
databases the account owns. The database's connection strings stop working at once."""

ROTATE = """Give a database the account owns a new password and return the new connection strings.
The old password stops working at once and its open sessions are ended: update .env (DATABASE_URL,
DATABASE_URL_DIRECT) with the new strings. Use it when a connection string may have leaked.
The new strings are secrets, as before."""


class Bounded(OrderedDict):
    """A dict that forgets its oldest entries past `limit` (a long-running HTTP server stays bounded)."""

    def __init__(self, limit: int = 10_000) -> None:
        super().__init__()
        self.limit = limit

    def __setitem__(self, key, value) -> None:
        super().__setitem__(key, value)
        self.move_to_end(key)
        while len(self) > self.limit:
            self.popitem(last=False)


class Tools:
    """What each tool does, without MCP: the server below calls these.

    A database is reachable by run_sql and describe_schema when the caller's
    scope created it (`scope`: the process on stdio, the MCP session on
    stateful HTTP), or when the caller shows the access_token create_database
    returned (HTTP clients of the 2026 protocol keep no session), or, with an
    API key, when the account owns it. Connection strings stay in this
    process's memory only.
    """

    def __init__(self, base_url: str, api_key: str | None = None, statement_timeout_s: float = DEFAULT_TIMEOUT_S):
        self.client = Client(base_url, api_key=api_key)
        self.api_key = api_key
        self.statement_timeout_s = statement_timeout_s
        self._token_key = secrets.token_bytes(32)  # tokens die with the process, as the strings do
        self._by_id: Bounded = Bounded()  # database id -> direct connection string
        self._creator_tokens: Bounded = Bounded()  # database id -> creator token (a secret: memory only)

    def access_token(self, database_id: str) -> str:
        return hmac.new(self._token_key, database_id.encode(), hashlib.sha256).hexdigest()

    def create_database(
        self, scope: dict | None, ref: str, enable_logical_replication: bool, region: str | None = None
    ) -> dict[str, Any]:
        body = self.client.create(ref, enable_logical_replication, region)
        self._remember(scope, body["id"], body["direct_connection_string"])
        if body.get("creator_token"):  # kept for delete_database, not shown to the agent
            self._creator_tokens[body["id"]] = body["creator_token"]
        return {
            "id": body["id"],
            "status": body["status"],
            "region": body.get("region"),
            "connection_string": body["connection_string"],
            "direct_connection_string": body["direct_connection_string"],
            # Only for enable_logical_replication: the replication gateway's replication=database string.
            "replication_connection_string": body.get("replication_connection_string"),
            "claim_url": body["claim_url"],
            "expires_at": body.get("expires_at"),
            "limits": body.get("limits"),
            "access_token": self.access_token(body["id"]),
            "note": "The connection strings are secrets (they hold the password): write them to .env, not to chat. "
            f"The database is deleted at {body.get('expires_at')} unless a person claims it at {body['claim_url']}.",
        }

    def _remember(self, scope: dict | None, database_id: str, url: str) -> None:
        self._by_id[database_id] = url
        if scope is not None:
            scope[database_id] = url

    def _created(self, scope: dict | None, database_id: str, access_token: str | None) -> bool:
        if scope is not None and database_id in scope:
            return True
        return bool(access_token) and hmac.compare_digest(self.access_token(database_id), access_token)

    def get_database(self, scope: dict | None, database_id: str, access_token: str | None = None) -> dict[str, Any]:
        database_id = check_id(database_id)
        body = self.client.get(database_id)
        body.pop("connection_string", None)
        body.pop("direct_connection_string", None)
        body["created_by_this_session"] = self._created(scope, database_id, access_token)
        return body

    def _url(self, scope: dict | None, database_id: str, access_token: str | None) -> str:
        database_id = check_id(database_id)
        if self._created(scope, database_id, access_token):
            url = (scope or {}).get(database_id) or self._by_id.get(database_id)
            if url:
                return url
        if self.api_key:
            try:
                return self.client.connection(database_id)["direct_connection_string"]
            except ApiError as exc:
                if exc.status not in (403, 404):
                    raise
        owner = " or that your account owns" if self.api_key else ""
        more = "" if self.api_key else " (set INSTAPG_API_KEY to reach databases your account owns)"
        raise ApiError(
            f"database {database_id} was not created in this session{owner}",
            f"Use create_database to get one{more}. Over HTTP without an MCP session, pass the access_token "
            "create_database returned.",
            status=403,
        )

    def run_sql(
        self, scope: dict | None, database_id: str, sql: str, read_write: bool, max_rows: int, access_token: str | None
    ) -> dict[str, Any]:
        from instapg_cli import sqltools

        url = self._url(scope, database_id, access_token)
        return sqltools.run(url, sql, read_write, max_rows, self.statement_timeout_s)

    def describe_schema(
        self, scope: dict | None, database_id: str, schema: str | None, access_token: str | None
    ) -> dict[str, Any]:
        from instapg_cli import sqltools

        return sqltools.describe(self._url(scope, database_id, access_token), schema, self.statement_timeout_s)

    def claim_url(self, database_id: str) -> dict[str, Any]:
        body = self.client.get(check_id(database_id))
        return {
            "id": body["id"],
            "status": body["status"],
            "claim_url": body["claim_url"],
            "expires_at": body.get("expires_at"),
            "how": "A person opens claim_url in a browser and signs in or creates an account; the database then "
            "never expires. Until then it is deleted at expires_at.",
        }

    def list_databases(self) -> dict[str, Any]:
        return {"databases": self.client.list()}

    def delete_database(self, scope: dict | None, database_id: str, access_token: str | None = None) -> dict[str, Any]:
        database_id = check_id(database_id)
        token = self._creator_tokens.get(database_id) if self._created(scope, database_id, access_token) else None
        if token:
            try:
                self.client.delete_unclaimed(database_id, token)
            except ApiError as exc:
                if exc.status != 409 or not self.api_key:  # 409: claimed since; its owner's key may delete it
                    raise
                self.client.delete(database_id)
        elif self.api_key:
            self.client.delete(database_id)
        else:
            raise ApiError(
                f"database {database_id} was not created in this session",
                "Without an API key, delete_database deletes only unclaimed databases this session created (over "
                "HTTP without an MCP session, pass the access_token create_database returned); set "
                "INSTAPG_API_KEY for databases your account owns.",
                status=403,
            )
        self._creator_tokens.pop(database_id, None)
        self._by_id.pop(database_id, None)
        if scope is not None:
            scope.pop(database_id, None)
        return {"id": database_id, "deleted": True}

    def create_copy(self, scope: dict | None, database_id: str) -> dict[str, Any]:
        body = self.client.copy(check_id(database_id))
        # The account owns the copy, so run_sql reaches it anyway; remembered here it needs no audited fetch.
        self._remember(scope, body["id"], body["direct_connection_string"])
        return {
            **body,
            "note": "A new database with the source's data as of now; changes to it never reach the source. "
            "Its connection strings are secrets: write them to .env (e.g. DATABASE_URL_COPY), not to chat. "
            "reset_copy makes it a fresh copy again; delete_database removes it.",
        }

    def reset_copy(self, database_id: str) -> dict[str, Any]:
        body = self.client.reset(check_id(database_id))
        return {
            **body,
            "note": "The copy holds the source's data as of now again; its connection strings did not change.",
        }

    def rotate_password(self, scope: dict | None, database_id: str) -> dict[str, Any]:
        database_id = check_id(database_id)
        body = self.client.rotate(database_id)
        if database_id in self._by_id:
            self._by_id[database_id] = body["direct_connection_string"]
        if scope is not None and database_id in scope:
            scope[database_id] = body["direct_connection_string"]
        return {
            **body,
            "note": "The old password no longer works. Update DATABASE_URL and DATABASE_URL_DIRECT in .env; "
            "the new strings are secrets.",
        }


def build_server(
    base_url: str, api_key: str | None = None, statement_timeout_s: float = DEFAULT_TIMEOUT_S, stdio: bool = True
):
    """The MCP server; account tools only when there is an API key (an agent sees only what works)."""
    import anyio
    from mcp.server.mcpserver import Context, MCPServer
    from mcp.server.mcpserver.exceptions import ToolError
    from mcp.types import ToolAnnotations

    tools = Tools(base_url, api_key, statement_timeout_s)
    # WARNING: a tool's expected failure is already the agent's answer; stderr stays quiet.
    server = MCPServer("instapg", instructions=INSTRUCTIONS, version=__version__, log_level="WARNING")
    process_scope: dict[str, str] = {}
    sessions: Bounded = Bounded()  # Mcp-Session-Id -> that session's databases

    def scope(ctx: Context) -> dict[str, str] | None:
        """What this caller created: on stdio the process is one agent's session; over HTTP, the MCP session."""
        if stdio:
            return process_scope
        session_id = (ctx.headers or {}).get("mcp-session-id")
        if not session_id:
            return None  # 2026 protocol, no session: the access_token is the proof
        if session_id not in sessions:
            sessions[session_id] = {}
        return sessions[session_id]

    async def call(fn, *args) -> dict[str, Any]:
        from instapg_cli.sqltools import SqlError

        try:
            # Off the event loop: the HTTP API and Postgres are blocking calls.
            return await anyio.to_thread.run_sync(fn, *args)
        except (ApiError, SqlError) as exc:
            raise ToolError(str(exc)) from None

    read = ToolAnnotations(read_only_hint=True, open_world_hint=False)

    @server.tool(description=CREATE, annotations=ToolAnnotations(read_only_hint=False, destructive_hint=False))
    async def create_database(
        ctx: Context, ref: str = "instapg-mcp", enable_logical_replication: bool = False, region: str | None = None
    ) -> dict[str, Any]:
        return await call(tools.create_database, scope(ctx), ref, enable_logical_replication, region)

    @server.tool(description=GET, annotations=read)
    async def get_database(ctx: Context, database_id: str, access_token: str | None = None) -> dict[str, Any]:
        return await call(tools.get_database, scope(ctx), database_id, access_token)

    @server.tool(description=RUN_SQL, annotations=ToolAnnotations(read_only_hint=False, destructive_hint=True))
    async def run_sql(
        ctx: Context,
        database_id: str,
        sql: str,
        read_write: bool = False,
        max_rows: int = 100,
        access_token: str | None = None,
    ) -> dict[str, Any]:
        return await call(tools.run_sql, scope(ctx), database_id, sql, read_write, max_rows, access_token)

    @server.tool(description=DESCRIBE, annotations=read)
    async def describe_schema(
        ctx: Context, database_id: str, schema: str | None = None, access_token: str | None = None
    ) -> dict[str, Any]:
        return await call(tools.describe_schema, scope(ctx), database_id, schema, access_token)

    @server.tool(description=DELETE, annotations=ToolAnnotations(read_only_hint=False, destructive_hint=True))
    async def delete_database(ctx: Context, database_id: str, access_token: str | None = None) -> dict[str, Any]:
        return await call(tools.delete_database, scope(ctx), database_id, access_token)

    @server.tool(description=CLAIM, annotations=read)
    async def claim_url(database_id: str) -> dict[str, Any]:
        return await call(tools.claim_url, database_id)

    if api_key:

        @server.tool(description=LIST, annotations=read)
        async def list_databases() -> dict[str, Any]:
            return await call(tools.list_databases)

        @server.tool(description=ROTATE, annotations=ToolAnnotations(read_only_hint=False, destructive_hint=True))
        async def rotate_password(ctx: Context, database_id: str) -> dict[str, Any]:
            return await call(tools.rotate_password, scope(ctx), database_id)

        @server.tool(description=COPY, annotations=ToolAnnotations(read_only_hint=False, destructive_hint=False))
        async def create_copy(ctx: Context, database_id: str) -> dict[str, Any]:
            return await call(tools.create_copy, scope(ctx), database_id)

        @server.tool(description=RESET, annotations=ToolAnnotations(read_only_hint=False, destructive_hint=True))
        async def reset_copy(database_id: str) -> dict[str, Any]:
            return await call(tools.reset_copy, database_id)

    return server


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="instapg-mcp",
        description="instapg's MCP server: create and query PostgreSQL databases from an AI agent.",
    )
    parser.add_argument("--url", help=f"instapg server (default: $INSTAPG_URL or {DEFAULT_URL})")
    parser.add_argument(
        "--api-key",
        help="account API key for list/rotate/copies, and delete of owned databases (default: $INSTAPG_API_KEY)",
    )
    parser.add_argument("--http", action="store_true", help="serve streamable HTTP instead of stdio")
    parser.add_argument("--host", default="127.0.0.1", help="with --http: address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8765, help="with --http: port (default 8765)")
    parser.add_argument(
        "--statement-timeout", type=float, default=DEFAULT_TIMEOUT_S, help="run_sql's time limit, seconds"
    )
    parser.add_argument("--version", action="version", version=f"instapg-mcp {__version__}")
    args = parser.parse_args(argv)
    try:
        import mcp  # noqa: F401
    except ImportError:
        print("instapg-mcp needs the mcp extra: pip install 'instapg[mcp]'", file=sys.stderr)
        return 3
    base = (args.url or os.environ.get("INSTAPG_URL") or DEFAULT_URL).rstrip("/")
    api_key = args.api_key or os.environ.get("INSTAPG_API_KEY") or None
    server = build_server(base, api_key, args.statement_timeout, stdio=not args.http)
    if args.http:
        server.run("streamable-http", host=args.host, port=args.port)
    else:
        server.run()  # stdio; logs go to stderr, stdout carries the protocol
    return 0


if __name__ == "__main__":
    sys.exit(main())
