"""`python -m devstack.clean .run`: what `make clean` does to a run's folder (README: Starting
afresh), where it only deleted it.

The folder holds each run's record of the processes it started (devstack.leftovers: `.run`'s,
`make run`'s, and `.run/bench`'s, a benchmark's), the one way a later run finds what a run killed
outright (SIGKILL, the OOM killer) left running, to stop it. Deleted with the folder, the record
was lost, and what it named ran on for good: the APIs, workers and servers holding `make run`'s
ports (the next run refused to start: "ports already in use"), a relay of theirs sending a
service's rows to their own broker, a PostgreSQL the run started running on a data directory
deleted under it. So the folder is deleted only once what each record names is stopped, as the
next run would stop it, and with each record's lock held meanwhile: a run still going (its
record locked) is left, and nothing is deleted, saying so. So is a folder a PostgreSQL may still
run on (one no record names); the System V segment a server killed on one left is removed first,
which nothing could find once its postmaster.pid is gone.

It imports the standard library alone (and devstack's modules that do): `make clean` runs it on a
venv whose packages are not (all) installed, a first `pip install` failed partway, or with no venv
at all, by the system's python.
"""

from __future__ import annotations

import shutil
import sys
from contextlib import ExitStack
from pathlib import Path

from devstack.leftovers import RUN_RECORD, RunInTheWay, RunRecord
from devstack.ports import LOCALHOST
from devstack.postgres_dirs import OWN_DATA_DIRS, RUN_DATA_DIR
from devstack.postmaster_lock import remove_shared_memory_left, server_may_run_on

# The data directories of the PostgreSQL servers runs start in their folders: `make run`'s and an
# own_postgres stack's.
POSTGRES_DATA_DIRS = (RUN_DATA_DIR, OWN_DATA_DIRS)


def clean(run_root: Path) -> list[str]:
    """Stop what the records in `run_root` name, then delete the folder; the lines that say what
    was stopped and removed. RunInTheWay, nothing deleted, while a run goes on there, or a
    PostgreSQL may run on a data directory in it."""
    if not run_root.exists():
        return []
    said = []
    with ExitStack() as held:
        for record in _records(run_root):
            run = RunRecord(record)
            stopped = run.begin()  # (its lock held until the folder is deleted)
            held.callback(run.end)
            if stopped:
                said.append(f"stopped what a run killed before left running in {record.parent}:"
                            f" {', '.join(stopped)}")
        for pgdata in _postgres_data_dirs(run_root):
            may_run, why = server_may_run_on(pgdata, LOCALHOST)
            if may_run:
                raise RunInTheWay(f"a PostgreSQL may run on {pgdata}: {why}")
            removed = remove_shared_memory_left(pgdata)
            if removed:
                said.append(removed)
        shutil.rmtree(run_root)
    return said


def _records(run_root: Path) -> list[Path]:
    """The records of the runs in `run_root`: its own (`make run`'s), and its subfolders' (the
    benchmark's `.run/bench`)."""
    return [path for path in (run_root / RUN_RECORD, *sorted(run_root.glob(f"*/{RUN_RECORD}")))
            if path.is_file()]


def _postgres_data_dirs(run_root: Path) -> list[Path]:
    return sorted(path for folder in (run_root, *run_root.iterdir()) if folder.is_dir()
                  for pattern in POSTGRES_DATA_DIRS for path in folder.glob(pattern)
                  if path.is_dir())


# The one folder it deletes: a run's (`make run`'s, the benchmark's within it).
RUN_FOLDER = ".run"


def main(argv: list[str]) -> int:
    """Exit 2, deleting nothing, unless given the one folder, named `.run`: with no argument it
    took the current directory (Path() is "."), and deleted it, a whole checkout with its .git
    from the checkout's root."""
    run_root = Path(argv[0]).resolve() if len(argv) == 1 and argv[0] else None
    if run_root is None or run_root.name != RUN_FOLDER:
        print(f"usage: python -m devstack.clean {RUN_FOLDER}: it deletes a run's folder, named"
              f" {RUN_FOLDER}, and no other (given: {' '.join(argv) or 'nothing'})",
              file=sys.stderr, flush=True)
        return 2
    try:
        for line in clean(run_root):
            print(f"[devstack] {line}", file=sys.stderr, flush=True)
    except (RunInTheWay, RuntimeError) as exc:
        print(f"[devstack] {run_root} not deleted: {exc}", file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
