"""The one Context of a process: what every domain function is handed.

Built once, on the first request or job that needs it (nothing touches AWS
or Postgres at import), through the cached getter `get()`, in the style of
Chalice's todo sample. Domain functions take it as their first argument
instead of reaching for module state. Tests call `reset()` after changing
the environment.

The two caches here are the process's only module-level state, with three
exceptions that belong elsewhere: a request's deadline (chalicelib.reliability)
and the request ids its log lines carry (chalicelib.logs) are per request,
not per process; apidoc keeps the parsed OpenAPI document, which never
changes in a process.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from chalicelib import keyring
from chalicelib.postgres import Sessions
from chalicelib.settings import Plan, Settings
from chalicelib.settings import load as load_settings

if TYPE_CHECKING:
    from chalicelib.abuse import Guard
    from chalicelib.crypto import KeyRing
    from chalicelib.hosts import AdminCredentials, HostCache
    from chalicelib.models import HostRecord
    from chalicelib.pooled import Candidates
    from chalicelib.pooler import Pooler
    from chalicelib.postgres import Target


@dataclass
class Context:
    settings: Settings
    keyring: KeyRing | keyring.SecretKeyRing
    hosts: HostCache  # the host registry, cached
    guard: Guard  # abuse limits (rate, failed keys, idempotency keys)
    pool: Candidates  # warm-pool records this process has seen and not taken yet
    credentials: AdminCredentials  # hosts' admin credentials, re-read on rotation
    sessions: Sessions  # kept-open admin connections for the create's hot path
    hardened: set[str] = field(default_factory=set)  # hosts this process hardened (chalicelib.jobs)
    poolers: dict[tuple, Pooler | None] = field(default_factory=dict)  # per host record's pooler fields

    def plan(self, name: str) -> Plan:
        return self.settings.plan(name)

    def target(self, host: HostRecord) -> Target:
        """How the service's admin session reaches `host`."""
        from chalicelib import hosts

        return hosts.target(host, self.settings, self.credentials, self.sessions)

    def region(self, host_id: str | None) -> str | None:
        """The region of a database on `host_id` (its host's, docs/regions.md); None without a host."""
        from chalicelib import hosts

        return hosts.database_region(self.hosts, self.settings, host_id)

    def pooler(self, host: HostRecord) -> Pooler | None:
        """The host's PgBouncer (chalicelib.pooler), or None when it has none; cached per its registration."""
        from chalicelib import hosts

        key = (
            host.id,
            host.pooler_hostname,
            host.pooler_port,
            host.pooler_admin_hostname,
            host.pooler_admin_port,
            host.pooler_credentials,
            host.pooler_store,
            host.pooler_sslmode,
            host.sslmode,
        )
        if key not in self.poolers:
            self.poolers[key] = hosts.pooler(host, self.credentials)
        return self.poolers[key]


def build(settings: Settings) -> Context:
    """A Context from `settings` (tests may build their own)."""
    # Imported here, not at the top: they import pynamodb (and botocore), which
    # costs a cold start, and app.py imports this module on every invocation.
    from chalicelib import models
    from chalicelib.abuse import Guard
    from chalicelib.hosts import AdminCredentials, HostCache
    from chalicelib.pooled import Candidates

    models.configure(settings)
    return Context(
        settings, keyring.load(settings), HostCache(), Guard(settings), Candidates(), AdminCredentials(settings), Sessions()
    )


@functools.lru_cache(maxsize=1)
def settings() -> Settings:
    """The process's settings, read from the environment once (a malformed one raises ValueError)."""
    return load_settings()


@functools.lru_cache(maxsize=1)
def get() -> Context:
    """The process's Context."""
    return build(settings())


def reset() -> None:
    """Forget the Context and the settings it was built from (tests, after changing the environment)."""
    close_sessions()
    settings.cache_clear()
    get.cache_clear()


def close_sessions() -> None:
    """Close the process Context's kept-open admin connections, if it was built (tests and tools stopping a server)."""
    if get.cache_info().currsize:
        get().sessions.clear()
