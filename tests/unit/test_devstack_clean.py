"""`make clean` deleted `.run` and with it each run's record of what it started
(devstack.leftovers), the one way a later run finds what a run killed outright left running: that
ran on for good, holding `make run`'s ports. It stops what the records name first, and deletes
nothing while a run goes on (devstack/clean.py). Asked of make in a copy of the Makefile, over a
venv whose python is this one's interpreter, the checkout's modules on its path."""

from __future__ import annotations

import os
import shutil
import signal
import site
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from devstack.clean import clean
from devstack.leftovers import RUN_RECORD, RunInTheWay, RunRecord
from tests.process_tools import gone

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def checkout(tmp_path):
    """The Makefile, with a venv whose python runs (this one's interpreter: its packages, and
    the checkout's modules, on its path)."""
    shutil.copy(REPO_ROOT / "Makefile", tmp_path / "Makefile")
    (tmp_path / ".venv" / "bin").mkdir(parents=True)
    (tmp_path / ".venv" / "bin" / "python").symlink_to(os.path.realpath(sys._base_executable))
    return tmp_path


def _make_clean(checkout: Path) -> subprocess.CompletedProcess:
    return subprocess.run(["make", "--no-print-directory", "clean"], cwd=checkout,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join(
                              [str(REPO_ROOT), *site.getsitepackages()])},
                          capture_output=True, text=True, timeout=60)


def _a_run_killed_outright(run_dir: Path) -> int:
    """The pid of a `sleep` a run in `run_dir` started, in its record, as a stack records its
    processes (a session of its own), before the run was killed (SIGKILL)."""
    program = textwrap.dedent(
        f"""
        import os, signal, subprocess
        from devstack.leftovers import RunRecord
        record = RunRecord({str(run_dir / RUN_RECORD)!r})
        record.begin()
        shop = subprocess.Popen(["sleep", "300"], start_new_session=True,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        record.note(shop.pid, signal.SIGTERM, "shop")
        print(shop.pid, flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
        """)
    run = subprocess.run([sys.executable, "-c", program], cwd=REPO_ROOT, capture_output=True,
                         text=True, timeout=30)
    assert run.returncode == -signal.SIGKILL, run.stderr
    return int(run.stdout)


@pytest.mark.parametrize("folder", [".run", ".run/bench"])
def test_make_clean_stops_what_a_run_killed_outright_left_before_deleting_its_record(
        checkout, folder):
    """`make run`'s (.run) or the benchmark's (.run/bench)."""
    shop = _a_run_killed_outright(checkout / folder)
    try:
        cleaned = _make_clean(checkout)
        assert cleaned.returncode == 0, cleaned.stderr
        assert gone(shop), "left running, its record deleted"
        assert (f"[devstack] stopped what a run killed before left running in"
                f" {checkout / folder}: shop\n") in cleaned.stderr
        assert not (checkout / ".run").exists() and not (checkout / ".venv").exists()
    finally:
        if not gone(shop):
            os.killpg(shop, signal.SIGKILL)


def test_make_clean_while_a_run_goes_on_deletes_nothing_saying_so(checkout):
    """The run's record, its secrets, its logs, its PostgreSQL's data were deleted under it (and a
    second run then started beside it, its record gone)."""
    record = RunRecord(checkout / ".run" / RUN_RECORD)
    record.begin()
    try:
        cleaned = _make_clean(checkout)
    finally:
        record.end()
    assert cleaned.returncode != 0
    assert (f"[devstack] {checkout / '.run'} not deleted: another run is using"
            f" {checkout / '.run'}\n"
            in cleaned.stderr)
    assert (checkout / ".run").is_dir() and (checkout / ".venv").is_dir()


def test_make_clean_without_a_run_folder_deletes_the_rest(checkout):
    (checkout / ".pytest_cache").mkdir()
    cleaned = _make_clean(checkout)
    assert cleaned.returncode == 0, cleaned.stderr
    assert not (checkout / ".venv").exists() and not (checkout / ".pytest_cache").exists()


def test_a_run_folder_a_postgresql_may_still_run_on_is_not_deleted(tmp_path):
    """Its data deleted under it, the server runs on, its port and shared memory held for good.
    (A lock file being written: a server starting there, as far as can be told.)"""
    pgdata = tmp_path / ".run" / "postgres"
    pgdata.mkdir(parents=True)
    (pgdata / "postmaster.pid").write_text("12")
    with pytest.raises(RunInTheWay, match=f"a PostgreSQL may run on {pgdata}: "):
        clean(tmp_path / ".run")
    assert (pgdata / "postmaster.pid").exists()
