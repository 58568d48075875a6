"""`make clean` deleted `.run` and with it each run's record of what it started
(devstack.leftovers), the one way a later run finds what a run killed outright left running: that
ran on for good, holding `make run`'s ports. It stops what the records name first, and deletes
nothing while a run goes on (devstack/clean.py). Asked of make in a copy of the Makefile, over a
venv whose python is this one's interpreter, the checkout's modules on its path."""

from __future__ import annotations

import os
import re
import shutil
import signal
import site
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from devstack.clean import main as clean_main
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


# A venv the Makefile finds: one whose first `pip install` failed before a package was in (its
# python runs, devstack's imports fail), none at all, or one whose interpreter is gone.
VENV_STATES = ("with no packages", "not there", "with its python gone")


def _a_venv(checkout: Path, state: str) -> None:
    venv = checkout / ".venv"
    shutil.rmtree(venv)
    if state == "with no packages":
        subprocess.run([os.path.realpath(sys._base_executable), "-m", "venv", "--without-pip",
                        venv], check=True, timeout=60)
    elif state == "with its python gone":
        (venv / "bin").mkdir(parents=True)
        (venv / "bin" / "python").symlink_to(checkout / "python-uninstalled")


@pytest.mark.parametrize("state", VENV_STATES)
def test_make_clean_stops_what_a_run_left_whatever_the_venvs_state(checkout, state):
    """It ran devstack.clean only where the venv's python ran, and that imported the venv's
    packages: with none installed it died before deleting anything (ModuleNotFoundError), with no
    python in the venv it deleted .run, and the record, leaving what that named running. It needs
    the standard library alone, run by $(PYTHON) where the venv's python does not run."""
    _a_venv(checkout, state)
    shop = _a_run_killed_outright(checkout / ".run")
    try:
        cleaned = subprocess.run(
            ["make", "--no-print-directory", "clean",
             f"PYTHON={os.path.realpath(sys._base_executable)}"],
            cwd=checkout, env={**os.environ, "PYTHONPATH": str(REPO_ROOT)}, capture_output=True,
            text=True, timeout=60)
        assert cleaned.returncode == 0, cleaned.stderr
        assert gone(shop), "left running, its record deleted"
        assert not (checkout / ".run").exists() and not (checkout / ".venv").exists()
    finally:
        if not gone(shop):
            os.killpg(shop, signal.SIGKILL)


def _without_site_packages(program: str) -> subprocess.CompletedProcess:
    """`program` run by this interpreter with none of its packages (-S: no site-packages; -I: no
    PYTHONPATH, user site, or current directory), the checkout's modules alone on its path."""
    return subprocess.run(
        [sys.executable, "-I", "-S", "-c",
         f"import sys; sys.path.insert(0, {str(REPO_ROOT)!r})\n{textwrap.dedent(program)}"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=30)


def test_devstack_clean_imports_the_standard_library_alone():
    """What `make clean` runs on a venv half-installed (above): devstack.postgres_data, which it
    imported for a name, imports devstack.infra, shared.migrations, sqlalchemy, alembic."""
    imported = _without_site_packages(
        """
        import devstack.clean
        ours = {*sys.stdlib_module_names, "__main__", "devstack"}
        print(sorted(name for name in sys.modules if name.partition(".")[0] not in ours))
        """)
    assert imported.returncode == 0, imported.stderr
    assert imported.stdout == "[]\n"


def test_with_no_psycopg2_a_server_that_may_run_on_a_data_directory_keeps_the_folder(tmp_path):
    """A lock file naming no shared memory and a port something listens on is judged by asking
    that server its data directory, with psycopg2: with none installed, nothing is told, and the
    folder is kept, saying so (not a ModuleNotFoundError), and saying that psycopg2 is missing
    (it said the server "does not say what it serves", as though it had been asked)."""
    pgdata = tmp_path / ".run" / "postgres"
    judged = _without_site_packages(
        f"""
        import os, socket
        from pathlib import Path
        from devstack.clean import clean
        from devstack.leftovers import RunInTheWay
        listening = socket.create_server(("127.0.0.1", 0))
        pgdata = Path({str(pgdata)!r})
        pgdata.mkdir(parents=True)
        port = listening.getsockname()[1]
        (pgdata / "postmaster.pid").write_text(f"{{os.getpid()}}\\n{{pgdata}}\\n1\\n{{port}}\\n")
        try:
            clean(pgdata.parent)
        except RunInTheWay as exc:
            print(exc)
        """)
    assert judged.returncode == 0, judged.stderr
    assert re.search(r"something listens on its port \d+, and psycopg2 is not installed here:"
                     r" cannot ask the server which data directory it serves", judged.stdout), \
        judged.stdout
    assert "does not say what it serves" not in judged.stdout
    assert (pgdata / "postmaster.pid").exists()


@pytest.mark.parametrize("argv", [[], [""], ["scratch"], [".run", "scratch"]])
def test_it_deletes_no_folder_but_one_named_run(tmp_path, monkeypatch, capsys, argv):
    """With no argument it took the current directory (Path() is ".") and deleted it: a whole
    checkout, .git and all, from the checkout's root."""
    here = tmp_path / "here"
    (here / "scratch").mkdir(parents=True)
    (here / ".run").mkdir()
    monkeypatch.chdir(here)
    assert clean_main(argv) == 2
    assert (here / "scratch").is_dir() and (here / ".run").is_dir()
    assert "usage: python -m devstack.clean .run: it deletes a run's folder, named .run, and no" \
        " other" in capsys.readouterr().err


def test_it_deletes_the_folder_named_run(tmp_path, monkeypatch):
    (tmp_path / ".run" / "logs").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    assert clean_main([".run"]) == 0
    assert not (tmp_path / ".run").exists()
