"""tools/ops/hostctl.py, the multi-host parts: activate after drain, remove a drained empty host."""

from __future__ import annotations

from tests.conftest import post_json


def test_activate_undoes_drain(host, capsys):
    from chalicelib.models import HOST_ACTIVE, HOST_DRAINING, HostRecord
    from tools.ops import hostctl

    assert hostctl.main(["drain", "--id", "local-1"]) == 0
    assert HostRecord.get("local-1").status == HOST_DRAINING
    assert hostctl.main(["activate", "--id", "local-1"]) == 0
    assert HostRecord.get("local-1").status == HOST_ACTIVE
    assert hostctl.main(["activate", "--id", "nope"]) == 1
    assert "no host nope" in capsys.readouterr().err


def test_remove_only_a_drained_empty_host(client, host, capsys):
    from chalicelib.models import HostRecord
    from tools.ops import hostctl

    assert post_json(client, "/api/v1/database", {"ref": "cli"}).status_code == 201
    assert hostctl.main(["remove", "--id", "local-1"]) == 1
    assert "drain it first" in capsys.readouterr().err
    hostctl.main(["drain", "--id", "local-1"])
    assert hostctl.main(["remove", "--id", "local-1"]) == 1
    assert "still carries 1 database(s)" in capsys.readouterr().err
    assert HostRecord.count() == 1

    HostRecord(id="local-1").update(actions=[HostRecord.allocated.set(0)])  # as if it had expired
    assert hostctl.main(["remove", "--id", "local-1"]) == 0
    assert HostRecord.count() == 0
    assert hostctl.main(["remove", "--id", "local-1"]) == 1
    assert "no host local-1" in capsys.readouterr().err


def test_add_with_logical_replication_needs_the_gateways_endpoint(host, pg, capsys):
    from chalicelib.models import HostRecord
    from tests.conftest import ADMIN_ENV
    from tools.ops import hostctl

    common = ["add", "--id", "local-r", "--hostname", pg.host, "--port", str(pg.port), "--credentials",
              f"env:{ADMIN_ENV}", "--capacity", "5", "--sslmode", "disable", "--logical-replication"]  # fmt: skip
    assert hostctl.main(common) == 2
    assert "--replication-endpoint" in capsys.readouterr().err
    assert hostctl.main([*common, "--replication-endpoint", "gw.example.com:5434"]) == 0
    assert "must be reachable only from inside the VPC" in capsys.readouterr().out
    saved = HostRecord.get("local-r")
    assert (saved.replication_hostname, saved.replication_port) == ("gw.example.com", 5434)
    assert hostctl.main(["list"]) == 0
    assert "replication gw.example.com:5434" in capsys.readouterr().out
