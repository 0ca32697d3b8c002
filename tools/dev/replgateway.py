"""A local replication gateway (tools/replication/gateway.py) in front of a local Postgres, for make dev and the tests.

It reaches Postgres on its Unix socket, the only place where the embedded
server lets replication companions log in (tools/dev/pgserver.py's pg_hba.conf),
and listens on a free 127.0.0.1 port it prints when ready. It stops by itself
when the process that started it is gone (a killed test run or `make dev`
leaves no gateway behind; tools/dev/reaper.py covers the servers).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

READY = "replication gateway listening on "


@dataclass
class LocalGateway:
    host: str
    port: int
    log: Path
    process: subprocess.Popen = field(repr=False)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self.process.stdout is not None:
            self.process.stdout.close()


def start(socket_dir: str | Path, pg_port: int, log: Path, *options: str) -> LocalGateway:
    """Start one gateway process (its log in `log`); `options` are more of its command-line flags."""
    with open(log, "ab") as err:
        process = subprocess.Popen(
            [sys.executable, "-m", "tools.replication.gateway", "--listen", "127.0.0.1:0",
             "--postgres", str(socket_dir), "--postgres-port", str(pg_port), "--parent-pid", str(os.getpid()), *options],
            stdout=subprocess.PIPE, stderr=err, text=True, cwd=Path(__file__).resolve().parents[2],
        )  # fmt: skip
    line = process.stdout.readline()  # its one line, or "" when it died first
    if not line.startswith(READY):
        process.kill()
        process.wait()
        raise RuntimeError(f"the replication gateway did not start: {log.read_text()[-2000:]}")
    host, _, port = line[len(READY) :].strip().rpartition(":")
    return LocalGateway(host, int(port), log, process)
