"""Deploy as code: the packaged CloudFormation template (`make package`) and cfn-lint on it, offline."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# chalice keeps the Linux wheels it fetched for a requirements.txt in .chalice/deployments (named by the
# requirements' hash and the Python version); the fixture's project is a new temp dir every run, so the
# wheels are kept here between runs, as pip keeps its cache. A changed requirements.txt gets a new name.
DEPLOYMENTS_CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "instapg" / "chalice-deployments"


def _restore_deployments(project: Path) -> None:
    target = project / ".chalice" / "deployments"
    target.mkdir(parents=True, exist_ok=True)
    for cached in DEPLOYMENTS_CACHE.glob("*.zip") if DEPLOYMENTS_CACHE.is_dir() else ():
        shutil.copy(cached, target / cached.name)


def _keep_deployments(project: Path) -> None:
    DEPLOYMENTS_CACHE.mkdir(parents=True, exist_ok=True)
    for built in (project / ".chalice" / "deployments").glob("*.zip"):
        if not (DEPLOYMENTS_CACHE / built.name).exists():
            partial = DEPLOYMENTS_CACHE / f".{built.name}.{os.getpid()}"
            shutil.copy(built, partial)
            partial.replace(DEPLOYMENTS_CACHE / built.name)  # whole or absent, with two runs at once


@pytest.fixture(scope="module")
def packaged(tmp_path_factory):
    """The project packaged as `make package` does, into a temp dir: (template dict, path)."""
    from tools.deploy import package

    project = tmp_path_factory.mktemp("project")
    for name in ("app.py", "requirements.txt"):
        shutil.copy(ROOT / name, project / name)
    for name in ("chalicelib", "infra", ".chalice"):
        shutil.copytree(ROOT / name, project / name, ignore=shutil.ignore_patterns("deployed", "__pycache__"))
    _restore_deployments(project)
    # Loading an app applies its stage's environment to os.environ (as chalice
    # does), and the copy's app.py must not stand in for the real one later.
    saved_env, saved_path, saved_app = dict(os.environ), list(sys.path), sys.modules.get("app")
    try:
        # The template does not depend on the CA bundle's content (tests/test_tls.py covers verify-full).
        template_path = package.package(project / "build", "prod", project_dir=project, require_ca=False)
        _keep_deployments(project)
    finally:
        os.environ.clear()
        os.environ.update(saved_env)
        sys.path[:] = saved_path
        sys.modules.pop("app", None)
        if saved_app is not None:
            sys.modules["app"] = saved_app
    return json.loads(template_path.read_text()), template_path


def _functions(template: dict) -> dict[str, dict]:
    return {k: v for k, v in template["Resources"].items() if v["Type"] == "AWS::Serverless::Function"}


# The only warnings cfn-lint may give, each explained: the functions' SubnetIds
# is the parameter's "" default when Network is not `existing` (then the
# template uses its own subnets or no VPC, and its Rules require SubnetIds
# when it is); SAM drops resource Metadata, so it cannot be silenced there.
# The pooler's TLS secret likewise is "" when PoolerEnabled is off (Rules require it when on).
EXPLAINED_WARNINGS = {
    ("W1030", ("Parameters", "SubnetIds", "Default")),
    ("W1030", ("Parameters", "PoolerTlsSecretArn", "Default")),
}


def test_cfn_lint_passes_on_the_packaged_template(packaged):
    _, path = packaged
    result = subprocess.run(
        [str(Path(sys.executable).parent / "cfn-lint"), "--format", "json", str(path)], capture_output=True, text=True
    )
    found = json.loads(result.stdout or "[]")
    unexplained = [
        f for f in found if (f["Rule"]["Id"], tuple(f["Location"]["Path"] or ())) not in EXPLAINED_WARNINGS
    ]
    assert not unexplained, json.dumps(unexplained, indent=1)
    assert all(f["Level"] == "Warning" for f in found)


def test_stream_handler_reads_the_databases_table_stream(packaged):
    template, _ = packaged
    streams = [
        event["Properties"]["Stream"]
        for fn in _functions(template).values()
        for event in fn["Properties"].get("Events", {}).values()
        if event["Type"] == "DynamoDB"
    ]
    assert streams == [{"Fn::GetAtt": ["DatabasesTable", "StreamArn"]}]


def test_schedule_is_an_eventbridge_rule(packaged):
    template, _ = packaged
    schedules = [
        event["Properties"]["Schedule"]
        for fn in _functions(template).values()
        for event in fn["Properties"].get("Events", {}).values()
        if event["Type"] == "Schedule"
    ]
    assert schedules and all(s.startswith(("rate(", "cron(")) for s in schedules)


def test_the_real_purge_and_drop_handlers_are_packaged_with_their_event_sources(packaged):
    """app.py's own `purge` (the schedule) and `drop_removed` (the stream): no stand-in is packaged in their place."""
    from app import app

    template, _ = packaged
    by_handler = {
        fn["Properties"]["Handler"]: fn["Properties"].get("Events", {}) for fn in _functions(template).values()
    }
    assert set(by_handler) == {"app.app", "app.purge", "app.drop_removed"}
    [schedule] = by_handler["app.purge"].values()
    [source] = [s for s in app.event_sources if s.handler_string == "app.purge"]
    expression = source.schedule_expression
    assert schedule == {
        "Type": "Schedule",
        "Properties": {"Schedule": expression if isinstance(expression, str) else expression.to_string()},
    }
    [stream] = by_handler["app.drop_removed"].values()
    assert stream["Type"] == "DynamoDB"
    assert stream["Properties"]["Stream"] == {"Fn::GetAtt": ["DatabasesTable", "StreamArn"]}
    assert stream["Properties"]["FunctionResponseTypes"] == ["ReportBatchItemFailures"]


def _statements(template: dict, function: str) -> list[dict]:
    role = _functions(template)[function]["Properties"]["Role"]["Fn::GetAtt"][0]
    policies = template["Resources"][role]["Properties"]["Policies"]
    out = []
    for policy in policies:
        for st in policy["PolicyDocument"]["Statement"]:
            out.append(st["Fn::If"][1] if "Fn::If" in st else st)
    return out


def test_each_function_has_its_own_least_privilege_role(packaged):
    template, _ = packaged
    functions = _functions(template)
    roles = {fn["Properties"]["Role"]["Fn::GetAtt"][0] for fn in functions.values()}
    assert len(roles) == len(functions) >= 3
    for name in functions:
        for st in _statements(template, name):
            actions = st["Action"] if isinstance(st["Action"], list) else [st["Action"]]
            assert all(a != "*" and not a.endswith(":*") for a in actions), (name, st)
            if st["Resource"] == "*":
                # Only actions AWS offers no resource-level permission for.
                assert set(actions) <= {
                    "dynamodb:ListStreams",
                    "ec2:CreateNetworkInterface",
                    "ec2:DeleteNetworkInterface",
                    "ec2:DescribeNetworkInterfaces",
                }, (name, st)
    # Only the stream handler may read the stream.
    for name, fn in functions.items():
        has_stream = any(e["Type"] == "DynamoDB" for e in fn["Properties"].get("Events", {}).values())
        reads_stream = any("dynamodb:GetRecords" in st["Action"] for st in _statements(template, name))
        assert has_stream == reads_stream, name


def test_functions_get_the_key_ring_secret_and_table_prefix(packaged):
    template, _ = packaged
    for name, fn in _functions(template).items():
        env = fn["Properties"]["Environment"]["Variables"]
        assert env["INSTAPG_PG_SSLROOTCERT"] == "chalicelib/certs/rds-ca-bundle.pem", name  # verify-full
        assert env["INSTAPG_KEYRING_SECRET_ARN"] == {"Ref": "KeyRingSecret"}, name
        assert env["INSTAPG_TABLE_PREFIX"] == {"Ref": "TablePrefix"}, name
        assert "INSTAPG_KEYRING" not in env, name


def test_unknown_routes_answer_404_json(packaged):
    template, _ = packaged
    # In the API's definition, so that the deployment SAM makes includes them.
    responses = template["Resources"]["RestAPI"]["Properties"]["DefinitionBody"][
        "x-amazon-apigateway-gateway-responses"
    ]
    missing = responses["MISSING_AUTHENTICATION_TOKEN"]
    assert missing["statusCode"] == "404"
    assert missing["responseParameters"]["gatewayresponse.header.Content-Type"] == "'application/json'"
    from chalicelib.http import NOT_FOUND_BODY

    assert json.loads(missing["responseTemplates"]["application/json"]) == NOT_FOUND_BODY
    # chalice's routes are still all there.
    assert "/api/v1/database" in template["Resources"]["RestAPI"]["Properties"]["DefinitionBody"]["paths"]


def test_tables_match_the_models(packaged):
    """The template's tables are exactly what chalicelib/models.py define, as tools/deploy/bootstrap.py creates them."""
    from chalicelib import models
    from tools.deploy.tables import table_spec, ttl_attribute  # the one description both deploy paths use

    template, _ = packaged
    tables = {
        r["Properties"]["TableName"]["Fn::Sub"]: r["Properties"]
        for r in template["Resources"].values()
        if r["Type"] == "AWS::DynamoDB::Table"
    }
    assert set(tables) == {f"${{TablePrefix}}-{suffix}" for suffix in models._SUFFIXES.values()}
    for model in models.MODELS:
        props = tables[f"${{TablePrefix}}-{models._SUFFIXES[model]}"]
        spec = table_spec(model)
        assert sorted(props["AttributeDefinitions"], key=str) == sorted(spec["AttributeDefinitions"], key=str)
        assert props["KeySchema"] == spec["KeySchema"]
        gsis = [
            {"IndexName": g["IndexName"], "KeySchema": g["KeySchema"], "Projection": g["Projection"]}
            for g in props.get("GlobalSecondaryIndexes", [])
        ]
        assert gsis == spec.get("GlobalSecondaryIndexes", [])
        assert props["PointInTimeRecoverySpecification"] == {"PointInTimeRecoveryEnabled": True}
        ttl = ttl_attribute(model)
        if ttl:
            assert props["TimeToLiveSpecification"] == {"AttributeName": ttl, "Enabled": True}
        stream = getattr(model.Meta, "stream_view_type", None)
        if stream:
            assert props["StreamSpecification"] == {"StreamViewType": stream}
    assert ttl_attribute(models.DatabaseRecord) == "expires_at"


# -- issue 16: production on AWS ------------------------------------------------------


def _by_kind(template: dict) -> dict[str, str]:
    """Logical id of the api, stream and schedule function."""
    out = {}
    for name, fn in _functions(template).items():
        events = [e["Type"] for e in fn["Properties"].get("Events", {}).values()]
        out["stream" if "DynamoDB" in events else "schedule" if "Schedule" in events else "api"] = name
    return out


def _sg_rules(template: dict, group: str, direction: str) -> list[dict]:
    """Inline and separate ingress/egress rules of one security group."""
    res = template["Resources"]
    key = "SecurityGroupIngress" if direction == "in" else "SecurityGroupEgress"
    rules = list(res[group]["Properties"].get(key, []))
    kind = "AWS::EC2::SecurityGroupIngress" if direction == "in" else "AWS::EC2::SecurityGroupEgress"
    rules += [r["Properties"] for r in res.values() if r["Type"] == kind and r["Properties"]["GroupId"] == {"Ref": group}]
    return rules


def test_timeouts_nest_gateway_function_statement(packaged):
    from chalicelib import postgres
    from tools.deploy import deployspec

    template, _ = packaged
    fns = _functions(template)
    kinds = _by_kind(template)
    api_timeout = fns[kinds["api"]]["Properties"]["Timeout"]
    assert api_timeout == deployspec.FUNCTION_TIMEOUT_S["api"] < deployspec.API_GATEWAY_LIMIT_S
    # The admin sessions' statement_timeout (jobs and stream) ends before their functions do.
    assert f"statement_timeout={deployspec.ADMIN_STATEMENT_TIMEOUT_S * 1000} " in postgres._ADMIN_OPTIONS
    for kind in ("schedule", "stream"):
        assert fns[kinds[kind]]["Properties"]["Timeout"] > deployspec.ADMIN_STATEMENT_TIMEOUT_S
    # The chalice path's config says the same.
    stage = json.loads((ROOT / ".chalice" / "config.json").read_text())["stages"]["prod"]
    assert stage["lambda_timeout"] == api_timeout
    for handler in stage["lambda_functions"]:
        assert stage["lambda_functions"][handler]["lambda_timeout"] > deployspec.ADMIN_STATEMENT_TIMEOUT_S


def test_stream_mapping_gives_up_on_a_poison_record_into_sqs(packaged):
    from tools.deploy import deployspec

    template, _ = packaged
    stream_fn = _functions(template)[_by_kind(template)["stream"]]
    (event,) = stream_fn["Properties"]["Events"].values()
    props = event["Properties"]
    assert props["MaximumRetryAttempts"] == deployspec.STREAM_MAPPING["MaximumRetryAttempts"] <= 10
    assert props["BisectBatchOnFunctionError"] is True
    assert 0 < props["MaximumRecordAgeInSeconds"] < 24 * 3600  # under the stream's own 24 h
    assert props["FunctionResponseTypes"] == ["ReportBatchItemFailures"]
    assert props["DestinationConfig"] == {
        "OnFailure": {"Type": "SQS", "Destination": {"Fn::GetAtt": ["StreamFailureQueue", "Arn"]}}
    }
    queue = template["Resources"]["StreamFailureQueue"]["Properties"]
    assert queue["SqsManagedSseEnabled"] is True and queue["MessageRetentionPeriod"] == 1209600
    sends = [st for st in _statements(template, _by_kind(template)["stream"]) if st["Sid"] == "StreamFailures"]
    assert sends == [
        {
            "Sid": "StreamFailures",
            "Effect": "Allow",
            "Action": ["sqs:SendMessage"],
            "Resource": {"Fn::GetAtt": ["StreamFailureQueue", "Arn"]},
        }
    ]


def test_every_function_has_a_log_group_with_retention_that_its_policy_covers(packaged):
    template, _ = packaged
    groups = {
        r["Properties"]["LogGroupName"]["Fn::Sub"]: r["Properties"]
        for r in template["Resources"].values()
        if r["Type"] == "AWS::Logs::LogGroup"
    }
    for name in _functions(template):
        assert groups[f"/aws/lambda/${{{name}}}"]["RetentionInDays"] == {"Ref": "LogRetentionDays"}, name
        (logs,) = [st for st in _statements(template, name) if st["Sid"] == "Logs"]
        # CloudFormation names a function <stack>-<logical id>-<suffix>; the policy covers that group.
        assert logs["Resource"]["Fn::Sub"].endswith(":log-group:/aws/lambda/${AWS::StackName}-*")
        assert "logs:CreateLogGroup" not in logs["Action"]  # the group exists, with its retention


def test_network_functions_reach_postgres_on_5432_only_and_nothing_public_reaches_postgres(packaged):
    template, _ = packaged
    res = template["Resources"]
    for name in _functions(template):
        vpc = res[name]["Properties"]["VpcConfig"]["Fn::If"]
        assert vpc[0] == "InVpc"
        assert vpc[1]["SecurityGroupIds"] == [{"Ref": "FunctionSecurityGroup"}]
    ingress = _sg_rules(template, "PostgresSecurityGroup", "in")
    assert sorted(r["SourceSecurityGroupId"]["Ref"] for r in ingress) == ["FunctionSecurityGroup", "PoolerSecurityGroup"]
    assert all((r["FromPort"], r["ToPort"], r["IpProtocol"]) == (5432, 5432, "tcp") for r in ingress)
    assert not any("CidrIp" in r or "CidrIpv6" in r for r in ingress)
    egress = _sg_rules(template, "FunctionSecurityGroup", "out")
    to_pg = [r for r in egress if r.get("DestinationSecurityGroupId") == {"Ref": "PostgresSecurityGroup"}]
    assert [(r["FromPort"], r["ToPort"]) for r in to_pg] == [(5432, 5432)]
    # 6433: the pooler's admin console, only to the pooler's group.
    assert all(r["FromPort"] == r["ToPort"] and r["FromPort"] in (443, 5432, 6433) for r in egress)
    assert all(r["DestinationSecurityGroupId"] == {"Ref": "PoolerSecurityGroup"} for r in egress if r["FromPort"] == 6433)
    pooler = _sg_rules(template, "PoolerSecurityGroup", "out")
    assert pooler[0] == {
        "IpProtocol": "tcp",
        "FromPort": 5432,
        "ToPort": 5432,
        "DestinationSecurityGroupId": {"Ref": "PostgresSecurityGroup"},
        "Description": "to the Postgres hosts",
    }
    # Besides Postgres, the pooler tasks reach only HTTPS (the ECR/Logs/Secrets endpoints; no route elsewhere).
    assert [(r["FromPort"], r["ToPort"]) for r in pooler[1:]] == [(443, 443)]
    # Endpoints instead of a NAT gateway; the subnets made here have no route out.
    ddb, sm = res["DynamoDbEndpoint"]["Properties"], res["SecretsManagerEndpoint"]["Properties"]
    assert ddb["VpcEndpointType"] == "Gateway" and ddb["ServiceName"]["Fn::Sub"].endswith(".dynamodb")
    assert sm["VpcEndpointType"] == "Interface" and sm["ServiceName"]["Fn::Sub"].endswith(".secretsmanager")
    assert sm["PrivateDnsEnabled"] is True
    assert [r["SourceSecurityGroupId"] for r in _sg_rules(template, "EndpointSecurityGroup", "in")] == [
        {"Ref": "FunctionSecurityGroup"},
        {"Ref": "PoolerSecurityGroup"},
    ]
    kinds = {r["Type"] for r in res.values()}
    assert not kinds & {"AWS::EC2::NatGateway", "AWS::EC2::EIP"}
    # The one internet gateway is the pooler NLB's, and only the NLB's subnets route to it.
    gateways = [k for k, r in res.items() if r["Type"] == "AWS::EC2::InternetGateway"]
    assert gateways == ["PoolerInternetGateway"] and res["PoolerInternetGateway"]["Condition"] == "MakePoolerNetwork"
    routes = [r["Properties"] for r in res.values() if r["Type"] == "AWS::EC2::Route"]
    assert routes == [
        {"RouteTableId": {"Ref": "PoolerPublicRouteTable"}, "DestinationCidrBlock": "0.0.0.0/0", "GatewayId": {"Ref": "PoolerInternetGateway"}}
    ]
    public = {
        r["Properties"]["SubnetId"]["Ref"]
        for r in res.values()
        if r["Type"] == "AWS::EC2::SubnetRouteTableAssociation" and r["Properties"]["RouteTableId"] == {"Ref": "PoolerPublicRouteTable"}
    }
    assert public == {"PoolerPublicSubnetA", "PoolerPublicSubnetB"}
    assert res["Vpc"]["Condition"] == "CreateNetwork"
    assert all(res[s]["Properties"]["MapPublicIpOnLaunch"] is False for s in ("PrivateSubnetA", "PrivateSubnetB"))
    assert set(template["Parameters"]["Network"]["AllowedValues"]) == {"create", "existing", "none"}


def test_optional_rds_host_is_private_encrypted_backed_up_with_a_managed_secret(packaged):
    template, _ = packaged
    host = template["Resources"]["Host"]
    props = host["Properties"]
    assert host["Condition"] == "MakeHost" and host["DeletionPolicy"] == "Snapshot"
    assert props["PubliclyAccessible"] is False and props["StorageEncrypted"] is True
    assert props["ManageMasterUserPassword"] is True and "MasterUserPassword" not in props
    assert props["VPCSecurityGroups"] == [{"Ref": "PostgresSecurityGroup"}]
    assert props["DBInstanceClass"] == {"Ref": "HostInstanceClass"}
    assert props["AllocatedStorage"] == {"Ref": "HostStorageGb"}
    assert props["MaxAllocatedStorage"] == {"Ref": "HostMaxStorageGb"} and props["StorageType"] == "gp3"
    assert props["BackupRetentionPeriod"] == {"Ref": "HostBackupRetentionDays"}
    assert props["DeletionProtection"] == {"Ref": "HostDeletionProtection"}
    # Every function may read the created host's secret (and the key ring), nothing broader.
    for name in _functions(template):
        (secrets,) = [st for st in _statements(template, name) if st["Sid"] == "Secrets"]
        assert secrets["Resource"] == [
            {"Ref": "KeyRingSecret"},
            {"Fn::If": ["MakeHost", {"Fn::GetAtt": ["Host", "MasterUserSecret.SecretArn"]}, {"Ref": "AWS::NoValue"}]},
            {"Fn::If": ["MakePooler", {"Ref": "PoolerAdminSecret"}, {"Ref": "AWS::NoValue"}]},
        ]
    assert "tools.ops.hostctl add" in template["Outputs"]["RegisterHost"]["Value"]["Fn::Sub"]


def test_reserved_concurrency_and_stage_throttling_are_parameters(packaged):
    from tools.deploy import deployspec

    template, _ = packaged
    fns, kinds = _functions(template), _by_kind(template)
    assert fns[kinds["api"]]["Properties"]["ReservedConcurrentExecutions"] == {"Ref": "ApiReservedConcurrency"}
    assert fns[kinds["schedule"]]["Properties"]["ReservedConcurrentExecutions"] == 1
    assert fns[kinds["stream"]]["Properties"]["ReservedConcurrentExecutions"] == deployspec.DEFAULT_STREAM_CONCURRENCY
    assert template["Parameters"]["ApiReservedConcurrency"]["Default"] == deployspec.DEFAULT_API_CONCURRENCY
    # db.t4g.medium grants ~410 connections; the default leaves room for the tenants' own.
    assert deployspec.api_concurrency(410) == 95 and deployspec.api_concurrency(10) == 1
    (method,) = template["Resources"]["RestAPI"]["Properties"]["MethodSettings"]
    assert method == {
        "ResourcePath": "/*",
        "HttpMethod": "*",
        "ThrottlingRateLimit": {"Ref": "ApiThrottleRate"},
        "ThrottlingBurstLimit": {"Ref": "ApiThrottleBurst"},
    }


def test_alarms_cover_stream_age_failures_errors_throttles_pool_and_fill(packaged):
    from tools.deploy import deployspec

    template, _ = packaged
    alarms = {k: r["Properties"] for k, r in template["Resources"].items() if r["Type"] == "AWS::CloudWatch::Alarm"}
    assert set(alarms) == {f"{spec['id']}Alarm" for spec in deployspec.ALARMS}
    metrics = {(a["Namespace"], a["MetricName"]) for a in alarms.values()}
    assert {
        ("AWS/Lambda", "IteratorAge"),
        ("AWS/SQS", "ApproximateNumberOfMessagesVisible"),
        ("AWS/Lambda", "Errors"),
        ("AWS/Lambda", "Throttles"),
        ("instapg", "PoolReady"),
        ("instapg", "HostFillPercent"),
    } <= metrics
    for alarm in alarms.values():
        assert alarm["AlarmActions"] == [{"Fn::If": ["MakeAlarmTopic", {"Ref": "AlarmTopic"}, {"Ref": "AlarmTopicArn"}]}]
    kinds = _by_kind(template)
    assert alarms["StreamIteratorAgeAlarm"]["Dimensions"] == [{"Name": "FunctionName", "Value": {"Ref": kinds["stream"]}}]
    assert alarms["ApiErrorsAlarm"]["Dimensions"] == [{"Name": "FunctionName", "Value": {"Ref": kinds["api"]}}]
    # The metrics the app emits are the ones the alarms watch.
    from chalicelib import metrics as app_metrics

    assert app_metrics.NAMESPACE == "instapg"
    assert {"PoolReady", "HostFillPercent"} <= set(app_metrics.NAMES)


def test_custom_domain_is_optional_and_sets_the_claim_url(packaged):
    template, _ = packaged
    res = template["Resources"]
    assert res["ApiDomain"]["Condition"] == "HasDomain"
    assert res["ApiDomain"]["Properties"]["EndpointConfiguration"] == {"Types": ["REGIONAL"]}
    assert res["ApiDomain"]["Properties"]["RegionalCertificateArn"] == {"Ref": "CertificateArn"}
    assert res["ApiDomainMapping"]["Properties"]["RestApiId"] == {"Ref": "RestAPI"}
    for name, fn in _functions(template).items():
        url = fn["Properties"]["Environment"]["Variables"]["INSTAPG_PUBLIC_URL"]
        assert url == {
            "Fn::If": [
                "HasPublicUrl",
                {"Ref": "PublicUrl"},
                {"Fn::If": ["HasDomain", {"Fn::Sub": "https://${DomainName}"}, ""]},
            ]
        }, name


def test_readme_deploy_section_states_what_deployspec_sets():
    """README's deploy numbers are the ones both paths apply (tools/deploy/deployspec.py)."""
    from tools.deploy import deployspec as d

    text = (ROOT / "README.md").read_text()
    t = d.FUNCTION_TIMEOUT_S
    m = d.STREAM_MAPPING
    for phrase in (
        f"The API function stops at {t['api']} s",
        f"scheduled job ({t['schedule']} s) and the stream handler ({t['stream']} s)",
        f"`statement_timeout` ({d.ADMIN_STATEMENT_TIMEOUT_S} s)",
        f"at most {m['MaximumRetryAttempts']} times",
        f"skips it once it is {m['MaximumRecordAgeInSeconds'] // 3600} hours old",
        f"(230 - {d.RESERVED_FOR_OTHERS}) / {d.SESSIONS_PER_INSTANCE} = **{d.api_concurrency(230)}**, the default",
        f"reserves {d.DEFAULT_API_CONCURRENCY} + {d.DEFAULT_STREAM_CONCURRENCY} + 1 concurrent",
        f"| {len(d.ALARMS)} CloudWatch alarms + SNS topic |",
        f"retention `LogRetentionDays` ({d.LOG_RETENTION_DAYS})",
    ):
        assert phrase in text, phrase
    assert d.api_concurrency(230) == d.DEFAULT_API_CONCURRENCY


# -- issue 14 §7: the pooler's production shape ---------------------------------------------------


def _conditions(template: dict, params: dict[str, str]) -> dict[str, bool]:
    """Every condition of the template evaluated for these parameter values (the rest at their defaults)."""
    values = {k: v.get("Default") for k, v in template["Parameters"].items()} | params

    def ev(node):
        if isinstance(node, dict):
            (fn, arg), = node.items()
            if fn == "Ref":
                value = values[arg]
                return value.split(",") if template["Parameters"][arg]["Type"] == "CommaDelimitedList" else value
            if fn == "Condition":
                return ev(template["Conditions"][arg])
            if fn == "Fn::Equals":
                return str(ev(arg[0])) == str(ev(arg[1]))
            if fn == "Fn::Not":
                return not ev(arg[0])
            if fn == "Fn::And":
                return all(ev(a) for a in arg)
            if fn == "Fn::Or":
                return any(ev(a) for a in arg)
            if fn == "Fn::Join":
                return arg[0].join(ev(arg[1]))
            raise AssertionError(fn)
        return node

    return {name: ev(body) for name, body in template["Conditions"].items()}


def _made(template: dict, params: dict[str, str]) -> set[str]:
    conditions = _conditions(template, params)
    return {k for k, r in template["Resources"].items() if "Condition" not in r or conditions[r["Condition"]]}


POOLER_ON = {"PoolerEnabled": "true", "PoolerImage": "123.dkr.ecr.us-east-2.amazonaws.com/pooler:1", "CreateHost": "true"}


def test_the_pooler_exists_only_when_its_parameter_is_on(packaged):
    template, _ = packaged
    off, on = _made(template, {"CreateHost": "true"}), _made(template, POOLER_ON)
    pooler_kinds = {"AWS::ECS::Service", "AWS::ECS::TaskDefinition", "AWS::ECS::Cluster", "AWS::ElasticLoadBalancingV2::LoadBalancer"}
    res = template["Resources"]
    assert not {k for k in off if res[k]["Type"] in pooler_kinds | {"AWS::EC2::InternetGateway"}}
    assert {res[k]["Type"] for k in on - off} >= pooler_kinds | {"AWS::EC2::InternetGateway", "AWS::SecretsManager::Secret"}
    # Without a VPC (Network=none) there is no pooler either: it serves a private host.
    assert not {k for k in _made(template, {**POOLER_ON, "Network": "none"}) if res[k]["Type"] in pooler_kinds}
    # The pooler's outputs, likewise.
    conditions = _conditions(template, POOLER_ON)
    outputs = {k for k, o in template["Outputs"].items() if "Condition" not in o or conditions[o["Condition"]]}
    assert {"PoolerEndpoint", "PoolerAdminEndpoint", "RegisterPooler"} <= outputs
    assert "tools.ops.hostctl pooler" in template["Outputs"]["RegisterPooler"]["Value"]["Fn::Sub"][0]


def test_pooler_nlb_passes_tls_through_on_5432_and_never_exposes_the_admin_port(packaged):
    template, _ = packaged
    res = template["Resources"]
    nlb = res["PoolerLoadBalancer"]["Properties"]
    assert (nlb["Type"], nlb["Scheme"]) == ("network", "internet-facing")
    listeners = [r["Properties"] for r in res.values() if r["Type"] == "AWS::ElasticLoadBalancingV2::Listener"]
    # TCP, not TLS: PgBouncer terminates TLS (Postgres asks for it in-protocol, which an NLB TLS listener cannot answer).
    assert [(x["Port"], x["Protocol"]) for x in listeners] == [(5432, "TCP")]
    group = res["PoolerTargetGroup"]["Properties"]
    assert (group["Protocol"], group["Port"], group["TargetType"]) == ("TCP", 5432, "ip")
    service = res["PoolerService"]["Properties"]
    assert service["LoadBalancers"] == [{"ContainerName": "pgbouncer", "ContainerPort": 5432, "TargetGroupArn": {"Ref": "PoolerTargetGroup"}}]
    assert service["NetworkConfiguration"]["AwsvpcConfiguration"]["AssignPublicIp"] == "DISABLED"
    assert service["NetworkConfiguration"]["AwsvpcConfiguration"]["SecurityGroups"] == [{"Ref": "PoolerSecurityGroup"}]
    assert service["DesiredCount"] == 1  # one PgBouncer per host: KILL and the pool sizes hold per process
    # Who reaches the tasks: the NLB's group on 5432, the functions' group on 6433, nobody by address.
    ingress = _sg_rules(template, "PoolerSecurityGroup", "in")
    assert sorted((r["FromPort"], r["SourceSecurityGroupId"]["Ref"]) for r in ingress) == [
        (5432, "PoolerLoadBalancerSecurityGroup"),
        (6433, "FunctionSecurityGroup"),
    ]
    assert not any("CidrIp" in r or "CidrIpv6" in r for r in ingress)
    nlb_in = _sg_rules(template, "PoolerLoadBalancerSecurityGroup", "in")
    assert [(r["FromPort"], r["ToPort"], r["CidrIp"]) for r in nlb_in] == [(5432, 5432, {"Ref": "PoolerAllowedCidr"})]
    assert nlb["SecurityGroups"] == [{"Ref": "PoolerLoadBalancerSecurityGroup"}]
    # Postgres: still nothing from the internet, only the functions and the pooler tasks.
    for rule in _sg_rules(template, "PostgresSecurityGroup", "in"):
        assert "CidrIp" not in rule and "CidrIpv6" not in rule
        assert rule["SourceSecurityGroupId"]["Ref"] in ("FunctionSecurityGroup", "PoolerSecurityGroup")
    assert template["Resources"]["Host"]["Properties"]["PubliclyAccessible"] is False


def test_pooler_task_gets_its_secrets_from_secrets_manager_and_verifies_the_host(packaged):
    template, _ = packaged
    res = template["Resources"]
    (container,) = res["PoolerTaskDefinition"]["Properties"]["ContainerDefinitions"]
    env = {e["Name"]: e["Value"] for e in container["Environment"]}
    assert env["PGSSLMODE"] == "verify-full" and env["PGSSLROOTCERT"] == "/etc/instapg/rds-ca-bundle.pem"
    assert env["PGUSER"] == "instapg_pooler_sync" and env["PGDATABASE"] == "instapg_pooler"
    assert not {"PGPASSWORD", "INSTAPG_POOLER_ADMIN_PASSWORD", "INSTAPG_POOLER_TLS_KEY_PEM"} & set(env)
    secrets = {s["Name"]: s["ValueFrom"]["Fn::Sub"] for s in container["Secrets"]}
    assert secrets == {
        "PGPASSWORD": "${PoolerSyncSecret}:password::",
        "INSTAPG_POOLER_ADMIN_PASSWORD": "${PoolerAdminSecret}:password::",
        "INSTAPG_POOLER_TLS_CERT_PEM": "${PoolerTlsSecretArn}:cert::",
        "INSTAPG_POOLER_TLS_KEY_PEM": "${PoolerTlsSecretArn}:key::",
    }
    assert {p["ContainerPort"] for p in container["PortMappings"]} == {5432, 6433}
    (policy,) = res["PoolerExecutionRole"]["Properties"]["Policies"]
    (statement,) = policy["PolicyDocument"]["Statement"]
    assert statement["Action"] == ["secretsmanager:GetSecretValue"]
    assert statement["Resource"] == [{"Ref": "PoolerAdminSecret"}, {"Ref": "PoolerSyncSecret"}, {"Ref": "PoolerTlsSecretArn"}]
    assert "TaskRoleArn" not in res["PoolerTaskDefinition"]["Properties"]  # the task calls no AWS API
    # The functions find the admin console by name; the endpoint the output names is that name.
    assert res["PoolerService"]["Properties"]["ServiceRegistries"] == [{"RegistryArn": {"Fn::GetAtt": ["PoolerAdminDiscovery", "Arn"]}}]
    assert template["Outputs"]["PoolerAdminEndpoint"]["Value"]["Fn::Sub"].startswith("pooler-admin.")


def test_the_zip_ships_bytecode_that_python_uses_without_its_source(packaged, tmp_path):
    """Lambda's /var/task is read-only: without .pyc files in the zip, every cold start compiles every module."""
    import zipfile

    _, path = packaged
    tag = sys.implementation.cache_tag
    with zipfile.ZipFile(path.parent / "deployment.zip") as archive:
        names = set(archive.namelist())
        for package_dir in ("chalicelib/", "botocore/", "psycopg/", "pynamodb/"):
            sources = [n for n in names if n.startswith(package_dir) and n.endswith(".py")]
            assert sources, package_dir
            missing = [
                n
                for n in sources
                if f"{n.rpartition('/')[0]}/__pycache__/{n.rpartition('/')[2][:-3]}.{tag}.pyc" not in names
            ]
            assert missing == [], missing[:5]
        for name in ("chalicelib/__init__.py", "chalicelib/clock.py"):
            folder, _, file = name.rpartition("/")
            archive.extract(name, tmp_path)
            archive.extract(f"{folder}/__pycache__/{file[:-3]}.{tag}.pyc", tmp_path)
    # A source that would fail if read: the import succeeds only through the shipped bytecode.
    (tmp_path / "chalicelib" / "clock.py").write_text("raise SystemExit('the source was compiled')\n")
    out = subprocess.run(
        [sys.executable, "-c", "import chalicelib.clock as c; print(c.__file__)"],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(tmp_path), "PYTHONDONTWRITEBYTECODE": "1"},
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == str(tmp_path / "chalicelib" / "clock.py")
