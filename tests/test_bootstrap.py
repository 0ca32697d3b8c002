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
    assert set(gsis) == {"by_due", "by_host"}
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
        "enabled stream",
        "enabled TTL on expires_at",
        "enabled point-in-time recovery",
    ]
    desc = dynamodb.describe_table(TableName="ipg-part-databases")["Table"]
    assert sorted(g["IndexName"] for g in desc["GlobalSecondaryIndexes"]) == ["by_due", "by_host"]
    assert (
        json.loads(config.read_text())["stages"]["prod"]["environment_variables"]["INSTAPG_STREAM_ARN"]
        == (desc["LatestStreamArn"])
    )


def test_bootstrap_refuses_the_local_stage(tmp_path):
    from tools import bootstrap

    with pytest.raises(SystemExit, match="local stack"):
        bootstrap.bootstrap("dev", "x", "us-east-2", tmp_path / "config.json")
