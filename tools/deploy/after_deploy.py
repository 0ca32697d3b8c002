"""After `chalice deploy`: what chalice cannot set (`python -m tools.deploy.bootstrap --after-deploy`).

The stream mapping's retries, bisect, record age, failure queue and partial
batch responses; the API stage's throttling; the alarms. Also the names chalice
gives the stage's functions, which the bootstrap's IAM policy needs too.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]


def function_names(stage: str) -> dict[str, list[str]]:
    """Names chalice gives the stage's functions, by kind (api, stream, schedule)."""
    from tools.deploy import package
    from tools.deploy.deployspec import APP_NAME

    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    import app as application  # registers the handlers; touches no AWS

    names: dict[str, list[str]] = {}
    for handler, kind in package.functions(application.app):
        name = f"{APP_NAME}-{stage}" if kind == "api" else f"{APP_NAME}-{stage}-{handler}"
        names.setdefault(kind, []).append(name)
    return names


def log_groups(stage: str) -> list[str]:
    return [f"/aws/lambda/{name}" for names in function_names(stage).values() for name in names]


def ensure_failure_queue(client, prefix: str, log=print) -> str:
    """The SQS queue that receives stream records the handler gave up on; returns its ARN."""
    from tools.deploy.deployspec import STREAM_FAILURE_QUEUE_RETENTION_S

    name = f"{prefix}-stream-failures"
    try:
        url = client.get_queue_url(QueueName=name)["QueueUrl"]
    except client.exceptions.QueueDoesNotExist:
        url = client.create_queue(
            QueueName=name,
            Attributes={
                "MessageRetentionPeriod": str(STREAM_FAILURE_QUEUE_RETENTION_S),
                "SqsManagedSseEnabled": "true",
            },
        )["QueueUrl"]
        log(f"{name}: created failure queue")
    return client.get_queue_attributes(QueueUrl=url, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]


def alarm_dimensions(kind: str, names: dict[str, list[str]], queue_name: str) -> list[dict[str, str]]:
    if kind.startswith("function:"):
        return [{"Name": "FunctionName", "Value": names[kind.split(":", 1)[1]][0]}]
    if kind == "queue":
        return [{"Name": "QueueName", "Value": queue_name}]
    return []


def finish(
    stage: str,
    prefix: str,
    region: str,
    endpoint: str | None = None,
    alarm_topic_arn: str | None = None,
    throttle_rate: float | None = None,
    throttle_burst: int | None = None,
    log=print,
) -> dict[str, Any]:
    """After `chalice deploy`: what chalice cannot set. Idempotent.

    The stream mapping's retries, bisect, record age, failure queue and
    partial batch responses; the stage's throttling; the alarms (to
    `alarm_topic_arn`). Timeouts, reserved concurrency and log retention are
    chalice settings, which `bootstrap` writes into the stage.
    """
    import boto3

    from tools.deploy import deployspec

    names = function_names(stage)
    lam = boto3.client("lambda", region_name=region, endpoint_url=endpoint)
    sqs = boto3.client("sqs", region_name=region, endpoint_url=endpoint)
    queue_name = f"{prefix}-stream-failures"
    queue_arn = ensure_failure_queue(sqs, prefix, log)
    mappings = []
    for function in names.get("stream", []):
        for mapping in lam.list_event_source_mappings(FunctionName=function)["EventSourceMappings"]:
            lam.update_event_source_mapping(
                UUID=mapping["UUID"],
                DestinationConfig={"OnFailure": {"Destination": queue_arn}},
                **deployspec.STREAM_MAPPING,
            )
            mappings.append(mapping["UUID"])
            log(f"{function}: stream mapping {mapping['UUID']} retries, bisects, reports failures to {queue_name}")
    if names.get("stream") and not mappings:
        raise SystemExit(f"{names['stream'][0]} has no event source mapping: run `chalice deploy` first")
    if throttle_rate or throttle_burst:
        _throttle_stage(
            boto3.client("apigateway", region_name=region, endpoint_url=endpoint),
            stage,
            throttle_rate,
            throttle_burst,
            log,
        )
    alarms = []
    if alarm_topic_arn:
        cw = boto3.client("cloudwatch", region_name=region, endpoint_url=endpoint)
        for spec in deployspec.ALARMS:
            name = f"{prefix}-{spec['id']}"
            cw.put_metric_alarm(
                AlarmName=name,
                AlarmDescription=spec["description"],
                Namespace=spec["namespace"],
                MetricName=spec["metric"],
                Dimensions=alarm_dimensions(spec["dimensions"], names, queue_name),
                Statistic=spec["statistic"],
                ComparisonOperator=spec["comparison"],
                Threshold=spec["threshold"],
                Period=spec["period"],
                EvaluationPeriods=1,
                TreatMissingData="notBreaching",
                AlarmActions=[alarm_topic_arn],
            )
            alarms.append(name)
        log(f"{len(alarms)} alarms notify {alarm_topic_arn}")
    return {"queue_arn": queue_arn, "mappings": mappings, "alarms": alarms}


def _throttle_stage(client, stage: str, rate: float | None, burst: int | None, log=print) -> None:
    from tools.deploy.deployspec import APP_NAME

    api_name = f"{APP_NAME}-{stage}"  # chalice names the REST API like the API function
    apis = [a for a in client.get_rest_apis(limit=500)["items"] if a["name"] == api_name]
    if not apis:
        raise SystemExit(f"no REST API named {api_name}: run `chalice deploy` first")
    ops = []
    if rate:
        ops.append({"op": "replace", "path": "/*/*/throttling/rateLimit", "value": str(rate)})
    if burst:
        ops.append({"op": "replace", "path": "/*/*/throttling/burstLimit", "value": str(burst)})
    for stage_desc in client.get_stages(restApiId=apis[0]["id"])["item"]:
        client.update_stage(restApiId=apis[0]["id"], stageName=stage_desc["stageName"], patchOperations=ops)
        log(f"{api_name} stage {stage_desc['stageName']}: throttled to {rate}/s, burst {burst}")
