"""SQLSTATE of a refused login.

libpq reports errors raised while a connection is being set up without their
SQLSTATE (psycopg's `exc.sqlstate` is None), so this maps the server's FATAL
message to the code the server sent. Statements on an open connection carry
their SQLSTATE: assert on `exc.sqlstate` there.
"""

from __future__ import annotations

import psycopg

_FATAL_CODES = [
    ("password authentication failed", "28P01"),  # invalid_password
    ("is not permitted to log in", "28000"),  # invalid_authorization_specification
    ("permission denied for database", "42501"),  # insufficient_privilege
    ("too many connections for role", "53300"),  # too_many_connections
    ("too many connections for database", "53300"),
    ("does not exist", "3D000"),  # invalid_catalog_name
    ("is not currently accepting connections", "55000"),
    ("no pg_hba.conf entry", "28000"),
]


def login_sqlstate(exc: psycopg.OperationalError) -> str | None:
    if exc.sqlstate:
        return exc.sqlstate
    text = str(exc)
    for needle, code in _FATAL_CODES:
        if needle in text:
            return code
    return None


def refused_login(**params) -> str | None:
    """Try to log in; the SQLSTATE of the refusal, or None when the login worked."""
    try:
        conn = psycopg.connect(connect_timeout=10, **params)
    except psycopg.OperationalError as exc:
        return login_sqlstate(exc) or f"unknown: {exc}"
    conn.close()
    return None
