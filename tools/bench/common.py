"""What every `make bench` figure shares: the Figure record, percentiles, timing a call, the table."""

from __future__ import annotations

import contextlib
import functools
import json
import os
import platform
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path


@dataclass
class Figure:
    name: str
    value: float | None
    unit: str
    samples: int
    how: str


def bench_environment() -> dict[str, str]:
    """What every bench stack runs with: fake AWS credentials, its own tables and names, and the
    abuse limits (issue 5) raised out of the way of its ~1000 creates from 127.0.0.1 (the checks still run)."""
    from chalicelib.crypto import new_key_spec

    return {
        "AWS_ACCESS_KEY_ID": "bench",
        "AWS_SECRET_ACCESS_KEY": "bench",
        "AWS_DEFAULT_REGION": "us-east-2",
        "AWS_REGION": "us-east-2",
        "AWS_ACCOUNT_ID_ENDPOINT_MODE": "disabled",
        "INSTAPG_STAGE": "dev",
        "INSTAPG_TABLE_PREFIX": "instapg-bench",
        "INSTAPG_KEYRING": new_key_spec("bench1"),
        "INSTAPG_NAME_PREFIX": "ipgb",
        "INSTAPG_CREATES_PER_MINUTE": "1000000",
        "INSTAPG_CREATES_PER_DAY": "1000000",
        "INSTAPG_MAX_UNCLAIMED_PER_HOST": "1000000",
    }


def say(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


def pct(values: list[float], p: float) -> float:
    """Nearest-rank percentile."""
    ordered = sorted(values)
    rank = max(1, round(p / 100 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


def ms(seconds: float) -> float:
    return round(seconds * 1000, 2)


@contextlib.contextmanager
def timed(owner, name: str, into: list[float]):
    """Record the duration of every call of `owner.name` while the block runs."""
    original = getattr(owner, name)

    @functools.wraps(original)
    def wrapper(*args, **kwargs):
        t = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            into.append(time.perf_counter() - t)

    setattr(owner, name, wrapper)
    try:
        yield
    finally:
        setattr(owner, name, original)


def post_json(url: str, body: dict) -> tuple[int, dict]:
    req = urllib.request.Request(
        url, data=json.dumps(body).encode(), method="POST", headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"{}")


def machine_info() -> dict:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "load_average_at_start": [round(x, 2) for x in load] if load else None,
    }


def table(figures: list[Figure]) -> str:
    rows = [("figure", "value", "samples", "what"), ("---", "---", "---", "---")]
    for f in figures:
        value = "not measured" if f.value is None else f"{f.value} {f.unit}"
        rows.append((f"`{f.name}`", value, str(f.samples), f.how))
    return "\n".join("| " + " | ".join(r) + " |" for r in rows)
