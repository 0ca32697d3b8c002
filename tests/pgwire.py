"""SQLSTATE of a refused login.

libpq (and so psycopg) reports no SQLSTATE for a connection that fails
during startup: only a message, whose text changes between versions. pg8000
speaks the protocol itself (with SCRAM) and keeps the server's ErrorResponse
fields, so the tests can assert on the code, e.g. 28000 for NOLOGIN.
"""

from __future__ import annotations

import psycopg


def login_sqlstate(url: str, dbname: str | None = None, replication: str | None = None) -> str | None:
    """The SQLSTATE the server refused this login with; None when the login worked.

    `replication`: "true" for a physical walsender login, "database" for a logical one.
    """
    import pg8000.exceptions
    import pg8000.native

    params = psycopg.conninfo.conninfo_to_dict(url)
    try:
        conn = pg8000.native.Connection(
            user=params["user"],
            password=params["password"],
            host=params["host"],
            port=int(params["port"]),
            database=dbname or params["dbname"],
            timeout=10,
            replication=replication,
        )
    except pg8000.exceptions.DatabaseError as exc:
        return exc.args[0].get("C")
    if replication is None:
        conn.run("SELECT 1")
    conn.close()
    return None
