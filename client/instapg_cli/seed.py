"""`--seed FILE.sql`: run a whole SQL file on the new database, in one transaction.

The file goes to the server in one simple-query message, so Postgres itself
splits the statements: `$$` function bodies, quoted semicolons and comments
all work, where splitting on `;` here would break them. When it fails, the
statement to blame is found from the error's position when Postgres gives one,
else by replaying the statements one by one in a transaction that is rolled
back; the lexer below only finds statement boundaries for that report.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_DOLLAR = re.compile(r"\$([A-Za-z_][A-Za-z0-9_]*)?\$")


class SeedError(Exception):
    """The seed did not apply; the message says where and why."""


@dataclass(frozen=True)
class Statement:
    start: int  # offset of the first character that is not blank or comment
    end: int  # offset after the terminating semicolon (or end of text)
    text: str


def statements(sql: str) -> list[Statement]:
    """Boundaries of the statements in `sql` (quotes, dollar quotes and comments respected)."""
    out: list[Statement] = []
    i, n = 0, len(sql)
    start: int | None = None
    while i < n:
        c = sql[i]
        if c == "-" and sql.startswith("--", i):
            j = sql.find("\n", i)
            i = n if j < 0 else j + 1
            continue
        if c == "/" and sql.startswith("/*", i):
            depth, i = 1, i + 2
            while i < n and depth:
                if sql.startswith("/*", i):
                    depth, i = depth + 1, i + 2
                elif sql.startswith("*/", i):
                    depth, i = depth - 1, i + 2
                else:
                    i += 1
            continue
        if c.isspace():
            i += 1
            continue
        if start is None:
            start = i
        if c == ";":
            out.append(Statement(start, i + 1, sql[start : i + 1]))
            start, i = None, i + 1
        elif c in "'\"":
            escapes = (
                c == "'" and i > 0 and sql[i - 1] in "eE" and (i < 2 or not (sql[i - 2].isalnum() or sql[i - 2] == "_"))
            )
            i += 1
            while i < n:
                if escapes and sql[i] == "\\":
                    i += 2
                    continue
                if sql[i] == c:
                    if i + 1 < n and sql[i + 1] == c:  # doubled quote
                        i += 2
                        continue
                    break
                i += 1
            i += 1
        elif c == "$" and (i == 0 or not (sql[i - 1].isalnum() or sql[i - 1] == "_")):
            match = _DOLLAR.match(sql, i)
            if match:
                close = sql.find(match.group(0), match.end())
                i = n if close < 0 else close + len(match.group(0))
            else:
                i += 1
        else:
            i += 1
    if start is not None:
        out.append(Statement(start, n, sql[start:n]))
    return out


def line_of(sql: str, offset: int) -> int:
    return sql.count("\n", 0, offset) + 1


def require_psycopg() -> None:
    """Raise SeedError (how to install it) when psycopg is missing: checked before a database is created."""
    _psycopg()


def _psycopg():
    try:
        import psycopg
    except ImportError:
        raise SeedError(
            "--seed needs psycopg, which is not installed. Install the client with its seed extra: "
            "pip install 'instapg[seed]' (or pipx inject instapg 'psycopg[binary]')"
        ) from None
    return psycopg


def apply(url: str, sql: str, filename: str = "seed") -> int:
    """Run `sql` on `url` in one transaction; returns the number of statements. Raises SeedError."""
    psycopg = _psycopg()
    parts = statements(sql)
    if not parts:
        return 0
    try:
        conn = psycopg.connect(url)
    except psycopg.OperationalError as exc:
        raise SeedError(f"cannot connect to the new database: {str(exc).strip().splitlines()[0]}") from None
    with conn:
        try:
            conn.execute(sql.encode())  # no parameters: the simple query protocol, many statements
        except psycopg.Error as exc:
            conn.rollback()
            raise SeedError(_describe(conn, sql, parts, exc, filename)) from None
        conn.commit()
    return len(parts)


def _describe(conn, sql: str, parts: list[Statement], exc, filename: str) -> str:
    position = getattr(exc.diag, "statement_position", None)
    offset: int | None = None
    failed: Statement | None = None
    if position:
        offset = int(position) - 1
        failed = next((s for s in parts if s.start <= offset < s.end), None)
    if failed is None:
        failed = _replay(conn, parts)
    if failed is not None and offset is None:
        offset = failed.start
    message = (exc.diag.message_primary or str(exc).strip().splitlines()[0]).strip()
    code = f" (SQLSTATE {exc.sqlstate})" if exc.sqlstate else ""
    where = f"{filename}:{line_of(sql, offset)}: " if offset is not None else f"{filename}: "
    text = f"seed failed, nothing was applied: {where}{message}{code}"
    if failed is not None:
        first = failed.text.strip().splitlines()[0]
        text += f"\n  in the statement at line {line_of(sql, failed.start)}: {first[:120]}"
    return text


def _replay(conn, parts: list[Statement]) -> Statement | None:
    """The first statement that fails when run one at a time (then everything is rolled back)."""
    import psycopg

    try:
        for part in parts:
            try:
                conn.execute(part.text.encode())
            except psycopg.Error:
                return part
        return None
    finally:
        conn.rollback()
