"""SQL for the MCP server's run_sql and describe_schema (needs psycopg: `instapg[mcp]`).

Read-only is a guard for an agent, not a security boundary: whoever holds the
connection string can write anyway. It is enforced in a way a single
statement cannot undo: the transaction is opened READ ONLY and a query runs
before the agent's statement (so `SET TRANSACTION READ WRITE` is refused), and
read-only calls take exactly one statement (so `COMMIT; DELETE ...` cannot end
the transaction and write in the next one).
"""

from __future__ import annotations

import base64
import datetime
import decimal
import uuid
from typing import Any

from instapg_cli.seed import statements

MAX_ROWS_LIMIT = 1000  # the most rows one call may ask for
MAX_CELL_CHARS = 2000  # a longer value is cut (an agent's context is the scarce resource)


class SqlError(Exception):
    """A failure to show the agent as is: what went wrong and what to do."""


def _connect(url: str, timeout_s: float):
    import psycopg

    try:
        return psycopg.connect(url, connect_timeout=max(1, int(timeout_s)), autocommit=False)
    except psycopg.OperationalError as exc:
        raise SqlError(f"cannot connect to the database: {str(exc).strip().splitlines()[0]}") from None


def _start(conn, read_only: bool, timeout_s: float) -> None:
    conn.read_only = read_only  # psycopg opens the transaction with BEGIN READ ONLY
    # set_config(..., true) is SET LOCAL: it ends with the transaction, which matters behind a
    # transaction-mode pooler. Being a query, it also takes the snapshot that makes a later
    # SET TRANSACTION READ WRITE fail.
    conn.execute("SELECT set_config('statement_timeout', %s, true)", (f"{int(timeout_s * 1000)}ms",))


def _json_value(value: Any) -> Any:
    if value is None or isinstance(value, (bool, int, float)):
        return value
    if isinstance(value, decimal.Decimal):
        return str(value)
    if isinstance(value, (datetime.date, datetime.time, datetime.datetime)):
        return value.isoformat()
    if isinstance(value, datetime.timedelta):
        return str(value)
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, (bytes, bytearray, memoryview)):
        raw = bytes(value)
        return {"base64": base64.b64encode(raw[:MAX_CELL_CHARS]).decode(), "bytes": len(raw)}
    if isinstance(value, (list, tuple)):
        return [_json_value(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _json_value(v) for k, v in value.items()}
    text = str(value)
    return text if len(text) <= MAX_CELL_CHARS else text[:MAX_CELL_CHARS] + "…"


def _cell(value: Any) -> Any:
    value = _json_value(value)
    if isinstance(value, str) and len(value) > MAX_CELL_CHARS:
        return value[:MAX_CELL_CHARS] + "…"
    return value


def _error(exc) -> SqlError:
    diag = getattr(exc, "diag", None)
    message = (getattr(diag, "message_primary", None) or str(exc).strip().splitlines()[0]).strip()
    code = getattr(exc, "sqlstate", None)
    hint = getattr(diag, "message_hint", None)
    text = f"{message} (SQLSTATE {code})" if code else message
    if code == "25006":
        text += ". run_sql is read-only unless you pass read_write=true"
    elif code == "57014":
        text += ". The statement hit run_sql's time limit; narrow it (WHERE, LIMIT) or add an index"
    if hint:
        text += f". Hint: {hint}"
    return SqlError(text)


def run(url: str, query: str, read_write: bool = False, max_rows: int = 100, timeout_s: float = 10.0) -> dict:
    """Run `query`; at most `max_rows` rows come back (`truncated` says when there were more)."""
    import psycopg

    max_rows = max(1, min(int(max_rows), MAX_ROWS_LIMIT))
    parts = statements(query)
    if not parts:
        raise SqlError("the SQL is empty")
    if not read_write and len(parts) > 1:
        raise SqlError(
            f"read-only run_sql takes one statement; this has {len(parts)}. Send them one at a time, "
            "or pass read_write=true to run several in one transaction (the last one's rows come back)"
        )
    conn = _connect(url, timeout_s)
    try:
        _start(conn, read_only=not read_write, timeout_s=timeout_s)
        cur = conn.cursor()
        rows: list[list[Any]] = []
        truncated = False
        try:
            if read_write:
                # Several statements: the simple query protocol, inside this one transaction.
                cur.execute(query.encode())
                while cur.nextset():
                    pass
                if cur.description is not None:
                    fetched = cur.fetchmany(max_rows + 1)
                    truncated = len(fetched) > max_rows
                    rows = [[_cell(v) for v in row] for row in fetched[:max_rows]]
                conn.commit()
            else:
                # One row at a time from the server, so a huge result is never held here.
                for row in cur.stream(query.encode()):
                    if len(rows) == max_rows:
                        truncated = True
                        break
                    rows.append([_cell(v) for v in row])
                conn.rollback()  # nothing to keep; ends the read-only transaction
        except psycopg.Error as exc:
            raise _error(exc) from None
        columns = [{"name": c.name, "type": _type_name(conn, c.type_code)} for c in (cur.description or [])]
        return {
            "columns": columns,
            "rows": rows,
            "row_count": len(rows),
            "truncated": truncated,
            "command": cur.statusmessage,
            "read_only": not read_write,
        }
    finally:
        conn.close()


def _type_name(conn, oid: int) -> str:
    from psycopg.postgres import types

    info = types.get(oid)
    return info.name if info else str(oid)


_SCHEMA_SQL = """
SELECT n.nspname, c.relname, c.relkind, a.attname, format_type(a.atttypid, a.atttypmod),
       NOT a.attnotnull, pg_get_expr(d.adbin, d.adrelid), obj_description(c.oid, 'pg_class')
FROM pg_class c
JOIN pg_namespace n ON n.oid = c.relnamespace
LEFT JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
LEFT JOIN pg_attrdef d ON d.adrelid = c.oid AND d.adnum = a.attnum
WHERE c.relkind IN ('r', 'p', 'v', 'm', 'f')
  AND n.nspname NOT IN ('pg_catalog', 'information_schema') AND n.nspname NOT LIKE 'pg\\_%%'
  AND (%(schema)s::text IS NULL OR n.nspname = %(schema)s::text)
ORDER BY n.nspname, c.relname, a.attnum
"""

_CONSTRAINTS_SQL = """
SELECT n.nspname, c.relname, k.conname, k.contype, pg_get_constraintdef(k.oid)
FROM pg_constraint k
JOIN pg_class c ON c.oid = k.conrelid
JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE k.contype <> 'n'  -- NOT NULL (PostgreSQL 18): the columns' nullable says it
  AND n.nspname NOT IN ('pg_catalog', 'information_schema') AND n.nspname NOT LIKE 'pg\\_%%'
  AND (%(schema)s::text IS NULL OR n.nspname = %(schema)s::text)
ORDER BY n.nspname, c.relname, k.contype, k.conname
"""

_INDEXES_SQL = """
SELECT schemaname, tablename, indexname, indexdef FROM pg_indexes
WHERE schemaname NOT IN ('pg_catalog', 'information_schema') AND schemaname NOT LIKE 'pg\\_%%'
  AND (%(schema)s::text IS NULL OR schemaname = %(schema)s::text)
ORDER BY schemaname, tablename, indexname
"""

_KINDS = {"r": "table", "p": "partitioned table", "v": "view", "m": "materialized view", "f": "foreign table"}


def describe(url: str, schema: str | None = None, timeout_s: float = 10.0) -> dict:
    """Tables and views with their columns, constraints and indexes (read-only)."""
    import psycopg

    conn = _connect(url, timeout_s)
    try:
        _start(conn, read_only=True, timeout_s=timeout_s)
        params = {"schema": schema}
        try:
            columns = conn.execute(_SCHEMA_SQL, params).fetchall()
            constraints = conn.execute(_CONSTRAINTS_SQL, params).fetchall()
            indexes = conn.execute(_INDEXES_SQL, params).fetchall()
            extensions = [r[0] for r in conn.execute("SELECT extname FROM pg_extension ORDER BY 1").fetchall()]
        except psycopg.Error as exc:
            raise _error(exc) from None
        conn.rollback()
    finally:
        conn.close()
    tables: dict[tuple[str, str], dict] = {}
    for nsp, rel, kind, col, typ, nullable, default, comment in columns:
        table = tables.setdefault(
            (nsp, rel),
            {
                "schema": nsp,
                "name": rel,
                "kind": _KINDS.get(kind, kind),
                "columns": [],
                "constraints": [],
                "indexes": [],
            },
        )
        if comment:
            table["comment"] = comment
        if col is not None:
            table["columns"].append({"name": col, "type": typ, "nullable": nullable, "default": default})
    for nsp, rel, name, _kind, definition in constraints:
        if (nsp, rel) in tables:
            tables[(nsp, rel)]["constraints"].append({"name": name, "definition": definition})
    for nsp, rel, name, definition in indexes:
        if (nsp, rel) in tables:
            tables[(nsp, rel)]["indexes"].append({"name": name, "definition": definition})
    return {"tables": list(tables.values()), "extensions": extensions}
