"""CloudWatch metrics in the embedded metric format (EMF): one JSON line on stdout per emit.

In Lambda, stdout goes to the function's log group and CloudWatch turns these
lines into metrics: no PutMetricData call, no client, nothing on the request's
path but a print. The alarms in the template (tools/deployspec.py ALARMS)
watch these names in namespace `instapg`.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Mapping

NAMESPACE = "instapg"
# Every metric the app emits, with its unit.
NAMES = {
    "Creates": "Count",  # every database handed out by a create
    "PoolTakes": "Count",  # of those, taken from the warm pool
    "OnDemandCreates": "Count",  # of those, made while the client waited
    "Claims": "Count",
    "Drops": "Count",  # databases dropped (stream, purge, reconciliation)
    "Failures": "Count",  # drops, refills and stream records that failed
    "PoolReady": "Count",  # ready pooled databases on a host (per Host and overall minimum)
    "HostFillPercent": "Percent",  # a host's allocated / capacity
}


def emit(values: Mapping[str, float], host: str | None = None, out=None) -> dict:
    """Write one EMF line with `values`; per host, also without the dimension (what the alarms watch).

    Only in Lambda (or to `out`): elsewhere stdout is a person's terminal or a
    command's output (the local stack, the CLI's tests), not a log group.
    """
    unknown = set(values) - set(NAMES)
    if unknown:
        raise ValueError(f"unknown metrics {sorted(unknown)}: add them to chalicelib.metrics.NAMES")
    dimensions: list[list[str]] = [["Host"], []] if host else [[]]
    line: dict = {
        "_aws": {
            "Timestamp": int(time.time() * 1000),
            "CloudWatchMetrics": [
                {
                    "Namespace": NAMESPACE,
                    "Dimensions": dimensions,
                    "Metrics": [{"Name": name, "Unit": NAMES[name]} for name in values],
                }
            ],
        },
        **values,
    }
    if host:
        line["Host"] = host
    if out is None and os.environ.get("AWS_LAMBDA_FUNCTION_NAME"):
        out = sys.stdout
    if out is not None:
        print(json.dumps(line, separators=(",", ":")), file=out, flush=True)
    return line


def count(name: str, n: float = 1, out=None) -> None:
    """One counter; never raises (a metric must not fail the request that counts)."""
    try:
        emit({name: n}, out=out)
    except Exception:  # noqa: BLE001 - stdout closed, say
        pass
