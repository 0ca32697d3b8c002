"""End to end: `make dev`'s stack over real HTTP, and a real login to the database it hands out."""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import psutil
import psycopg
import pytest

from tests.pgerrors import refused_login
from tests.pgwire import login_sqlstate
from tools.dev import pgserver
from tools.dev.pgserver import free_port

ROOT = Path(__file__).resolve().parent.parent


def _request(method: str, url: str, body: bytes | None = None, headers: dict | None = None):
    req = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, json.loads(resp.read() or b"null")
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"null")


# Looked up here, not in the child: between fork and exec the child must not import (another thread of
# this process may have held the import lock at the fork).
_PRCTL = ctypes.CDLL(None, use_errno=True).prctl
_PR_SET_PDEATHSIG = 1


def _stop_with_parent() -> None:
    """In the stack's process: SIGTERM (its clean stop) when this pytest process dies, even by SIGKILL."""
    _PRCTL(_PR_SET_PDEATHSIG, signal.SIGTERM)


@pytest.fixture(scope="module")
def devstack():
    port = free_port()
    # Not under pytest's tmp folder: another pytest run on the machine resets
    # its mode to 0700, and the server's own user would lose its data.
    # Throwaway and owned by this process (the reaper removes it, the stack's lock file inside, if this run
    # is killed), and reachable by the server's user: its data stays here, on tmpfs, not relocated to disk.
    root = pgserver.private_dir("instapg-e2e-")
    data_dir = root / "dev"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("INSTAPG_", "AWS_"))}
    env.update(PORT=str(port), INSTAPG_DEV_DIR=str(data_dir), PYTHONUNBUFFERED="1")
    # Expiry goes through the emulated TTL and stream only: the stack's purge never runs here.
    env.update(INSTAPG_LOCAL_TTL_SWEEP_SECONDS="1", INSTAPG_LOCAL_PURGE_INTERVAL_SECONDS="3600")
    proc = subprocess.Popen(
        [sys.executable, "-m", "tools.dev.devstack"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        preexec_fn=_stop_with_parent,
    )
    lines: list[str] = []
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line and proc.poll() is not None:
            break
        lines.append(line)
        if "Ctrl-C stops everything" in line:
            break
    else:
        proc.kill()
        pytest.fail("devstack did not become ready:\n" + "".join(lines))
    if proc.poll() is not None:
        pytest.fail("devstack exited:\n" + "".join(lines))
    # Keep reading, or a full pipe would block the server's request logging.
    threading.Thread(target=lambda: [None for _ in proc.stdout], daemon=True).start()
    yield proc, f"http://127.0.0.1:{port}", "".join(lines)
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=60)
    shutil.rmtree(root, ignore_errors=True)


def test_banner_prints_a_curl_line(devstack):
    _, base, output = devstack
    assert f"curl -X POST {base}/api/v1/database" in output


def test_banner_operator_key_opens_the_dashboard(devstack):
    import json
    import re
    import urllib.request

    _, base, output = devstack
    key = re.search(rf"dashboard {re.escape(base)}/admin with the operator key (ipgo_[A-Za-z0-9_-]{{43}})", output)
    assert key, output
    request = urllib.request.Request(f"{base}/admin/api/summary", headers={"Authorization": f"Bearer {key.group(1)}"})
    with urllib.request.urlopen(request, timeout=30) as response:
        assert response.status == 200 and json.loads(response.read())["hosts"][0]["capacity"] == 1000


def test_create_over_http_and_use_the_database(devstack):
    _, base, _ = devstack
    # Exactly what the README's curl sends (no Content-Type header).
    status, body = _request("POST", f"{base}/api/v1/database", b'{"ref":"e2e"}')
    assert status == 201, body
    assert body["claim_url"] == f"{base}/claim/{body['id']}"
    with psycopg.connect(body["connection_string"], connect_timeout=10) as conn:
        conn.execute("CREATE TABLE items (id int PRIMARY KEY, name text)")
        conn.execute("INSERT INTO items VALUES (1, 'first')")
        assert conn.execute("SELECT name FROM items").fetchall() == [("first",)]
    status, again = _request("GET", f"{base}/api/v1/database/{body['id']}")
    assert status == 200 and again["id"] == body["id"]


def test_logical_replication_goes_through_the_stacks_gateway(devstack):
    _, base, output = devstack
    gateway_port = int(output.split("gateway   127.0.0.1:")[1].split()[0])
    status, body = _request("POST", f"{base}/api/v1/database", b'{"ref":"e2e","enable_logical_replication":true}')
    assert status == 201, body
    params = psycopg.conninfo.conninfo_to_dict(body["replication_connection_string"])
    assert int(params["port"]) == gateway_port and params["replication"] == "database"
    with psycopg.connect(body["replication_connection_string"], connect_timeout=10, autocommit=True) as conn:
        assert conn.execute("IDENTIFY_SYSTEM").fetchone()[3] == params["dbname"]
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("BASE_BACKUP")


def test_wrong_password_is_refused_over_tcp(devstack):
    _, base, _ = devstack
    _, body = _request("POST", f"{base}/api/v1/database", b'{"ref":"e2e"}')
    params = psycopg.conninfo.conninfo_to_dict(body["direct_connection_string"])
    params["password"] = "not-the-password"
    # invalid_password: scram-sha-256 is enforced, not trust.
    assert refused_login(**params) == "28P01"
    # The pooled string is make dev's PgBouncer, which refuses with 08P01 (1.18 uses it for every login it refuses).
    pooled = psycopg.conninfo.conninfo_to_dict(body["connection_string"])
    assert pooled["port"] != params["port"]
    pooled["password"] = "not-the-password"
    assert login_sqlstate(psycopg.conninfo.make_conninfo(**pooled)) == "08P01"


def test_errors_over_http_are_json(devstack):
    _, base, _ = devstack
    assert _request("GET", f"{base}/no/such/route") == (
        404,
        {"error": "Not found", "hint": "No such path; see GET /api/v1/openapi.yaml for the API."},
    )
    status, body = _request("POST", f"{base}/api/v1/database", b"{not json", {"Content-Type": "application/json"})
    assert status == 400 and body["error"] == "Request body is not valid JSON"
    status, body = _request("POST", f"{base}/api/v1/database", b"{}")
    assert status == 400 and body["error"] == "Missing referrer"
    status, body = _request("POST", f"{base}/api/v1/database", b'{"ref":"' + b"x" * 20000 + b'"}')
    assert status == 413
    status, body = _request("GET", f"{base}/healthz")
    assert status == 200 and body["ok"] is True


def test_expiry_and_a_deleted_record_go_through_the_local_ttl_and_stream(devstack):
    import boto3

    _, base, output = devstack
    moto = output.split("dynamodb  ")[1].split()[0]
    table = boto3.resource(
        "dynamodb", endpoint_url=moto, region_name="us-east-2", aws_access_key_id="x", aws_secret_access_key="x"
    ).Table("instapg-dev-databases")
    _, expiring = _request("POST", f"{base}/api/v1/database", b'{"ref":"e2e"}')
    _, deleted = _request("POST", f"{base}/api/v1/database", b'{"ref":"e2e"}')
    # Aged as tests/test_expiry.py does (the stack's lifetime is 72 h): TTL's sweep deletes it.
    table.update_item(
        Key={"id": expiring["id"]}, UpdateExpression="SET expires_at = :t", ExpressionAttributeValues={":t": 1}
    )
    table.delete_item(Key={"id": deleted["id"]})  # by hand: no TTL identity on its REMOVE
    for body in (expiring, deleted):
        give_up = time.monotonic() + 30
        while True:
            try:
                psycopg.connect(body["connection_string"], connect_timeout=5).close()
            except psycopg.OperationalError:
                break  # the role and database are gone
            assert time.monotonic() < give_up, "the database was not dropped through the stream"
            time.sleep(0.2)
        status, got = _request("GET", f"{base}/api/v1/database/{body['id']}")
        assert status == 410 and got["error"] == "Database expired", got


def test_ctrl_c_stops_everything(devstack):
    proc, base, output = devstack
    pg_port = int(output.split("postgres  127.0.0.1:")[1].split()[0])
    gateway_port = int(output.split("gateway   127.0.0.1:")[1].split()[0])
    postgres_pids = [p.pid for p in psutil.process_iter(["name", "cmdline"]) if _is_postgres_on(p, pg_port)]
    assert postgres_pids
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=60) == 0
    assert not [pid for pid in postgres_pids if _alive(pid)]
    with socket.socket() as sock:
        assert sock.connect_ex(("127.0.0.1", int(base.rsplit(":", 1)[1]))) != 0, "API still serving"
    with socket.socket() as sock:
        assert sock.connect_ex(("127.0.0.1", gateway_port)) != 0, "replication gateway still serving"


def _alive(pid: int) -> bool:
    # The server daemonizes; where PID 1 does not reap, it lingers as a zombie.
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _is_postgres_on(proc, port: int) -> bool:
    cmdline = proc.info.get("cmdline") or []
    return proc.info.get("name") == "postgres" and f"port={port}" in " ".join(cmdline)


def test_a_second_make_dev_on_the_same_folder_stops_and_wipes_nothing(tmp_path):
    from tools.dev.devstack import _lock

    data_dir = tmp_path / "dev"
    held = _lock(data_dir)  # what a running `make dev` holds
    assert held is not None
    data_dir.mkdir()
    (data_dir / "keep").write_text("the first stack's data")
    env = {**os.environ, "INSTAPG_DEV_DIR": str(data_dir), "PORT": str(free_port())}
    run = subprocess.run(
        [sys.executable, "-m", "tools.dev.devstack"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
    )
    assert run.returncode == 1
    assert "another `make dev` is using" in run.stderr
    assert (data_dir / "keep").read_text() == "the first stack's data"
    held.close()
