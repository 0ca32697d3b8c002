"""The scheduled job ("the purge"): everything that must happen without a request.

One EventBridge rule runs it (app.py's `purge`); `make dev` runs it on a
timer. Each part is bounded and resumable, so a run cut short loses nothing:
  1. expiry: expired databases, crashed creates, pending drops, orphans (chalicelib.expiry);
  2. quotas: sizes, storage locks, long queries (chalicelib.quotas);
  3. the warm pool: ready databases topped up on every active host (chalicelib.pool).
The purge gets at most PURGE_SHARE of the budget, so a large expiry backlog
cannot starve quota enforcement; the quota pass runs until the run's deadline.
"""

from __future__ import annotations

import dataclasses
import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from chalicelib.databases import DatabaseService

PURGE_SHARE = 0.6


def run(service: DatabaseService, budget_s: float) -> dict[str, Any]:
    """One run taking no new work after `budget_s` seconds; returns each part's summary."""
    from chalicelib import expiry, pool, quotas

    deadline = time.time() + budget_s
    harden_hosts(service, deadline)
    purge = expiry.run_scheduled(service, budget_s=budget_s * PURGE_SHARE)
    enforcement = quotas.enforce(service, deadline=deadline)
    refill = pool.refill(service, deadline=deadline)
    report_metrics(service, purge, refill)
    return {"purge": dataclasses.asdict(purge), "quotas": enforcement, "pool": _as_dict(refill)}


# Hosts this process has hardened. A host registered with `tools.ops.hostctl add
# --no-check` (from outside a VPC nothing else reaches) is hardened here, by
# the first scheduled run that reaches it; REVOKE is idempotent, so once per
# cold start is cheap.
_hardened: set[str] = set()


def harden_hosts(service: DatabaseService, deadline: float) -> list[str]:
    """Revoke PUBLIC's CONNECT/TEMPORARY on each active host's maintenance databases; returns the hosts done."""
    import logging

    from chalicelib import hosts as hostlib
    from chalicelib import postgres
    from chalicelib.models import HOST_ACTIVE

    log = logging.getLogger(__name__)
    done: list[str] = []
    for host in service.hosts.all(fresh=True):
        if host.id in _hardened or host.status != HOST_ACTIVE or time.time() > deadline:
            continue
        try:
            warnings = postgres.harden_host(hostlib.target(host, service.settings))
        except Exception as exc:  # unreachable now: the next run tries again
            log.warning("hardening host %s failed: %s", host.id, type(exc).__name__)
            continue
        _hardened.add(host.id)
        done.append(host.id)
        for warning in warnings:
            log.warning("host %s: %s", host.id, warning)
    return done


def report_metrics(service: DatabaseService, purge: Any, refill: Any) -> None:
    """Drops and failures of this run; each host's ready pool and fill (what the alarms watch)."""
    from chalicelib import metrics, pool
    from chalicelib.models import HOST_ACTIVE

    drops = purge.expired_dropped + purge.leftovers_dropped + purge.orphans_dropped
    metrics.emit({"Drops": drops, "Failures": purge.failed + getattr(refill, "failed", 0)})
    for host in service.hosts.all():
        if host.status != HOST_ACTIVE:
            continue
        fill = 100.0 * int(host.allocated or 0) / max(int(host.capacity or 0), 1)
        values = {"HostFillPercent": round(fill, 1)}
        if service.settings.pool_size > 0:
            values["PoolReady"] = len(pool.pooled(host.id))
        metrics.emit(values, host=host.id)


def _as_dict(summary: Any) -> Any:
    return dataclasses.asdict(summary) if dataclasses.is_dataclass(summary) else summary


def budget_s(service: DatabaseService, context: Any) -> float:
    """A Lambda's working time: a fraction of the invocation's remaining time, the rest to finish and log.

    Never longer than the interval between runs, so runs do not pile up (the next one resumes).
    """
    remaining = context.get_remaining_time_in_millis() / 1000
    return min(remaining, service.settings.purge_rate_minutes * 60) * service.settings.purge_time_fraction


def run_lambda(service: DatabaseService, context: Any) -> dict[str, Any]:
    """The scheduled Lambda."""
    return run(service, budget_s(service, context))
