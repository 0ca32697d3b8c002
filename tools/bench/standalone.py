"""A bench part in a process of its own (scaling, density): its own servers, moto and Context.

`make bench` runs each as `python -m tools.bench.<part> --json ...` and adds
the figures it prints, so one part's hosts and records never reach another's.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path

from tools.bench.common import Figure, bench_environment, say

ROOT = Path(__file__).resolve().parents[2]


@contextlib.contextmanager
def stack(**env: str) -> Iterator[object]:
    """moto in this process, the tables, a Context; abuse limits out of the way, no warm pool."""
    os.environ.update({**bench_environment(), "INSTAPG_POOL_SIZE": "0", **env})
    os.environ.pop("INSTAPG_DYNAMODB_ENDPOINT", None)
    import logging

    from moto import mock_aws

    from tools.dev import motoatomic

    logging.getLogger("chalicelib").setLevel(logging.WARNING)
    logging.getLogger("chalicelib").propagate = False
    motoatomic.install()
    with mock_aws():
        from chalicelib import context, models

        context.reset()
        service = context.get()
        models.configure(service.settings)
        models.create_tables()
        try:
            yield service
        finally:
            context.close_sessions()


def register(service, host_id: str, server, capacity: int = 100_000) -> None:
    from chalicelib import hosts

    env = f"INSTAPG_BENCH_ADMIN_{host_id.upper().replace('-', '_')}"
    os.environ[env] = server.admin_credentials_json
    hosts.register(service.settings, host_id, "127.0.0.1", server.port, f"env:{env}", capacity, "disable")
    service.hosts.invalidate()


def on_sigterm() -> None:
    """SIGTERM raises SystemExit, so a part's `finally` stops its servers and removes their data."""
    import signal

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))


def emit(figures: list[Figure]) -> None:
    """The last line a part prints with --json: what `run` reads."""
    print(json.dumps([asdict(f) for f in figures]), flush=True)


def run(module: str, args: list[str], timeout_s: float = 600) -> list[Figure]:
    """Run a part in a fresh interpreter; its figures, or one 'not measured' figure saying why."""
    proc = subprocess.Popen(
        [sys.executable, "-m", f"tools.bench.{module}", "--json", *args],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=None,  # its progress lines go where ours go
        text=True,
    )
    try:
        try:
            out, _ = proc.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            # SIGTERM, not SIGKILL: the part stops its servers and removes their data (see `on_sigterm`).
            proc.terminate()
            proc.communicate(timeout=120)
            raise
        return [Figure(**f) for f in json.loads(out.strip().splitlines()[-1])]
    except (subprocess.SubprocessError, OSError, ValueError, IndexError) as exc:
        say(f"{module}: failed ({type(exc).__name__})")
        return [Figure(f"{module}", None, "", 0, f"not measured: the part failed ({type(exc).__name__})")]


def part_main(args, measure) -> int:
    """A standalone part's main after its arguments: stop cleanly on SIGTERM, measure, print (or emit JSON)."""
    on_sigterm()
    figures = measure(args)
    if args.json:
        emit(figures)
    else:
        for f in figures:
            print(f"{f.name}: {f.value} {f.unit} ({f.how})")
    return 0
