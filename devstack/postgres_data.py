"""An embedded PostgreSQL's data directory deleted: the one a stack with `own_postgres` kept its
server's data in (Stack.own_postgres_dir, `run_dir/postgres-<8 hex>`), once that server has
stopped, and those a run killed outright left in its folder.

A stack deletes its own folder as it ends (bench.shop.forget_stack_data). Killed with no chance
to (SIGKILL, the OOM killer, the machine losing power), it leaves the folder, a whole cluster and
its WAL, and the System V segment of its server, killed with it; each run names its folder anew,
so none is ever started on again. So a stack with `own_postgres`, as it starts, once what the
killed run left running is stopped (devstack.leftovers), deletes every `postgres-*` of its folder
(and initdb's `.postgres-*.initdb`) no server runs on, its segment first: one a server may run
on (postmaster_lock.server_may_run_on: a server still running, its backends still attached to
its segment, one starting, a lock file no server wrote, which tells nothing) is another's, and
left.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from devstack.infra import initdb_staging
from devstack.postgres_dirs import OWN_DATA_DIRS, STAGING_DIRS
from devstack.postmaster_lock import remove_shared_memory_left, server_may_run_on


def forget_postgres_data(pgdata: Path) -> str | None:
    """Delete an embedded PostgreSQL's data directory, its server stopped, or killed (the chaos
    soak's, left down by a Ctrl-C or a restart that failed): the shared memory such a one left is
    removed first, which no server started there again can remove once the folder is gone; and
    the folder initdb was making it in, should its making have been cut short. The line that
    says the shared memory was removed; None if none was."""
    removed = remove_shared_memory_left(pgdata)
    shutil.rmtree(pgdata, ignore_errors=True)
    shutil.rmtree(initdb_staging(pgdata), ignore_errors=True)
    return removed


def sweep_postgres_data_left(run_dir: Path, host: str) -> list[str]:
    """Delete the data directories (and initdb's folders) of the stacks' own servers in
    `run_dir` no server runs on, what runs killed outright left; the lines that say what was
    deleted, and what was left and why."""
    said = []
    for pgdata in _own_data_dirs(run_dir):
        staging = initdb_staging(pgdata)
        may_run, why = server_may_run_on(pgdata, host)
        if not may_run:
            may_run, why_staging = server_may_run_on(staging, host)
            # (initdb's folder alone left: what is said of it, not "it is not there".)
            why = why_staging if may_run or not pgdata.exists() else why
        if may_run:
            said.append(f"left {pgdata}, a server may run on it: {why}")
            continue
        deleted = [str(path) for path in (pgdata, staging) if path.exists()]
        removed = forget_postgres_data(pgdata)
        if removed:
            said.append(removed)
        said.append(f"deleted {' and '.join(deleted)}, left by a run killed before: {why}")
    return said


def _own_data_dirs(run_dir: Path) -> list[Path]:
    """The stacks' own data directories in `run_dir`, those initdb was making too."""
    names = {path.name for path in run_dir.glob(OWN_DATA_DIRS) if path.is_dir()}
    names |= {path.name[1:-len(".initdb")] for path in run_dir.glob(STAGING_DIRS)
              if path.is_dir()}
    return [run_dir / name for name in sorted(names)]
