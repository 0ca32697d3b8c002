"""The scheduled job ("the purge"): everything that must happen without a request.

One EventBridge rule runs it (app.py's `purge`); `make dev` runs it on a
timer. Each part is bounded and resumable, so a run cut short loses nothing:
  1. expiry: expired databases, crashed creates, pending drops, orphans (chalicelib.expiry);
  2. quotas: sizes, storage locks, long queries (chalicelib.quotas), and on hosts
     that offer logical replication the slot and walsender guard (chalicelib.replication);
  3. metering: transfer through the pooler, locks over the plan's transfer, the daily
     usage rows (chalicelib.metering);
  4. the warm pool: ready databases topped up on every active host (chalicelib.pool).
The purge gets at most PURGE_SHARE of the budget, so a large expiry backlog
cannot starve quota enforcement; the quota pass runs until the run's deadline.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import TYPE_CHECKING, Any

from chalicelib import expiry, metering, metrics, pool, provisioning, quotas
from chalicelib.clock import Deadline
from chalicelib.models import HOST_ACTIVE

if TYPE_CHECKING:
    from chalicelib.context import Context

log = logging.getLogger(__name__)

PURGE_SHARE = 0.6


def run(ctx: Context, deadline: Deadline) -> dict[str, Any]:
    """One run taking no new work after `deadline`; returns each part's summary."""
    harden_hosts(ctx, deadline)
    purge = expiry.run_scheduled(ctx, Deadline.after(deadline.left() * PURGE_SHARE))
    enforcement = quotas.enforce(ctx, deadline)
    metered = metering.run(ctx, deadline)
    refill = pool.refill(ctx, deadline)
    report_metrics(ctx, purge, refill)
    return {"purge": dataclasses.asdict(purge), "quotas": enforcement, "metering": metered, "pool": _as_dict(refill)}


def harden_hosts(ctx: Context, deadline: Deadline) -> list[str]:
    """Revoke PUBLIC's CONNECT/TEMPORARY on each active host's maintenance databases; returns the hosts done.

    A host registered with `tools.ops.hostctl add --no-check` (from outside a VPC
    nothing else reaches) is hardened here, by the first scheduled run that
    reaches it; REVOKE is idempotent, so once per process (ctx.hardened) is cheap.
    """
    done: list[str] = []
    for host in ctx.hosts.all(fresh=True):
        if host.id in ctx.hardened or host.status != HOST_ACTIVE or deadline.passed():
            continue
        try:
            warnings = provisioning.harden_host(ctx.target(host))
        except Exception as exc:  # unreachable now: the next run tries again
            log.warning("hardening host %s failed: %s", host.id, type(exc).__name__)
            continue
        ctx.hardened.add(host.id)
        done.append(host.id)
        for warning in warnings:
            log.warning("host %s: %s", host.id, warning)
    return done


def report_metrics(ctx: Context, purge: Any, refill: Any) -> None:
    """Drops and failures of this run; each host's ready pool and fill (what the alarms watch)."""
    drops = purge.expired_dropped + purge.leftovers_dropped + purge.orphans_dropped
    metrics.emit({"Drops": drops, "Failures": purge.failed + getattr(refill, "failed", 0)})
    for host in ctx.hosts.all():
        if host.status != HOST_ACTIVE:
            continue
        fill = 100.0 * int(host.allocated or 0) / max(int(host.capacity or 0), 1)
        values = {"HostFillPercent": round(fill, 1)}
        if ctx.settings.pool_size > 0:
            values["PoolReady"] = len(pool.pooled(host.id))
        metrics.emit(values, host=host.id)


def _as_dict(summary: Any) -> Any:
    return dataclasses.asdict(summary) if dataclasses.is_dataclass(summary) else summary


def budget_s(ctx: Context, context: Any) -> float:
    """A Lambda's working time: a fraction of the invocation's remaining time, the rest to finish and log.

    Never longer than the interval between runs, so runs do not pile up (the next one resumes).
    """
    remaining = context.get_remaining_time_in_millis() / 1000
    return min(remaining, ctx.settings.purge_rate_minutes * 60) * ctx.settings.purge_time_fraction


def run_lambda(ctx: Context, context: Any) -> dict[str, Any]:
    """The scheduled Lambda."""
    return run(ctx, Deadline.after(budget_s(ctx, context)))
