"""Scaling out, measured so that it means something: each host gets a fixed CPU budget.

    .venv/bin/python -m tools.bench.scaling [--creates 24] [--cpu 0.1] [--clients 16]

On a 2-core machine two Postgres servers, the API and the clients share the
same cores, so "two hosts" measured the machine. Here each server's
processes (the postmaster and every backend it forks) go into a cgroup (v1
`cpu` controller) of their own with a CFS quota of `--cpu` cores, so one host
is the bottleneck and a second host adds capacity, as a second RDS instance
would. Their data is on tmpfs with fsync off: both servers share one disk
here, and a disk is not what a host's CPU quota can split; in production each
host has its own. Creates are on demand (the pool is off), from `--clients`
threads calling creation.create in this process (moto in-process), first with
one host registered, then with two. Needs root and a writable
/sys/fs/cgroup/cpu; otherwise says why and measures nothing.
"""

from __future__ import annotations

import argparse
import os
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from tools.bench import standalone
from tools.bench.common import Figure, say
from tools.bench.standalone import register, stack

CGROUP_CPU = Path("/sys/fs/cgroup/cpu")


class CpuGroup:
    """A cgroup v1 `cpu` group with a CFS quota; removed by `close()`."""

    def __init__(self, name: str, cores: float) -> None:
        self.path = CGROUP_CPU / name
        self.path.mkdir()
        (self.path / "cpu.cfs_period_us").write_text("100000")
        (self.path / "cpu.cfs_quota_us").write_text(str(int(cores * 100000)))
        # A high weight, so that on a busy machine the host gets its quota when it has work;
        # the quota caps what the weight can take from everything else.
        (self.path / "cpu.shares").write_text("8192")

    def add_tree(self, root_pid: int) -> int:
        """Move a process and its children (a postmaster and its backends); later forks follow it."""
        pids = [root_pid] + _children(root_pid)
        for pid in pids:
            (self.path / "cgroup.procs").write_text(str(pid))
        return len(pids)

    def throttled(self) -> tuple[int, int]:
        """(periods, throttled periods) from cpu.stat."""
        stat = dict(line.split() for line in (self.path / "cpu.stat").read_text().splitlines())
        return int(stat.get("nr_periods", 0)), int(stat.get("nr_throttled", 0))

    def close(self) -> None:
        for pid in (self.path / "cgroup.procs").read_text().split():
            try:
                (CGROUP_CPU / "cgroup.procs").write_text(pid)
            except OSError:
                pass  # exited meanwhile
        try:
            self.path.rmdir()
        except OSError as exc:
            say(f"cgroup {self.path} not removed: {exc}")


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            found.append(int(entry.name))
    return found


def _postmaster(server) -> int:
    return int((server.data_dir / "postmaster.pid").read_text().splitlines()[0])


def cgroups_usable() -> str | None:
    """None when this process may make cpu cgroups, else why not."""
    if os.geteuid() != 0:
        return "needs root (cgroup v1 cpu controller)"
    if not (CGROUP_CPU / "cpu.cfs_quota_us").exists():
        return f"no cgroup v1 cpu controller at {CGROUP_CPU}"
    if not os.access(CGROUP_CPU, os.W_OK):
        return f"{CGROUP_CPU} is not writable"
    return None


def measure(args: argparse.Namespace) -> list[Figure]:
    from chalicelib import creation
    from chalicelib.records import Requester
    from chalicelib.schemas import CreateDatabase
    from tools.dev import pgserver

    why = cgroups_usable()
    if why:
        return [Figure("scaling_2_hosts_ratio", None, "x", 0, f"not measured: {why}")]
    roots, servers, groups = [], [], []
    try:
        for i in (1, 2):
            root = pgserver.private_dir(f"instapg-scaling{i}-")
            roots.append(root)
            server = pgserver.start(root / "pg", settings={"fsync": "off"})
            servers.append(server)
            group = CpuGroup(f"instapg-bench-{os.getpid()}-{i}", args.cpu)
            groups.append(group)
            group.add_tree(_postmaster(server))
        rates = []
        with stack() as service:

            def one(i: int) -> bool:
                try:
                    creation.create(service, CreateDatabase(ref=f"sc{i}"), Requester())
                    return True
                except Exception as exc:  # counted, not fatal
                    say(f"scaling: a create failed: {type(exc).__name__}")
                    return False

            for hosts in (1, 2):
                # Placement fills the host with the most free slots first: the second host gets as many
                # free slots as the first has left, so creates alternate from the first one.
                capacity = 100_000 if hosts == 1 else 100_000 - int(service.hosts.get("scale-1").allocated or 0)
                register(service, f"scale-{hosts}", servers[hosts - 1], capacity=capacity)
                n = args.creates * hosts
                before = [g.throttled() for g in groups]
                t = time.perf_counter()
                with ThreadPoolExecutor(max_workers=args.clients) as executor:
                    ok = sum(executor.map(one, range(n)))
                elapsed = time.perf_counter() - t
                throttled = [
                    f"{(g.throttled()[1] - b[1]) * 100 // max(g.throttled()[0] - b[0], 1)}%"
                    for g, b in zip(groups[:hosts], before, strict=False)
                ]
                rates.append(ok / elapsed)
                say(f"scaling: {hosts} host(s): {ok}/{n} creates in {elapsed:.1f}s; throttled periods {throttled}")
        how = (
            f"on-demand creates (creation.create, {args.clients} threads, moto in-process), each host's Postgres "
            f"in its own cgroup with a CPU quota of {args.cpu} cores, data on tmpfs"
        )
        return [
            Figure("scaling_1_host", round(rates[0], 1), "creates/s", args.creates, how + ", 1 host"),
            Figure("scaling_2_hosts", round(rates[1], 1), "creates/s", args.creates * 2, how + ", 2 hosts"),
            Figure("scaling_2_hosts_ratio", round(rates[1] / rates[0], 2), "x", args.creates * 3, "2 hosts / 1 host"),
        ]
    finally:
        for server in servers:
            server.stop(mode="immediate")
        for group in groups:
            group.close()
        for root in roots:
            shutil.rmtree(root, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.bench.scaling", description=__doc__.splitlines()[0])
    parser.add_argument("--creates", type=int, default=24, help="creates per host (default 24)")
    parser.add_argument("--cpu", type=float, default=0.1, help="CPU quota per host, in cores (default 0.1)")
    parser.add_argument("--clients", type=int, default=16, help="concurrent clients (default 16)")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON (what make bench reads)")
    return standalone.part_main(parser.parse_args(argv), measure)


if __name__ == "__main__":
    raise SystemExit(main())
