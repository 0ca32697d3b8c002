"""The `instapg` client against a real local stack over HTTP (the app served by chalice local, moto, Postgres)."""

from __future__ import annotations

import json
import threading
from datetime import UTC, datetime

import psycopg
import pytest
from instapg_cli import envfile
from instapg_cli.cli import main
from instapg_cli.seed import statements


@pytest.fixture(scope="session")
def http_app():
    """The app on a free port on 127.0.0.1, as `chalice local` serves it, in this process.

    One server for the session (chalice patches the app's class once); each
    test's moto and environment apply to it because they live in this process.
    """
    from chalice.config import Config
    from chalice.local import ChaliceRequestHandler, CustomLocalChalice, LocalChalice, LocalDevServer

    from app import app
    from tools.dev.pgserver import free_port

    class QuietHandler(ChaliceRequestHandler):
        def log_message(self, *args) -> None:  # the access log would mix into the client's stderr
            pass

    # What chalice.local.create_local_server does, with a quiet handler; once
    # per process (the claim page's browser test may have done it already).
    if not isinstance(app, CustomLocalChalice):
        CustomLocalChalice.__bases__ = (LocalChalice, app.__class__)
        app.__class__ = CustomLocalChalice
    port = free_port()
    config = Config.create(chalice_stage="dev", chalice_app=app)
    httpd = LocalDevServer(app, config, "127.0.0.1", port, handler_cls=QuietHandler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{port}"
    httpd.shutdown()
    thread.join(timeout=5)


@pytest.fixture
def server(host, http_app):
    return http_app


@pytest.fixture
def run(server, tmp_path, monkeypatch, capsys):
    """Run `instapg ARGS` in an empty folder against the server: (exit code, stdout, stderr)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("INSTAPG_URL", server)
    for name in ("BROWSER", "DISPLAY", "WAYLAND_DISPLAY"):
        monkeypatch.delenv(name, raising=False)

    def invoke(*args: str) -> tuple[int, str, str]:
        code = main(list(args))
        out, err = capsys.readouterr()
        return code, out, err

    return invoke


def _records() -> int:
    from chalicelib.models import DatabaseRecord

    return sum(1 for _ in DatabaseRecord.scan())


def test_writes_env_whose_url_connects(run, tmp_path):
    code, out, _ = run("--yes")
    assert code == 0, out
    env = envfile.read(tmp_path / ".env")
    assert set(env) == {
        "DATABASE_URL",
        "DATABASE_URL_DIRECT",
        "PUBLIC_POSTGRES_CLAIM_URL",
        "DATABASE_URL_CREATOR_TOKEN",
    }
    text = (tmp_path / ".env").read_text()
    assert text.startswith("# instapg database ") and "expires 20" in text.splitlines()[0]
    assert env["PUBLIC_POSTGRES_CLAIM_URL"] in text.splitlines()[0]
    with psycopg.connect(env["DATABASE_URL"]) as conn:
        conn.execute("CREATE TABLE t (id int)")
        assert conn.execute("SELECT current_user = current_database()").fetchone() == (True,)
    with psycopg.connect(env["DATABASE_URL_DIRECT"]) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)


def test_existing_key_is_not_overwritten(run, tmp_path):
    original = "# mine\nDATABASE_URL=postgresql://me@elsewhere/db\n"
    (tmp_path / ".env").write_text(original)
    code, out, _ = run("--yes")
    assert code == 0
    assert "DATABASE_URL already exists in .env; not creating a database." in out
    assert (tmp_path / ".env").read_text() == original
    assert _records() == 0


def test_options_env_key_prefix_and_append(run, tmp_path):
    target = tmp_path / "config" / "app.env"
    target.parent.mkdir()
    target.write_text("OTHER=1")  # no final newline
    code, _, _ = run("--yes", "--env", str(target), "--key", "PG_URL", "--prefix", "VITE_", "--ref", "my-app")
    assert code == 0
    env = envfile.read(target)
    assert env["OTHER"] == "1"
    assert {"PG_URL", "PG_URL_DIRECT", "VITE_POSTGRES_CLAIM_URL"} <= set(env)
    from chalicelib.models import DatabaseRecord

    assert [r.ref for r in DatabaseRecord.scan()] == ["my-app"]


def test_json_prints_the_answer_and_writes_nothing(run, tmp_path):
    import json

    code, out, _ = run("--json", "--yes")
    assert code == 0
    body = json.loads(out)
    assert body["status"] == "UNCLAIMED" and body["connection_string"].startswith("postgresql://")
    assert not (tmp_path / ".env").exists()


SEED = """-- schema for the app; semicolons; in comments; are fine
CREATE TABLE notes (id serial PRIMARY KEY, body text NOT NULL DEFAULT 'a;b');
/* a block comment; with a semicolon */
CREATE FUNCTION add_note(t text) RETURNS int LANGUAGE plpgsql AS $$
DECLARE
  new_id int;
BEGIN
  INSERT INTO notes (body) VALUES (t) RETURNING id INTO new_id;
  RETURN new_id;
END;
$$;
SELECT add_note('first; note');
"""


def test_seed_applies_a_file_with_a_plpgsql_function(run, tmp_path):
    (tmp_path / "schema.sql").write_text(SEED)
    code, out, err = run("--yes", "--seed", "schema.sql")
    assert code == 0, err
    assert "Seeded from schema.sql: 3 statements." in out
    with psycopg.connect(envfile.read(tmp_path / ".env")["DATABASE_URL"]) as conn:
        assert conn.execute("SELECT body FROM notes").fetchall() == [("first; note",)]
        assert conn.execute("SELECT add_note('second')").fetchone() == (2,)


@pytest.mark.parametrize(
    ("bad", "sqlstate"),
    [
        ("SELECT 1 / 0;", "22012"),  # fails while running: no position from Postgres
        ("INSERT INTO nosuch VALUES (1);", "42P01"),  # Postgres points at the table
        ("CREATE TABLE broken (id int,);", "42601"),  # syntax error
    ],
)
def test_a_failing_seed_statement_is_reported_with_its_line(run, tmp_path, bad, sqlstate):
    (tmp_path / "schema.sql").write_text(SEED + "\n-- then\n" + bad + "\nCREATE TABLE after_it (id int);\n")
    line = SEED.count("\n") + 3
    code, _, err = run("--yes", "--seed", "schema.sql")
    assert code == 1
    assert f"schema.sql:{line}:" in err
    assert f"SQLSTATE {sqlstate}" in err
    assert f"in the statement at line {line}: {bad}" in err
    # One transaction: nothing of the seed stayed.
    with psycopg.connect(envfile.read(tmp_path / ".env")["DATABASE_URL"]) as conn:
        assert conn.execute("SELECT to_regclass('notes'), to_regclass('after_it')").fetchone() == (None, None)
    # Fixed file, applied with `instapg seed` to the database already in .env.
    (tmp_path / "schema.sql").write_text(SEED)
    code, out, _ = run("seed", "schema.sql")
    assert code == 0 and "3 statements" in out


def test_server_errors_are_one_line_with_the_hint(run, tmp_path, host):
    host.update(actions=[type(host).allocated.set(int(host.capacity))])
    code, out, err = run("--yes")
    assert code == 4  # temporary: retry later
    assert err.count("\n") == 1
    assert err.startswith("instapg: No capacity (HTTP 503). Every database host is full")
    assert "Retry-After: 60s" in err
    assert not (tmp_path / ".env").exists()


def test_a_bad_request_is_one_line(run):
    code, _, err = run("--yes", "--ref", "")
    assert code == 1
    assert err.startswith("instapg: Missing referrer (HTTP 400). ") and err.count("\n") == 1


def test_unreachable_server(run, monkeypatch):
    from tools.dev.pgserver import free_port

    code, _, err = run("--yes", "--url", f"http://127.0.0.1:{free_port()}")
    assert code == 4
    assert err.startswith("instapg: cannot reach http://127.0.0.1:") and "make dev" in err
    assert err.count("\n") == 1


def test_status_and_claim(run, tmp_path):
    run("--yes")
    code, out, _ = run("status")
    assert code == 0
    assert "status       UNCLAIMED" in out
    assert "expires      at 20" in out and "(in 71h" in out
    assert "size         not measured yet (limit 100 MB)" in out
    assert "transfer     0 bytes in, 0 bytes out in " in out and "(limit 1.0 GB), through the pooler" in out
    claim_url = envfile.read(tmp_path / ".env")["PUBLIC_POSTGRES_CLAIM_URL"]
    code, out, _ = run("claim")  # no display: prints instead of opening
    assert code == 0
    assert out.strip() == f"Open this URL to claim the database: {claim_url}"


def test_status_without_env_says_what_to_do(run):
    code, _, err = run("status")
    assert code == 2
    assert err == (
        "instapg: no PUBLIC_POSTGRES_CLAIM_URL in .env: run `instapg` first (or pass --env/--prefix, or a database id)\n"
    )


def test_seed_without_psycopg_says_how_to_install_it(run, tmp_path, monkeypatch):
    import sys

    (tmp_path / "schema.sql").write_text("SELECT 1;")
    run("--yes")
    monkeypatch.setitem(sys.modules, "psycopg", None)  # as if not installed
    code, _, err = run("seed", "schema.sql")
    assert code == 3
    assert "pip install 'instapg[seed]'" in err


def test_statement_boundaries():
    sql = "SELECT 'a;b'; -- c;\nSELECT $x$ ; $x$;\n/* ; /* ; */ ; */ SELECT E'\\';';\nSELECT \"q;\" FROM t"
    texts = [s.text for s in statements(sql)]
    assert texts == ["SELECT 'a;b';", "SELECT $x$ ; $x$;", "SELECT E'\\';';", 'SELECT "q;" FROM t']


def test_logical_replication_is_asked_for(run, tmp_path):
    # The test host offers none, so the server's 422 comes back as one line.
    code, _, err = run("--yes", "--logical-replication")
    assert code == 1
    assert err.startswith("instapg: Logical replication is not available on this deployment (HTTP 422). ")
    assert not (tmp_path / ".env").exists()


# -- issue 17: the complete CLI ---------------------------------------------------------


def test_seed_without_psycopg_creates_nothing(run, tmp_path, monkeypatch):
    import sys

    (tmp_path / "schema.sql").write_text("SELECT 1;")
    monkeypatch.setitem(sys.modules, "psycopg", None)  # as if not installed
    code, _, err = run("--yes", "--seed", "schema.sql")
    assert code == 3
    assert "pip install 'instapg[seed]'" in err
    assert not (tmp_path / ".env").exists()
    assert _records() == 0  # checked before the database was asked for


def test_status_shows_the_size_the_server_measured(run, tmp_path):
    from datetime import UTC, datetime

    from chalicelib.models import DatabaseRecord

    run("--yes")
    database_id = envfile.read(tmp_path / ".env")["PUBLIC_POSTGRES_CLAIM_URL"].rsplit("/", 1)[1]
    record = DatabaseRecord.get(database_id)
    record.update(
        actions=[DatabaseRecord.size_bytes.set(1572864), DatabaseRecord.size_checked_at.set(datetime.now(UTC))]
    )
    code, out, _ = run("status")
    assert code == 0
    assert "size         1.5 MB at 20" in out and "(limit 100 MB)" in out
    code, out, _ = run("status", "--json")
    assert code == 0 and json.loads(out)["quota"]["size_bytes"] == 1572864


def _api_key(server: str) -> str:
    from instapg_cli.api import _request

    return _request("POST", f"{server}/api/v1/accounts", {"email": "cli@example.com"}, 30)[1]["api_key"]


def test_account_commands_status_list_usage_rotate_delete(run, server, tmp_path, monkeypatch):
    from instapg_cli.api import _request

    from chalicelib import context, metering, usage
    from chalicelib.clock import Deadline

    key = _api_key(server)
    (tmp_path / ".env").write_text("# mine\nOTHER=1\n")
    assert run("--yes")[0] == 0
    before = envfile.read(tmp_path / ".env")
    database_id = before["PUBLIC_POSTGRES_CLAIM_URL"].rsplit("/", 1)[1]
    _request("POST", f"{server}/api/v1/database/{database_id}/claim", {}, 30, key)

    monkeypatch.setenv("INSTAPG_API_KEY", key)
    with psycopg.connect(before["DATABASE_URL_DIRECT"]):  # one open session, seen by status
        code, out, _ = run("status")
    assert code == 0, out
    assert "status       CLAIMED" in out and "expires      never (claimed)" in out
    assert "connections  1 open (limit " in out
    assert " now (limit " in out  # the owner's live size

    code, out, _ = run("list")
    assert code == 0 and database_id in out and "CLAIMED" in out
    code, out, _ = run("list", "--json")
    assert [d["id"] for d in json.loads(out)["databases"]] == [database_id]

    with psycopg.connect(before["DATABASE_URL_DIRECT"]):  # one session in the job's sample
        metering.run(context.get(), Deadline.after(30))
    code, out, _ = run("usage")
    today = next(line.split() for line in out.splitlines() if line.startswith(usage.day_key(datetime.now(UTC))))
    assert code == 0 and today[3] == "1" and today[1:3] != ["-"]  # size "7.3 MB", 1 connection at peak
    assert "through the pooler" in out
    code, out, _ = run("usage", "--json")
    days = json.loads(out)["usage"]
    assert len(days) == usage.KEEP_DAYS and days[-1]["connections_peak"] == 1 and days[-1]["size_bytes"] > 0

    code, out, _ = run("rotate")
    assert code == 0 and "updated DATABASE_URL and DATABASE_URL_DIRECT in .env" in out
    after = envfile.read(tmp_path / ".env")
    assert after["DATABASE_URL"] != before["DATABASE_URL"] and after["OTHER"] == "1"
    assert (tmp_path / ".env").read_text().startswith("# mine\nOTHER=1\n")
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(before["DATABASE_URL_DIRECT"], connect_timeout=5).close()
    with psycopg.connect(after["DATABASE_URL_DIRECT"]) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)

    code, out, _ = run("delete", "--yes")
    assert code == 0 and out.startswith(f"Deleted database {database_id}.")
    code, _, err = run("status")
    assert code == 1 and "Database deleted (HTTP 410)" in err
    code, out, _ = run("delete", database_id, "--yes", "--json")
    assert code == 1 and json.loads(out)["http_status"] == 410


def test_account_commands_need_a_key(run, monkeypatch):
    monkeypatch.delenv("INSTAPG_API_KEY", raising=False)
    some_id = "2b929341-cbab-40c2-bdaa-8880ffbe4ac4"
    for command in (["list"], ["rotate", some_id], ["delete", "--yes"], ["usage", some_id]):
        code, _, err = run(*command)
        assert code == 2, command
        assert "--api-key" in err or "run `instapg` first" in err


def test_json_on_every_command(run, tmp_path):
    (tmp_path / "schema.sql").write_text("CREATE TABLE t (id int);")
    code, out, _ = run("--yes", "--json", "--seed", "schema.sql")
    body = json.loads(out)
    assert code == 0 and body["seed"] == {"file": "schema.sql", "statements": 1}
    assert body["connection_string"].startswith("postgresql://")
    envfile.append(tmp_path / ".env", [f"PUBLIC_POSTGRES_CLAIM_URL={body['claim_url']}"])
    envfile.append(tmp_path / ".env", [f"DATABASE_URL={body['connection_string']}"])

    code, out, _ = run("status", "--json")
    assert code == 0 and json.loads(out)["id"] == body["id"]
    code, out, _ = run("claim", "--json")
    assert code == 0 and json.loads(out) == {"claim_url": body["claim_url"], "opened": False}
    code, out, _ = run("claim", body["id"], "--no-browser")
    assert code == 0 and out.strip().endswith(body["claim_url"])
    code, out, _ = run("seed", "schema.sql", "--json")  # the table exists now: a failure, as JSON
    failure = json.loads(out)
    assert code == 1 and failure["exit_code"] == 1 and "SQLSTATE 42P07" in failure["error"]
    code, out, _ = run("status", "not-an-id", "--json")
    assert code == 2 and "is not a database id" in json.loads(out)["error"]


def test_a_large_seed_shows_a_progress_line(run, tmp_path):
    big = tmp_path / "big.sql"
    rows = ",".join(f"({i}, '{'x' * 100}')" for i in range(11000))  # about 1.2 MB
    big.write_text(f"CREATE TABLE big (id int, pad text);\nINSERT INTO big VALUES {rows};\n")
    small = tmp_path / "small.sql"
    small.write_text("SELECT 1;")
    code, out, err = run("--yes", "--seed", "small.sql")
    assert code == 0 and "Seeding" not in err
    code, out, err = run("seed", "big.sql")
    assert code == 0, err
    lines = err.splitlines()
    assert lines[0] == "Seeding big.sql (1.2 MB): started"
    assert lines[1].startswith("Seeding big.sql (1.2 MB): done in ")
    assert out == "Seeded from big.sql: 2 statements.\n"


# -- the creator token: the CLI deletes its own unclaimed database without an API key --------


def _token_line_pair(text: str) -> tuple[str, str]:
    lines = text.splitlines()
    (i,) = [n for n, line in enumerate(lines) if line.startswith("DATABASE_URL_CREATOR_TOKEN=")]
    return lines[i - 1], lines[i]


def test_creator_token_in_env_deletes_the_unclaimed_database(run, server, tmp_path, monkeypatch):
    from instapg_cli.api import Client

    monkeypatch.delenv("INSTAPG_API_KEY", raising=False)
    code, out, _ = run("--yes")
    assert code == 0
    assert "PUBLIC_POSTGRES_CLAIM_URL and DATABASE_URL_CREATOR_TOKEN to .env." in out
    env = envfile.read(tmp_path / ".env")
    database_id = env["PUBLIC_POSTGRES_CLAIM_URL"].rsplit("/", 1)[1]
    comment, line = _token_line_pair((tmp_path / ".env").read_text())
    assert comment.startswith("# DATABASE_URL_CREATOR_TOKEN is a secret: it deletes this database")
    assert line == f"DATABASE_URL_CREATOR_TOKEN={env['DATABASE_URL_CREATOR_TOKEN']}"
    assert env["DATABASE_URL_CREATOR_TOKEN"].startswith("ipgc_")

    code, out, err = run("delete", "--yes", "--json")
    assert code == 0, err
    assert json.loads(out) == {"id": database_id, "deleted": True, "with": "creator_token"}
    with pytest.raises(Exception) as gone:
        Client(server).get(database_id)
    assert gone.value.status == 410
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(env["DATABASE_URL_DIRECT"], connect_timeout=5).close()
    code, _, err = run("status")
    assert code == 1 and "(HTTP 410)" in err


def test_a_wrong_creator_token_is_refused(run, server, tmp_path, monkeypatch):
    from instapg_cli.api import Client

    monkeypatch.delenv("INSTAPG_API_KEY", raising=False)
    assert run("--yes")[0] == 0
    env = envfile.read(tmp_path / ".env")
    database_id = env["PUBLIC_POSTGRES_CLAIM_URL"].rsplit("/", 1)[1]
    envfile.replace(tmp_path / ".env", {"DATABASE_URL_CREATOR_TOKEN": "ipgc_" + "A" * 43})
    code, out, err = run("delete", "--yes")
    assert code == 1
    assert err.startswith("instapg: Creator token does not match (HTTP 403). ") and err.count("\n") == 1
    assert env["DATABASE_URL_CREATOR_TOKEN"] not in err + out
    assert Client(server).get(database_id)["status"] == "UNCLAIMED"
    with psycopg.connect(env["DATABASE_URL_DIRECT"]) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)


def test_the_token_belongs_to_the_database_in_env_and_never_gets_the_public_prefix(run, server, tmp_path, monkeypatch):
    from instapg_cli.api import Client

    monkeypatch.delenv("INSTAPG_API_KEY", raising=False)
    code, _, _ = run("--yes", "--key", "PG_URL", "--prefix", "VITE_")
    assert code == 0
    env = envfile.read(tmp_path / ".env")
    # VITE_/PUBLIC_ variables end up in browser bundles: the secret is named after the database's key.
    assert "PG_URL_CREATOR_TOKEN" in env and not [k for k in env if k.startswith("VITE_") and "TOKEN" in k]
    # Another database's id: this .env's token is not sent for it, and without a key that is a usage error.
    other = Client(server).create("someone-else")
    code, _, err = run("delete", other["id"], "--yes", "--key", "PG_URL", "--prefix", "VITE_")
    assert code == 2 and "creator token" in err and "--api-key" in err
    assert Client(server).get(other["id"])["status"] == "UNCLAIMED"
    code, out, _ = run("delete", "--yes", "--key", "PG_URL", "--prefix", "VITE_")
    assert code == 0 and out.startswith("Deleted database ")


def test_a_claimed_database_needs_the_owners_key(run, server, tmp_path, monkeypatch):
    from instapg_cli.api import _request

    monkeypatch.delenv("INSTAPG_API_KEY", raising=False)
    key = _api_key(server)
    assert run("--yes")[0] == 0
    database_id = envfile.read(tmp_path / ".env")["PUBLIC_POSTGRES_CLAIM_URL"].rsplit("/", 1)[1]
    _request("POST", f"{server}/api/v1/database/{database_id}/claim", {}, 30, key)
    code, _, err = run("delete", "--yes")  # the creator token no longer deletes it
    assert code == 1 and "Database is claimed (HTTP 409)" in err
    code, out, _ = run("delete", "--yes", "--json", "--api-key", key)
    assert code == 0 and json.loads(out) == {"id": database_id, "deleted": True, "with": "api_key"}


def test_claim_with_a_key_sends_the_creator_token_from_env(run, server, tmp_path, monkeypatch, instapg_env):
    from chalicelib import context, records

    monkeypatch.delenv("INSTAPG_API_KEY", raising=False)
    instapg_env.setenv("INSTAPG_CLAIM_REQUIRES_TOKEN", "true")  # the id alone no longer claims
    context.reset()
    assert run("--yes")[0] == 0
    env = envfile.read(tmp_path / ".env")
    database_id = env["PUBLIC_POSTGRES_CLAIM_URL"].rsplit("/", 1)[1]
    key = _api_key(server)
    envfile.replace(tmp_path / ".env", {"DATABASE_URL_CREATOR_TOKEN": "ipgc_" + "A" * 43})
    code, _, err = run("claim", "--api-key", key)
    assert code == 1 and "Creator token does not match (HTTP 403)" in err
    assert records.find(database_id).status == "UNCLAIMED"
    envfile.replace(tmp_path / ".env", {"DATABASE_URL_CREATOR_TOKEN": env["DATABASE_URL_CREATOR_TOKEN"]})
    code, out, err = run("claim", "--api-key", key, "--json")
    assert code == 0, err
    assert json.loads(out) == {"id": database_id, "status": "CLAIMED", "with_creator_token": True}
    assert records.find(database_id).status == "CLAIMED"


def test_copy_and_reset(run, server, tmp_path, monkeypatch):
    from instapg_cli.api import _request

    key = _api_key(server)
    (tmp_path / "schema.sql").write_text("CREATE TABLE t (v text); INSERT INTO t VALUES ('source');")
    assert run("--yes", "--seed", "schema.sql")[0] == 0
    source = envfile.read(tmp_path / ".env")
    database_id = source["PUBLIC_POSTGRES_CLAIM_URL"].rsplit("/", 1)[1]
    monkeypatch.setenv("INSTAPG_API_KEY", key)
    code, _, err = run("copy")
    assert code == 1 and "Unclaimed databases cannot be copied (HTTP 409)" in err
    _request("POST", f"{server}/api/v1/database/{database_id}/claim", {}, 30, key)

    code, out, _ = run("copy")
    assert code == 0 and "wrote DATABASE_URL_COPY and DATABASE_URL_COPY_DIRECT to .env" in out, out
    copied = envfile.read(tmp_path / ".env")
    assert copied["DATABASE_URL"] == source["DATABASE_URL"]  # the source's lines stay
    with psycopg.connect(copied["DATABASE_URL_COPY"]) as conn:
        assert conn.execute("SELECT v FROM t").fetchall() == [("source",)]
        conn.execute("DELETE FROM t")
    code, _, err = run("copy")  # the variable is taken: nothing is made
    assert code == 2 and "--as" in err
    copy_id = out.split(" to ", 1)[1].split(";", 1)[0].split()[0]  # "<id> in <region>; wrote ..."
    assert out.split(";", 1)[0].endswith(f"{copy_id} in {server_region()}")  # a copy lives by its source
    code, out, _ = run("reset", copy_id, "--yes", "--json")
    assert code == 0 and json.loads(out)["source_id"] == database_id
    with psycopg.connect(copied["DATABASE_URL_COPY"]) as conn:
        assert conn.execute("SELECT v FROM t").fetchall() == [("source",)]


def server_region() -> str:
    from chalicelib import context

    return context.get().settings.default_region


def test_a_region_is_asked_for_and_every_output_names_it(run, server, service, second_host, tmp_path, monkeypatch):
    from instapg_cli.api import _request

    from tests.test_multihost import _host_of, _set_host

    _set_host(service, "local-2", region="eu-west-1")
    code, out, _ = run("--yes", "--region", "eu-west-1")
    assert code == 0 and "The database in eu-west-1 expires at 20" in out, out
    env = envfile.read(tmp_path / ".env")
    database_id = env["PUBLIC_POSTGRES_CLAIM_URL"].rsplit("/", 1)[1]
    assert _host_of(database_id) == "local-2"
    assert (tmp_path / ".env").read_text().startswith(f"# instapg database {database_id} in eu-west-1: expires")
    code, out, _ = run("status")
    assert code == 0 and "region       eu-west-1" in out.splitlines()
    key = _api_key(server)
    _request("POST", f"{server}/api/v1/database/{database_id}/claim", {}, 30, key)
    monkeypatch.setenv("INSTAPG_API_KEY", key)
    code, out, _ = run("list")
    row = next(line for line in out.splitlines() if line.startswith(database_id))
    assert code == 0 and row.split()[3] == "eu-west-1" and out.splitlines()[0].split()[3] == "REGION"
    code, out, err = run("--yes", "--region", "mars-1", "--env", "other.env")
    assert code == 1 and "Unknown region 'mars-1' (HTTP 422)" in err, err
