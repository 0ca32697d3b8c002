"""tools/bootstrap.py: the `chalice deploy` path creates the tables idempotently against moto."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def dynamodb():
    import boto3
    from moto import mock_aws

    with mock_aws():
        yield boto3.client("dynamodb", region_name="us-east-2")


def test_bootstrap_twice_creates_everything_once(dynamodb, tmp_path):
    from tools import bootstrap

    config = tmp_path / "config.json"
    shutil.copy(ROOT / ".chalice" / "config.json", config)
    lines: list[str] = []
    first = bootstrap.bootstrap("staging", "ipg-boot", "us-east-2", config, log=lines.append)
    assert "created table" in first["databases"]["changes"]

    desc = dynamodb.describe_table(TableName="ipg-boot-databases")["Table"]
    assert desc["StreamSpecification"] == {"StreamEnabled": True, "StreamViewType": "NEW_AND_OLD_IMAGES"}
    gsis = {g["IndexName"]: g for g in desc["GlobalSecondaryIndexes"]}
    assert set(gsis) == {"by_due", "by_host", "by_owner"}
    assert gsis["by_due"]["KeySchema"] == [
        {"AttributeName": "due_bucket", "KeyType": "HASH"},
        {"AttributeName": "due_at", "KeyType": "RANGE"},
    ]
    ttl = dynamodb.describe_time_to_live(TableName="ipg-boot-databases")["TimeToLiveDescription"]
    assert ttl == {"TimeToLiveStatus": "ENABLED", "AttributeName": "expires_at"}
    for table in ("ipg-boot-databases", "ipg-boot-hosts"):
        backups = dynamodb.describe_continuous_backups(TableName=table)["ContinuousBackupsDescription"]
        assert backups["PointInTimeRecoveryDescription"]["PointInTimeRecoveryStatus"] == "ENABLED"

    stage = json.loads(config.read_text())["stages"]["staging"]
    env = stage["environment_variables"]
    assert env["INSTAPG_TABLE_PREFIX"] == "ipg-boot"
    assert env["INSTAPG_STREAM_ARN"] == desc["LatestStreamArn"]
    assert stage["iam_policy_file"] == "policy-staging.json" and stage["autogen_policy"] is False
    assert json.loads((tmp_path / "policy-staging.json").read_text()) == first["policy"]
    # The key ring secret exists and holds a usable ring.
    import boto3

    from chalicelib.crypto import KeyRing

    secret = boto3.client("secretsmanager", region_name="us-east-2").get_secret_value(
        SecretId=env["INSTAPG_KEYRING_SECRET_ARN"]
    )
    assert KeyRing.parse(secret["SecretString"]).primary_id.startswith("k")
    assert secret["SecretString"] not in "\n".join(lines)  # key material is never printed
    for st in first["policy"]["Statement"]:
        assert st["Action"] != "*" and not any(a.endswith(":*") for a in st["Action"])
        assert st["Resource"] != "*" or st["Sid"] in ("ListStreams", "VpcNetworking")
    by_sid = {st["Sid"]: st for st in first["policy"]["Statement"]}
    assert by_sid["Stream"]["Resource"] == [desc["LatestStreamArn"]]
    assert by_sid["Secrets"]["Resource"][0] == env["INSTAPG_KEYRING_SECRET_ARN"]

    before = config.read_text()
    second = bootstrap.bootstrap("staging", "ipg-boot", "us-east-2", config, log=lines.append)
    assert all(second[suffix]["changes"] == [] for suffix in ("databases", "hosts"))
    assert second["keyring_secret_arn"] == env["INSTAPG_KEYRING_SECRET_ARN"]
    assert second["databases"]["stream_arn"] == desc["LatestStreamArn"]
    assert config.read_text() == before
    assert lines[-1].endswith("already up to date")


def test_bootstrap_completes_a_table_made_without_index_stream_and_ttl(dynamodb, tmp_path):
    from chalicelib import models
    from tools import bootstrap

    spec = bootstrap.table_spec(models.DatabaseRecord)
    dynamodb.create_table(
        TableName="ipg-part-databases",
        BillingMode="PAY_PER_REQUEST",
        AttributeDefinitions=[{"AttributeName": "id", "AttributeType": "S"}],
        KeySchema=spec["KeySchema"],
    )
    config = tmp_path / "config.json"
    config.write_text('{"version": "2.0", "app_name": "instapg", "stages": {}}')
    result = bootstrap.bootstrap("prod", "ipg-part", "us-east-2", config, log=lambda _: None)
    assert result["databases"]["changes"] == [
        "created index by_due",
        "created index by_host",
        "created index by_owner",
        "enabled stream",
        "enabled TTL on expires_at",
        "enabled point-in-time recovery",
    ]
    desc = dynamodb.describe_table(TableName="ipg-part-databases")["Table"]
    assert sorted(g["IndexName"] for g in desc["GlobalSecondaryIndexes"]) == ["by_due", "by_host", "by_owner"]
    assert (
        json.loads(config.read_text())["stages"]["prod"]["environment_variables"]["INSTAPG_STREAM_ARN"]
        == (desc["LatestStreamArn"])
    )


def test_bootstrap_refuses_the_local_stage(tmp_path):
    from tools import bootstrap

    with pytest.raises(SystemExit, match="local stack"):
        bootstrap.bootstrap("dev", "x", "us-east-2", tmp_path / "config.json")


def test_policy_lets_every_function_write_its_logs_including_the_api_itself(dynamodb, tmp_path):
    from tools import bootstrap

    config = tmp_path / "config.json"
    shutil.copy(ROOT / ".chalice" / "config.json", config)
    result = bootstrap.bootstrap("prod", "instapg-prod", "us-east-2", config, log=lambda _: None)
    logs = {st["Sid"]: st for st in result["policy"]["Statement"]}["Logs"]
    # The API function is named `instapg-prod`, with no suffix: `instapg-prod-*` missed it.
    for function in ("instapg-prod", "instapg-prod-purge", "instapg-prod-drop_removed"):
        assert f"arn:aws:logs:us-east-2:123456789012:log-group:/aws/lambda/{function}:*" in logs["Resource"]
    assert "logs:CreateLogGroup" not in logs["Action"]  # chalice makes the groups, with retention


def _rehearse_chalice_deploy(stage: str, config: Path, stream_arn: str) -> None:
    """What `chalice deploy --stage <stage>` creates, as chalice names it, in moto."""
    import io
    import zipfile

    import boto3

    stage_cfg = json.loads(config.read_text())["stages"][stage]
    iam = boto3.client("iam", region_name="us-east-2")
    role = iam.create_role(RoleName=f"instapg-{stage}", AssumeRolePolicyDocument="{}")["Role"]["Arn"]
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("app.py", "")
    lam = boto3.client("lambda", region_name="us-east-2")
    for suffix in ("", "-purge", "-drop_removed"):
        handler = suffix.lstrip("-")
        per = stage_cfg.get("lambda_functions", {}).get(handler, {}) if handler else {}
        lam.create_function(
            FunctionName=f"instapg-{stage}{suffix}",
            Runtime="python3.12",
            Role=role,
            Handler="app.app",
            Code={"ZipFile": buf.getvalue()},
            Timeout=per.get("lambda_timeout", stage_cfg["lambda_timeout"]),
        )
    # chalice's mapping: batch size and starting position only.
    lam.create_event_source_mapping(
        FunctionName=f"instapg-{stage}-drop_removed", EventSourceArn=stream_arn, BatchSize=100,
        StartingPosition="TRIM_HORIZON",
    )
    apigw = boto3.client("apigateway", region_name="us-east-2")
    api = apigw.create_rest_api(name=f"instapg-{stage}")["id"]
    root = apigw.get_resources(restApiId=api)["items"][0]["id"]
    apigw.put_method(restApiId=api, resourceId=root, httpMethod="GET", authorizationType="NONE")
    apigw.put_integration(restApiId=api, resourceId=root, httpMethod="GET", type="MOCK")
    apigw.create_deployment(restApiId=api, stageName="api")


def test_deploy_rehearsal_bootstrap_deploy_after_deploy(dynamodb, tmp_path):
    """The whole chalice path against moto: bootstrap, (what) chalice deploy (creates), bootstrap --after-deploy."""
    import boto3

    from tools import bootstrap, deployspec

    config = tmp_path / "config.json"
    shutil.copy(ROOT / ".chalice" / "config.json", config)
    first = bootstrap.bootstrap(
        "staging", "ipg-rh", "us-east-2", config, api_concurrency=70, log_retention_days=14,
        domain=("db.example.com", "arn:aws:acm:us-east-2:123456789012:certificate/abc"), log=lambda _: None,
    )
    stage = json.loads(config.read_text())["stages"]["staging"]
    # Timeouts: the API function ends before API Gateway's 29 s; the jobs run longer than the admin statement_timeout.
    assert stage["lambda_timeout"] == deployspec.FUNCTION_TIMEOUT_S["api"] < deployspec.API_GATEWAY_LIMIT_S
    assert stage["lambda_functions"]["purge"]["lambda_timeout"] > deployspec.ADMIN_STATEMENT_TIMEOUT_S
    assert stage["lambda_functions"]["drop_removed"]["lambda_timeout"] > deployspec.ADMIN_STATEMENT_TIMEOUT_S
    assert stage["reserved_concurrency"] == 70 and stage["lambda_functions"]["purge"]["reserved_concurrency"] == 1
    assert stage["log_retention_in_days"] == 14
    assert stage["api_gateway_custom_domain"]["domain_name"] == "db.example.com"
    assert stage["environment_variables"]["INSTAPG_PUBLIC_URL"] == "https://db.example.com"
    assert stage["environment_variables"]["INSTAPG_PG_SSLROOTCERT"] == "chalicelib/certs/rds-ca-bundle.pem"
    by_sid = {st["Sid"]: st for st in first["policy"]["Statement"]}
    assert by_sid["StreamFailures"]["Resource"] == [first["queue_arn"]]

    _rehearse_chalice_deploy("staging", config, first["databases"]["stream_arn"])
    sns = boto3.client("sns", region_name="us-east-2")
    topic = sns.create_topic(Name="ops")["TopicArn"]
    lines: list[str] = []
    done = bootstrap.finish(
        "staging", "ipg-rh", "us-east-2", alarm_topic_arn=topic, throttle_rate=50, throttle_burst=100,
        log=lines.append,
    )

    lam = boto3.client("lambda", region_name="us-east-2")
    (mapping,) = lam.list_event_source_mappings(FunctionName="instapg-staging-drop_removed")["EventSourceMappings"]
    assert mapping["MaximumRetryAttempts"] == deployspec.STREAM_MAPPING["MaximumRetryAttempts"]
    assert mapping["BisectBatchOnFunctionError"] is True
    assert mapping["MaximumRecordAgeInSeconds"] == deployspec.STREAM_MAPPING["MaximumRecordAgeInSeconds"]
    assert mapping["FunctionResponseTypes"] == ["ReportBatchItemFailures"]
    assert mapping["DestinationConfig"] == {"OnFailure": {"Destination": first["queue_arn"]}}
    assert lam.get_function(FunctionName="instapg-staging")["Configuration"]["Timeout"] == 20

    cw = boto3.client("cloudwatch", region_name="us-east-2")
    alarms = {a["AlarmName"]: a for a in cw.describe_alarms(AlarmNamePrefix="ipg-rh-")["MetricAlarms"]}
    assert set(alarms) == {f"ipg-rh-{spec['id']}" for spec in deployspec.ALARMS}
    assert all(a["AlarmActions"] == [topic] for a in alarms.values())
    assert alarms["ipg-rh-StreamIteratorAge"]["Dimensions"] == [
        {"Name": "FunctionName", "Value": "instapg-staging-drop_removed"}
    ]
    assert alarms["ipg-rh-StreamFailures"]["Dimensions"] == [{"Name": "QueueName", "Value": "ipg-rh-stream-failures"}]
    assert alarms["ipg-rh-ApiThrottles"]["Dimensions"] == [{"Name": "FunctionName", "Value": "instapg-staging"}]

    apigw = boto3.client("apigateway", region_name="us-east-2")
    api = apigw.get_rest_apis()["items"][0]["id"]
    settings = apigw.get_stage(restApiId=api, stageName="api")["methodSettings"]["*/*"]
    assert (settings["throttlingRateLimit"], settings["throttlingBurstLimit"]) == (50.0, 100)

    # Twice is the same.
    again = bootstrap.finish("staging", "ipg-rh", "us-east-2", alarm_topic_arn=topic, log=lines.append)
    assert again["queue_arn"] == done["queue_arn"] and again["mappings"] == done["mappings"]


def test_public_url_is_written_for_the_api(dynamodb, tmp_path):
    """Deployed, the API answers 503 without INSTAPG_PUBLIC_URL; known after the first deploy, bootstrap sets it."""
    from tools import bootstrap

    config = tmp_path / "config.json"
    shutil.copy(ROOT / ".chalice" / "config.json", config)
    url = "https://abc123.execute-api.us-east-2.amazonaws.com/api/"
    bootstrap.bootstrap("staging", "ipg-url", "us-east-2", config, public_url=url, log=lambda _: None)
    env = json.loads(config.read_text())["stages"]["staging"]["environment_variables"]
    assert env["INSTAPG_PUBLIC_URL"] == url.rstrip("/")


def test_after_deploy_before_deploy_says_so(dynamodb):
    from tools import bootstrap

    with pytest.raises(SystemExit, match="chalice deploy"):
        bootstrap.finish("nodeploy", "ipg-x", "us-east-2", log=lambda _: None)
