"""A stack with a PostgreSQL of its own, as it starts, deletes the data directories of the
stacks' own servers a run killed outright left in its folder, no server running on them
(devstack/postgres_data.py); run_dir/postgres, ensure_postgres's, is not one of them. Started
here with one of its ports taken, so that its start stops just after (a server left running on
such a folder is test_chaos_postgres_restart.py's)."""

from __future__ import annotations

import socket
import subprocess
import sys
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
    assert (f"deleted {tmp_path / '.postgres-5eed5eed.initdb'}, left by a run killed before: it"
            " has no postmaster.pid, and no postgres runs on it") in said  # (not "not there")


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
