"""`make package`: one CloudFormation template for the whole deployment.

    python -m tools.deploy.package [--stage prod] [OUTDIR]

Runs `chalice package --merge-template` with infra/resources.yaml plus an
overlay computed here from the app's handlers, because chalice names every
function's resources after its handler and a static merge template would have
to repeat those names. The overlay

- points each DynamoDB stream event source at `DatabasesTable.StreamArn`
  (chalice writes the ARN app.py had at package time, a placeholder);
- replaces each function role's policy with only what that kind of function
  uses (the API: tables and secrets; the stream handler: also the stream;
  scheduled jobs: tables and secrets);
- sets the environment (table prefix, key ring secret) and VPC placement.

chalice package needs AWS_DEFAULT_REGION and no AWS access; it fetches Linux
wheels from PyPI on first use and caches the zip in .chalice/deployments/.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from tools.deploy.deployspec import ALARMS, DEFAULT_STREAM_CONCURRENCY, FUNCTION_TIMEOUT_S, STREAM_MAPPING

ROOT = Path(__file__).resolve().parents[2]
INFRA = ROOT / "infra" / "resources.yaml"
RDS_CA_BUNDLE = "chalicelib/certs/rds-ca-bundle.pem"  # tools/deploy/rdsca.py writes it
STREAM_TABLE = "DatabasesTable"  # the only table with a stream handler (models: "databases")

# What every function may do on every table (one per model, see table_resources).
TABLE_ACTIONS = [
    "dynamodb:BatchGetItem",
    "dynamodb:DeleteItem",
    "dynamodb:DescribeTable",
    "dynamodb:GetItem",
    "dynamodb:PutItem",
    "dynamodb:Query",
    "dynamodb:Scan",
    "dynamodb:UpdateItem",
]
STREAM_ACTIONS = ["dynamodb:DescribeStream", "dynamodb:GetRecords", "dynamodb:GetShardIterator"]
# Lambda in a VPC manages its network interfaces; AWS does not support
# resource-level permissions for these, hence "*" with three named actions.
# The API's from the parameter (README, "Concurrency and connections"); one purge at a time.
RESERVED_CONCURRENCY: dict[str, Any] = {
    "api": {"Ref": "ApiReservedConcurrency"},
    "schedule": 1,
    "stream": DEFAULT_STREAM_CONCURRENCY,
}
VPC_ACTIONS = ["ec2:CreateNetworkInterface", "ec2:DeleteNetworkInterface", "ec2:DescribeNetworkInterfaces"]


def load_infra(path: Path = INFRA) -> dict[str, Any]:
    """infra/resources.yaml as a dict (short-form intrinsics like !Ref become their long form)."""
    from chalice.package import YAMLTemplateSerializer

    return YAMLTemplateSerializer().load_template(path.read_text(), str(path))


def functions(app) -> list[tuple[str, str]]:
    """(handler name, kind) of every Lambda function chalice will generate: kind is api, stream or schedule."""
    from chalice.app import CloudWatchEventConfig, DynamoDBEventConfig, ScheduledEventConfig

    found: list[tuple[str, str]] = []
    if app.routes:
        found.append(("api_handler", "api"))
    for source in app.event_sources:
        if isinstance(source, DynamoDBEventConfig):
            found.append((source.name, "stream"))
        elif isinstance(source, (ScheduledEventConfig, CloudWatchEventConfig)):
            found.append((source.name, "schedule"))
        else:
            raise SystemExit(f"tools/deploy/package.py does not know event source {type(source).__name__}: add it")
    if app.pure_lambda_functions:
        raise SystemExit("tools/deploy/package.py does not handle @app.lambda_function yet: add it")
    return found


def _policy(kind: str, tables: list[str]) -> dict[str, Any]:
    table_arns: list[Any] = []
    for table in tables:
        table_arns += [{"Fn::GetAtt": [table, "Arn"]}, {"Fn::Sub": f"${{{table}.Arn}}/index/*"}]
    statements: list[dict[str, Any]] = [
        {
            # Every function's group exists (with retention) before it runs: no CreateLogGroup.
            "Sid": "Logs",
            "Effect": "Allow",
            "Action": ["logs:CreateLogStream", "logs:PutLogEvents"],
            "Resource": {
                "Fn::Sub": "arn:${AWS::Partition}:logs:${AWS::Region}:${AWS::AccountId}:log-group:/aws/lambda/${AWS::StackName}-*"
            },
        },
        {"Sid": "Metadata", "Effect": "Allow", "Action": TABLE_ACTIONS, "Resource": table_arns},
        {
            "Sid": "Secrets",
            "Effect": "Allow",
            "Action": ["secretsmanager:GetSecretValue"],
            "Resource": [
                {"Ref": "KeyRingSecret"},
                {"Fn::If": ["MakeHost", {"Fn::GetAtt": ["Host", "MasterUserSecret.SecretArn"]}, {"Ref": "AWS::NoValue"}]},
                # The pooler's admin console user (KILL, RELOAD, SHOW STATS): infra/resources.yaml.
                {"Fn::If": ["MakePooler", {"Ref": "PoolerAdminSecret"}, {"Ref": "AWS::NoValue"}]},
            ],
        },
        {
            "Fn::If": [
                "HasHostSecrets",
                {
                    "Sid": "HostSecrets",
                    "Effect": "Allow",
                    "Action": ["secretsmanager:GetSecretValue"],
                    "Resource": {"Ref": "HostAdminSecretArns"},
                },
                {"Ref": "AWS::NoValue"},
            ]
        },
    ]
    if kind == "stream":
        statements.append(
            {
                "Sid": "Stream",
                "Effect": "Allow",
                "Action": STREAM_ACTIONS,
                "Resource": {"Fn::GetAtt": [STREAM_TABLE, "StreamArn"]},
            }
        )
        statements.append(
            {"Sid": "ListStreams", "Effect": "Allow", "Action": ["dynamodb:ListStreams"], "Resource": "*"}
        )
        # The mapping's on-failure destination sends with the function's role.
        statements.append(
            {
                "Sid": "StreamFailures",
                "Effect": "Allow",
                "Action": ["sqs:SendMessage"],
                "Resource": {"Fn::GetAtt": ["StreamFailureQueue", "Arn"]},
            }
        )
    statements.append(
        {
            "Fn::If": [
                "InVpc",
                {"Sid": "VpcNetworking", "Effect": "Allow", "Action": VPC_ACTIONS, "Resource": "*"},
                {"Ref": "AWS::NoValue"},
            ]
        }
    )
    return {"Version": "2012-10-17", "Statement": statements}


def table_resources() -> dict[str, Any]:
    """One AWS::DynamoDB::Table per model in chalicelib/models.py, as tools/deploy/bootstrap.py creates them.

    Generated rather than written in infra/resources.yaml, so that a new model
    is deployed without a second definition to keep in step.
    """
    from chalicelib import models
    from tools.deploy.tables import table_spec, ttl_attribute

    resources: dict[str, Any] = {}
    for model in models.MODELS:
        suffix = models._SUFFIXES[model]
        props: dict[str, Any] = {
            "TableName": {"Fn::Sub": f"${{TablePrefix}}-{suffix}"},
            "BillingMode": "PAY_PER_REQUEST",
            **table_spec(model),
            "PointInTimeRecoverySpecification": {"PointInTimeRecoveryEnabled": True},
            "SSESpecification": {"SSEEnabled": True},
        }
        ttl = ttl_attribute(model)
        if ttl:
            props["TimeToLiveSpecification"] = {"AttributeName": ttl, "Enabled": True}
        stream_view = getattr(model.Meta, "stream_view_type", None)
        if stream_view:
            props["StreamSpecification"] = {"StreamViewType": stream_view}
        resources[table_logical_id(suffix)] = {
            "Type": "AWS::DynamoDB::Table",
            "DeletionPolicy": "Retain",
            "UpdateReplacePolicy": "Retain",
            "Properties": props,
        }
    return resources


def table_logical_id(suffix: str) -> str:
    # CloudFormation logical ids are alphanumeric: "api-keys" -> "ApiKeysTable".
    return "".join(part.capitalize() for part in suffix.replace("_", "-").split("-")) + "Table"


def overlay(app, infra: dict[str, Any]) -> dict[str, Any]:
    """The generated part of the merge template: the tables and the per-function settings."""
    from chalice.utils import to_cfn_resource_name

    resources: dict[str, Any] = table_resources()
    tables = list(resources)
    functions_by_kind: dict[str, str] = {}
    for name, kind in functions(app):
        function = "APIHandler" if kind == "api" else to_cfn_resource_name(name)
        role = to_cfn_resource_name(f"{name}_role")
        resources[role] = {
            "Properties": {"Policies": [{"PolicyName": f"{role}Policy", "PolicyDocument": _policy(kind, tables)}]}
        }
        props: dict[str, Any] = {
            "Timeout": FUNCTION_TIMEOUT_S[kind],
            "ReservedConcurrentExecutions": RESERVED_CONCURRENCY[kind],
            "Environment": {
                "Variables": {
                    "INSTAPG_TABLE_PREFIX": {"Ref": "TablePrefix"},
                    "INSTAPG_KEYRING_SECRET_ARN": {"Ref": "KeyRingSecret"},
                    "INSTAPG_PG_SSLROOTCERT": RDS_CA_BUNDLE,  # verify-full to the hosts (make rds-ca)
                    "INSTAPG_PUBLIC_URL": {
                        "Fn::If": [
                            "HasPublicUrl",
                            {"Ref": "PublicUrl"},
                            {"Fn::If": ["HasDomain", {"Fn::Sub": "https://${DomainName}"}, ""]},
                        ]
                    },
                }
            },
            "VpcConfig": {
                "Fn::If": [
                    "InVpc",
                    {
                        "SubnetIds": {
                            "Fn::If": [
                                "CreateNetwork",
                                [{"Ref": "PrivateSubnetA"}, {"Ref": "PrivateSubnetB"}],
                                {"Ref": "SubnetIds"},  # cfn-lint W1030 on its "" default: tests/test_infra.py
                            ]
                        },
                        "SecurityGroupIds": [{"Ref": "FunctionSecurityGroup"}],
                    },
                    {"Ref": "AWS::NoValue"},
                ]
            },
        }
        if kind == "stream":
            event = to_cfn_resource_name(f"{name}-dynamodb-event-source")
            props["Events"] = {
                event: {
                    "Properties": {
                        "Stream": {"Fn::GetAtt": [STREAM_TABLE, "StreamArn"]},
                        # A poison record must not stall the stream; the
                        # scheduled purge and reconciliation catch what is skipped.
                        **STREAM_MAPPING,
                        "DestinationConfig": {
                            "OnFailure": {"Type": "SQS", "Destination": {"Fn::GetAtt": ["StreamFailureQueue", "Arn"]}}
                        },
                    }
                }
            }
        resources[function] = {"Properties": props}
        # chalice's log group per function (log_retention_in_days): the
        # parameter's retention, and the API's named after the right resource
        # (chalice writes ${ApiHandler}, which does not exist).
        resources[to_cfn_resource_name(f"{name}_log_group")] = {
            "Properties": {
                "LogGroupName": {"Fn::Sub": f"/aws/lambda/${{{function}}}"},
                "RetentionInDays": {"Ref": "LogRetentionDays"},
            }
        }
        functions_by_kind[kind] = function
    resources.update(alarm_resources(functions_by_kind))
    return {"Resources": resources}


def alarm_resources(functions_by_kind: dict[str, str]) -> dict[str, Any]:
    """One AWS::CloudWatch::Alarm per tools/deploy/deployspec.ALARMS entry, notifying the alarm topic."""
    out: dict[str, Any] = {}
    for spec in ALARMS:
        kind = spec["dimensions"]
        if kind.startswith("function:"):
            function = functions_by_kind.get(kind.split(":", 1)[1])
            if function is None:
                continue
            dimensions = [{"Name": "FunctionName", "Value": {"Ref": function}}]
        elif kind == "queue":
            dimensions = [{"Name": "QueueName", "Value": {"Fn::GetAtt": ["StreamFailureQueue", "QueueName"]}}]
        else:
            dimensions = []
        props: dict[str, Any] = {
            "AlarmName": {"Fn::Sub": f"${{AWS::StackName}}-{spec['id']}"},
            "AlarmDescription": spec["description"],
            "Namespace": spec["namespace"],
            "MetricName": spec["metric"],
            "Statistic": spec["statistic"],
            "ComparisonOperator": spec["comparison"],
            "Threshold": spec["threshold"],
            "Period": spec["period"],
            "EvaluationPeriods": 1,
            "TreatMissingData": "notBreaching",
            "AlarmActions": [{"Fn::If": ["MakeAlarmTopic", {"Ref": "AlarmTopic"}, {"Ref": "AlarmTopicArn"}]}],
        }
        if dimensions:
            props["Dimensions"] = dimensions
        out[f"{spec['id']}Alarm"] = {"Type": "AWS::CloudWatch::Alarm", "Properties": props}
    return out


def merge_template(app, infra_path: Path = INFRA) -> dict[str, Any]:
    """infra/resources.yaml with the overlay merged in (the overlay wins on conflicts)."""
    from chalice.package import TemplateDeepMerger

    infra = load_infra(infra_path)
    return TemplateDeepMerger().merge(overlay(app, infra), infra)


def load_app(project_dir: Path, stage: str):
    from chalice.cli import factory

    # Another project's app.py may already be imported under the same name.
    sys.modules.pop("app", None)
    cli = factory.CLIFactory(str(project_dir))
    config = cli.create_config_obj(chalice_stage_name=stage)
    return cli.load_chalice_app(config.environment_variables)


def package(outdir: Path, stage: str = "prod", project_dir: Path = ROOT, require_ca: bool = True) -> Path:
    """Write deployment.zip and sam.json (the one template) into `outdir`; returns the template's path.

    The functions verify their hosts against the RDS CA bundle: without it in
    the zip they could reach no host, so packaging stops (`make rds-ca`).
    """
    if require_ca and not (project_dir / RDS_CA_BUNDLE).exists():
        raise SystemExit(f"{RDS_CA_BUNDLE} is missing: run `make rds-ca` (or `make package`, which does)")
    env = {**os.environ, "AWS_DEFAULT_REGION": os.environ.get("AWS_DEFAULT_REGION", "us-east-2")}
    app = load_app(project_dir, stage)
    outdir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        merged = Path(tmp) / "merge.json"
        merged.write_text(json.dumps(merge_template(app, project_dir / "infra" / "resources.yaml"), indent=2))
        subprocess.run(
            [str(Path(sys.executable).parent / "chalice"), "--project-dir", str(project_dir), "package"]
            + ["--stage", stage, "--merge-template", str(merged), str(outdir)],
            check=True,
            env=env,
        )
    add_bytecode(outdir / "deployment.zip", outdir / "sam.json")
    return outdir / "sam.json"


def add_bytecode(zip_path: Path, template_path: Path) -> int:
    """Add a compiled `__pycache__` entry for every module in the zip; returns how many were added.

    chalice zips sources only, and Lambda's `/var/task` is read-only, so every
    cold start compiled each module it imported (botocore, psycopg, urllib3,
    pynamodb, chalicelib...): 0.7 s of CPU on the loaded bench machine
    (docs/performance.md, cold start). The entries are unchecked-hash `.pyc`
    files (PEP 552): Python uses them without comparing the source's mtime,
    which a zip does not keep reliably; they are made from the zip's own
    sources, so they cannot disagree. They only work for the Python that made
    them, so nothing is added when the template's runtime is another version.
    """
    import py_compile
    import zipfile

    runtime = f"python{sys.version_info.major}.{sys.version_info.minor}"
    template = json.loads(template_path.read_text())
    runtimes = {
        r.get("Properties", {}).get("Runtime")
        for r in template.get("Resources", {}).values()
        if r.get("Type") == "AWS::Serverless::Function"
    }
    if runtimes != {runtime}:
        print(f"no bytecode added: the functions run {sorted(map(str, runtimes))}, this is {runtime}", file=sys.stderr)
        return 0
    added = 0
    with tempfile.TemporaryDirectory() as tmp, zipfile.ZipFile(zip_path, "a", zipfile.ZIP_DEFLATED) as archive:
        names = set(archive.namelist())
        for name in sorted(n for n in names if n.endswith(".py")):
            folder, _, file = name.rpartition("/")
            cached = f"{folder + '/' if folder else ''}__pycache__/{file[:-3]}.{sys.implementation.cache_tag}.pyc"
            if cached in names:
                continue
            source = Path(tmp) / "module.py"
            source.write_bytes(archive.read(name))
            try:
                py_compile.compile(
                    str(source),
                    cfile=str(Path(tmp) / "module.pyc"),
                    dfile=name,
                    doraise=True,
                    invalidation_mode=py_compile.PycInvalidationMode.UNCHECKED_HASH,
                )
            except py_compile.PyCompileError:
                continue  # a file no runtime imports (a template, a Python 2 leftover): it stays source
            info = zipfile.ZipInfo(cached, date_time=archive.getinfo(name).date_time)
            info.external_attr = 0o644 << 16
            info.compress_type = zipfile.ZIP_DEFLATED
            archive.writestr(info, (Path(tmp) / "module.pyc").read_bytes())
            added += 1
    return added



def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("outdir", nargs="?", default="build", type=Path)
    parser.add_argument("--stage", default="prod")
    args = parser.parse_args(argv)
    template = package(args.outdir.resolve(), args.stage)
    print(f"wrote {template} and {template.parent / 'deployment.zip'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
