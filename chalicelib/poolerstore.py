"""The production pooler's tenant list: a table on the Postgres host that a sync loop renders for PgBouncer.

Lambda cannot write the files of a PgBouncer container, and RDS's master user
cannot read pg_authid for an `auth_query`. So the service keeps what PgBouncer
needs (role, database, SCRAM verifier, pool size, server address) in
`pooler.tenants`, in a dedicated database on each host (`DBNAME`). The sync
loop beside PgBouncer (tools/pooler/sync.py) logs in as `SYNC_ROLE`, which can
read that table and nothing else, renders PgBouncer's auth_file and databases
file with `chalicelib.pooler`'s render functions, and reloads PgBouncer.

Every write bumps `pooler.state.generation` in the same transaction and
NOTIFYs `CHANNEL`, so the sync loop applies it within milliseconds; the
service then waits on the admin console until PgBouncer shows that
generation loaded (an entry `chalicelib.pooler.GENERATION_ENTRY` whose target
dbname is `g<generation>`), and only then KILLs.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from chalicelib.pooler import GENERATION_ENTRY, PoolerError, Tenant

if TYPE_CHECKING:  # psycopg and the admin connection are imported lazily
    import psycopg

    from chalicelib.postgres import Target

log = logging.getLogger(__name__)

DBNAME = "instapg_pooler"
SYNC_ROLE = "instapg_pooler_sync"
CHANNEL = "instapg_pooler"
# Server connections the sync loops may hold (one per PgBouncer task, a roll doubles it).
SYNC_CONNECTION_LIMIT = 4

_SCHEMA = """
CREATE SCHEMA IF NOT EXISTS pooler;
CREATE TABLE IF NOT EXISTS pooler.tenants (
    role        text PRIMARY KEY,
    dbname      text NOT NULL UNIQUE,
    verifier    text NOT NULL,
    pool_size   integer NOT NULL CHECK (pool_size > 0),
    server_host text NOT NULL,
    server_port integer NOT NULL CHECK (server_port BETWEEN 1 AND 65535),
    updated_at  timestamptz NOT NULL DEFAULT now()
);
-- One row: raised by every write, so a writer's change has a number the sync loop reports back.
CREATE TABLE IF NOT EXISTS pooler.state (
    one        boolean PRIMARY KEY DEFAULT true CHECK (one),
    generation bigint NOT NULL
);
INSERT INTO pooler.state (one, generation) VALUES (true, 1) ON CONFLICT DO NOTHING;
"""


def setup(admin: Target, sync_password: str) -> None:
    """Create the database, its tables and the read-only sync role on a host; run again to change the password.

    Works as RDS's master user (CREATEDB, CREATEROLE; no superuser). The
    password is sent as a SCRAM verifier, never in clear.
    """
    from psycopg import sql

    from chalicelib.postgres import scram_verifier

    verifier = scram_verifier(sync_password)
    with admin.connect() as conn:
        conn.autocommit = True
        exists = conn.execute("SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = %s", (SYNC_ROLE,)).fetchone()
        # The attributes are set once, at CREATE: a non-superuser may not name SUPERUSER in an ALTER.
        attributes = "" if exists else " NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS NOINHERIT"
        conn.execute(
            sql.SQL(
                ("ALTER" if exists else "CREATE") + " ROLE {} LOGIN" + attributes + " CONNECTION LIMIT {} PASSWORD {}"
            ).format(sql.Identifier(SYNC_ROLE), sql.Literal(SYNC_CONNECTION_LIMIT), sql.Literal(verifier))
        )
        if not conn.execute("SELECT 1 FROM pg_catalog.pg_database WHERE datname = %s", (DBNAME,)).fetchone():
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(DBNAME)))
        conn.execute(sql.SQL("REVOKE ALL ON DATABASE {} FROM PUBLIC").format(sql.Identifier(DBNAME)))
        conn.execute(
            sql.SQL("GRANT CONNECT ON DATABASE {} TO {}").format(sql.Identifier(DBNAME), sql.Identifier(SYNC_ROLE))
        )
    with admin.connect(DBNAME) as conn:
        with conn.transaction():
            conn.execute(_SCHEMA)
            conn.execute("REVOKE ALL ON SCHEMA pooler FROM PUBLIC")
            role = sql.Identifier(SYNC_ROLE)
            conn.execute(sql.SQL("GRANT USAGE ON SCHEMA pooler TO {}").format(role))
            conn.execute(sql.SQL("GRANT SELECT ON pooler.tenants, pooler.state TO {}").format(role))


class TableStore:
    """`chalicelib.pooler.Store` on `pooler.tenants` in `DBNAME`, written as the host's admin.

    `apply` waits (up to `apply_timeout_s`) until PgBouncer shows, on its admin
    console, the generation of this store's last write: the sync loop has
    rendered and reloaded it. Only then do the pooler's KILLs follow.
    """

    def __init__(self, admin: Target, apply_timeout_s: float = 5.0) -> None:
        self.admin = admin
        self.apply_timeout_s = apply_timeout_s
        self._last = -1  # the generation of this store's last write

    @contextmanager
    def _write(self) -> Iterator[psycopg.Connection]:
        """One transaction: the caller's change, the next generation, a NOTIFY sent at commit."""
        with self.admin.connect(DBNAME) as conn:
            with conn.transaction():
                # The row lock orders writers: generations commit in the order they are numbered.
                (gen,) = conn.execute(
                    "UPDATE pooler.state SET generation = generation + 1 RETURNING generation"
                ).fetchone()
                yield conn
                conn.execute("SELECT pg_catalog.pg_notify(%s, %s)", (CHANNEL, str(gen)))
        self._last = max(self._last, int(gen))

    def put(self, tenants: Iterable[Tenant], only_present: bool = False) -> None:
        with self._write() as conn:
            for t in tenants:
                values = (t.verifier, t.pool_size, t.server_host, t.server_port, t.role, t.dbname)
                if only_present:  # a rotation: a tenant taken out (locked, expired) stays out
                    conn.execute(
                        "UPDATE pooler.tenants SET verifier = %s, pool_size = %s, server_host = %s,"
                        " server_port = %s, updated_at = now() WHERE role = %s AND dbname = %s",
                        values,
                    )
                    continue
                conn.execute(
                    "INSERT INTO pooler.tenants (verifier, pool_size, server_host, server_port, role, dbname)"
                    " VALUES (%s, %s, %s, %s, %s, %s)"
                    " ON CONFLICT (role) DO UPDATE SET dbname = excluded.dbname, verifier = excluded.verifier,"
                    " pool_size = excluded.pool_size, server_host = excluded.server_host,"
                    " server_port = excluded.server_port, updated_at = now()",
                    values,
                )

    def remove(self, role: str, dbname: str) -> None:
        self.remove_many([(role, dbname)])

    def remove_many(self, tenants: Iterable[tuple[str, str]]) -> None:
        roles, dbnames = [list(names) for names in zip(*tenants, strict=True)] or ([], [])
        with self._write() as conn:
            conn.execute("DELETE FROM pooler.tenants WHERE role = ANY(%s) OR dbname = ANY(%s)", (roles, dbnames))

    def databases(self) -> set[str]:
        with self.admin.connect(DBNAME) as conn:
            return {name for (name,) in conn.execute("SELECT dbname FROM pooler.tenants").fetchall()}

    def apply(self, admin: Callable[..., list[dict]]) -> list[str]:
        """Wait until PgBouncer has loaded this store's last write; nothing for the caller to send."""
        deadline = time.monotonic() + self.apply_timeout_s
        while loaded_generation(admin("SHOW DATABASES")) < self._last:
            if time.monotonic() >= deadline:
                raise PoolerError(
                    f"pooler has not loaded change {self._last} in {self.apply_timeout_s:g} s: is its sync loop running?"
                )
            time.sleep(0.02)
        return []


def loaded_generation(show_databases: list[dict]) -> int:
    """The generation PgBouncer has loaded, from SHOW DATABASES rows (-1: none)."""
    for row in show_databases:
        if row["name"] == GENERATION_ENTRY and str(row.get("database") or "").startswith("g"):
            return int(row["database"][1:])
    return -1


def generation_entry(generation: int) -> str:
    """The [databases] line that tells the admin console which generation is loaded.

    It points at a closed port: a client has no reason to connect to it and gets an error if it does.
    """
    return f"{GENERATION_ENTRY} = host=127.0.0.1 port=1 dbname=g{int(generation)} pool_size=1\n"


def read(conn: psycopg.Connection) -> tuple[int, list[Tenant]]:
    """(generation, tenants) in one snapshot: what the sync loop renders. A row that fails
    `Tenant`'s checks is left out (it could not be written safely into PgBouncer's files)."""
    with conn.transaction():
        conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
        (generation,) = conn.execute("SELECT generation FROM pooler.state").fetchone()
        rows = conn.execute(
            "SELECT role, dbname, verifier, pool_size, server_host, server_port FROM pooler.tenants ORDER BY dbname"
        ).fetchall()
    tenants = []
    for row in rows:
        try:
            tenants.append(Tenant(*row))
        except ValueError:
            # Only the service writes the table; a row it did not write is never rendered (names only in the log).
            log.warning("pooler.tenants row for role %r skipped: not a generated tenant", str(row[0])[:64])
    return int(generation), tenants
