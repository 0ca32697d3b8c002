"""tools/localserver.py serving the app in a thread of the test process, and a raw HTTP client for it.

moto (mock_aws, from the `aws` fixture) patches botocore process-wide, so the
served app talks to the same in-process DynamoDB as the test.
"""

from __future__ import annotations

import http.client
import json
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Answer:
    status: int
    headers: http.client.HTTPMessage
    body: bytes

    @property
    def json(self):
        return json.loads(self.body)


@contextmanager
def serving() -> Iterator[int]:
    """The local server on a free port of 127.0.0.1; yields the port."""
    from tools.localserver import create_server
    from tools.pgserver import free_port

    saved = dict(os.environ)  # create_server applies the stage's environment
    port = free_port()
    server = create_server(ROOT, "127.0.0.1", port)
    thread = threading.Thread(target=server.server.serve_forever, daemon=True)
    thread.start()
    try:
        yield port
    finally:
        server.shutdown()
        server.server.server_close()
        thread.join(timeout=10)
        os.environ.clear()
        os.environ.update(saved)


def request(
    port: int,
    method: str,
    path: str,
    body: bytes | str | None = None,
    headers: dict[str, str] | None = None,
    source: str = "127.0.0.1",
) -> Answer:
    """One request on a new connection whose source address is `source` (any of 127.0.0.0/8)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30, source_address=(source, 0))
    try:
        conn.request(method, path, body=body, headers=headers or {})
        response = conn.getresponse()
        return Answer(response.status, response.headers, response.read())
    finally:
        conn.close()
