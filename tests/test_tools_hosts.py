"""tools/ops/hostctl.py, the operator command that registers Postgres hosts."""

from __future__ import annotations

from tests.conftest import ADMIN_ENV


def test_add_list_and_drain(aws, pg, capsys):
    from chalicelib.models import HOST_DRAINING, HostRecord
    from tools.ops import hostctl

    args = ["add", "--id", "pg-1", "--hostname", pg.host, "--port", str(pg.port)]
    args += ["--credentials", f"env:{ADMIN_ENV}", "--capacity", "50", "--sslmode", "disable"]
    assert hostctl.main(args + ["--region", "eu-west-1"]) == 0
    assert "host pg-1 added" in capsys.readouterr().out
    assert hostctl.main(args[:-4] + ["--capacity", "60", "--sslmode", "disable"]) == 0  # again: an update
    assert HostRecord.get("pg-1").capacity == 60
    assert HostRecord.get("pg-1").region == "eu-west-1"  # an update without --region keeps it
    capsys.readouterr()

    assert hostctl.main(["list"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["ID", "STATUS", "REGION", "ALLOCATED", "CAPACITY", "ENDPOINT"]
    assert out[1].split() == ["pg-1", "ACTIVE", "eu-west-1", "0", "60", f"{pg.host}:{pg.port}"]

    assert hostctl.main(["drain", "--id", "pg-1"]) == 0
    assert HostRecord.get("pg-1").status == HOST_DRAINING
    assert hostctl.main(["drain", "--id", "nope"]) == 1


def test_add_refuses_a_host_it_cannot_log_in_to(aws, pg, capsys, instapg_env):
    import json

    from chalicelib.models import HostRecord
    from tools.ops import hostctl

    instapg_env.setenv("WRONG_ADMIN", json.dumps({"username": pg.admin_user, "password": "wrong-password"}))
    code = hostctl.main(
        ["add", "--id", "pg-2", "--hostname", pg.host, "--port", str(pg.port), "--credentials", "env:WRONG_ADMIN"]
        + ["--capacity", "5", "--sslmode", "disable"]
    )
    err = capsys.readouterr().err
    assert code == 1
    assert err.startswith("host pg-2 not added: cannot connect to") and "wrong-password" not in err
    assert HostRecord.count() == 0
