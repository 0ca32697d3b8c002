"""Logical replication for tenants that ask for it, and the guard that bounds it.

On a host that offers it (wal_level=logical; on RDS `rds.logical_replication`)
a database created with `enable_logical_replication` gets a *companion* role,
`<tenant role>_repl`: REPLICATION (on RDS, membership in `rds_replication`),
a member of the tenant role (so table sync can read the published tables),
the tenant's password verifier, and reachable only through the replication
gateway (tools/replication/gateway.py), which refuses every physical command.
The tenant role itself never has REPLICATION. docs/replication.md has the
reasoning. The scheduled job runs `guard` on such hosts: it drops physical
slots, ends tenants' physical walsenders, and drops logical slots past the
per-database count or retained-WAL limits, with an audit event.
"""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from chalicelib import audit

if TYPE_CHECKING:  # psycopg is imported lazily to keep cold starts cheap
    import psycopg

    from chalicelib.models import DatabaseRecord
    from chalicelib.postgres import Target
    from chalicelib.settings import Settings

log = logging.getLogger(__name__)

RDS_ROLE = "rds_replication"
SLOT_DROPPED = "replication_slot_dropped"
# The companion of tenant role R is R + this suffix. The embedded server's
# pg_hba.conf refuses TCP logins of names ending with it (tools/dev/pgserver.py):
# a tenant name's random part is base32, so no tenant role ends with it.
COMPANION_SUFFIX = "_repl"
_NAME_MAX = 63  # NAMEDATALEN - 1


def companion(role: str) -> str:
    """The replicating companion of tenant role `role` (ValueError when the name would not fit)."""
    if role.endswith(COMPANION_SUFFIX):
        raise ValueError(f"{role} is a companion already")
    name = role + COMPANION_SUFFIX
    if len(name.encode()) > _NAME_MAX:
        raise ValueError(f"companion of {role} would be longer than {_NAME_MAX} bytes (shorten INSTAPG_NAME_PREFIX)")
    return name


def is_companion(name: str) -> bool:
    return name.endswith(COMPANION_SUFFIX)



# A walsender's last command (pg_stat_activity.query) that streams or copies
# WAL of the whole cluster, or makes a physical slot: any replication command
# but the logical forms of START_REPLICATION and CREATE_REPLICATION_SLOT,
# whose LOGICAL must follow the slot name (a slot may be *named* "logical").
_REPLICATION_COMMAND = re.compile(
    r"^\s*(START_REPLICATION|CREATE_REPLICATION_SLOT|BASE_BACKUP|READ_REPLICATION_SLOT|TIMELINE_HISTORY"
    r"|UPLOAD_MANIFEST)\b",
    re.IGNORECASE,
)
_SLOT = r'(?:"(?:[^"]|"")*"|[^\s"]+)'
_LOGICAL = re.compile(
    rf"^\s*(START_REPLICATION\s+SLOT\s+{_SLOT}\s+LOGICAL|CREATE_REPLICATION_SLOT\s+{_SLOT}\s+(TEMPORARY\s+)?LOGICAL)\s",
    re.IGNORECASE,
)


def is_physical_command(query: str | None) -> bool:
    """Whether a walsender's command is one a tenant may not run (anything physical)."""
    if not query or not _REPLICATION_COMMAND.match(query):
        return False
    return _LOGICAL.match(query) is None


def check_host(target: Target) -> None:
    """Refuse to flag a host for logical replication when it cannot decode (ValueError says why)."""
    with target.connect() as conn:
        level = conn.execute("SHOW wal_level").fetchone()[0]
        # PostgreSQL 16+ lets a CREATEROLE admin give REPLICATION only if it has
        # it; on RDS the grant is membership in rds_replication instead.
        can_grant = conn.execute(
            "SELECT rolsuper OR rolreplication OR EXISTS (SELECT 1 FROM pg_roles WHERE rolname = %s) "
            "FROM pg_roles WHERE rolname = current_user",
            (RDS_ROLE,),
        ).fetchone()[0]
    if level != "logical":
        raise ValueError(
            f"wal_level is {level!r}: logical replication needs wal_level=logical "
            "(on RDS, rds.logical_replication=1 in the parameter group, then a reboot)"
        )
    if not can_grant:
        raise ValueError(f"admin role {target.user!r} needs REPLICATION to give it to tenants and drop their slots")


def create_companion(conn: psycopg.Connection, role: str, verifier: str, connections: int, login: bool = True) -> str:
    """Make `role`'s companion on the admin connection `conn`; returns its name.

    The same SCRAM verifier as the tenant (the gateway relays SCRAM untouched
    and holds no secret), LOGIN REPLICATION, a member of the tenant role with
    INHERIT (table sync COPYs the published tables, which the tenant owns) but
    not SET, and the tenant's connection limit. CONNECT on the tenant's
    database comes with the membership (the tenant owns it); every other
    database's CONNECT is revoked from PUBLIC.
    """
    from psycopg import sql

    name = companion(role)
    name_id = sql.Identifier(name)
    conn.execute(
        sql.SQL(
            "CREATE ROLE {} {} NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS INHERIT "
            "CONNECTION LIMIT {} PASSWORD {}"
        ).format(name_id, sql.SQL("LOGIN" if login else "NOLOGIN"), sql.Literal(connections), sql.Literal(verifier))
    )
    # As for tenant roles (provisioning._membership_grant): the admin inherits the companion, or
    # pg_stat_activity hides its sessions' state and query from the guard and the time limits.
    admin = sql.SQL("GRANT {} TO CURRENT_USER").format(name_id)
    member = sql.SQL("GRANT {} TO {}").format(sql.Identifier(role), name_id)
    if conn.info.server_version >= 160000:
        admin = admin + sql.SQL(" WITH INHERIT TRUE, SET TRUE")
        member = member + sql.SQL(" WITH INHERIT TRUE, SET FALSE")
    conn.execute(admin)
    conn.execute(member)
    grant(conn, name)
    return name


def grant(conn: psycopg.Connection, role: str) -> None:
    """Let `role` (a companion) decode and stream: `rds_replication` on RDS, else the REPLICATION attribute."""
    from psycopg import sql

    role_id = sql.Identifier(role)
    if conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (RDS_ROLE,)).fetchone():
        # RDS grants replication through this role (its master user holds it
        # with ADMIN); inherited explicitly, whatever the role's default.
        stmt = sql.SQL("GRANT {} TO {}").format(sql.Identifier(RDS_ROLE), role_id)
        if conn.info.server_version >= 160000:
            stmt = stmt + sql.SQL(" WITH INHERIT TRUE")
        conn.execute(stmt)
    else:
        # PostgreSQL 16+: only a role that has REPLICATION may give it.
        conn.execute(sql.SQL("ALTER ROLE {} REPLICATION").format(role_id))


def drop_database_slots(conn: psycopg.Connection, dbname: str, wait_s: float = 5.0) -> list[str]:
    """Drop every replication slot of `dbname` (DROP DATABASE fails while one exists).

    Ends the walsenders using them first; a terminated walsender releases its
    slot a moment later, so an in-use slot is retried until `wait_s`.
    """
    rows = conn.execute(
        "SELECT slot_name, active_pid FROM pg_replication_slots WHERE database = %s", (dbname,)
    ).fetchall()
    dropped = []
    for name, pid in rows:
        _drop_slot(conn, name, pid, wait_s)
        dropped.append(name)
    return dropped


def _drop_slot(conn: psycopg.Connection, name: str, pid: int | None, wait_s: float = 5.0) -> bool:
    """Drop one slot, ending the session that holds it; False when it was gone already."""
    import psycopg

    if pid is not None:
        conn.execute("SELECT pg_terminate_backend(%s)", (pid,))
    give_up = time.monotonic() + wait_s
    while True:
        try:
            with conn.transaction():
                conn.execute("SELECT pg_drop_replication_slot(%s)", (name,))
            return True
        except psycopg.errors.UndefinedObject:
            return False
        except psycopg.errors.ObjectInUse:
            if time.monotonic() > give_up:
                raise
            # The holder may have been a new session: end whoever holds it now.
            row = conn.execute("SELECT active_pid FROM pg_replication_slots WHERE slot_name = %s", (name,)).fetchone()
            if row and row[0] is not None:
                conn.execute("SELECT pg_terminate_backend(%s)", (row[0],))
            time.sleep(0.05)


@dataclass(frozen=True)
class Slot:
    name: str
    kind: str  # physical or logical
    database: str | None
    active_pid: int | None
    retained_bytes: int | None  # WAL the slot keeps (None: no restart_lsn yet)


def slots(conn: psycopg.Connection) -> list[Slot]:
    rows = conn.execute(
        "SELECT slot_name, slot_type, database, active_pid, "
        "pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn)::bigint "
        "FROM pg_replication_slots WHERE NOT temporary ORDER BY slot_name"
    ).fetchall()
    return [Slot(*row) for row in rows]


def _physical_walsenders(conn: psycopg.Connection, prefix: str) -> list[tuple[int, str]]:
    rows = conn.execute(
        "SELECT pid, usename, query FROM pg_stat_activity WHERE backend_type = 'walsender' "
        "AND starts_with(usename, %s) AND pid <> pg_backend_pid()",
        (prefix + "_",),
    ).fetchall()
    return [(pid, role) for pid, role, query in rows if is_physical_command(query)]


def guard(
    settings: Settings, target: Target, records: list[DatabaseRecord], summary: dict[str, Any] | None = None
) -> dict[str, Any]:
    """One pass over a logical-replication host: what a tenant's REPLICATION must not keep.

    - physical walsenders of tenant roles are ended (their WAL is every tenant's);
    - physical slots are dropped, except names starting with INSTAPG_KEEP_PHYSICAL_SLOTS prefixes;
    - a tenant database's logical slots past INSTAPG_LOGICAL_SLOTS_PER_DATABASE are
      dropped (inactive ones first), and so is any slot keeping more than
      INSTAPG_LOGICAL_SLOT_MAX_RETAINED_MB of WAL; each with an audit event.
    Idempotent; returns (and adds to) `summary`.
    """
    summary = summary if summary is not None else {}
    for key in ("walsenders_ended", "physical_slots_dropped", "slots_dropped"):
        summary.setdefault(key, 0)
    prefix = settings.name_prefix + "_"
    by_db = {r.db_name: r for r in records}
    limit_bytes = settings.slot_max_retained_mb * 1024 * 1024
    with target.connect() as conn:
        for pid, role in _physical_walsenders(conn, settings.name_prefix):
            log.warning("ending physical walsender %d of %s: tenants may only stream logically", pid, role)
            conn.execute("SELECT pg_terminate_backend(%s)", (pid,))
            summary["walsenders_ended"] += 1
        per_db: dict[str, list[Slot]] = {}
        for slot in slots(conn):
            if slot.kind == "physical":
                if not slot.name.startswith(settings.keep_physical_slots or ("\0",)):
                    log.warning("dropping physical slot %s: tenants may not keep physical slots", slot.name)
                    _drop_slot(conn, slot.name, slot.active_pid)
                    summary["physical_slots_dropped"] += 1
            elif slot.database and slot.database.startswith(prefix):
                per_db.setdefault(slot.database, []).append(slot)
        for database, found in per_db.items():
            # Inactive first, then the newest-looking names: an extra slot nobody reads goes before one in use.
            found.sort(key=lambda s: (s.active_pid is None, s.name))
            keep = settings.slots_per_database
            for index, slot in enumerate(found):
                if index >= keep:
                    why = f"slot {slot.name}: more than {keep} slot(s) on the database"
                elif slot.retained_bytes is not None and slot.retained_bytes > limit_bytes:
                    why = (
                        f"slot {slot.name}: retained {slot.retained_bytes} bytes of WAL, "
                        f"over {settings.slot_max_retained_mb} MB"
                    )
                else:
                    continue
                if _drop_slot(conn, slot.name, slot.active_pid):
                    summary["slots_dropped"] += 1
                    record = by_db.get(database)
                    log.warning("dropped replication slot of %s: %s", record.id if record else database, why)
                    if record is not None:
                        audit.record_quietly(record.id, SLOT_DROPPED, audit.SYSTEM, detail=why)
    return summary
