"""Owner markers for the servers and folders the local stack and the tests start, and their reaper.

A test run or `make dev` killed with SIGKILL (or by the OOM killer) runs no cleanup: its embedded
Postgres (daemonized by pg_ctl) and its PgBouncer (its own session) keep running, and their folders
stay in /dev/shm, holding memory. So whatever the project starts is registered here with its owner
(the process that started it, by pid *and* start time, so a reused pid is not mistaken for it), and
every start (pgserver.start, pgbouncer.start, the test session, make dev) first reaps what dead owners
left: their postmasters and poolers are stopped and their throwaway folders removed.

A server whose owner is alive is never touched: two pytest workers, a `make dev` and other clones of
the repo on the same machine share the registry, and all their owners are alive.

The registry is one small JSON file per folder in `/dev/shm/instapg-owners-<uid>/` (a user can only
stop its own processes, so each user reaps its own). Each entry is flock'ed while it is written or
reaped, and a reaper checks after locking that the entry is still the one it read: a folder reused by
a new owner (make dev's `.local/pg` on the next start) is never stopped by a late reaper.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import signal
import tempfile
import time
from pathlib import Path

OWNER_FILE = ".instapg-owner"  # in the folder too, for a human wondering whose it is
# What the reaper may remove besides a throwaway folder: the server's socket folder.
_REMOVABLE_EXTRAS = ("ipg-sock-",)
_STOP_WAIT_S = 5.0


def registry() -> Path:
    """This user's registry folder (tmpfs when there is one: it lives as long as the processes)."""
    base = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else tempfile.gettempdir()
    path = Path(base) / f"instapg-owners-{os.geteuid()}"
    path.mkdir(mode=0o700, exist_ok=True)
    return path


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def _stat_fields(pid: int) -> list[str] | None:
    """/proc/<pid>/stat after the command name (which may hold spaces): [state, ppid, ...]."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return raw[raw.rindex(")") + 2 :].split()


def _start_time(pid: int) -> str | None:
    fields = _stat_fields(pid)
    return fields[19] if fields else None  # field 22 of stat: start time in clock ticks since boot


def _running(pid: int) -> bool:
    """Alive and not a zombie (a container's pid 1 may never reap a daemon we killed)."""
    fields = _stat_fields(pid)
    return fields is not None and fields[0] not in ("Z", "X")


def owner(pid: int | None = None) -> dict[str, object]:
    """Who owns something: a process, by pid, start time and boot."""
    pid = os.getpid() if pid is None else pid
    return {"pid": pid, "start": _start_time(pid), "boot": _boot_id()}


def owner_alive(entry: dict) -> bool:
    pid = entry.get("pid")
    if not isinstance(pid, int) or entry.get("boot") != _boot_id():
        return False
    return _running(pid) and _start_time(pid) == entry.get("start")


def _entry_path(path: Path) -> Path:
    return registry() / (hashlib.sha256(str(path).encode()).hexdigest()[:24] + ".json")


def register(path: Path, remove: bool, extras: tuple[Path, ...] = (), pid: int | None = None) -> None:
    """`path` (a folder) is owned by this process (or `pid`) from now on.

    `remove`: the folder is throwaway (a private_dir), so the reaper deletes it; otherwise (a data dir
    someone may restart, make dev's folder) it only stops what runs in it. `extras`: folders of the
    server outside `path` (its socket folder) that go with it.
    """
    path = Path(path).resolve()
    entry = {**owner(pid), "path": str(path), "remove": remove, "extras": [str(p) for p in extras]}
    text = json.dumps(entry)
    with contextlib.suppress(OSError):  # a folder of a 0700 parent the server user owns: the registry suffices
        (path / OWNER_FILE).write_text(text)
    target = _entry_path(path)
    with open(target, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        handle.seek(0)
        handle.truncate()
        handle.write(text)
        handle.flush()


def _pids_in(path: Path, name: str) -> list[tuple[Path, int]]:
    """(folder, pid) of the `name` pid file in `path` and in its subfolders (not deeper: a data
    dir's own tree can hold hundreds of thousands of files, and the project puts servers there)."""
    folders = [path]
    if not (path / "PG_VERSION").exists():
        with contextlib.suppress(OSError):
            folders += [child for child in path.iterdir() if child.is_dir() and not child.is_symlink()]
    found = []
    for folder in folders:
        try:
            first = (folder / name).read_text().split("\n", 1)[0].strip()
            found.append((folder, int(first)))
        except (OSError, ValueError):
            continue
    return found


def _is_postmaster_of(pid: int, data_dir: Path) -> bool:
    """Really that data dir's postgres: the executable is postgres and it runs in that folder."""
    try:
        exe = os.path.basename(os.readlink(f"/proc/{pid}/exe"))
        cwd = Path(os.readlink(f"/proc/{pid}/cwd"))
    except OSError:
        return False
    return exe == "postgres" and cwd == data_dir.resolve()


def _is_pgbouncer_of(pid: int, state_dir: Path) -> bool:
    try:
        exe = os.path.basename(os.readlink(f"/proc/{pid}/exe"))
        args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return exe.startswith("pgbouncer") and str(state_dir.resolve() / "pgbouncer.ini").encode() in args


def _stop(pid: int, sig: int) -> None:
    """`sig`, then SIGKILL if it has not ended within a few seconds."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)
    deadline = time.monotonic() + _STOP_WAIT_S
    while _running(pid) and time.monotonic() < deadline:
        time.sleep(0.02)
    if _running(pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + _STOP_WAIT_S
        while _running(pid) and time.monotonic() < deadline:
            time.sleep(0.02)


def stop_servers(path: Path) -> list[str]:
    """Stop every postmaster and PgBouncer whose folder is under `path`; what was stopped."""
    stopped = []
    if not path.is_dir():
        return stopped
    for data_dir, pid in _pids_in(path, "postmaster.pid"):
        if _running(pid) and _is_postmaster_of(pid, data_dir):
            # SIGQUIT is `pg_ctl stop -m immediate`: the postmaster ends its backends and removes its
            # shared memory and dynamic shared memory segments itself.
            _stop(pid, signal.SIGQUIT)
            stopped.append(f"postgres {pid} ({data_dir})")
    for state_dir, pid in _pids_in(path, "pgbouncer.pid"):
        if _running(pid) and _is_pgbouncer_of(pid, state_dir):
            _stop(pid, signal.SIGTERM)  # 1.18's immediate shutdown
            stopped.append(f"pgbouncer {pid} ({state_dir})")
    return stopped


def _remove_lock_beside(path: Path) -> None:
    """make dev's `<folder>.lock`, once nobody holds it."""
    lock = path.with_name(path.name + ".lock")
    try:
        handle = open(lock)  # noqa: SIM115 - closed below
    except OSError:
        return
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return
        lock.unlink(missing_ok=True)


def _reap_entry(target: Path) -> list[str]:
    try:
        handle = open(target)  # noqa: SIM115 - closed below
    except OSError:
        return []
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return []  # being written or reaped right now
        try:
            if os.fstat(handle.fileno()).st_ino != target.stat().st_ino:
                return []  # reaped and registered again since we opened it
            entry = json.loads(handle.read())
        except (OSError, ValueError):
            return []  # half written by an owner that died writing it: kept (harmless), never guessed
        if owner_alive(entry):
            return []
        path = Path(entry["path"])
        done = stop_servers(path)
        for extra in entry.get("extras", []):
            if Path(extra).name.startswith(_REMOVABLE_EXTRAS):
                shutil.rmtree(extra, ignore_errors=True)
        if entry.get("remove") and path.exists():
            shutil.rmtree(path, ignore_errors=True)
            _remove_lock_beside(path)
            done.append(f"removed {path}")
        target.unlink(missing_ok=True)
        return done


def reap() -> list[str]:
    """Stop and remove what this user's dead owners left; what was done (empty when nothing)."""
    done: list[str] = []
    for target in sorted(registry().glob("*.json")):
        done.extend(_reap_entry(target))
    return done


def reap_and_say(who: str) -> None:
    """reap(), printing one line when it found something (a killed run is worth knowing about)."""
    import sys

    done = reap()
    if done:
        print(f"[{who}] reaped what a killed run left: {'; '.join(done)}", file=sys.stderr, flush=True)
