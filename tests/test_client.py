"""The `instapg` client against a real local stack over HTTP (the app served by chalice local, moto, Postgres)."""

from __future__ import annotations

import threading

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
    from tools.pgserver import free_port

    class QuietHandler(ChaliceRequestHandler):
        def log_message(self, *args) -> None:  # the access log would mix into the client's stderr
            pass

    # What chalice.local.create_local_server does, with a quiet handler.
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
    assert set(env) == {"DATABASE_URL", "DATABASE_URL_DIRECT", "PUBLIC_POSTGRES_CLAIM_URL"}
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
    assert code == 1
    assert err.count("\n") == 1
    assert err.startswith("instapg: No capacity (HTTP 503). Every database host is full")
    assert "Retry-After: 60s" in err
    assert not (tmp_path / ".env").exists()


def test_a_bad_request_is_one_line(run):
    code, _, err = run("--yes", "--ref", "")
    assert code == 1
    assert err.startswith("instapg: Missing referrer (HTTP 400). ") and err.count("\n") == 1


def test_unreachable_server(run, monkeypatch):
    from tools.pgserver import free_port

    code, _, err = run("--yes", "--url", f"http://127.0.0.1:{free_port()}")
    assert code == 1
    assert err.startswith("instapg: cannot reach http://127.0.0.1:") and "make dev" in err
    assert err.count("\n") == 1


def test_status_and_claim(run, tmp_path):
    run("--yes")
    code, out, _ = run("status")
    assert code == 0
    assert "status    UNCLAIMED" in out
    assert "expires   at 20" in out and "(in 71h" in out
    claim_url = envfile.read(tmp_path / ".env")["PUBLIC_POSTGRES_CLAIM_URL"]
    code, out, _ = run("claim")  # no display: prints instead of opening
    assert code == 0
    assert out.strip() == f"Open this URL to claim the database: {claim_url}"


def test_status_without_env_says_what_to_do(run):
    code, _, err = run("status")
    assert code == 1
    assert err == "instapg: no PUBLIC_POSTGRES_CLAIM_URL in .env: run `instapg` first (or pass --env/--prefix)\n"


def test_seed_without_psycopg_says_how_to_install_it(run, tmp_path, monkeypatch):
    import sys

    (tmp_path / "schema.sql").write_text("SELECT 1;")
    run("--yes")
    monkeypatch.setitem(sys.modules, "psycopg", None)  # as if not installed
    code, _, err = run("seed", "schema.sql")
    assert code == 1
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
