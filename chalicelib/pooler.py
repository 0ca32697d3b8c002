"""What the service tells a PgBouncer in front of a host (issue 14, the engine).

The pooler's auth source is an auth_file holding each tenant's SCRAM verifier,
exactly the string Postgres stores (`postgres.scram_verifier`): PgBouncer
checks the client's proof against it and, from that proof, logs in to Postgres
with SCRAM as well, so no plaintext password exists anywhere. Its databases
come from an included ini file. Both files are written here (mode 0600,
replaced atomically under a lock) and picked up with RELOAD on the admin
console. Removing a tenant from the files is what locks it out of the pooler:
after `ALTER ROLE ... NOLOGIN` PgBouncer would still hand a client a warm
server connection, so every lock also revokes and KILLs the tenant's pools.

Each tenant has two entries: `<db>` in transaction mode (the pooled string;
`prepare_threshold=None` for psycopg, since PgBouncer 1.18 has no
`max_prepared_statements`) and `<db>_session` in session mode (the direct
string where Postgres itself is private). The lifecycle reaches it through
chalicelib.access; `Context.pooler(host)` builds one per host.

Where the entries are kept is a `Store`: `FileStore` writes the two files
PgBouncer reads (make dev, the tests, a PgBouncer on the service's own
machine). In production Lambda cannot write the container's files: a store
kept in a table, rendered by a sync loop next to PgBouncer with
`render_auth`/`render_databases`, takes its place behind the same interface.
"""

from __future__ import annotations

import fcntl
import os
import re
import tempfile
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol
from urllib.parse import quote

AUTH_FILE = "userlist.txt"
DATABASES_FILE = "databases.ini"
SESSION_SUFFIX = "_session"
# The entry a sync loop adds to tell which change it loaded (chalicelib.poolerstore): not a tenant.
GENERATION_ENTRY = "instapg_generation"
# Names and verifiers go into PgBouncer's config files unquoted: only what the
# service itself generates may pass (tenant names are opaque base32).
_NAME = re.compile(r"^[a-z_][a-z0-9_]{0,54}$")
_VERIFIER = re.compile(r"^SCRAM-SHA-256\$[0-9]+:[A-Za-z0-9+/=]+\$[A-Za-z0-9+/=]+:[A-Za-z0-9+/=]+$")
_HOST = re.compile(r"^[A-Za-z0-9.:-]+$")


class PoolerError(Exception):
    """The pooler could not be reached or refused a command (message is safe to log)."""


@dataclass(frozen=True)
class Tenant:
    """One tenant as the pooler sees it."""

    role: str
    dbname: str
    verifier: str = field(repr=False)
    pool_size: int  # the plan's connections: server connections the pooled path may use
    server_host: str  # Postgres as PgBouncer reaches it
    server_port: int

    def __post_init__(self) -> None:
        for name in (self.role, self.dbname):
            if not _NAME.match(name):
                raise ValueError("pooler: tenant names must be generated names")
        if not _VERIFIER.match(self.verifier):
            raise ValueError("pooler: not a SCRAM-SHA-256 verifier")
        if not _HOST.match(self.server_host) or not 0 < self.server_port < 65536 or self.pool_size < 1:
            raise ValueError("pooler: bad server address or pool size")


class Store(Protocol):
    """Where a pooler's tenant entries are kept (the write side; PgBouncer reads them).

    Every method is idempotent. `apply` returns the admin-console commands
    that make PgBouncer load what was written ("RELOAD" for files PgBouncer
    reads itself; a store whose sync loop reloads waits for it, watching the
    console through `admin`, and returns none: chalicelib.poolerstore.TableStore).
    """

    def put(self, tenants: Iterable[Tenant], only_present: bool = False) -> None:
        """Add or replace the tenants' auth line and both database entries (`only_present`: replace only)."""
        ...

    def remove(self, role: str, dbname: str) -> None:
        """Remove the tenant's auth line and both entries; nothing to remove is no error."""
        ...

    def remove_many(self, tenants: Iterable[tuple[str, str]]) -> None:
        """`remove` of many (role, dbname) pairs in one write (the purge revokes a batch at once)."""
        ...

    def databases(self) -> set[str]:
        """Tenant database names with entries (reconciliation compares them with the records)."""
        ...

    def apply(self, admin: Callable[..., list[dict]]) -> list[str]:
        ...


@dataclass(frozen=True)
class FileStore:
    """The two files PgBouncer reads (its auth_file and the included databases file), in `state_dir`."""

    state_dir: Path

    def put(self, tenants: Iterable[Tenant], only_present: bool = False) -> None:
        with self._edit() as (auth, dbs):
            for tenant in tenants:
                if only_present and tenant.dbname not in dbs:
                    continue
                auth[tenant.role] = tenant.verifier
                dbs[tenant.dbname] = tenant

    def remove(self, role: str, dbname: str) -> None:
        self.remove_many([(role, dbname)])

    def remove_many(self, tenants: Iterable[tuple[str, str]]) -> None:
        with self._edit() as (auth, dbs):
            for role, dbname in tenants:
                auth.pop(role, None)
                dbs.pop(dbname, None)

    def databases(self) -> set[str]:
        return set(_read_databases(self.state_dir / DATABASES_FILE))

    def apply(self, admin: Callable[..., list[dict]]) -> list[str]:
        return ["RELOAD"]

    @contextmanager
    def _edit(self) -> Iterator[tuple[dict[str, str], dict[str, Tenant | str]]]:
        """Both files, read and rewritten under one lock so concurrent writers lose nothing."""
        lock = self.state_dir / ".lock"
        with open(lock, "a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            auth = _read_auth(self.state_dir / AUTH_FILE)
            dbs: dict[str, Tenant | str] = dict(_read_databases(self.state_dir / DATABASES_FILE))
            yield auth, dbs
            _write(self.state_dir / AUTH_FILE, render_auth(auth))
            _write(self.state_dir / DATABASES_FILE, render_databases(dbs))


@dataclass(frozen=True)
class Pooler:
    """One PgBouncer: where clients reach it, its admin console, its config folder."""

    host: str  # as clients reach it (the connection strings)
    port: int
    admin_user: str
    admin_password: str = field(repr=False)
    store: Store  # where its tenant entries are written
    admin_host: str = "127.0.0.1"  # as the service reaches the admin console
    admin_port: int | None = None  # None: `port`
    sslmode: str = "disable"
    connect_timeout: int = 5
    # The admin console's, when it differs: behind the NLB's public name a certificate for verify-full
    # cannot also name the private admin endpoint, so there the console is reached with "require".
    admin_sslmode: str | None = None

    # -- connection strings --------------------------------------------------

    def pooled_url(self, role: str, password: str, dbname: str) -> str:
        """Transaction pooling: many clients on the plan's few server connections."""
        return _url(self.host, self.port, role, password, dbname, self.sslmode)

    def session_url(self, role: str, password: str, dbname: str) -> str:
        """Session semantics through the pooler (LISTEN/NOTIFY, prepared statements, pg_dump)."""
        return _url(self.host, self.port, role, password, dbname + SESSION_SUFFIX, self.sslmode)

    # -- lifecycle -------------------------------------------------------------

    def publish(self, *tenants: Tenant) -> None:
        """Add (or replace) tenants' auth and database entries; they can connect once this returns.

        Several at once for a restarted PgBouncer or a reconciliation: one RELOAD.
        """
        self.store.put(tenants)
        if commands := self.store.apply(self.admin):
            self.admin(*commands)

    def revoke(self, role: str, dbname: str) -> None:
        """Take the tenant out of the pooler and end every session it has there.

        For a lock, expiry, delete or drain: a warm server connection would
        otherwise let a NOLOGIN role in. Idempotent.
        """
        self.revoke_many([(role, dbname)])

    def revoke_many(self, tenants: list[tuple[str, str]]) -> None:
        """`revoke` of many (role, dbname) pairs: one store write, one reload, one round of KILLs."""
        for role, dbname in tenants:
            if not (_NAME.match(role) and _NAME.match(dbname)) or role == self.admin_user:
                raise ValueError("pooler: tenant names must be generated names")
        if not tenants:
            return
        self.store.remove_many(tenants)
        self._reload_and_kill([dbname for _, dbname in tenants], resume=False)

    def rotate(self, tenant: Tenant) -> None:
        """The tenant's new verifier (set on Postgres too): the old password is refused, sessions ended.

        A tenant that is not published (revoked: locked, expired) stays out.
        """
        self.store.put([tenant], only_present=True)
        self._reload_and_kill([tenant.dbname], resume=True)

    def stats(self) -> dict[str, tuple[int, int]]:
        """Bytes (received from clients, sent to clients) per tenant database since PgBouncer started.

        Both entries of a tenant count under its database name. Counters
        restart with the process: the metering job keeps deltas.
        """
        totals: dict[str, tuple[int, int]] = {}
        for row in self.admin("SHOW STATS"):
            name = row["database"]
            if name in ("pgbouncer", GENERATION_ENTRY):
                continue
            if name.endswith(SESSION_SUFFIX):
                name = name[: -len(SESSION_SUFFIX)]
            received, sent = totals.get(name, (0, 0))
            totals[name] = (received + int(row["total_received"]), sent + int(row["total_sent"]))
        return totals

    def published(self) -> set[str]:
        """Tenant databases in the pooler's config (for reconciling with the records)."""
        return self.store.databases()

    # -- admin console ---------------------------------------------------------

    def admin(self, *commands: str) -> list[dict]:
        """Run admin-console commands on one connection; the last one's rows as dicts.

        Only the simple query protocol works there (hence ClientCursor).
        """
        import psycopg  # lazily: cold starts stay cheap
        from psycopg.rows import dict_row

        command = commands[0]
        try:
            with psycopg.connect(
                host=self.admin_host,
                port=self.admin_port or self.port,
                user=self.admin_user,
                password=self.admin_password,
                dbname="pgbouncer",
                sslmode=self.admin_sslmode or self.sslmode,
                connect_timeout=self.connect_timeout,
                autocommit=True,
                cursor_factory=psycopg.ClientCursor,
                row_factory=dict_row,
            ) as conn:
                rows: list[dict] = []
                for command in commands:
                    cur = conn.execute(command)
                    rows = cur.fetchall() if cur.description else []
                return rows
        except psycopg.Error as exc:
            reason = f"{type(exc).__name__} {exc.sqlstate or ''}".strip()
            raise PoolerError(f"pooler {command.split()[0]}: {reason}") from None

    def _reload_and_kill(self, dbnames: list[str], resume: bool) -> None:
        """RELOAD, then KILL both entries of each tenant: its clients and server connections end now.

        Only entries PgBouncer still holds (a revoked one stays until its
        connections are gone) are killed. A killed entry is paused until
        RESUME; a revoked one is gone from the config, so a new client is
        refused instead of waiting.
        """
        names = {name for dbname in dbnames for name in (dbname, dbname + SESSION_SUFFIX)}
        live = [row["name"] for row in self.admin(*self.store.apply(self.admin), "SHOW DATABASES") if row["name"] in names]
        commands = [f"KILL {name}" for name in live] + ([f"RESUME {name}" for name in live] if resume else [])
        if commands:
            self.admin(*commands)


def _url(host: str, port: int, user: str, password: str, dbname: str, sslmode: str) -> str:
    return (
        f"postgresql://{quote(user, safe='')}:{quote(password, safe='')}@{host}:{port}/"
        f"{quote(dbname, safe='')}?sslmode={quote(sslmode, safe='')}"
    )


def render_auth(entries: dict[str, str]) -> str:
    """PgBouncer's auth_file: `"user" "SCRAM verifier"` per line."""
    return "".join(f'"{user}" "{verifier}"\n' for user, verifier in sorted(entries.items()))


def _database_lines(tenant: Tenant) -> list[str]:
    common = f"host={tenant.server_host} port={tenant.server_port} dbname={tenant.dbname}"
    size = tenant.pool_size
    return [
        # Pooled: at most the plan's server connections, however many clients.
        f"{tenant.dbname} = {common} pool_mode=transaction pool_size={size} max_db_connections={size}",
        # Direct through the pooler: one server connection per client, as Postgres would do.
        f"{tenant.dbname}{SESSION_SUFFIX} = {common} pool_mode=session pool_size={size} max_db_connections={size}",
    ]


def render_databases(entries: dict[str, Tenant | str]) -> str:
    """The included ini: a [databases] section with both entries of every tenant."""
    lines = ["[databases]"]
    for name in sorted(entries):
        entry = entries[name]
        lines.extend(_database_lines(entry) if isinstance(entry, Tenant) else entry.splitlines())
    return "\n".join(lines) + "\n"


def _read_auth(path: Path) -> dict[str, str]:
    entries: dict[str, str] = {}
    if path.exists():
        for line in path.read_text().splitlines():
            parts = line.split('" "')
            if len(parts) == 2:
                entries[parts[0].strip('"')] = parts[1].strip().strip('"')
    return entries


def _read_databases(path: Path) -> dict[str, str]:
    """Tenant database -> its lines as written (kept verbatim when another tenant changes)."""
    entries: dict[str, str] = {}
    if path.exists():
        for line in path.read_text().splitlines():
            name = line.split("=", 1)[0].strip()
            if "=" not in line or not _NAME.match(name):
                continue
            base = name[: -len(SESSION_SUFFIX)] if name.endswith(SESSION_SUFFIX) else name
            entries[base] = (entries[base] + "\n" + line) if base in entries else line
    return entries


def _write(path: Path, text: str) -> None:
    """Replace `path` atomically, 0600, owned as its folder is (PgBouncer's user reads it)."""
    st = path.parent.stat()
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
        os.chmod(tmp, 0o600)
        if os.geteuid() == 0:
            os.chown(tmp, st.st_uid, st.st_gid)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def admin_entry(user: str, verifier: str) -> str:
    """The auth_file line of the service's own admin user (also a valid `render_auth` entry)."""
    if not _NAME.match(user) or not _VERIFIER.match(verifier):
        raise ValueError("pooler: bad admin user or verifier")
    return render_auth({user: verifier})
