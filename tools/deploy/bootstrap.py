"""The `chalice deploy` path: create (or complete) the AWS resources, then record them in the stage.

    AWS_DEFAULT_REGION=us-east-2 python -m tools.deploy.bootstrap --stage prod [--prefix instapg-prod] \\
        [--host-secret-arn ARN ...] [--subnet-ids a,b --security-group-ids sg]

Idempotent: run it as often as you like. For each model in chalicelib/models.py
it creates the table if missing, then makes sure of what may be missing on an
existing one (each index, the stream, TTL, point-in-time recovery). It creates
the key ring secret `<prefix>/keyring` with one fresh key if missing, and
writes the functions' IAM policy to .chalice/policy-<stage>.json (these
tables, this stream, these secrets). It writes INSTAPG_TABLE_PREFIX,
INSTAPG_STREAM_ARN and INSTAPG_KEYRING_SECRET_ARN into the stage's
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

from tools.deploy.after_deploy import ensure_failure_queue, finish, log_groups
from tools.deploy.tables import table_spec, ttl_attribute

ROOT = Path(__file__).resolve().parents[2]


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


def write_stage(config_path: Path, stage: str, env: dict[str, str], settings: dict[str, Any]) -> bool:
    """Set `env` in the stage's environment_variables and `settings` on the stage; returns whether it changed."""
    config = json.loads(config_path.read_text())
    stage_cfg = config.setdefault("stages", {}).setdefault(stage, {})
    current = stage_cfg.setdefault("environment_variables", {})
    if all(current.get(k) == v for k, v in env.items()) and all(stage_cfg.get(k) == v for k, v in settings.items()):
        return False
    current.update(env)
    stage_cfg.update(settings)
    config_path.write_text(json.dumps(config, indent=2) + "\n")
    return True


def stage_settings(
    config: dict[str, Any], stage: str, api_concurrency: int | None, log_retention_days: int
) -> dict[str, Any]:
    """Timeouts, reserved concurrency and log retention for the stage, per function kind (tools/deploy/deployspec.py).

    chalice applies these on deploy: a stage-wide value is the API function's,
    `lambda_functions.<handler>` the others'; `log_retention_in_days` makes
    each function's log group with that retention.
    """
    from tools.deploy import deployspec, package

    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    import app as application

    functions = dict(config.get("stages", {}).get(stage, {}).get("lambda_functions", {}))
    for handler, kind in package.functions(application.app):
        if kind == "api":
            continue
        per = dict(functions.get(handler, {}))
        per["lambda_timeout"] = deployspec.FUNCTION_TIMEOUT_S[kind]
        # One purge at a time; the stream handler's few keep a backlog's connections bounded.
        per["reserved_concurrency"] = 1 if kind == "schedule" else deployspec.DEFAULT_STREAM_CONCURRENCY
        functions[handler] = per
    return {
        "lambda_timeout": deployspec.FUNCTION_TIMEOUT_S["api"],
        "reserved_concurrency": api_concurrency or deployspec.DEFAULT_API_CONCURRENCY,
        "log_retention_in_days": log_retention_days,
        "lambda_functions": functions,
    }


def ensure_keyring_secret(client, name: str, log=print) -> str:
    """The key ring secret's ARN; a new secret gets one fresh key, made here and sent only to Secrets Manager."""
    from chalicelib.crypto import new_key_spec

    try:
        return client.describe_secret(SecretId=name)["ARN"]
    except client.exceptions.ResourceNotFoundException:
        kid = "k" + time.strftime("%Y%m%d%H%M%S", time.gmtime())
        arn = client.create_secret(
            Name=name, Description="instapg credential encryption key ring", SecretString=new_key_spec(kid)
        )["ARN"]
        log(f"{name}: created key ring secret with key {kid}")
        return arn


def policy(
    region: str, account: str, stage: str, tables: list[dict[str, Any]], secret_arns: list[str], queue_arn: str
) -> dict[str, Any]:
    """The functions' IAM policy for `chalice deploy`: these tables, this stream, these secrets."""
    table_arns = [f"arn:aws:dynamodb:{region}:{account}:table/{t['table']}" for t in tables]
    stream_arns = [t["stream_arn"] for t in tables if t["stream_arn"]]
    return {
        "Version": "2012-10-17",
        "Statement": [
            {
                # The API function is `<app>-<stage>` itself, the others `<app>-<stage>-<handler>`.
                # No CreateLogGroup: the groups exist (ensure_log_groups) with their retention.
                "Sid": "Logs",
                "Effect": "Allow",
                "Action": ["logs:CreateLogStream", "logs:PutLogEvents"],
                "Resource": [f"arn:aws:logs:{region}:{account}:log-group:{group}:*" for group in log_groups(stage)],
            },
            {
                "Sid": "Metadata",
                "Effect": "Allow",
                "Action": _package_actions("TABLE_ACTIONS"),
                "Resource": table_arns + [f"{arn}/index/*" for arn in table_arns],
            },
            {"Sid": "Stream", "Effect": "Allow", "Action": _package_actions("STREAM_ACTIONS"), "Resource": stream_arns},
            {"Sid": "ListStreams", "Effect": "Allow", "Action": ["dynamodb:ListStreams"], "Resource": "*"},
            {"Sid": "Secrets", "Effect": "Allow", "Action": ["secretsmanager:GetSecretValue"], "Resource": secret_arns},
            {
                # The stream's on-failure destination: Lambda sends with the function's role.
                "Sid": "StreamFailures",
                "Effect": "Allow",
                "Action": ["sqs:SendMessage"],
                "Resource": [queue_arn],
            },
            {
                # Lambda in a VPC; AWS has no resource-level permissions for these.
                "Sid": "VpcNetworking",
                "Effect": "Allow",
                "Action": _package_actions("VPC_ACTIONS"),
                "Resource": "*",
            },
        ],
    }


def _package_actions(name: str):
    from tools.deploy import package  # one list of actions (and one bundle path) for both deployment paths

    value = getattr(package, name)
    return list(value) if isinstance(value, list) else value


def bootstrap(
    stage: str,
    prefix: str,
    region: str,
    config_path: Path,
    endpoint: str | None = None,
    host_secret_arns: list[str] | None = None,
    subnet_ids: list[str] | None = None,
    security_group_ids: list[str] | None = None,
    log_retention_days: int = 30,
    api_concurrency: int | None = None,
    domain: tuple[str, str] | None = None,
    public_url: str | None = None,
    log=print,
) -> dict:
    import boto3

    from chalicelib import models

    if stage == "dev":
        raise SystemExit("stage dev is the local stack's (`make dev`); bootstrap another stage, e.g. --stage prod")
    client = boto3.client("dynamodb", region_name=region, endpoint_url=endpoint)
    results = {}
    for model in models.MODELS:
        suffix = models._SUFFIXES[model]
        results[suffix] = ensure_table(client, model, f"{prefix}-{suffix}", log=log)
    secrets = boto3.client("secretsmanager", region_name=region, endpoint_url=endpoint)
    secret_arn = ensure_keyring_secret(secrets, f"{prefix}/keyring", log)
    queue_arn = ensure_failure_queue(boto3.client("sqs", region_name=region, endpoint_url=endpoint), prefix, log)
    account = boto3.client("sts", region_name=region, endpoint_url=endpoint).get_caller_identity()["Account"]
    # Without host secret ARNs, any RDS-managed master secret of the account.
    hosts = host_secret_arns or [f"arn:aws:secretsmanager:{region}:{account}:secret:rds!*"]
    policy_file = f"policy-{stage}.json"
    document = policy(region, account, stage, list(results.values()), [secret_arn, *hosts], queue_arn)
    (config_path.parent / policy_file).write_text(json.dumps(document, indent=2) + "\n")
    env = {
        "INSTAPG_TABLE_PREFIX": prefix,
        "INSTAPG_STREAM_ARN": results["databases"]["stream_arn"],
        "INSTAPG_KEYRING_SECRET_ARN": secret_arn,
        "INSTAPG_PG_SSLROOTCERT": _package_actions("RDS_CA_BUNDLE"),  # verify-full; `make rds-ca` before deploy
    }
    settings: dict[str, Any] = {
        "autogen_policy": False,
        "iam_policy_file": policy_file,
        **stage_settings(json.loads(config_path.read_text()), stage, api_concurrency, log_retention_days),
    }
    if domain:
        # Claim links then stay on this name whatever happens to the API's own.
        settings["api_gateway_custom_domain"] = {"domain_name": domain[0], "certificate_arn": domain[1]}
        settings["api_gateway_endpoint_type"] = "REGIONAL"
        env["INSTAPG_PUBLIC_URL"] = f"https://{domain[0]}"
    if public_url:
        env["INSTAPG_PUBLIC_URL"] = public_url.rstrip("/")
    if subnet_ids and security_group_ids:
        settings.update(subnet_ids=subnet_ids, security_group_ids=security_group_ids)
    if write_stage(config_path, stage, env, settings):
        log(f"{config_path}: stage {stage} now has {', '.join(f'{k}={v}' for k, v in env.items())}")
    else:
        log(f"{config_path}: stage {stage} already up to date")
    return {**results, "keyring_secret_arn": secret_arn, "queue_arn": queue_arn, "policy": document}


def main(argv: list[str] | None = None) -> int:
    import os

    parser = argparse.ArgumentParser(description="Create the AWS resources for `chalice deploy` (idempotent).")
    parser.add_argument("--stage", default="prod", help="chalice stage to write (not dev: that is the local stack)")
    parser.add_argument("--prefix", help="table name prefix (default: instapg-<stage>)")
    parser.add_argument("--region", default=os.environ.get("AWS_DEFAULT_REGION") or "us-east-2")
    parser.add_argument("--endpoint-url", help="AWS endpoint for every call (e.g. a local moto server)")
    parser.add_argument("--config", type=Path, default=ROOT / ".chalice" / "config.json")
    parser.add_argument("--host-secret-arn", action="append", help="a host admin secret the functions may read")
    parser.add_argument("--subnet-ids", help="comma-separated private subnets for the functions")
    parser.add_argument("--security-group-ids", help="comma-separated security groups for the functions")
    parser.add_argument("--api-concurrency", type=int, help="the API function's reserved concurrency (README)")
    parser.add_argument("--log-retention-days", type=int, default=30)
    parser.add_argument("--domain-name", help="custom domain for the API (needs --certificate-arn)")
    parser.add_argument("--certificate-arn", help="ACM certificate for --domain-name (same region)")
    parser.add_argument(
        "--public-url", help="INSTAPG_PUBLIC_URL: the API's URL (in Lambda every request answers 503 without one)"
    )
    parser.add_argument(
        "--after-deploy",
        action="store_true",
        help="run after `chalice deploy`: stream failure handling, stage throttling, alarms",
    )
    parser.add_argument("--alarm-topic-arn", help="SNS topic the alarms notify (--after-deploy)")
    parser.add_argument("--throttle-rate", type=float, help="API stage requests/s (--after-deploy)")
    parser.add_argument("--throttle-burst", type=int, help="API stage burst (--after-deploy)")
    args = parser.parse_args(argv)
    split = lambda v: [x.strip() for x in v.split(",") if x.strip()] if v else None  # noqa: E731
    prefix = args.prefix or f"instapg-{args.stage}"
    if args.after_deploy:
        finish(
            args.stage,
            prefix,
            args.region,
            args.endpoint_url,
            alarm_topic_arn=args.alarm_topic_arn,
            throttle_rate=args.throttle_rate,
            throttle_burst=args.throttle_burst,
        )
        return 0
    if bool(args.domain_name) != bool(args.certificate_arn):
        parser.error("--domain-name and --certificate-arn go together")
    bootstrap(
        args.stage,
        prefix,
        args.region,
        args.config,
        args.endpoint_url,
        host_secret_arns=args.host_secret_arn,
        subnet_ids=split(args.subnet_ids),
        security_group_ids=split(args.security_group_ids),
        log_retention_days=args.log_retention_days,
        api_concurrency=args.api_concurrency,
        domain=(args.domain_name, args.certificate_arn) if args.domain_name else None,
        public_url=args.public_url,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
