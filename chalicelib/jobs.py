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
from typing import TYPE_CHECKING, Any

from chalicelib import expiry, pool, quotas
from chalicelib.clock import Deadline

if TYPE_CHECKING:
    from chalicelib.context import Context

PURGE_SHARE = 0.6


def run(ctx: Context, deadline: Deadline) -> dict[str, Any]:
    """One run taking no new work after `deadline`; returns each part's summary."""
    purge = expiry.run_scheduled(ctx, Deadline.after(deadline.left() * PURGE_SHARE))
    enforcement = quotas.enforce(ctx, deadline)
    refill = pool.refill(ctx, deadline)
    return {"purge": dataclasses.asdict(purge), "quotas": enforcement, "pool": _as_dict(refill)}


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
