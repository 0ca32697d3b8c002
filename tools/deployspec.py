"""What both deploy paths set the same way: timeouts, the stream's failure handling, logs, concurrency, alarms.

tools/package.py turns these into CloudFormation (build/sam.json) and
tools/bootstrap.py into boto3 calls for `chalice deploy`; tests/test_infra.py
and tests/test_bootstrap.py hold both to these values, so the two paths cannot
drift apart.
"""

from __future__ import annotations

from typing import Any

APP_NAME = "instapg"  # .chalice/config.json app_name: chalice names functions <app>-<stage>[-<handler>]

# Timeouts, outermost first. API Gateway ends an integration at 29 s; the API
# function must end before it (20 s), and the service's own request deadline
# (10 s, chalicelib) and statement timeouts sit under that. The admin
# sessions' statement_timeout (60 s, chalicelib/postgres.py) is used by the
# scheduled job and the stream handler only, whose functions run longer.
API_GATEWAY_LIMIT_S = 29
FUNCTION_TIMEOUT_S = {"api": 20, "schedule": 300, "stream": 120}
ADMIN_STATEMENT_TIMEOUT_S = 60

# The stream's event source mapping. A record the handler cannot process is
# reported (ReportBatchItemFailures) and retried from there; after
# MaximumRetryAttempts or MaximumRecordAgeInSeconds it goes to the SQS queue
# and the shard moves on. The scheduled purge (by_due index) and
# reconciliation drop what a skipped REMOVE left behind.
STREAM_BATCH_SIZE = 100
STREAM_MAPPING = {
    "MaximumRetryAttempts": 5,
    "BisectBatchOnFunctionError": True,
    "MaximumRecordAgeInSeconds": 6 * 3600,
    "FunctionResponseTypes": ["ReportBatchItemFailures"],
}
STREAM_FAILURE_QUEUE_RETENTION_S = 14 * 24 * 3600  # SQS's maximum

LOG_RETENTION_DAYS = 30

# Reserved concurrency of the API function. Each warm API instance keeps at
# most MAX_IDLE (chalicelib/postgres.py _Sessions) admin sessions per host and
# holds one while it works; the scheduled job and the stream handler add a few.
# With RESERVED_FOR_OTHERS connections kept for them, the superuser, RDS's own
# and an operator, the API may use at most
#   (max_connections - RESERVED_FOR_OTHERS) // SESSIONS_PER_INSTANCE
# instances. db.t4g.medium: max_connections = LEAST(DBInstanceClassMemory/9531392, 5000)
# ~ 410, minus the tenants' own (role CONNECTION LIMIT) connections it must leave room for.
SESSIONS_PER_INSTANCE = 4
RESERVED_FOR_OTHERS = 30
DEFAULT_API_CONCURRENCY = 50
DEFAULT_STREAM_CONCURRENCY = 5  # at most one per shard anyway; caps a backlog's connections


def api_concurrency(admin_connections: int) -> int:
    """The API function's reserved concurrency for a host that grants the service `admin_connections`."""
    return max(1, (admin_connections - RESERVED_FOR_OTHERS) // SESSIONS_PER_INSTANCE)


# Alarms: (name, namespace, metric, statistic, comparison, threshold, period s,
# dimensions kind, what it means). "function:<kind>" dimensions are the
# FunctionName of that kind of function; "queue" the failure queue's name.
ALARMS: list[dict[str, Any]] = [
    {
        "id": "StreamIteratorAge",
        "namespace": "AWS/Lambda",
        "metric": "IteratorAge",
        "statistic": "Maximum",
        "comparison": "GreaterThanThreshold",
        "threshold": 15 * 60 * 1000,  # ms: REMOVEs 15 minutes behind
        "period": 300,
        "dimensions": "function:stream",
        "description": "The stream handler is more than 15 minutes behind the databases table's stream.",
    },
    {
        "id": "StreamFailures",
        "namespace": "AWS/SQS",
        "metric": "ApproximateNumberOfMessagesVisible",
        "statistic": "Maximum",
        "comparison": "GreaterThanThreshold",
        "threshold": 0,
        "period": 300,
        "dimensions": "queue",
        "description": "Stream records the handler gave up on are in the failure queue (the purge still drops their databases).",
    },
    *[
        {
            "id": f"{kind.capitalize()}{metric}",
            "namespace": "AWS/Lambda",
            "metric": metric,
            "statistic": "Sum",
            "comparison": "GreaterThanThreshold",
            "threshold": 0 if kind != "api" else 5,
            "period": 300,
            "dimensions": f"function:{kind}",
            "description": f"The {kind} function had {metric.lower()} in 5 minutes.",
        }
        for kind in ("api", "schedule", "stream")
        for metric in ("Errors", "Throttles")
    ],
    {
        "id": "PoolEmpty",
        "namespace": "instapg",
        "metric": "PoolReady",
        "statistic": "Minimum",
        "comparison": "LessThanOrEqualToThreshold",
        "threshold": 0,
        "period": 900,
        "dimensions": "none",
        "description": "A host's warm pool was empty for 15 minutes: creates are on-demand (slow).",
    },
    {
        "id": "HostNearFull",
        "namespace": "instapg",
        "metric": "HostFillPercent",
        "statistic": "Maximum",
        "comparison": "GreaterThanThreshold",
        "threshold": 85,
        "period": 900,
        "dimensions": "none",
        "description": "A host is over 85% of its capacity: add or register another host.",
    },
]
