"""GET /healthz: is the metadata store up, and does at least one host answer?"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

from chalicelib import postgres
from chalicelib.models import HOST_ACTIVE, DatabaseRecord

if TYPE_CHECKING:
    from chalicelib.context import Context

log = logging.getLogger(__name__)


def run(ctx: Context) -> tuple[bool, dict[str, Any]]:
    checks: dict[str, Any] = {}
    try:
        DatabaseRecord.describe_table()
        checks["dynamodb"] = "ok"
        hosts = [h for h in ctx.hosts.all(fresh=True) if h.status == HOST_ACTIVE]
    except Exception as exc:
        log.warning("health: dynamodb unavailable: %s", type(exc).__name__)
        checks["dynamodb"] = "unavailable"
        return False, checks

    def probe(host) -> str:
        try:
            postgres.ping(ctx.target(host))
            return "ok"
        except Exception as exc:  # reported, never raised; details stay in the log
            log.warning(
                "health: host %s unavailable: %s",
                host.id,
                exc if isinstance(exc, postgres.HostUnavailable) else type(exc).__name__,
            )
            return "unavailable"

    if hosts:
        with ThreadPoolExecutor(max_workers=min(8, len(hosts))) as pool:
            checks["hosts"] = dict(zip((h.id for h in hosts), pool.map(probe, hosts), strict=False))
    else:
        checks["hosts"] = {}
    ok = any(v == "ok" for v in checks["hosts"].values())
    if not ok and not hosts:
        checks["hint"] = "No active host is registered."
    return ok, checks
