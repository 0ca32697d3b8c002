"""The `chalice deploy` path: create (or complete) the DynamoDB tables, then record them in the stage.

    AWS_DEFAULT_REGION=us-east-2 python -m tools.bootstrap --stage dev [--prefix instapg-dev]

Idempotent: run it as often as you like. For each model in chalicelib/models.py
it creates the table if missing, then makes sure of what may be missing on an
existing one (each index, the stream, TTL, point-in-time recovery). It writes
INSTAPG_TABLE_PREFIX and INSTAPG_STREAM_ARN into the stage's
`environment_variables` in .chalice/config.json, where `chalice deploy` reads
them both for the functions and when it imports app.py to wire the stream
handler.

The table layout comes from the pynamodb models, the same source the app and
infra/resources.yaml (checked by tests/test_infra.py) use.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


def _hash_first(key_schema: list[dict[str, str]]) -> list[dict[str, str]]:
    return sorted(
        ({"AttributeName": k["AttributeName"], "KeyType": k["KeyType"]} for k in key_schema),
        key=lambda k: k["KeyType"] != "HASH",
    )


def table_spec(model) -> dict[str, Any]:
    """CreateTable arguments (without the name) for a pynamodb model."""
    schema = model._get_schema()
    spec: dict[str, Any] = {
        "AttributeDefinitions": [dict(a) for a in schema["attribute_definitions"]],
        "KeySchema": _hash_first(schema["key_schema"]),
    }
    gsis = [
        {"IndexName": g["index_name"], "KeySchema": _hash_first(g["key_schema"]), "Projection": dict(g["projection"])}
        for g in schema["global_secondary_indexes"]
    ]
    if gsis:
        spec["GlobalSecondaryIndexes"] = gsis
    return spec


def ttl_attribute(model) -> str | None:
    from pynamodb.attributes import TTLAttribute

    for name, attr in model.get_attributes().items():
        if isinstance(attr, TTLAttribute):
            return attr.attr_name or name
    return None


def _wait_active(client, table: str, index: str | None = None, timeout_s: float = 600) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while True:
        desc = client.describe_table(TableName=table)["Table"]
        statuses = [desc["TableStatus"]]
        if index:
            statuses += [
                g.get("IndexStatus") for g in desc.get("GlobalSecondaryIndexes", []) if g["IndexName"] == index
            ]
        if all(s == "ACTIVE" for s in statuses):
            return desc
        if time.monotonic() > deadline:
            raise TimeoutError(f"{table} {index or ''} not ACTIVE after {timeout_s:.0f}s")
        time.sleep(2)


def ensure_table(client, model, table: str, log=print) -> dict[str, Any]:
    """Create or complete one table; returns {"table", "stream_arn", "changes"}."""
    spec = table_spec(model)
    stream_view = getattr(model.Meta, "stream_view_type", None)
    changes: list[str] = []
    try:
        desc = client.describe_table(TableName=table)["Table"]
    except client.exceptions.ResourceNotFoundException:
        args: dict[str, Any] = {"TableName": table, "BillingMode": "PAY_PER_REQUEST", **spec}
        if stream_view:
            args["StreamSpecification"] = {"StreamEnabled": True, "StreamViewType": stream_view}
        client.create_table(**args)
        changes.append("created table")
        desc = _wait_active(client, table)

    have = {g["IndexName"] for g in desc.get("GlobalSecondaryIndexes", [])}
    for gsi in spec.get("GlobalSecondaryIndexes", []):
        if gsi["IndexName"] in have:
            continue
        # DynamoDB takes one new index per UpdateTable.
        client.update_table(
            TableName=table,
            AttributeDefinitions=spec["AttributeDefinitions"],
            GlobalSecondaryIndexUpdates=[{"Create": gsi}],
        )
        changes.append(f"created index {gsi['IndexName']}")
        desc = _wait_active(client, table, gsi["IndexName"])

    if stream_view:
        current = desc.get("StreamSpecification") or {}
        if not current.get("StreamEnabled"):
            client.update_table(
                TableName=table, StreamSpecification={"StreamEnabled": True, "StreamViewType": stream_view}
            )
            changes.append("enabled stream")
            desc = _wait_active(client, table)
        elif current.get("StreamViewType") != stream_view:
            # Changing it means a new stream (and ARN): an operator's decision.
            raise SystemExit(f"{table} streams {current.get('StreamViewType')}, expected {stream_view}")

    ttl = ttl_attribute(model)
    if ttl:
        status = client.describe_time_to_live(TableName=table)["TimeToLiveDescription"]
        if status.get("TimeToLiveStatus") not in ("ENABLED", "ENABLING") or status.get("AttributeName") != ttl:
            client.update_time_to_live(TableName=table, TimeToLiveSpecification={"Enabled": True, "AttributeName": ttl})
            changes.append(f"enabled TTL on {ttl}")

    backups = client.describe_continuous_backups(TableName=table)["ContinuousBackupsDescription"]
    pitr = (backups.get("PointInTimeRecoveryDescription") or {}).get("PointInTimeRecoveryStatus")
    if pitr != "ENABLED":
        client.update_continuous_backups(
            TableName=table, PointInTimeRecoverySpecification={"PointInTimeRecoveryEnabled": True}
        )
        changes.append("enabled point-in-time recovery")

    log(f"{table}: {', '.join(changes) if changes else 'up to date'}")
    return {"table": table, "stream_arn": desc.get("LatestStreamArn"), "changes": changes}


def write_stage_env(config_path: Path, stage: str, values: dict[str, str]) -> bool:
    """Set `values` in the stage's environment_variables; returns whether the file changed."""
    config = json.loads(config_path.read_text())
    env = config.setdefault("stages", {}).setdefault(stage, {}).setdefault("environment_variables", {})
    if all(env.get(k) == v for k, v in values.items()):
        return False
    env.update(values)
    config_path.write_text(json.dumps(config, indent=2) + "\n")
    return True


def bootstrap(stage: str, prefix: str, region: str, config_path: Path, endpoint: str | None = None, log=print) -> dict:
    import boto3

    from chalicelib import models

    client = boto3.client("dynamodb", region_name=region, endpoint_url=endpoint)
    results = {}
    for model in models.MODELS:
        suffix = models._SUFFIXES[model]
        results[suffix] = ensure_table(client, model, f"{prefix}-{suffix}", log=log)
    values = {"INSTAPG_TABLE_PREFIX": prefix, "INSTAPG_STREAM_ARN": results["databases"]["stream_arn"]}
    if write_stage_env(config_path, stage, values):
        log(f"{config_path}: stage {stage} now has {', '.join(f'{k}={v}' for k, v in values.items())}")
    else:
        log(f"{config_path}: stage {stage} already up to date")
    return results


def main(argv: list[str] | None = None) -> int:
    import os

    parser = argparse.ArgumentParser(description="Create the DynamoDB tables for `chalice deploy` (idempotent).")
    parser.add_argument("--stage", default="dev")
    parser.add_argument("--prefix", help="table name prefix (default: instapg-<stage>)")
    parser.add_argument("--region", default=os.environ.get("AWS_DEFAULT_REGION") or "us-east-2")
    parser.add_argument("--endpoint-url", help="DynamoDB endpoint (e.g. a local moto server)")
    parser.add_argument("--config", type=Path, default=ROOT / ".chalice" / "config.json")
    args = parser.parse_args(argv)
    bootstrap(args.stage, args.prefix or f"instapg-{args.stage}", args.region, args.config, args.endpoint_url)
    return 0


if __name__ == "__main__":
    sys.exit(main())
