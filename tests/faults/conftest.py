"""Real faults for the fault suite: a Postgres server the test stops and starts,
a DynamoDB endpoint that accepts connections and never answers, moto over
HTTP for child processes the test kills with SIGKILL."""

from __future__ import annotations

import json
import shutil
import socket
import threading
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import _tmp_root

FLAKY_ADMIN_ENV = "INSTAPG_TEST_HOST_ADMIN_FLAKY"


@dataclass
class StoppablePg:
    """An embedded Postgres of the fault suite's own: stopping it disturbs no other test."""

    data_dir: Path
    port: int
    admin_user: str
    admin_password: str
    superuser_dsn: str
    server: object

    def admin_json(self) -> str:
        return json.dumps({"username": self.admin_user, "password": self.admin_password})

    def stop(self) -> None:
        from chalicelib import context

        self.server.stop(mode="immediate")
        context.close_sessions()

    def start(self) -> None:
        from tools.dev import pgserver

        self.server = pgserver.start(self.data_dir, port=self.port, settings={"fsync": "off"})

    @property
    def running(self) -> bool:
        return (self.data_dir / "postmaster.pid").exists()


@pytest.fixture(scope="session")
def stoppable_pg():
    from tools.dev import pgserver

    root = _tmp_root()
    server = pgserver.start(root / "pg", settings={"fsync": "off"})
    handle = StoppablePg(
        root / "pg", server.port, pgserver.ADMIN_ROLE, server.admin_password, server.superuser_dsn, server
    )
    try:
        yield handle
    finally:
        handle.server.stop(mode="immediate")
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def flaky_host(aws, service, stoppable_pg, instapg_env):
    """The stoppable server registered as the only host, `flaky-1`; running again after the test."""
    from chalicelib import hosts

    if not stoppable_pg.running:
        stoppable_pg.start()
    instapg_env.setenv(FLAKY_ADMIN_ENV, stoppable_pg.admin_json())
    record, _ = hosts.register(
        service.settings,
        "flaky-1",
        "127.0.0.1",
        stoppable_pg.port,
        f"env:{FLAKY_ADMIN_ENV}",
        capacity=100,
        sslmode="disable",
    )
    service.hosts.invalidate()
    yield record
    if not stoppable_pg.running:
        stoppable_pg.start()


class HangingEndpoint:
    """A TCP listener that accepts every connection and never sends a byte."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.accepted: list[socket.socket] = []
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.accepted.append(conn)

    def close(self) -> None:
        self.sock.close()
        for conn in self.accepted:
            conn.close()


@pytest.fixture
def hanging_endpoint():
    endpoint = HangingEndpoint()
    yield endpoint
    endpoint.close()


@pytest.fixture
def moto_http(instapg_env):
    """moto's DynamoDB over HTTP on 127.0.0.1, tables created: shared with child processes."""
    from moto.server import ThreadedMotoServer

    from chalicelib import context, models
    from tools.dev import motoatomic, pgserver

    motoatomic.install()
    port = pgserver.free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    instapg_env.setenv("INSTAPG_DYNAMODB_ENDPOINT", f"http://127.0.0.1:{port}")
    context.reset()
    models.configure(context.get().settings)
    models.create_tables()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()
        context.reset()
