"""Drops in parallel, per host, on a bounded number of kept admin sessions (the purge's workers).

Every DROP DATABASE waits for a checkpoint of its own: PostgreSQL forces one
so that the checkpointer forgets the database's files before they are
removed. Drops running at the same time share that checkpoint, so a host
drops many databases at once almost as fast as one (docs/performance.md
has the figures). A purge run gives each host at most
`purge_sessions_per_host` workers, each with one admin connection kept for
the whole run, since a login costs more than the statements around a drop.

Each drop revokes its tenant on the host's pooler first. A revoke is a
store write, a reload and KILLs (tens to a hundred and more ms, serialized
per pooler), so the workers of a host share them: a worker whose revoke
finds another in flight waits, and the next one revokes every tenant queued
meanwhile in one call (`access.revoke_many`). Each drop still starts only
after its own tenant was revoked.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, TypeVar

from chalicelib import access, postgres, provisioning

if TYPE_CHECKING:
    import psycopg

    from chalicelib.context import Context
    from chalicelib.models import DatabaseRecord, HostRecord

T = TypeVar("T")


class ConnectionLost(Exception):
    """A worker's kept connection was gone after a failed drop (retried once on a new one)."""


class _SharedRevokes:
    """One host's pooler revokes, batched: whoever finds none in flight revokes everything queued."""

    def __init__(self, ctx: Context, host: HostRecord) -> None:
        self._ctx = ctx
        self._host = host
        self._cond = threading.Condition()
        self._queue: list[tuple[str, str]] = []
        self._busy = False
        self._results: dict[tuple[str, str], BaseException | None] = {}  # revoked by another worker

    def revoke(self, role: str, dbname: str) -> None:
        """Returns once a revoke that includes (role, dbname) has run; raises what that revoke raised.

        A pooler that does not answer is logged, not raised (`access.revoke`): the drop goes on.
        """
        tenant = (role, dbname)
        with self._cond:
            self._queue.append(tenant)
            while self._busy and tenant not in self._results:
                self._cond.wait()
            if tenant in self._results:
                error = self._results.pop(tenant)
                if error is not None:
                    raise error
                return
            batch, self._queue, self._busy = self._queue, [], True
        error = None
        try:
            access.revoke_many(self._ctx, self._host, batch)
        except BaseException as exc:
            error = exc
            raise
        finally:
            with self._cond:
                self._busy = False
                self._results.update((t, error) for t in batch if t != tenant)
                self._cond.notify_all()


class Droppers:
    """Worker threads per host (at most `sessions` each) and their kept connections; `close()` ends both."""

    def __init__(self, ctx: Context, sessions: int) -> None:
        self._ctx = ctx
        self._sessions = max(1, sessions)
        self._pools: dict[str, ThreadPoolExecutor] = {}
        self._local = threading.local()  # a worker's own connection: each thread serves one host
        self._conns: list[psycopg.Connection] = []
        self._revokes: dict[str, _SharedRevokes] = {}
        self._lock = threading.Lock()

    def submit(self, host_id: str, fn: Callable[[], T]) -> Future[T]:
        """Run `fn` on one of `host_id`'s workers."""
        with self._lock:
            pool = self._pools.get(host_id)
            if pool is None:
                pool = ThreadPoolExecutor(self._sessions, thread_name_prefix=f"drop-{host_id}")
                self._pools[host_id] = pool
        return pool.submit(fn)

    def drop(self, record: DatabaseRecord) -> bool:
        """On a worker: drop the record's database and role (idempotent); True when something existed.

        Raises what `provisioning.drop_tenant` raises, and HostUnavailable for
        an unregistered or unreachable host. After any error but ClaimedTenant
        the connection is closed (its state is unknown) and the next drop
        opens a new one.
        """
        try:
            host = self._ctx.hosts.get(record.host_id)
        except KeyError:
            raise postgres.HostUnavailable(f"host {record.host_id} is not registered") from None
        # The host's pooler first (chalicelib.access): its entries and sessions end before the drop.
        if self._ctx.pooler(host) is not None:
            with self._lock:
                revokes = self._revokes.setdefault(host.id, _SharedRevokes(self._ctx, host))
            revokes.revoke(record.role_name, record.db_name)
        target = self._ctx.target(host)
        try:
            return self._drop_on_kept(target, record)
        except ConnectionLost:
            # The kept connection died under the drop (parallel drops end sessions in the databases
            # they drop; a restart ends all): drops are idempotent, so once more on a new one.
            try:
                return self._drop_on_kept(target, record)
            except ConnectionLost as again:
                raise again.__cause__ from None

    def _drop_on_kept(self, target: postgres.Target, record: DatabaseRecord) -> bool:
        import psycopg

        conn = self._connection(target)
        try:
            return provisioning.drop_tenant(target, record.role_name, record.db_name, conn=conn)
        except provisioning.ClaimedTenant:
            raise  # raised between statements, the connection is fine
        except BaseException as exc:
            self._local.conn = None
            lost = conn.closed or conn.broken
            conn.close()
            if lost and isinstance(exc, psycopg.OperationalError):
                raise ConnectionLost(str(exc)) from exc
            raise

    def _connection(self, target: postgres.Target) -> psycopg.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is not None and not conn.closed and not conn.broken:
            return conn
        try:
            conn = target.open()
        except postgres.HostUnavailable:
            # Once more: many workers logging in at once can overrun a busy host's connect timeout;
            # a host that is down fails again, and the run skips it.
            conn = target.open()
        self._local.conn = conn
        with self._lock:
            self._conns.append(conn)
        return conn

    def close(self) -> None:
        """Wait for the workers, then close every connection they opened."""
        with self._lock:
            pools, self._pools = list(self._pools.values()), {}
        for pool in pools:
            pool.shutdown(wait=True)
        with self._lock:
            conns, self._conns = self._conns, []
        for conn in conns:
            conn.close()
