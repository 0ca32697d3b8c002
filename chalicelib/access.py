"""A tenant's two ways in, Postgres and its host's pooler, changed together.

Every lifecycle step that opens, locks, rotates or drops a tenant on Postgres
goes through here, so the pooler follows (issue 14 §5): a role made NOLOGIN
is still served over PgBouncer's warm server connections unless its entries
are revoked and its pools killed too.

A tenant with logical replication has a third way in, its companion role
behind the replication gateway (chalicelib.replication): the Postgres steps
in chalicelib.provisioning lock, unlock, rotate and drop it with its tenant,
so every function here covers it.

A pooler that does not answer:
- publish raises `pooler.PoolerError`: a create on that host fails cleanly
  (the create moves to another host or answers 503 with Retry-After), since
  its pooled string would not work.
- revoke and rotate log it and let the Postgres step proceed: the store is
  written before PgBouncer is told (a stopped PgBouncer reads it when it
  starts, and holds no sessions meanwhile), and the reconciliation
  (`sync`) removes entries no live record holds.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from chalicelib import pooler as pooler_mod
from chalicelib import postgres, provisioning, records
from chalicelib.models import DatabaseRecord

if TYPE_CHECKING:
    from chalicelib.context import Context
    from chalicelib.models import HostRecord
    from chalicelib.settings import Plan

log = logging.getLogger(__name__)

# Records whose entries the reconciliation leaves alone: live, or a create/claim under way.
HOLDS_ENTRIES = ("PROVISIONING", "POOLED", "UNCLAIMED", "CLAIMING", "CLAIMED")


def tenant(host: HostRecord, record: DatabaseRecord, plan: Plan, scram: str) -> pooler_mod.Tenant:
    """The tenant as the host's pooler sees it: the plan's connections are its pool size."""
    return pooler_mod.Tenant(record.role_name, record.db_name, scram, plan.connections, host.hostname, int(host.port))


def publish(ctx: Context, host: HostRecord, record: DatabaseRecord, plan: Plan, scram: str | None = None) -> None:
    """Let the tenant in through the host's pooler (with the plan's pool size); no-op without a pooler.

    `scram` is the verifier just set on the role; None reads the record's.
    Raises pooler.PoolerError when the pooler does not answer.
    """
    bouncer = ctx.pooler(host)
    if bouncer is None:
        return
    scram = scram or records.verifier(ctx, record) or _reset_verifier(ctx, host, record)
    bouncer.publish(tenant(host, record, plan, scram))


def _reset_verifier(ctx: Context, host: HostRecord, record: DatabaseRecord) -> str:
    """A record from before verifiers were kept: a new verifier of the same password, on the role and the record."""
    scram = postgres.scram_verifier(records.password(ctx, record))
    provisioning.set_verifier(ctx.target(host), record.role_name, scram)
    sealed = records.seal_verifier(ctx, record.id, scram)
    record.update(actions=[DatabaseRecord.verifier_key_id.set(sealed.key_id), DatabaseRecord.verifier_secret.set(sealed.blob)])
    return scram


def revoke(ctx: Context, host: HostRecord, role: str, dbname: str) -> bool:
    """Take the tenant out of the pooler and end its sessions there; False (logged) when the pooler did not answer."""
    return revoke_many(ctx, host, [(role, dbname)])


def revoke_many(ctx: Context, host: HostRecord, tenants: list[tuple[str, str]]) -> bool:
    """`revoke` of many (role, dbname) pairs on one host's pooler: one store write and one reload for all."""
    bouncer = ctx.pooler(host)
    if bouncer is None or not tenants:
        return True
    try:
        bouncer.revoke_many(tenants)
        return True
    except pooler_mod.PoolerError as exc:
        names = ", ".join(dbname for _, dbname in tenants)
        log.warning("pooler of host %s: revoke of %s not confirmed (%s); the reconciliation finishes it", host.id, names, exc)
        return False


def drop(ctx: Context, host: HostRecord, role: str, dbname: str, keep_claimed: bool = True) -> bool:
    """Revoke on the pooler, then `provisioning.drop_tenant` (see there; True when something existed).

    A claimed tenant that the drop refuses (ClaimedTenant) was revoked
    already: the reconciliation publishes it again.
    """
    revoke(ctx, host, role, dbname)
    return provisioning.drop_tenant(ctx.target(host), role, dbname, keep_claimed=keep_claimed)


def lock(ctx: Context, host: HostRecord, record: DatabaseRecord) -> int:
    """Lock the tenant out of both ways in; the number of Postgres sessions ended."""
    revoke(ctx, host, record.role_name, record.db_name)
    return provisioning.lock_role(ctx.target(host), record.role_name)


def unlock(ctx: Context, host: HostRecord, record: DatabaseRecord, plan: Plan) -> None:
    """LOGIN again on Postgres, then published again (a pooler that does not answer: the reconciliation does it)."""
    provisioning.unlock_role(ctx.target(host), record.role_name)
    try:
        publish(ctx, host, record, plan)
    except pooler_mod.PoolerError as exc:
        log.warning("pooler of host %s: publish of %s after unlock failed (%s)", host.id, record.db_name, exc)


def rotate(ctx: Context, host: HostRecord, record: DatabaseRecord, plan: Plan, password: str) -> str:
    """A new password on Postgres (its sessions end) and on the pooler (old password refused, sessions ended).

    Returns the new verifier, for the record. Raises postgres.HostUnavailable
    when Postgres does not answer (nothing changed).
    """
    scram = postgres.scram_verifier(password)
    provisioning.set_password(ctx.target(host), record.role_name, password, verifier=scram)
    bouncer = ctx.pooler(host)
    if bouncer is not None:
        try:
            bouncer.rotate(tenant(host, record, plan, scram))
        except pooler_mod.PoolerError as exc:
            log.warning("pooler of host %s: rotate of %s not confirmed (%s)", host.id, record.db_name, exc)
    return scram


def sync(ctx: Context, host: HostRecord, entries: set[str], holders: dict[str, str]) -> tuple[int, int]:
    """Reconcile the pooler's entries with the records: (revoked, published).

    `entries`: the pooler's tenant databases, read before `holders`, the db
    name -> status of every record on the host (a create writes its record
    before it publishes, so an entry without a holder is left over: a crash,
    or a revoke whose pooler did not answer). Live records without an entry
    are published again, unless the quota locked them.
    """
    if ctx.pooler(host) is None:
        return 0, 0
    revoked = published = 0
    # Only this deployment's names, as the Postgres reconciliation: a pooler may serve others too.
    prefix = ctx.settings.name_prefix + "_"
    for dbname in sorted(e for e in entries if e.startswith(prefix)):
        if holders.get(dbname) not in HOLDS_ENTRIES:
            if revoke(ctx, host, dbname, dbname):  # tenant role and database share the generated name
                revoked += 1
    missing = {name for name, status in holders.items() if status in ("UNCLAIMED", "CLAIMED")} - entries
    for dbname in sorted(missing):
        item = next(iter(DatabaseRecord.by_host.query(host.id, DatabaseRecord.db_name == dbname)), None)
        record = DatabaseRecord.get(item.id, consistent_read=True) if item is not None else None
        if record is None or record.status not in ("UNCLAIMED", "CLAIMED") or record.locked_reason:
            continue
        publish(ctx, host, record, ctx.plan(record.plan))
        published += 1
    return revoked, published
