"""A stack with a PostgreSQL of its own, as it starts, deletes the data directories of the
stacks' own servers a run killed outright left in its folder, no server running on them
(devstack/postgres_data.py); run_dir/postgres, ensure_postgres's, is not one of them. Started
here with one of its ports taken, so that its start stops just after (a server left running on
such a folder is test_chaos_postgres_restart.py's)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from contextlib import closing
from pathlib import Path

import pytest

from devstack.infra import LOCALHOST, free_port
from devstack.stack import Stack


def test_a_folder_a_killed_run_left_is_deleted_as_the_next_stack_on_its_own_postgres_starts(
        tmp_path, capsys):
    """Its postmaster.pid names a server gone (a pid no process has, a port nothing listens
    on); and initdb's folder of a run killed as it made its cluster goes too."""
    left = tmp_path / "postgres-0badcafe"
    (left / "base").mkdir(parents=True)
    (left / "postmaster.pid").write_text(
        f"{_a_pid_ended()}\n{left}\n1700000000\n{free_port()}\n\n{LOCALHOST}\n")
    (tmp_path / ".postgres-5eed5eed.initdb" / "base").mkdir(parents=True)
    (tmp_path / "postgres" / "base").mkdir(parents=True)  # (ensure_postgres's: not the stack's)
    _start_stopped_after_the_sweep(tmp_path)
    assert sorted(path.name for path in tmp_path.iterdir() if "postgres" in path.name) == [
        "postgres"]
    said = capsys.readouterr().err
    assert f"[devstack] deleted {left}, left by a run killed before:" in said
    # (What is said of initdb's folder, left alone: not the data folder's "it is not there".)
    assert (f"deleted {tmp_path / '.postgres-5eed5eed.initdb'}, left by a run killed before: it"
            " has no postmaster.pid, and no postgres runs on that data directory") in said


def test_a_folder_whose_lock_file_names_a_port_no_server_writes_is_left_saying_why(
        tmp_path, capsys):
    """Whole (a pid and a port line) but no server's (port 0): devstack leaves such a file for
    the server to judge, and whether a server runs on the folder cannot be told either. Taken
    for a file not whole, the folder was deleted once the file had been left 10 s with no
    postgres running there."""
    left = tmp_path / "postgres-0badcafe"
    (left / "base").mkdir(parents=True)
    lock = left / "postmaster.pid"
    lock.write_text(f"{_a_pid_ended()}\n{left}\n1700000000\n0\n\n{LOCALHOST}\n")
    an_hour_ago = time.time() - 3600
    os.utime(lock, (an_hour_ago, an_hour_ago))
    _start_stopped_after_the_sweep(tmp_path)
    assert (left / "base").is_dir()
    assert (f"[devstack] left {left}, a server may run on it: its postmaster.pid names a port no"
            " server writes ('0'), so whether a server runs on it cannot be told; if none does,"
            " remove the file by hand") in capsys.readouterr().err


def test_a_stack_not_on_its_own_postgres_leaves_the_folders(tmp_path):
    (tmp_path / "postgres-0badcafe" / "base").mkdir(parents=True)
    _start_stopped_after_the_sweep(tmp_path, own_postgres=False)
    assert (tmp_path / "postgres-0badcafe" / "base").is_dir()


def _a_pid_ended() -> int:
    process = subprocess.Popen([sys.executable, "-c", ""])
    process.wait()
    return process.pid


def _start_stopped_after_the_sweep(run_dir: Path, own_postgres: bool = True) -> None:
    """Start a stack in `run_dir`, its broker's port taken: it stops as it finds it so."""
    with closing(socket.socket()) as taken:
        taken.bind((LOCALHOST, 0))
        taken.listen()
        stack = Stack(run_dir, ports={"broker": taken.getsockname()[1]},
                      own_postgres=own_postgres)
        with pytest.raises(RuntimeError, match="ports already in use"):
            stack.start()
