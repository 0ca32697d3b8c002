"""A killed run leaves nothing behind: the next start stops its servers and removes its folders
(tools/dev/reaper.py), and never touches what a live owner runs. Real processes throughout."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tools.dev import reaper

ROOT = Path(__file__).resolve().parent.parent

# The owner: starts a server (and a PgBouncer when installed) in a folder of its own, says where, waits.
CHILD = """
import json, sys, time
import psycopg
from tools.dev import pgbouncer, pgserver
root = pgserver.private_dir("instapg-reaptest-")
server = pgserver.start(root / "pg", settings={"fsync": "off"})
with psycopg.connect(server.superuser_dsn) as conn:
    dsm = conn.execute("SHOW dynamic_shared_memory_type").fetchone()[0]
bouncer = pgbouncer.start(root / "pgbouncer") if pgbouncer.binary() else None
postmaster = int((server.data_dir / "postmaster.pid").read_text().split()[0])
print(json.dumps({"root": str(root), "data_dir": str(server.data_dir), "postmaster": postmaster,
                  "bouncer": bouncer.process.pid if bouncer else None, "dsm": dsm}), flush=True)
time.sleep(600)
"""


def _running(pid: int) -> bool:
    return reaper._running(pid)


@pytest.fixture
def owner_child():
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    line = proc.stdout.readline()
    if not line:
        proc.kill()
        pytest.fail(f"the owner did not start its server: {proc.stderr.read()[-2000:]}")
    started = json.loads(line)
    yield proc, started
    if proc.poll() is None:
        proc.kill()
        proc.wait()
    reaper.reap()  # whatever happened above, nothing of this test stays


def test_a_killed_owners_server_and_folder_are_reaped_a_live_ones_kept(owner_child):
    proc, started = owner_child
    root, data_dir, postmaster = Path(started["root"]), Path(started["data_dir"]), started["postmaster"]

    reaper.reap()  # the owner is alive: nothing of it is touched
    assert _running(postmaster) and root.is_dir()
    if started["bouncer"]:
        assert _running(started["bouncer"])
    if str(data_dir).startswith("/dev/shm/"):
        # Its dynamic shared memory is inside the data dir (goes with it), not /dev/shm/PostgreSQL.*.
        assert started["dsm"] == "mmap" and (data_dir / "pg_dynshmem").is_dir()

    proc.send_signal(signal.SIGKILL)  # as the OOM killer does: no cleanup runs
    proc.wait()
    assert _running(postmaster), "pg_ctl's postmaster outlives its owner: what the reaper is for"

    done = reaper.reap()
    assert not _running(postmaster)
    if started["bouncer"]:
        assert not _running(started["bouncer"])
    assert not root.exists()
    assert any(str(postmaster) in line for line in done), done


def test_a_pid_file_naming_another_program_is_not_killed(tmp_path):
    """A dead owner's postmaster.pid whose pid now belongs to something else: that process lives."""
    stranger = subprocess.Popen(["sleep", "60"])
    try:
        folder = tmp_path / "left"
        (folder / "pg").mkdir(parents=True)
        (folder / "pg" / "postmaster.pid").write_text(f"{stranger.pid}\n{folder / 'pg'}\n")
        (folder / "pgbouncer").mkdir()
        (folder / "pgbouncer" / "pgbouncer.pid").write_text(f"{stranger.pid}\n")
        gone = subprocess.Popen([sys.executable, "-c", "pass"])
        gone.wait()
        reaper.register(folder, remove=True, pid=gone.pid)  # an owner that has exited
        reaper.reap()
        assert stranger.poll() is None and not folder.exists()
    finally:
        stranger.kill()
        stranger.wait()


def test_an_owner_is_its_pid_and_its_start_time():
    me = reaper.owner()
    assert reaper.owner_alive(me)
    # The same pid with another start time is a process that reused the pid: the owner is dead.
    assert not reaper.owner_alive({**me, "start": str(int(me["start"]) + 1)})
    assert not reaper.owner_alive({**me, "boot": "another-boot"})


def test_a_stale_lock_beside_a_reaped_folder_goes_a_held_one_stays(tmp_path):
    import fcntl

    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    for name, hold in (("free", False), ("held", True)):
        folder = tmp_path / name
        folder.mkdir()
        lock = tmp_path / f"{name}.lock"
        lock.write_text("")
        if hold:
            handle = open(lock)  # noqa: SIM115 - held to the end of the test
            fcntl.flock(handle, fcntl.LOCK_EX)
        reaper.register(folder, remove=True, pid=gone.pid)
    reaper.reap()
    assert not (tmp_path / "free").exists() and not (tmp_path / "free.lock").exists()
    assert not (tmp_path / "held").exists() and (tmp_path / "held.lock").exists()
    handle.close()


def test_registry_is_per_user_and_private():
    assert reaper.registry().name == f"instapg-owners-{os.geteuid()}"
    assert reaper.registry().stat().st_mode & 0o077 == 0
