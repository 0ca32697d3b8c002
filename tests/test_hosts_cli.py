"""tools/hosts.py: the operator command for hosts."""

from __future__ import annotations

import json

from tests.conftest import ADMIN_ENV, post_json


def _run(capsys, *argv: str) -> tuple[int, dict | None, str]:
    from tools import hosts as cli

    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, (json.loads(out) if out.strip() else None), err


def test_add_list_drain_activate(aws, pg, capsys):
    code, added, _ = _run(
        capsys,
        "add", "h1", "--hostname", pg.host, "--port", str(pg.port),
        "--credentials", f"env:{ADMIN_ENV}", "--capacity", "50", "--sslmode", "disable",
    )  # fmt: skip
    assert code == 0
    assert added["host"]["status"] == "ACTIVE"
    assert added["host"]["capacity"] == 50
    _, listed, _ = _run(capsys, "list")
    assert [h["id"] for h in listed["hosts"]] == ["h1"]
    assert pg.admin_password not in json.dumps(listed)
    assert _run(capsys, "drain", "h1")[1]["host"]["status"] == "DRAINING"
    assert _run(capsys, "activate", "h1")[1]["host"]["status"] == "ACTIVE"


def test_add_refuses_a_host_it_cannot_reach(aws, capsys):
    from tools.pgserver import free_port

    code, _, err = _run(
        capsys,
        "add", "h9", "--hostname", "127.0.0.1", "--port", str(free_port()),
        "--credentials", f"env:{ADMIN_ENV}", "--capacity", "5",
    )  # fmt: skip
    assert code == 1 and "cannot connect" in err
    _, listed, _ = _run(capsys, "list")
    assert listed["hosts"] == []


def test_remove_only_a_drained_empty_host(client, host, capsys):
    body = post_json(client, "/api/v1/database", {"ref": "cli"}).json_body
    assert body["id"]
    code, _, err = _run(capsys, "remove", "local-1")
    assert code == 1 and "drain it first" in err
    _run(capsys, "drain", "local-1")
    code, _, err = _run(capsys, "remove", "local-1")
    assert code == 1 and "still carries 1 database" in err
    from chalicelib.models import HostRecord

    HostRecord(id="local-1").update(actions=[HostRecord.allocated.set(0)])
    code, result, _ = _run(capsys, "remove", "local-1")
    assert code == 0 and result == {"removed": "local-1"}
    assert _run(capsys, "list")[1]["hosts"] == []


def test_unknown_host_is_a_clear_error(aws, capsys):
    code, _, err = _run(capsys, "drain", "nope")
    assert code == 1 and "no host 'nope'" in err
