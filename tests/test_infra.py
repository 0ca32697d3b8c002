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

# Handlers of the shapes the expiry issue adds to app.py, appended to a copy of
# the project only when app.py has none of that kind yet, so the stream wiring
# and the per-function policies are checked either way.
STUB_STREAM = """

@app.on_dynamodb_record(stream_arn="arn:aws:dynamodb:us-east-2:000000000000:table/placeholder/stream/x")
def packaging_stub_stream(event):
    return None
"""
STUB_SCHEDULE = """

@app.schedule("rate(5 minutes)")
def packaging_stub_schedule(event):
    return None
"""


@pytest.fixture(scope="module")
def packaged(tmp_path_factory):
    """The project packaged as `make package` does, into a temp dir: (template dict, path)."""
    from chalice.app import DynamoDBEventConfig, ScheduledEventConfig

    from tools import package

    project = tmp_path_factory.mktemp("project")
    for name in ("app.py", "requirements.txt"):
        shutil.copy(ROOT / name, project / name)
    for name in ("chalicelib", "infra", ".chalice"):
        shutil.copytree(ROOT / name, project / name, ignore=shutil.ignore_patterns("deployed", "__pycache__"))
    # Loading an app applies its stage's environment to os.environ (as chalice
    # does), and the copy's app.py must not stand in for the real one later.
    saved_env, saved_path, saved_app = dict(os.environ), list(sys.path), sys.modules.get("app")
    try:
        app = package.load_app(ROOT, "prod")
        kinds = {type(s) for s in app.event_sources}
        with open(project / "app.py", "a") as fh:
            if DynamoDBEventConfig not in kinds:
                fh.write(STUB_STREAM)
            if ScheduledEventConfig not in kinds:
                fh.write(STUB_SCHEDULE)
        template_path = package.package(project / "build", "prod", project_dir=project)
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


def test_cfn_lint_passes_on_the_packaged_template(packaged):
    _, path = packaged
    result = subprocess.run([str(Path(sys.executable).parent / "cfn-lint"), str(path)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


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
    """The template's tables are exactly what chalicelib/models.py (and tools/bootstrap.py) define."""
    from chalicelib import models
    from tools import bootstrap

    template, _ = packaged
    tables = {
        r["Properties"]["TableName"]["Fn::Sub"]: r["Properties"]
        for r in template["Resources"].values()
        if r["Type"] == "AWS::DynamoDB::Table"
    }
    assert set(tables) == {f"${{TablePrefix}}-{suffix}" for suffix in models._SUFFIXES.values()}
    for model in models.MODELS:
        props = tables[f"${{TablePrefix}}-{models._SUFFIXES[model]}"]
        spec = bootstrap.table_spec(model)
        assert sorted(props["AttributeDefinitions"], key=str) == sorted(spec["AttributeDefinitions"], key=str)
        assert props["KeySchema"] == spec["KeySchema"]
        gsis = [
            {"IndexName": g["IndexName"], "KeySchema": g["KeySchema"], "Projection": g["Projection"]}
            for g in props.get("GlobalSecondaryIndexes", [])
        ]
        assert gsis == spec.get("GlobalSecondaryIndexes", [])
        assert props["PointInTimeRecoverySpecification"] == {"PointInTimeRecoveryEnabled": True}
        ttl = bootstrap.ttl_attribute(model)
        if ttl:
            assert props["TimeToLiveSpecification"] == {"AttributeName": ttl, "Enabled": True}
        stream = getattr(model.Meta, "stream_view_type", None)
        if stream:
            assert props["StreamSpecification"] == {"StreamViewType": stream}
    assert bootstrap.ttl_attribute(models.DatabaseRecord) == "expires_at"
