"""The production pooler as code (issue 14 §7): the host's tenant table, the sync loop, the container's entrypoint.

The entrypoint (infra/pooler/entrypoint.sh) runs for real with Debian's PgBouncer
(1.18 here; the image has 1.24): config rendering, TLS required from clients,
the admin console only through the admin port, the sync loop rendering the
tenants the service writes to the embedded Postgres. Refusals by SQLSTATE.
"""

from __future__ import annotations

import ast
import dataclasses
import datetime
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest
from psycopg import sql

from tests.pgwire import login_sqlstate

ROOT = Path(__file__).resolve().parent.parent
POOLER_REFUSED = "08P01"  # PgBouncer refuses the logins it decides itself with 08P01
ADMIN_USER = "instapg_pooler"


def _self_signed(tmp: Path) -> tuple[str, str]:
    """A certificate and key for 127.0.0.1 (PEM), as the pooler secret would hold them."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "pooler.test")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()
    return cert.public_bytes(serialization.Encoding.PEM).decode(), key_pem


@dataclass
class Task:
    """One run of the container's entrypoint."""

    process: subprocess.Popen
    env: dict
    state_dir: Path
    port: int
    admin_port: int

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()


def _wait_port(port: int, process: subprocess.Popen, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, f"entrypoint exited with {process.returncode}"
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise AssertionError(f"nothing listens on {port}")


@pytest.fixture(scope="module")
def target(pg):
    from chalicelib import postgres

    return postgres.Target(pg.host, pg.port, pg.admin_user, pg.admin_password, "postgres", "disable")


@pytest.fixture(scope="module")
def task_env(pg, target):
    """The host set up for a table-backed pooler, and the environment ECS would give the task."""
    from chalicelib import poolerstore
    from tools.dev import pgbouncer as local_pgbouncer
    from tools.dev import pgserver

    if local_pgbouncer.binary() is None:
        pytest.skip("pgbouncer is not installed (make test installs it: tools/dev/install-pgbouncer.sh)")
    sync_password = secrets.token_urlsafe(24)
    poolerstore.setup(target, sync_password)
    root = pgserver.private_dir("instapg-poolerprod-")
    user = pgserver._system_user()
    # PgBouncer refuses root: as root the task's `pgbouncer` drops to the embedded server's user, as the image's USER does.
    bindir = root / "bin"
    bindir.mkdir()
    real = local_pgbouncer.binary()
    wrapper = bindir / "pgbouncer"
    if user:
        import pwd

        entry = pwd.getpwnam(user)
        wrapper.write_text(
            f'#!/bin/sh\nexec setpriv --reuid={entry.pw_uid} --regid={entry.pw_gid} --clear-groups {real} "$@"\n'
        )
    else:
        wrapper.write_text(f'#!/bin/sh\nexec {real} "$@"\n')
    wrapper.chmod(0o755)
    cert, key = _self_signed(root)
    env = {
        **os.environ,
        "PATH": f"{bindir}:{os.environ['PATH']}",
        "INSTAPG_PYTHON": sys.executable,
        "INSTAPG_POOLER_ADMIN_USER": ADMIN_USER,
        "INSTAPG_POOLER_ADMIN_PASSWORD": secrets.token_urlsafe(24),
        # Clients here come from 127.0.0.1 too: the forwarder connects from another loopback address.
        "INSTAPG_POOLER_ADMIN_FROM": "127.0.0.2",
        "INSTAPG_POOLER_ADMIN_LISTEN": "127.0.0.1",
        "INSTAPG_POOLER_TLS_CERT_PEM": cert,
        "INSTAPG_POOLER_TLS_KEY_PEM": key,
        "INSTAPG_POOLER_SERVER_TLS_SSLMODE": "disable",  # the embedded server has no TLS; production: verify-full
        "PGHOST": pg.host,
        "PGPORT": str(pg.port),
        "PGUSER": poolerstore.SYNC_ROLE,
        "PGPASSWORD": sync_password,
        "PGDATABASE": poolerstore.DBNAME,
        "PGSSLMODE": "disable",
    }
    yield env, root, user
    shutil.rmtree(root, ignore_errors=True)


def _start_task(task_env, name: str) -> Task:
    from tools.dev import pgserver

    env, root, user = task_env
    state = root / name
    state.mkdir(mode=0o700)
    pgserver._chown(state, user)
    port, admin_port = pgserver.free_port(), pgserver.free_port()
    env = {
        **env,
        "INSTAPG_POOLER_STATE_DIR": str(state),
        "INSTAPG_POOLER_PORT": str(port),
        "INSTAPG_POOLER_ADMIN_PORT": str(admin_port),
    }
    process = subprocess.Popen(
        ["bash", str(ROOT / "infra" / "pooler" / "entrypoint.sh")],
        cwd=ROOT,
        env=env,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
    )
    _wait_port(port, process)
    _wait_port(admin_port, process)
    return Task(process, env, state, port, admin_port)


@pytest.fixture(scope="module")
def task(task_env):
    running = _start_task(task_env, "task1")
    yield running
    running.stop()


@pytest.fixture(scope="module")
def bouncer(task, target):
    """The service's view of the task: public and admin endpoints over TLS, tenants in the host's table."""
    from chalicelib import pooler, poolerstore

    return pooler.Pooler(
        "127.0.0.1",
        task.port,
        ADMIN_USER,
        task.env["INSTAPG_POOLER_ADMIN_PASSWORD"],
        poolerstore.TableStore(target),
        admin_port=task.admin_port,
        sslmode="require",
    )


@pytest.fixture
def make_tenant(pg, target, bouncer):
    from chalicelib import pooler, postgres, provisioning
    from chalicelib.identifiers import tenant_name, tenant_password
    from chalicelib.settings import TRIAL_PLAN, load

    made = []
    prefix = "ipgprod" + secrets.token_hex(2)

    def make() -> tuple[pooler.Tenant, str]:
        name, password = tenant_name(prefix), tenant_password()
        verifier = postgres.scram_verifier(password)
        plan = dataclasses.replace(load({}).plan(TRIAL_PLAN), connections=3)
        provisioning.create_tenant(target, name, name, password, plan, verifier=verifier)
        tenant = pooler.Tenant(name, name, verifier, 3, pg.host, pg.port)
        made.append(tenant)
        return tenant, password

    yield make
    for tenant in made:
        # Out of the table (a running task's sync loop drops it), then off Postgres; no task needs to be up.
        bouncer.store.remove(tenant.role, tenant.dbname)
        provisioning.drop_tenant(target, tenant.role, tenant.dbname, keep_claimed=False)


def _connect(url: str, **kwargs) -> psycopg.Connection:
    return psycopg.connect(url, prepare_threshold=None, connect_timeout=10, **kwargs)


# -- the table and its read-only role ---------------------------------------------------------


def test_sync_role_reads_the_tenant_table_and_nothing_else(pg, task_env, target):
    from chalicelib import poolerstore

    env = task_env[0]
    as_sync = dict(host=pg.host, port=pg.port, user=poolerstore.SYNC_ROLE, password=env["PGPASSWORD"])
    with psycopg.connect(dbname=poolerstore.DBNAME, autocommit=True, **as_sync) as conn:
        generation, _ = poolerstore.read(conn)
        assert generation >= 1
        for statement in (
            "INSERT INTO pooler.tenants VALUES ('x', 'x', 'x', 1, 'h', 1)",
            "DELETE FROM pooler.tenants",
            "UPDATE pooler.state SET generation = 0",
            "CREATE TABLE pooler.mine (a int)",
        ):
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute(statement)
    # No other database lets it in (the host's hardening revoked PUBLIC's CONNECT on postgres).
    from chalicelib import provisioning

    provisioning.harden_host(target)
    with pytest.raises(psycopg.OperationalError) as refused:
        psycopg.connect(dbname="postgres", **as_sync).close()
    assert "permission denied" in str(refused.value)
    # Setting up again (a new sync password) keeps the table and its rows.
    poolerstore.setup(target, env["PGPASSWORD"])


def test_table_store_numbers_every_write_and_lists_names(pg, target):
    from chalicelib import pooler, poolerstore, postgres

    store = poolerstore.TableStore(target)
    verifier = postgres.scram_verifier("x" * 20)
    name = "ipgstore_" + secrets.token_hex(4)
    tenant = pooler.Tenant(name, name, verifier, 2, pg.host, pg.port)
    generations = []
    for change in (
        lambda: store.put([tenant]),
        lambda: store.put([dataclasses.replace(tenant, pool_size=4)], only_present=True),
        lambda: store.remove(name, name),
    ):
        change()
        generations.append(store._last)
        if len(generations) == 2:
            assert name in store.databases()
    assert generations == sorted(set(generations)) and name not in store.databases()
    # A rotation of a tenant that is not there does not publish it (a locked tenant stays out).
    store.put([tenant], only_present=True)
    assert name not in store.databases()
    store.remove(name, name)  # idempotent


# -- the task: entrypoint, sync loop, PgBouncer ------------------------------------------------


def test_new_tenant_connects_over_tls_once_publish_returns(make_tenant, bouncer, task):
    tenant, password = make_tenant()
    bouncer.publish(tenant)  # returns when PgBouncer has loaded the sync loop's rendering
    url = bouncer.pooled_url(tenant.role, password, tenant.dbname)
    assert url.endswith("?sslmode=require")
    with _connect(url) as conn:
        assert conn.execute("SELECT current_user").fetchone() == (tenant.role,)
        assert conn.pgconn.ssl_in_use
    with _connect(bouncer.session_url(tenant.role, password, tenant.dbname)) as conn:
        assert conn.execute("SELECT current_database()").fetchone() == (tenant.dbname,)
    # Without TLS the pooler refuses the client (client_tls_sslmode = require).
    assert login_sqlstate(url.replace("sslmode=require", "sslmode=disable")) == POOLER_REFUSED
    # The files the sync loop wrote hold the verifier, never a password.
    from chalicelib import pooler

    auth = (task.state_dir / pooler.AUTH_FILE).read_text()
    assert f'"{tenant.role}" "{tenant.verifier}"' in auth
    assert password not in auth and task.env["INSTAPG_POOLER_ADMIN_PASSWORD"] not in auth
    assert tenant.dbname in bouncer.published()


def test_revoked_tenant_is_refused_and_its_sessions_killed(make_tenant, bouncer):
    tenant, password = make_tenant()
    bouncer.publish(tenant)
    url = bouncer.pooled_url(tenant.role, password, tenant.dbname)
    held = _connect(url, autocommit=True)
    held.execute("SELECT 1")
    bouncer.revoke(tenant.role, tenant.dbname)
    with pytest.raises(psycopg.OperationalError):
        held.execute("SELECT 1")
    held.close()
    assert login_sqlstate(url) == POOLER_REFUSED
    assert tenant.dbname not in bouncer.published()


def test_rotate_refuses_the_old_password_through_the_table(make_tenant, bouncer, target):
    from chalicelib import postgres

    tenant, password = make_tenant()
    bouncer.publish(tenant)
    new_password = secrets.token_urlsafe(24)
    verifier = postgres.scram_verifier(new_password)
    with target.connect() as conn:
        conn.execute(sql.SQL("ALTER ROLE {} PASSWORD {}").format(sql.Identifier(tenant.role), sql.Literal(verifier)))
    bouncer.rotate(dataclasses.replace(tenant, verifier=verifier))
    assert login_sqlstate(bouncer.pooled_url(tenant.role, password, tenant.dbname)) == POOLER_REFUSED
    with _connect(bouncer.pooled_url(tenant.role, new_password, tenant.dbname)) as conn:
        assert conn.execute("SELECT current_user").fetchone() == (tenant.role,)


def test_sync_loop_reconnects_when_the_host_drops_its_connection(make_tenant, bouncer, pg):
    """The host ends the sync loop's session (a failover or restart does the same): it reconnects and goes on."""
    deadline = time.monotonic() + 10  # the loop may still be starting when this test runs first
    with psycopg.connect(pg.superuser_dsn, autocommit=True) as conn:
        while True:
            ended = conn.execute(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
                " WHERE application_name = 'instapg-pooler-sync'"
            ).fetchone()[0]
            if ended or time.monotonic() > deadline:
                break
            time.sleep(0.1)
    assert ended == 1
    tenant, password = make_tenant()
    bouncer.publish(tenant)  # loaded once the loop is back (backoff 0.5 s), within the 5 s apply timeout
    with _connect(bouncer.pooled_url(tenant.role, password, tenant.dbname)) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)


def test_admin_console_only_through_the_admin_port(bouncer, task):
    password = task.env["INSTAPG_POOLER_ADMIN_PASSWORD"]
    admin_url = f"postgresql://{ADMIN_USER}:{password}@127.0.0.1:{{}}/pgbouncer?sslmode=require"
    # The public port (what the NLB forwards) refuses the admin user, password and all.
    assert login_sqlstate(admin_url.format(task.port)) == POOLER_REFUSED
    # The admin port (functions only) lets the service in, over TLS.
    assert any(row["name"] == "pgbouncer" for row in bouncer.admin("SHOW DATABASES"))


# -- what the image is built from ---------------------------------------------------------------


def test_ini_sets_tls_and_the_options_of_the_version_it_runs():
    from tools.pooler import config

    old = config.render_ini(Path("/s"), (1, 18), admin_user=ADMIN_USER, tls_cert="/c", tls_key="/k")
    new = config.render_ini(Path("/s"), (1, 24), admin_user=ADMIN_USER, tls_cert="/c", tls_key="/k")
    for text in (old, new):
        assert "client_tls_sslmode = require\n" in text and "server_tls_sslmode = verify-full\n" in text
        assert "auth_type = hba\n" in text and text.rstrip().endswith("%include /s/databases.ini")
    assert "max_prepared_statements" not in old and "max_prepared_statements = 200\n" in new
    assert "max_user_client_connections = 200\n" in new and "max_db_client_connections = 200\n" in new
    hba = config.render_hba(ADMIN_USER)
    assert hba.splitlines()[0] == f"hostssl pgbouncer {ADMIN_USER} 127.0.0.1/32 scram-sha-256"
    assert not any(line.startswith("host ") and "trust" in line for line in hba.splitlines())


def _runtime_nodes(tree: ast.AST):
    """Every node except those under `if TYPE_CHECKING:` (imports only a type checker runs)."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
            continue
        yield node
        yield from _runtime_nodes(node)


def _local_imports(module: str) -> set[str]:
    """chalicelib/tools modules `module` imports, transitively (what the image must copy)."""
    seen: set[str] = set()
    todo = [module]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        path = ROOT / (name.replace(".", "/") + ".py")
        if not path.exists():
            path = ROOT / name.replace(".", "/") / "__init__.py"
        for node in _runtime_nodes(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in ("chalicelib", "tools"):
                if (ROOT / node.module.replace(".", "/")).is_dir():
                    todo += [f"{node.module}.{alias.name}" for alias in node.names]
                else:
                    todo.append(node.module)
            elif isinstance(node, ast.Import):
                todo += [a.name for a in node.names if a.name.split(".")[0] in ("chalicelib", "tools")]
    return seen


def test_dockerfile_copies_what_the_task_imports_and_installs_a_current_pgbouncer():
    dockerfile = (ROOT / "infra" / "pooler" / "Dockerfile").read_text()
    copied = set()
    for line in dockerfile.replace("\\\n", " ").splitlines():
        if line.startswith("COPY "):
            copied |= {w.rstrip("/") for w in line.split()[1:-1]}
    needed = set()
    for entry in ("tools.pooler.sync", "tools.pooler.config", "tools.pooler.adminport"):
        needed |= _local_imports(entry)
    for name in needed:
        path = name.replace(".", "/")
        file = path + ".py" if (ROOT / (path + ".py")).exists() else path + "/__init__.py"
        assert file in copied or any(file.startswith(c + "/") for c in copied), f"{file} is not in the image"
    for package in {n.rsplit(".", 1)[0] for n in needed if "." in n}:
        init = package.replace(".", "/") + "/__init__.py"
        assert init in copied or any(init.startswith(c + "/") for c in copied), f"{init} is not in the image"
    # PgBouncer >= 1.24 or the build fails; never as root; the entrypoint is the tested one.
    assert re.search(r"pgbouncer --version \| grep -Eq '\^PgBouncer 1\\\.\(2\[4-9\]", dockerfile)
    assert "\nUSER postgres\n" in dockerfile
    assert 'ENTRYPOINT ["/bin/bash", "/app/entrypoint.sh"]' in dockerfile
    assert "COPY infra/pooler/entrypoint.sh /app/entrypoint.sh" in dockerfile


# -- the service's side: hostctl registers the pooler, the API hands out its strings -----------


def _sync_pid(task: Task) -> int:
    """The sync loop's process among the entrypoint's children."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat_fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            cmdline = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if int(stat_fields[1]) == task.process.pid and b"tools.pooler.sync" in cmdline:
            return int(entry.name)
    raise AssertionError("no sync loop under the entrypoint")


def test_a_stopped_sync_loop_fails_a_publish_in_bounded_time_and_catches_up(make_tenant, task, target):
    from chalicelib import pooler, poolerstore

    tenant, password = make_tenant()
    slow = pooler.Pooler(
        "127.0.0.1",
        task.port,
        ADMIN_USER,
        task.env["INSTAPG_POOLER_ADMIN_PASSWORD"],
        poolerstore.TableStore(target, apply_timeout_s=0.5),
        admin_port=task.admin_port,
        sslmode="require",
    )
    pid = _sync_pid(task)
    os.kill(pid, signal.SIGSTOP)
    try:
        with pytest.raises(pooler.PoolerError, match="sync loop"):
            slow.publish(tenant)
    finally:
        os.kill(pid, signal.SIGCONT)
    # The row was written: once the loop runs again it loads it (the NOTIFY waited for it).
    dataclasses.replace(slow, store=poolerstore.TableStore(target)).publish(tenant)
    with _connect(slow.pooled_url(tenant.role, password, tenant.dbname)) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)


def test_hostctl_registers_the_pooler_and_the_api_hands_out_its_tls_strings(client, host, task, capsys, instapg_env):
    import json

    from chalicelib import context
    from chalicelib.models import HostRecord
    from tests.conftest import post_json
    from tools.ops import hostctl

    admin_password = task.env["INSTAPG_POOLER_ADMIN_PASSWORD"]
    instapg_env.setenv("TEST_POOLER_ADMIN", json.dumps({"username": ADMIN_USER, "password": admin_password}))
    instapg_env.setenv("TEST_POOLER_SYNC", json.dumps({"username": "instapg_pooler_sync", "password": task.env["PGPASSWORD"]}))
    instapg_env.setenv("TEST_POOLER_WRONG", json.dumps({"username": ADMIN_USER, "password": "not-" + admin_password}))
    register = ["pooler", "--id", "local-1", "--hostname", "127.0.0.1", "--port", str(task.port)]
    register += ["--admin", f"127.0.0.1:{task.admin_port}", "--sync-credentials", "env:TEST_POOLER_SYNC"]
    # A wrong admin secret is refused before anything is written, and its password is never printed.
    assert hostctl.main([*register, "--credentials", "env:TEST_POOLER_WRONG"]) == 1
    err = capsys.readouterr().err
    assert "not registered" in err and admin_password not in err
    assert HostRecord.get("local-1").pooler_hostname is None
    assert hostctl.main([*register, "--credentials", "env:TEST_POOLER_ADMIN"]) == 0
    assert "Postgres is private" in capsys.readouterr().out
    record = HostRecord.get("local-1")
    assert (record.pooler_store, record.pooler_sslmode, record.postgres_private) == ("table", "require", True)
    assert hostctl.main(["list"]) == 0
    assert f"admin 127.0.0.1:{task.admin_port}, table" in capsys.readouterr().out

    context.get().hosts.invalidate()
    created = post_json(client, "/api/v1/database", {"ref": "prod-pooler"})
    assert created.status_code == 201, created.json_body
    body = created.json_body
    pooled, direct = body["connection_string"], body["direct_connection_string"]
    assert f"@127.0.0.1:{task.port}/" in pooled and pooled.endswith("?sslmode=require")
    assert f"@127.0.0.1:{task.port}/" in direct and "_session?sslmode=require" in direct
    with _connect(pooled) as conn:
        assert conn.pgconn.ssl_in_use and conn.execute("SELECT 1").fetchone() == (1,)
    with _connect(direct) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)
    # Deleting it takes it out of the host's table, and so out of PgBouncer.
    token = body["creator_token"]
    gone = client.http.delete(f"/api/v1/database/{body['id']}", headers={"Authorization": f"Bearer {token}"})
    assert gone.status_code in (200, 204), gone.json_body
    assert login_sqlstate(pooled) == POOLER_REFUSED

    assert hostctl.main(["pooler", "--id", "local-1", "--remove"]) == 0
    record = HostRecord.get("local-1")
    assert record.pooler_hostname is None and record.pooler_store is None and not record.postgres_private


def test_task_ends_when_pgbouncer_dies_and_a_new_task_serves_the_table_at_once(make_tenant, bouncer, task, task_env, target):
    """kill -9 of PgBouncer ends the task (ECS starts another); the new one starts with every tenant.

    Last in the module: it ends the module's task.
    """
    from chalicelib import pooler, poolerstore

    tenant, password = make_tenant()
    bouncer.publish(tenant)
    pid = int((task.state_dir / "pgbouncer.pid").read_text().split()[0])
    os.kill(pid, signal.SIGKILL)
    assert task.process.wait(timeout=15) != 0
    replacement = _start_task(task_env, "task2")
    try:
        # Before any write: the tenant was rendered before PgBouncer started (sync --once).
        url = pooler.Pooler(
            "127.0.0.1", replacement.port, ADMIN_USER, "", poolerstore.TableStore(target), sslmode="require"
        ).pooled_url(tenant.role, password, tenant.dbname)
        with _connect(url) as conn:
            assert conn.execute("SELECT current_user").fetchone() == (tenant.role,)
    finally:
        replacement.stop()


def test_a_verify_full_pooler_keeps_verify_full_in_the_strings_and_require_for_its_admin_console(instapg_env):
    """The certificate names the public endpoint; the admin console's private name cannot be on it."""
    import json

    from chalicelib import hosts, poolerstore
    from chalicelib.models import HostRecord
    from chalicelib.settings import load

    instapg_env.setenv("TEST_POOLER_ADMIN", json.dumps({"username": ADMIN_USER, "password": "x" * 20}))
    record = HostRecord(
        id="h1", hostname="db.internal", port=5432, credentials="env:INSTAPG_TEST_HOST_ADMIN", capacity=1,
        pooler_hostname="pg.example.com", pooler_port=5432, pooler_admin_hostname="pooler-admin.x.internal",
        pooler_admin_port=6433, pooler_credentials="env:TEST_POOLER_ADMIN", pooler_store="table",
        pooler_sslmode="verify-full", postgres_private=True,
    )
    bouncer = hosts.pooler(record, hosts.AdminCredentials(load()))
    assert isinstance(bouncer.store, poolerstore.TableStore)
    assert bouncer.pooled_url("ipg_a", "pw", "ipg_a").endswith("@pg.example.com:5432/ipg_a?sslmode=verify-full")
    assert (bouncer.admin_host, bouncer.admin_port, bouncer.admin_sslmode) == ("pooler-admin.x.internal", 6433, "require")
    record.pooler_sslmode = "require"
    assert hosts.pooler(record, hosts.AdminCredentials(load())).admin_sslmode is None
