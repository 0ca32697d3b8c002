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
    tls: object = None  # pg8000's default: TLS when the server offers it
    if params.get("sslmode") == "disable":
        tls = False
    elif params.get("sslmode") == "require":  # encrypted, the certificate not checked (as libpq's require)
        import ssl

        tls = ssl.create_default_context()
        tls.check_hostname = False
        tls.verify_mode = ssl.CERT_NONE
    try:
        conn = pg8000.native.Connection(
            user=params["user"],
            password=params["password"],
            host=params["host"],
            port=int(params["port"]),
            database=dbname or params["dbname"],
            timeout=10,
            replication=replication,
            ssl_context=tls,
        )
    except pg8000.exceptions.DatabaseError as exc:
        return exc.args[0].get("C")
    if replication is None:
        conn.run("SELECT 1")
    conn.close()
    return None
