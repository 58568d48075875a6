"""devstack's process handling: logs, stopping process groups, Ctrl-C, polling, log following."""

from __future__ import annotations

import contextlib
import functools
import io
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from devstack import infra, processes
from devstack.infra import free_port, port_open, wait_until
from devstack.leftovers import RunInTheWay, RunRecord, started_at, this_boot
from devstack.logs import LogFollower
from devstack.processes import ManagedProcess, ProcessGroup
from devstack.stack import DEFAULT_PORTS, Stack
from shared.config import ENVIRONMENT, load_settings
from tests.process_tools import end_child, gone, line_within, start_child

REPO_ROOT = Path(__file__).resolve().parents[2]


def _shell(tmp_path: Path, script: str, name: str = "sh") -> ManagedProcess:
    return ManagedProcess(
        name, ["sh", "-c", script], os.environ, tmp_path / f"{name}.log", tmp_path
    )


def test_output_and_errors_go_to_the_log_file(tmp_path):
    process = _shell(tmp_path, "echo to-stdout; echo to-stderr >&2; exit 3").start()
    try:
        wait_until(lambda: not process.alive(), 5, 0.02, "the shell to exit")
        assert process.returncode == 3
        assert process.died()
        assert process.log_tail().splitlines() == ["to-stdout", "to-stderr"]
    finally:
        process.stop()  # (reaped: its Popen otherwise warns, ResourceWarning, as it is collected)


def test_stop_ends_the_process_and_the_children_it_started(tmp_path):
    process = _shell(tmp_path, "sleep 300 & echo $! > child.pid; wait").start()
    wait_until(
        lambda: (tmp_path / "child.pid").exists() and (tmp_path / "child.pid").read_text().strip(),
        5,
        0.02,
        "the child pid",
    )
    child = int((tmp_path / "child.pid").read_text())
    assert os.getpgid(process.pid) == process.pid != os.getpgid(0)  # its own group, not ours

    process.stop(timeout=5)

    assert not process.alive() and not process.died()
    wait_until(lambda: gone(child), 5, 0.02, "the grandchild to end")


def test_stop_kills_a_process_that_ignores_sigterm(tmp_path):
    process = _shell(tmp_path, "trap '' TERM; echo ready; sleep 300").start()
    wait_until(lambda: "ready" in process.log_tail(), 5, 0.02, "the trap to be set")
    started = time.monotonic()

    process.stop(timeout=0.5)

    assert time.monotonic() - started >= 0.5
    assert process.returncode == -signal.SIGKILL


def test_a_stopped_process_can_be_started_again_and_appends_to_its_log(tmp_path):
    process = _shell(tmp_path, "echo run; sleep 300").start()
    wait_until(lambda: "run" in process.log_tail(), 5, 0.02, "the first run")
    process.stop()
    process.start()
    wait_until(lambda: process.log_tail().count("run") == 2, 5, 0.02, "the second run")
    assert process.alive()
    process.stop()


def test_a_new_run_keeps_the_log_of_the_run_before_as_log_1_and_no_older_one(tmp_path):
    """A run that died lost its logs as soon as the next started (its first start truncated
    them), the one the developer makes to see why: each start of a new run keeps the log the run
    before wrote as `<name>.log.1`, in place of the one before it (the disk use bounded)."""
    for run in ("first", "second", "third"):
        process = _shell(tmp_path, f"echo {run} run; sleep 300").start()
        wait_until(lambda: process.log_tail(), 5, 0.02, f"the {run} run's line")
        process.stop()

    assert (tmp_path / "sh.log").read_text() == "third run\n"
    assert (tmp_path / "sh.log.1").read_text() == "second run\n"
    assert sorted(path.name for path in tmp_path.glob("sh.log*")) == ["sh.log", "sh.log.1"]


def _leaving_a_child(tmp_path: Path, exit_line: str) -> tuple[ManagedProcess, int]:
    """A process that starts a child in its group (a gunicorn master's worker, say), then ends by
    itself with `exit_line`, the child left running; and that child's pid."""
    process = _shell(tmp_path, f"sleep 300 & echo $! > child.pid; {exit_line}").start()
    wait_until(lambda: process.died(), 5, 0.02, "the process to end by itself")
    return process, int((tmp_path / "child.pid").read_text())


@pytest.mark.parametrize("exit_line, returncode", [("exit 3", 3), ("kill -9 $$", -signal.SIGKILL)])
def test_a_process_that_ended_by_itself_holds_its_pid_until_the_stop_ends_what_it_left(
        tmp_path, exit_line, returncode):
    """Seen to have died (`make run` looks twice a second), a leader reaped at once gave its pid
    back, for the system to give another process, maybe leading a group of its own: the stop's
    SIGKILL to the dead leader's group, long after, killed that one. The leader is left a zombie
    (its pid no other's) until the stop has killed its group's orphan and reaped it."""
    process, child = _leaving_a_child(tmp_path, exit_line)
    try:
        assert process.returncode == returncode and not process.alive()
        assert _state(process.pid) == "Z"  # (still ours, unreaped)
        assert _running(child)

        process.stop(timeout=5)

        assert _state(process.pid) != "Z"  # reaped
        assert process.returncode == returncode and not process.died()
        wait_until(lambda: gone(child), 5, 0.02, "the orphan to be killed")
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(child, signal.SIGKILL)


@pytest.mark.parametrize("sees_exit_unreaped", [True, False], ids=["waitid", "popen"])
def test_a_stop_kills_what_a_leader_that_ends_on_its_signal_leaves_in_its_group(
        tmp_path, monkeypatch, sees_exit_unreaped):
    """A leader that ends on the stop signal, leaving a child of its group that ignores it: the
    stop kills that child, whether the exit is seen unreaped (os.waitid) or as Popen sees it,
    reaping (macOS before Python 3.13), where the leader, reaped by the stop's own wait, had its
    group signalled no more and the child ran on, holding its port."""
    monkeypatch.setattr(processes, "SEES_EXIT_UNREAPED", sees_exit_unreaped)
    process = _shell(tmp_path, "sh -c 'trap \"\" TERM; exec sleep 300' & echo $! > child.pid;"
                               " trap 'exit 0' TERM; wait").start()
    wait_until(lambda: (tmp_path / "child.pid").exists()
               and (tmp_path / "child.pid").read_text().strip(), 5, 0.02, "the child to start")
    child = int((tmp_path / "child.pid").read_text())
    try:
        process.stop(timeout=5)

        assert process.returncode == 0
        wait_until(lambda: gone(child), 5, 0.02, "the child that ignored the stop signal to go")
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(child, signal.SIGKILL)


def test_a_group_whose_leader_was_reaped_is_signalled_no_more(tmp_path, monkeypatch):
    """Its leader's pid, given back as it was reaped, may be another's group's id by then."""
    process = _shell(tmp_path, "sleep 300").start()
    process.stop(timeout=5)
    signalled = []
    monkeypatch.setattr(os, "killpg", lambda pgid, signum: signalled.append((pgid, signum)))

    process.kill()
    process.stop(timeout=5)

    assert signalled == []


def test_a_start_again_ends_what_the_previous_start_left_running(tmp_path):
    """A process started again once it died: the orphans of its first start (workers holding its
    port) are killed, not left for no stop to reach (the stop signals the new start's group)."""
    process, child = _leaving_a_child(tmp_path, "exit 3")
    process.argv = ["sleep", "300"]  # (its second start runs on)
    try:
        process.start()
        wait_until(lambda: gone(child), 5, 0.02, "the first start's orphan to be killed")
        assert process.alive()
    finally:
        process.stop(timeout=5)
        with contextlib.suppress(ProcessLookupError):
            os.kill(child, signal.SIGKILL)


class _Recorder:
    """A process of the group that notes its name in `stopped` as it is stopped."""

    def __init__(self, name: str, stopped: list[str]):
        self.name = name
        self.stopped = stopped

    def stop(self, timeout=10):
        self.stopped.append(self.name)


def test_group_stops_processes_in_reverse_start_order():
    stopped = []

    group = ProcessGroup(handle_signals=False)
    for name in ("postgres", "broker", "api"):
        group.add(_Recorder(name, stopped))

    group.stop_all()
    group.stop_all()

    assert stopped == ["api", "broker", "postgres"]


def test_a_process_is_not_started_again_once_its_group_is_stopping(tmp_path):
    """bench.chaos's disruptor starts again what it killed, from a thread of its own: once a
    Ctrl-C's stop has begun, it starts nothing (the stop may have passed it: left running)."""
    group = ProcessGroup(handle_signals=False)
    process = group.start(_shell(tmp_path, "sleep 60"))
    try:
        process.kill()
        wait_until(lambda: not process.alive(), 5, 0.02, "the killed process to end")
        assert group.start_again(process) is True and process.alive()
        group.stop_all()
        assert group.start_again(process) is False
        assert not process.alive()
    finally:
        process.stop()


def test_what_is_checked_before_a_start_again_runs_only_while_the_group_is_not_stopping(
        tmp_path):
    """bench.chaos checks its Redis's port so: a port taken refuses the start, and once a stop
    has begun the check is not run (its error would take the stop's KeyboardInterrupt's place)."""
    group = ProcessGroup(handle_signals=False)
    process = group.start(_shell(tmp_path, "sleep 60"))
    checked = []

    def port_taken() -> None:
        checked.append(process.alive())
        raise RuntimeError("port taken")

    try:
        process.kill()
        wait_until(lambda: not process.alive(), 5, 0.02, "the killed process to end")
        with pytest.raises(RuntimeError, match="port taken"):
            group.start_again(process, port_taken)
        assert checked == [False] and not process.alive()
        assert group.start_again(process, lambda: checked.append(process.alive())) is True
        assert checked == [False, False] and process.alive()
        group.stop_all()
        assert group.start_again(process, port_taken) is False
        assert checked == [False, False] and not process.alive()
    finally:
        process.stop()


def test_what_the_group_is_told_to_do_once_a_process_is_stopped_comes_before_the_next_stop():
    """devstack.stack lets the orders in flight settle once the processes taking requests are
    stopped, before the workers are; a stop_all that finds the process stopped already (a second
    Ctrl-C) does it no more."""
    happened = []

    group = ProcessGroup(handle_signals=False)
    for name in ("worker", "grpc", "api"):
        group.add(_Recorder(name, happened))
    group.when_stopped(group.processes[1], lambda: happened.append("settled"))

    group.stop_all()
    group.stop_all()

    assert happened == ["api", "grpc", "settled", "worker"]


def test_what_a_hook_raises_leaves_no_process_running():
    """The drain's hook failing (any error) still has the workers and the broker stopped."""
    stopped = []

    group = ProcessGroup(handle_signals=False)
    for name in ("broker", "worker", "grpc", "api"):
        group.add(_Recorder(name, stopped))

    def failing() -> None:
        raise RuntimeError("the drain failed")

    group.when_stopped(group.processes[2], failing)

    with pytest.raises(RuntimeError, match="the drain failed"):
        group.stop_all()
    assert stopped == ["api", "grpc", "worker", "broker"]
    assert group.processes == []


@contextlib.contextmanager
def _started_ready(program: str, tmp_path: Path) -> Iterator[subprocess.Popen]:
    """`program` (_started), given once it says "ready"; ended on the way out (end_child)."""
    parent = _started(program, tmp_path)
    try:
        assert line_within(parent.stdout, 30, '"ready"').strip() == "ready"
        yield parent
    finally:
        end_child(parent)


def test_a_second_ctrl_c_while_the_apis_stop_stops_the_rest_at_once_without_the_drain(tmp_path):
    """README: a second Ctrl-C skips the drain. One arriving while an API is still stopping once
    ran stop_all again within the first, the drain (devstack.stack's when_stopped hook) and all."""
    program = textwrap.dedent(
        """
        import time
        from devstack.processes import ProcessGroup
        group = ProcessGroup()

        class Fake:
            def __init__(self, name, takes):
                self.name, self.takes = name, takes

            def stop(self, timeout=10):
                print("stopping " + self.name, flush=True)
                time.sleep(self.takes)  # (a slow stop: the scenario)
                print("stopped " + self.name, flush=True)

            def kill(self):
                print("killed " + self.name, flush=True)

        for name, takes in (("worker", 0), ("grpc", 0), ("api", 3)):
            group.add(Fake(name, takes))
        # (A drain that takes long: the scenario.)
        group.when_stopped(group.processes[1],
                           lambda: (print("draining", flush=True), time.sleep(60)))
        print("ready", flush=True)
        time.sleep(300)  # (lives on until killed)
        """
    )
    with _started_ready(program, tmp_path) as parent:
        parent.send_signal(signal.SIGINT)
        assert line_within(parent.stdout, 10, '"stopping api"').strip() == "stopping api"

        parent.send_signal(signal.SIGINT)

        assert parent.wait(10) == -signal.SIGINT
        said = parent.stdout.read().split("\n")
        assert "draining" not in said
        assert "stopped worker" in said
        assert "killed api" in said  # (the second Ctrl-C cut its stop short: not left running)


def test_a_process_whose_stop_a_second_ctrl_c_cuts_short_is_killed_not_left_running(tmp_path):
    """A real process that will not end on its stop signal (a gunicorn waiting on connections):
    the second Ctrl-C, coming while the first stop waits on it, had it left running, its port
    kept; it is killed, not waited for again."""
    program = textwrap.dedent(
        f"""
        import os
        from pathlib import Path
        from devstack.processes import ManagedProcess, ProcessGroup
        TRAPPING = "trap 'echo term' TERM; echo up; while :; do sleep 0.1; done"
        group = ProcessGroup()
        folder = Path({str(tmp_path)!r})
        api = ManagedProcess("api", ["sh", "-c", TRAPPING], os.environ, folder / "api.log", folder)
        group.start(api)
        print(api.pid, flush=True)
        import time
        time.sleep(300)  # (lives on until killed)
        """
    )
    parent = _started(program, tmp_path)
    try:
        api_pid = int(line_within(parent.stdout, 30, "the api's pid"))
        wait_until(lambda: "up" in (tmp_path / "api.log").read_text(), 5, 0.02, "the api")
        parent.send_signal(signal.SIGINT)
        wait_until(lambda: "term" in (tmp_path / "api.log").read_text(), 5, 0.02,
                   "the api's stop signal, the first stop waiting on it")
        parent.send_signal(signal.SIGINT)

        assert parent.wait(10) == -signal.SIGINT
        wait_until(lambda: not _running(api_pid), 5, 0.02, "the api killed")
    finally:
        end_child(parent)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(api_pid, signal.SIGKILL)


def test_the_process_a_second_ctrl_c_killed_is_not_killed_again_by_a_later_stop(tmp_path):
    """The second Ctrl-C kills the process the first stop was waiting on, and the program ends:
    its exit's stop (atexit) once found it still named as being stopped (the last to stop, no
    other's stop named another after it) and killed its pid again, by then free for the system to
    give another process (the killed one reaped)."""
    program = textwrap.dedent(
        """
        import atexit, time
        # (Registered before the group's, so run after its stop at exit.)
        atexit.register(lambda: print("exited", flush=True))
        from devstack.processes import ProcessGroup
        group = ProcessGroup()

        class Fake:
            def __init__(self, name):
                self.name = name

            def stop(self, timeout=10):
                print("stopping " + self.name, flush=True)
                time.sleep(60 if self.name == "broker" else 0)  # (a broker slow to stop)

            def kill(self):
                print("killed " + self.name, flush=True)

        for name in ("broker", "api"):
            group.add(Fake(name))
        print("ready", flush=True)
        time.sleep(300)  # (lives on until killed)
        """
    )
    with _started_ready(program, tmp_path) as parent:
        parent.send_signal(signal.SIGINT)
        assert line_within(parent.stdout, 10, '"stopping api"').strip() == "stopping api"
        assert line_within(parent.stdout, 10, '"stopping broker"').strip() == "stopping broker"

        parent.send_signal(signal.SIGINT)

        assert parent.wait(10) == -signal.SIGINT
        said = parent.stdout.read().split("\n")
        assert said[-2:] == ["exited", ""]  # (the exit's stop came and went)
        assert said.count("killed broker") == 1, said


def _running(pid: int) -> bool:
    return _state(pid) not in (None, "Z")


def _state(pid: int) -> str | None:
    """Process `pid`'s state (/proc/<pid>/stat): "Z" for a zombie; None once it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return None


@pytest.mark.parametrize(
    "signum, exit_code", [(signal.SIGINT, -signal.SIGINT), (signal.SIGTERM, 128 + signal.SIGTERM),
                          (signal.SIGHUP, 128 + signal.SIGHUP)]
)
def test_ctrl_c_sigterm_or_a_hangup_stops_every_process_the_program_started(tmp_path, signum,
                                                                           exit_code):
    program = textwrap.dedent(
        """
        import os, sys, time
        from devstack.processes import ManagedProcess, ProcessGroup
        group = ProcessGroup()
        for name in ("first", "second"):
            process = ManagedProcess(name, ["sleep", "300"], os.environ, name + ".log", ".")
            group.start(process)
            print(process.pid, flush=True)
        print("ready", flush=True)
        time.sleep(300)  # (lives on until killed)
        """
    )
    parent = _started(program, tmp_path)
    try:
        children = [int(line_within(parent.stdout, 30, "a child's pid")) for _ in range(2)]
        assert line_within(parent.stdout, 30, '"ready"').strip() == "ready"

        parent.send_signal(signum)

        assert parent.wait(10) == exit_code
        assert all(gone(pid) for pid in children)
    finally:
        end_child(parent)


def _started(program: str, cwd, ignoring_ctrl_c: bool = False, stderr=None) -> subprocess.Popen:
    """`program` run by this Python, importing the repository's modules, its stdout read; its
    SIGHUP as a terminal's job gets it, and its SIGINT too unless `ignoring_ctrl_c` (then ignored,
    as a background job of a non-interactive shell gets it), whatever this run was started with
    (pytest under nohup, or in a background job, would pass them on ignored)."""
    sigint = signal.SIG_IGN if ignoring_ctrl_c else signal.SIG_DFL

    def signals_as_given() -> None:
        signal.signal(signal.SIGINT, sigint)
        signal.signal(signal.SIGHUP, signal.SIG_DFL)

    return start_child([sys.executable, "-c", program], cwd=cwd, stdout=subprocess.PIPE,
                       stderr=stderr, text=True, env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
                       preexec_fn=signals_as_given)


def test_a_program_started_ignoring_ctrl_c_goes_on_ignoring_it(tmp_path):
    """As a job a non-interactive shell starts in the background (`python -m devstack run &`),
    whose SIGINT is ignored: a SIGINT sent to the program stops nothing, where it once stopped
    every process silently and left the program running. SIGTERM still stops them all."""
    program = textwrap.dedent(
        """
        import os, signal, sys, time
        from devstack.processes import ManagedProcess, ProcessGroup
        group = ProcessGroup()
        process = ManagedProcess("child", ["sleep", "300"], os.environ, "child.log", ".")
        group.start(process)
        # Python runs the handlers of signals pending together in the signals' order: once this
        # one has answered, a SIGINT sent before it has been handled, if it was to be.
        signal.signal(signal.SIGUSR1, lambda *_: print("usr1", flush=True))
        print(process.pid, flush=True)
        while True:
            time.sleep(300)  # (lives on until killed)
        """
    )
    parent = _started(program, tmp_path, ignoring_ctrl_c=True)
    try:
        child = int(line_within(parent.stdout, 30, "the child's pid"))

        parent.send_signal(signal.SIGINT)
        parent.send_signal(signal.SIGUSR1)
        assert line_within(parent.stdout, 10, '"usr1"').strip() == "usr1"
        assert parent.poll() is None and not gone(child)

        parent.send_signal(signal.SIGTERM)
        assert parent.wait(10) == 128 + signal.SIGTERM
        assert gone(child)
    finally:
        end_child(parent)


def test_wait_until_names_what_it_waited_for():
    with pytest.raises(TimeoutError, match="the moon to rise"):
        wait_until(lambda: False, timeout=0.2, interval=0.05, what="the moon to rise")

    calls = iter([False, False, True])
    wait_until(lambda: next(calls), timeout=2, interval=0.01, what="the third call")


def test_free_port_is_free_and_port_open_sees_a_listener():
    import socket

    port = free_port()
    assert not port_open("127.0.0.1", port, timeout=0.2)
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", port))
        listener.listen()
        assert port_open("127.0.0.1", port, timeout=0.2)


def test_log_follower_prefixes_complete_lines_and_holds_partial_ones(tmp_path):
    api, worker = tmp_path / "api.log", tmp_path / "worker.log"
    api.write_text("started\nhalf a li")
    out = io.StringIO()
    follower = LogFollower([("api", api), ("worker", worker)], out)

    assert follower.poll() == 1
    with api.open("a") as log:
        log.write("ne\n")
    worker.write_text("ready\n")
    follower.poll()
    api.write_text("restarted\n")  # truncated and rewritten
    follower.poll()

    assert out.getvalue().splitlines() == [
        "   api | started",
        "   api | half a line",
        "worker | ready",
        "   api | restarted",
    ]


def test_stack_env_is_the_config_contract_and_overrides_may_name_the_found_services(tmp_path):
    stack = Stack(
        tmp_path,
        env_overrides={"ORDERS_DATABASE_URL": "{postgres}/test_orders", "REDIS_URL": "{redis}/5"},
        ports={"broker": 19999},
    )

    env = stack._build_env("postgresql://postgres@127.0.0.1:5432", "redis://127.0.0.1:6379")

    assert env == {
        "ORDERS_DATABASE_URL": "postgresql://postgres@127.0.0.1:5432/test_orders",
        "PAYMENTS_DATABASE_URL": "postgresql://postgres@127.0.0.1:5432/hseshop_payments",
        "GATEWAY_DATABASE_URL": "postgresql://postgres@127.0.0.1:5432/hseshop_gateway",
        "ORDERS_SERVICE_URL": "http://127.0.0.1:8001",
        "PAYMENTS_SERVICE_URL": "http://127.0.0.1:8002",
        "REDIS_URL": "redis://127.0.0.1:6379/5",
        "KAFKA_BOOTSTRAP_SERVERS": "127.0.0.1:19999",
        "CELERY_BROKER_URL": "",  # (REDIS_URL's)
        "CACHE_REDIS_URL": "",  # (REDIS_URL's)
        "REDIS_KEY_PREFIX": "hseshop",
        "KAFKA_CONSUMER_GROUP_PREFIX": "hseshop",
        "TOPIC_PAYMENT_REQUESTED": "orders.payment-requested",
        "TOPIC_PAYMENT_RESULTS": "payments.payment-results",
        "TOPIC_ORDER_STATUS_CHANGED": "orders.order-status-changed",
        "OUTBOX_EXTRA_TOPICS": "",
        "CELERY_BROKER_READ_URL": "",
        "CELERY_BROKER_WRITE_URL": "",
        "CELERY_RESULT_BACKEND": "",
        "BROKER_URL": "",
        "RESULT_BACKEND": "",
        "LOADER": "",
        "CONFIG_MODULE": "",
        "ORDERS_GRPC_BIND": "127.0.0.1:50051",
        "ORDERS_GRPC_TARGET": "127.0.0.1:50051",
        "PAYMENTS_GRPC_BIND": "127.0.0.1:50052",
        "PAYMENTS_GRPC_TARGET": "127.0.0.1:50052",
    }
    assert stack.orders_url == "http://127.0.0.1:8001" and stack.flower_url is None


# The settings naming a server, or a namespace on one (shared.config's URLs, addresses, topics and
# prefixes), and Celery's own variables naming one, which it takes before its configuration.
NAMING_A_SERVER = [
    *(name for name in ENVIRONMENT if name.startswith("TOPIC_")
      or name.endswith(("_URL", "_PREFIX", "_SERVERS", "_BIND", "_TARGET", "_TOPICS"))),
    "CELERY_BROKER_READ_URL", "CELERY_BROKER_WRITE_URL", "CELERY_RESULT_BACKEND",
    # (the celery command's --broker and --result-backend)
    "BROKER_URL", "RESULT_BACKEND"]
ELSEWHERE = "redis://127.0.0.1:1/0"


def test_a_stack_gives_its_processes_its_own_servers_and_names_whatever_the_shell_exported(
        tmp_path, monkeypatch):
    """A shell holding another run's settings (`set -a; . .run/env` of another checkout, a
    deployment's env file) passed CELERY_BROKER_URL, CACHE_REDIS_URL and REDIS_KEY_PREFIX on to
    `make run`'s processes, while the stack gave them its own REDIS_URL: their tasks went to
    another Redis, orders left NEW with nothing said. Every setting naming a server or a namespace
    is the stack's (a Celery child asked which broker it takes), but for its env_overrides."""
    for name in NAMING_A_SERVER:
        monkeypatch.setenv(name, ELSEWHERE)
    stack = Stack(tmp_path)
    stack._env = stack._build_env("postgresql://postgres@127.0.0.1:5432", "redis://127.0.0.1:6379")
    given = stack._process_env()

    assert [name for name in NAMING_A_SERVER if given[name] == ELSEWHERE] == []
    settings = load_settings(given)
    assert settings.celery_broker_url == settings.cache_url() == "redis://127.0.0.1:6379/0"
    assert settings.redis_key_prefix == "hseshop"
    celery = subprocess.run(
        [sys.executable, "-c", "from tasks.celery_app import app; c = app.conf;"
         " print(c.broker_url, c.broker_read_url, c.broker_write_url, c.result_backend)"],
        env=given, cwd=REPO_ROOT, stdin=subprocess.DEVNULL, capture_output=True, text=True,
        timeout=60)
    assert celery.stdout.split() == ["redis://127.0.0.1:6379/0"] * 3 + ["None"], celery.stderr
    # The celery command (workers, beat, Flower) as make run starts it: its options read the
    # environment too (BROKER_URL its --broker's), and its configuration's module and loader.
    assert (given["LOADER"], given["CONFIG_MODULE"]) == ("", "")
    report = subprocess.run(
        [sys.executable, "-m", "celery", "-A", "tasks", "report"], env=given, cwd=REPO_ROOT,
        stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60)
    assert re.findall(r"^(broker_url|result_backend): (.*)$", report.stdout, re.MULTILINE) == [
        ("broker_url", "'redis://:********@127.0.0.1:6379/0'"),  # (as it shows any: masked)
        ("result_backend", "None")], report.stderr

    overridden = Stack(tmp_path, env_overrides={"CELERY_BROKER_URL": "{redis}/5",
                                                "REDIS_KEY_PREFIX": "test.run"})
    env = overridden._build_env("postgresql://postgres@127.0.0.1:5432", "redis://127.0.0.1:6379")
    assert (env["CELERY_BROKER_URL"], env["REDIS_KEY_PREFIX"]) == (
        "redis://127.0.0.1:6379/5", "test.run")


def test_migrations_that_do_not_finish_in_time_fail_the_start_with_their_log(tmp_path,
                                                                             monkeypatch):
    silent = socket.create_server(("127.0.0.1", 0))  # takes connections, never answers
    stack = Stack(tmp_path)
    stack._env = stack._build_env(f"postgresql://postgres@127.0.0.1:{silent.getsockname()[1]}",
                                  "redis://127.0.0.1:6379")
    monkeypatch.setattr("devstack.stack.MIGRATIONS_TIMEOUT_SECONDS", 1.0)
    stack.logs_dir.mkdir(parents=True)
    try:
        with pytest.raises(RuntimeError, match="migrations for orders did not finish in 1 s; "
                                               ".*migrate-orders.log"):
            stack._migrate("orders")
    finally:
        silent.close()


def test_the_migrations_log_of_the_run_before_is_kept_too(tmp_path):
    """As each process's (ManagedProcess): a run whose migrations failed keeps their log."""
    stack = Stack(tmp_path)
    stack._env = stack._build_env(f"postgresql://postgres@127.0.0.1:{free_port()}",
                                  "redis://127.0.0.1:6379")
    stack.logs_dir.mkdir(parents=True)
    (stack.logs_dir / "migrate-orders.log").write_text("the run before's\n")
    with pytest.raises(RuntimeError, match="migrations for orders exited with code"):
        stack._migrate("orders")
    assert (stack.logs_dir / "migrate-orders.log.1").read_text() == "the run before's\n"


def test_make_run_prints_every_address_the_shop_serves(tmp_path, capsys):
    from devstack.__main__ import print_urls

    print_urls(Stack(tmp_path, with_flower=True, ports={"payments-grpc": 50099}),
               tmp_path / "env")

    printed = capsys.readouterr().out
    for address in ("http://127.0.0.1:8000/", "http://127.0.0.1:8000/docs",
                    "http://127.0.0.1:8001", "http://127.0.0.1:8002", "127.0.0.1:50051",
                    "127.0.0.1:50099", "http://127.0.0.1:5555", "127.0.0.1:9092",
                    f"set -a; . {tmp_path / 'env'}; set +a"):
        assert address in printed, address


def test_flower_is_given_its_configuration_file_by_its_absolute_path(tmp_path):
    """Flower reads flowerconfig.py from its working directory unless given --conf, and goes on
    without it, unsaid, where it is missing; a file named by --conf must be there."""
    stack = Stack(tmp_path, with_flower=True)
    stack._env = stack._build_env("postgresql://postgres@127.0.0.1:5432", "redis://127.0.0.1:6379")
    (flower,) = [process for process in stack._app_processes() if process.name == "flower"]
    (conf,) = [arg.removeprefix("--conf=") for arg in flower.argv if arg.startswith("--conf=")]
    assert Path(conf).is_absolute() and Path(conf) == REPO_ROOT / "flowerconfig.py"
    assert Path(conf).is_file()


def test_a_make_run_that_cannot_start_leaves_the_running_ones_settings_file(tmp_path,
                                                                            monkeypatch, capsys):
    """A second `make run` finds the first's ports taken and stops, saying why (no traceback: the
    reason is the message): the first's `.run/env`, which the operator's tools read, stays."""
    import devstack.__main__ as make_run

    class PortsTaken(Stack):
        def start(self, timeout: float = 60):
            raise RuntimeError("ports already in use; is another stack running?")

    (tmp_path / ".run").mkdir()
    running_ones = tmp_path / ".run" / "env"
    running_ones.write_text("REDIS_URL=redis://127.0.0.1:40001/0\n")
    monkeypatch.setattr(make_run, "REPO_ROOT", tmp_path)
    monkeypatch.setattr(make_run, "Stack", PortsTaken)
    assert make_run.run() == 1
    assert capsys.readouterr().err == (
        "[devstack] could not start: ports already in use; is another stack running?\n")
    assert running_ones.read_text() == "REDIS_URL=redis://127.0.0.1:40001/0\n"


def test_make_run_serves_on_the_ports_and_names_its_environment_sets(tmp_path, monkeypatch,
                                                                      capsys):
    """Port 8000 taken on a developer's machine, or a second checkout to run beside the first:
    `make run` had no setting for either. Its stack gets the ports GATEWAY_PORT and the others
    set, and the names' prefix HSESHOP_PREFIX sets; its defaults unset."""
    import devstack.__main__ as make_run

    given = []

    class Recorded(Stack):
        def start(self, timeout: float = 60):
            given.append((self.ports, self.names_prefix))
            raise RuntimeError("recorded")

    monkeypatch.setattr(make_run, "REPO_ROOT", tmp_path)
    monkeypatch.setattr(make_run, "Stack", Recorded)
    monkeypatch.setenv("GATEWAY_PORT", "18080")
    monkeypatch.setenv("FLOWER_PORT", "15555")
    monkeypatch.setenv("HSESHOP_PREFIX", "hseshop_second")
    assert make_run.run() == 1
    monkeypatch.delenv("GATEWAY_PORT")
    monkeypatch.delenv("FLOWER_PORT")
    monkeypatch.delenv("HSESHOP_PREFIX")
    assert make_run.run() == 1

    assert given == [({**DEFAULT_PORTS, "gateway": 18080, "flower": 15555}, "hseshop_second"),
                     (DEFAULT_PORTS, "hseshop")]


def test_a_make_run_given_a_setting_it_cannot_take_says_so_in_one_line(tmp_path, monkeypatch,
                                                                       capsys):
    import devstack.__main__ as make_run

    class NeverStarted(Stack):
        def start(self, timeout: float = 60):
            raise RuntimeError("started")

    monkeypatch.setattr(make_run, "REPO_ROOT", tmp_path)
    monkeypatch.setattr(make_run, "Stack", NeverStarted)
    monkeypatch.setenv("ORDERS_PORT", "8000")
    assert make_run.run() == 1
    assert capsys.readouterr().err == (
        "[devstack] could not start: port 8000 is given to more than one server: gateway (by"
        " default; GATEWAY_PORT) and ORDERS_PORT; set each its own\n")
    assert not (tmp_path / ".run" / "processes").exists()


def test_a_stack_with_a_names_prefix_names_its_databases_and_redis_keys_with_it(tmp_path):
    """Two checkouts' `make run`s on the machine's PostgreSQL and Redis shared hseshop_orders,
    hseshop_payments, hseshop_gateway and the Redis keys under hseshop (one's workers taking the
    other's tasks). make run's stack names them all with its prefix (HSESHOP_PREFIX)."""
    stack = Stack(tmp_path, names_prefix="hseshop_second")

    env = stack._build_env("postgresql://postgres@127.0.0.1:5432", "redis://127.0.0.1:6379")

    assert {name: env[name] for name in ("ORDERS_DATABASE_URL", "PAYMENTS_DATABASE_URL",
                                         "GATEWAY_DATABASE_URL", "REDIS_KEY_PREFIX")} == {
        "ORDERS_DATABASE_URL": "postgresql://postgres@127.0.0.1:5432/hseshop_second_orders",
        "PAYMENTS_DATABASE_URL": "postgresql://postgres@127.0.0.1:5432/hseshop_second_payments",
        "GATEWAY_DATABASE_URL": "postgresql://postgres@127.0.0.1:5432/hseshop_second_gateway",
        "REDIS_KEY_PREFIX": "hseshop_second",
    }


def test_a_port_already_in_use_is_refused_naming_the_setting_that_moves_it(tmp_path):
    """The start said which ports were taken, and nothing of how to run elsewhere."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        taken = listener.getsockname()[1]
        ports = {name: free_port() for name in DEFAULT_PORTS}
        stack = Stack(tmp_path, ports={**ports, "gateway": taken}, with_flower=True)

        with pytest.raises(RuntimeError) as refused:
            stack._check_ports_free()

    assert str(refused.value) == (
        f"ports already in use: gateway ({taken}); is another stack running? To run beside it,"
        f" set others: GATEWAY_PORT (README: The two commands)")


def test_a_make_run_on_a_system_without_proc_says_so_in_one_line(tmp_path, monkeypatch, capsys):
    """Where there is no Linux /proc (macOS), `make run` cannot tell the processes it starts
    apart (devstack.leftovers): it stops before starting any, saying why in one line, where it
    was a FileNotFoundError's traceback; nothing is written in its folder's list."""
    import devstack.__main__ as make_run
    from devstack import leftovers

    missing = tmp_path / "no-proc" / "boot_id"
    monkeypatch.setattr(leftovers, "BOOT_ID", missing)
    monkeypatch.setattr(make_run, "REPO_ROOT", tmp_path)
    assert make_run.run() == 1
    assert capsys.readouterr().err == (
        f"[devstack] could not start: devstack runs on Linux only: it needs /proc, and cannot"
        f" read {missing} here (No such file or directory)\n")
    assert not (tmp_path / ".run" / "processes").exists()


def _make_run(tmp_path, shop: list[str], start_hangs: bool = False,
              broker: bool = False) -> subprocess.Popen:
    """`python -m devstack run` (run_main), its folder the test's, its shop the one process
    `shop` (named "shop", or, if `broker`, "broker" and the stack's broker), whose pid it prints
    first (then, if `start_hangs`, its start never ends); its stderr read too."""
    name = "broker" if broker else "shop"
    program = textwrap.dedent(
        f"""
        import os
        import time
        from pathlib import Path
        import devstack.__main__ as make_run
        from devstack.processes import ManagedProcess, ProcessGroup
        from shared.quiet_interrupt import run_main

        class OneProcess(make_run.Stack):
            def start(self, timeout=60):  # (its group made as Stack.start makes it)
                self._group = ProcessGroup(on_signal=self._say_stopping)
                self._env = {{}}
                shop = ManagedProcess({name!r}, {shop!r}, os.environ,
                                      self.logs_dir / "shop.log", self.run_dir)
                if {broker!r}:
                    self._broker = shop
                print(self._group.start(shop).pid, flush=True)
                while {start_hangs!r}:  # (a start that hangs: the scenario)
                    time.sleep(1)
                return self

        make_run.REPO_ROOT, make_run.Stack = Path({str(tmp_path)!r}), OneProcess
        run_main(lambda: make_run.main(["run"]))
        """
    )
    return _started(program, tmp_path, stderr=subprocess.PIPE)


def _ctrl_c_stops_it(run: subprocess.Popen, shop: int) -> None:
    """Ctrl-C to a _make_run whose shop (its pid) runs: it stops it, says so in its last two
    lines, and dies of SIGINT."""
    run.send_signal(signal.SIGINT)

    out, err = run.communicate(timeout=30)
    assert run.returncode == -signal.SIGINT, err
    assert err == "\n[devstack] stopping...\n[devstack] stopped.\n"
    assert gone(shop)


@contextlib.contextmanager
def _make_run_ready(tmp_path, shop: list[str], start_hangs: bool = False, broker: bool = False):
    """A _make_run, given as (run, the shop's pid) once it says Ctrl-C stops everything (if
    `start_hangs`, once its shop has started); ended on the way out (end_child), its shop's
    process group killed if still there (what the test leaves, if it fails)."""
    run, pid = _make_run(tmp_path, shop, start_hangs, broker), None
    try:
        pid = int(line_within(run.stdout, 30, "the shop's pid"))
        while not start_hangs and (line := line_within(run.stdout, 30, "the run to start")) and (
                line != "Ctrl-C stops everything.\n"):
            pass
        yield run, pid
    finally:
        end_child(run)
        if pid is not None and not gone(pid):
            os.killpg(pid, signal.SIGKILL)


def test_ctrl_c_has_make_run_stop_the_shop_then_die_of_sigint(tmp_path):
    """`python -m devstack run` (`make run`), Ctrl-C'd once the shop runs, stops what it started
    and removes its settings file, its last line saying it has stopped (there was none after the
    drain's), then dies of SIGINT, as the operator's commands do, for a script running the
    command itself (`while python -m devstack run; do ...; done`) to stop too: it exited 0 (make
    dies of SIGINT whatever it exits with). Its shop here is one sleep, its folder the test's."""
    with _make_run_ready(tmp_path, ["sleep", "300"]) as (run, sleep):
        assert (tmp_path / ".run" / "env").exists()

        _ctrl_c_stops_it(run, sleep)
        assert not (tmp_path / ".run" / "env").exists()


def _shop_pids(tmp_path) -> list[int]:
    """The pids the shop of a _make_run wrote in its folder's file "pids", one a start."""
    pids = tmp_path / ".run" / "pids"
    return [int(pid) for pid in pids.read_text().split()] if pids.exists() else []


@contextlib.contextmanager
def _every_start_of_the_shop_ended(tmp_path):
    """On the way out, kill what is left of each start of a _make_run's shop (_shop_pids), as the
    test leaves it if it fails."""
    try:
        yield
    finally:
        for pid in _shop_pids(tmp_path):
            if not gone(pid):
                os.killpg(pid, signal.SIGKILL)


# A shop that, as it starts the first time, writes a line in its log and is killed (SIGKILL, as
# the OOM killer kills); started again, it runs on. Each start writes its pid in "pids".
DIES_ONCE = ('echo $$ >> pids; [ -e died ] && exec sleep 300; touch died;'
             ' echo "MemoryError: 2.1 GB"; kill -KILL $$')


def test_a_process_of_make_run_that_dies_is_started_again_saying_which_how_and_its_last_lines(
        tmp_path):
    """A Celery worker OOM-killed, a gunicorn master crashed: `make run` said one line and ran on
    without it, the orders it would have handled sitting unprocessed. It is started again, and
    said so, with its exit code and the last lines of its log; Ctrl-C then stops the run as
    ever."""
    log = tmp_path / ".run" / "logs" / "shop.log"
    with _every_start_of_the_shop_ended(tmp_path), _make_run_ready(
            tmp_path, ["sh", "-c", DIES_ONCE]) as (run, first):
        assert line_within(run.stderr, 30, "the death said") == (
            f"[devstack] shop exited with code -9 (SIGKILL): starting it again; the last lines"
            f" of {log}:\n")
        assert line_within(run.stderr, 10, "its log's line") == "    MemoryError: 2.1 GB\n"
        wait_until(lambda: len(_shop_pids(tmp_path)) == 2, 10, 0.02, "the shop to start again")
        again = _shop_pids(tmp_path)[1]
        assert gone(first) and not gone(again)

        _ctrl_c_stops_it(run, again)


def test_a_process_of_make_run_that_keeps_dying_stops_the_run(tmp_path):
    """Started again twice, a process that dies a third time within a minute (a mistake in its
    code, a setting) stops the run, saying so, with a non-zero exit: starting it again on and on
    would hide it."""
    log = tmp_path / ".run" / "logs" / "shop.log"
    with _every_start_of_the_shop_ended(tmp_path), _make_run_ready(
            tmp_path, ["sh", "-c", "echo $$ >> pids; echo cannot bind; exit 3"]) as (run, _):
        out, err = run.communicate(timeout=30)
    assert run.returncode == 1, err
    starting_again = (f"[devstack] shop exited with code 3: starting it again; the last lines of"
                      f" {log}:")
    assert err.splitlines() == [
        starting_again, "    cannot bind",
        starting_again, "    cannot bind", "    cannot bind",
        f"[devstack] shop exited with code 3, 3 deaths within 60 s: stopping the run; the last"
        f" lines of {log}:", "    cannot bind", "    cannot bind", "    cannot bind",
        "[devstack] stopped."]
    assert len(_shop_pids(tmp_path)) == 3


def test_the_broker_of_make_run_dying_stops_the_run_not_started_again_empty(tmp_path):
    """Tansu keeps its messages in memory only: those it held when it died are lost. Started
    again, empty, it would hide that (orders left NEW for good); so the run stops, saying why,
    with a non-zero exit."""
    log = tmp_path / ".run" / "logs" / "shop.log"
    with _every_start_of_the_shop_ended(tmp_path), _make_run_ready(
            tmp_path, ["sh", "-c", "echo $$ >> pids; echo 'out of memory'; exit 101"],
            broker=True) as (run, _):
        out, err = run.communicate(timeout=30)
    assert run.returncode == 1, err
    assert err == (
        "[devstack] broker exited with code 101: stopping the run, not starting it again (the"
        " Kafka broker keeps its messages in memory only: those it held are lost, and one started"
        f" again, empty, would hide that); the last lines of {log}:\n    out of memory\n"
        "[devstack] stopped.\n")
    assert len(_shop_pids(tmp_path)) == 1


def test_ctrl_c_as_make_run_starts_stops_what_it_started_and_says_so_last(tmp_path):
    """A Ctrl-C before the shop is up stops what was started, and the run's last line says it has
    stopped, as once the shop is up: "stopping..." was its last."""
    with _make_run_ready(tmp_path, ["sleep", "300"], start_hangs=True) as (run, sleep):
        _ctrl_c_stops_it(run, sleep)


def test_ctrl_c_stops_make_run_even_when_saying_so_fails(tmp_path):
    """"[devstack] stopping..." said on a stderr that cannot take it (a pipe whose reader died of
    the same Ctrl-C, `2>&1 | tee`; a terminal closed) keeps nothing from stopping: the shop is
    stopped and the run dies of SIGINT. The write's BrokenPipeError skipped the stop and the
    KeyboardInterrupt, and rose in the main thread instead (here: a traceback, exit 1)."""
    with _make_run_ready(tmp_path, ["sleep", "300"]) as (run, sleep):
        run.stderr.close()  # (nobody reads it: a write to it raises BrokenPipeError)

        run.send_signal(signal.SIGINT)

        assert run.wait(30) == -signal.SIGINT
        assert gone(sleep)
        assert not (tmp_path / ".run" / "env").exists()


# A shop process slow to stop: once it holds SIGTERM back (its file "holding", in its folder), a
# SIGTERM has it wait for the file "go" there before it exits.
SLOW_TO_STOP = textwrap.dedent(
    """
    import os, signal, time
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    open("holding", "w").close()
    signal.sigwait({signal.SIGTERM})
    while not os.path.exists("go"):
        time.sleep(0.05)
    """
)


def test_make_run_says_it_is_stopping_as_ctrl_c_comes_not_once_it_has_stopped(tmp_path):
    """"[devstack] stopping..." is said as Ctrl-C comes, on stderr, while the shop is stopping
    (its drain, a slow process: seconds): it was said once everything had stopped, the operator
    meanwhile told nothing."""
    with _make_run_ready(tmp_path, [sys.executable, "-c", SLOW_TO_STOP]) as (run, shop):
        wait_until(lambda: (tmp_path / ".run" / "holding").exists(), 10, 0.02,
                   "the shop to hold SIGTERM back")

        run.send_signal(signal.SIGINT)

        assert line_within(run.stderr, 10, "a line on stderr") == "\n"
        assert line_within(run.stderr, 10, "[devstack] stopping...") == "[devstack] stopping...\n"
        assert not gone(shop)  # (still stopping)
        (tmp_path / ".run" / "go").touch()
        out, err = run.communicate(timeout=30)
        assert run.returncode == -signal.SIGINT, err
        assert err == "[devstack] stopped.\n"
        assert gone(shop)

# A program that begins a run record in its folder, starts two processes under it (one with a
# child of its own, in its group), prints their pids, then "ready", and waits.
RECORDED_RUN = textwrap.dedent(
    """
    import os, time
    from devstack.leftovers import RunRecord
    from devstack.processes import ManagedProcess, ProcessGroup
    record = RunRecord("processes")
    record.begin()
    group = ProcessGroup(record=record)
    for name, script in (("alone", "exec sleep 300"),
                         ("parent", "sleep 300 & echo $! > child.pid; wait")):
        process = ManagedProcess(name, ["sh", "-c", script], os.environ, name + ".log", ".")
        group.start(process)
        print(process.pid, flush=True)
    while not os.path.exists("child.pid") or not open("child.pid").read().strip():
        time.sleep(0.01)
    print(open("child.pid").read().strip(), flush=True)
    print("ready", flush=True)
    time.sleep(300)  # (lives on until killed)
    """
)


def _recorded_run(tmp_path: Path) -> tuple[subprocess.Popen, list[int]]:
    run = start_child([sys.executable, "-c", RECORDED_RUN], cwd=tmp_path,
                      stdout=subprocess.PIPE, text=True,
                      env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
    pids = [int(line_within(run.stdout, 30, "a process's pid")) for _ in range(3)]
    assert line_within(run.stdout, 30, '"ready"').strip() == "ready"
    return run, pids


def test_what_a_run_killed_outright_left_running_the_next_run_in_its_folder_stops(tmp_path):
    run, pids = _recorded_run(tmp_path)
    end_child(run)  # (killed, SIGKILL: no chance to stop anything)
    try:
        assert not any(gone(pid) for pid in pids)  # left running

        record = RunRecord(tmp_path / "processes")
        assert sorted(record.begin()) == ["alone", "parent"]

        wait_until(lambda: all(gone(pid) for pid in pids), 5, 0.02, "what was left to end")
        record.end()
        assert not (tmp_path / "processes").exists()
    finally:  # (what the test leaves, if it fails)
        for pid in pids:
            if not gone(pid):
                os.kill(pid, signal.SIGKILL)


def test_the_record_of_a_run_still_running_is_left_alone_and_ended_by_it_as_it_stops(tmp_path):
    run, pids = _recorded_run(tmp_path)
    try:
        with pytest.raises(RunInTheWay, match="another run is using"):
            RunRecord(tmp_path / "processes").begin()
        assert not any(gone(pid) for pid in pids)
    finally:
        run.terminate()
        run.wait(10)
        end_child(run)
    assert all(gone(pid) for pid in pids)
    assert not (tmp_path / "processes").exists()


def test_a_pid_since_given_to_another_process_is_not_taken_for_one_left(tmp_path):
    """A record names each process by its pid and the moment it started: a pid of a process
    that has ended may be another's by the next run. (And a line a killed run left unfinished, or
    an empty list, stops no run.)"""
    other = _shell(tmp_path, "exec sleep 300").start()
    record = tmp_path / "processes"
    record.write_text(f"{other.pid} {started_at(other.pid) - 1} {signal.SIGTERM} broker\n"
                      f"{other.pid} {started_at(other.pid)}")  # (torn)
    this_run = RunRecord(record)
    try:
        assert this_run.begin() == []
        assert other.alive()
        assert record.read_text() == f"boot {this_boot()}\n"  # this run's list now
    finally:
        this_run.end()
        other.stop()


def _begun_and_ended(path: Path) -> list[str]:
    """What a run's RunRecord(path).begin() stopped, the run then ended (its list closed, and the
    list's lock with it: held, no other run could begin)."""
    record = RunRecord(path)
    try:
        return record.begin()
    finally:
        record.end()


def test_a_list_of_another_boot_names_nothing_that_runs(tmp_path):
    """After a reboot (.run kept on disk) a pid and its start come again: what the list of a run
    of an earlier boot names (here a process that runs now) is not signalled. A list of this
    boot, or from before lists said their boot, is judged by pid and start as before."""
    other_boot = "0" * 8 if this_boot() != "0" * 8 else "1" * 8
    record = tmp_path / "processes"
    running = _shell(tmp_path, "exec sleep 300").start()

    def naming_it(written_in: str) -> Path:
        record.write_text(f"{written_in}{running.pid} {started_at(running.pid)} {signal.SIGTERM}"
                          " broker\n")
        return record

    try:
        assert _begun_and_ended(naming_it(f"boot {other_boot}\n")) == []
        assert running.alive()

        for written_in in (f"boot {this_boot()}\n", ""):
            assert _begun_and_ended(naming_it(written_in)) == ["broker"]
            wait_until(lambda: not running.alive(), 15, 0.02, "the broker to be stopped")
            running.start()
    finally:
        running.stop()


def test_a_list_whose_process_still_runs_as_the_run_ends_is_kept_for_the_next(tmp_path):
    """A stop cut short (a second Ctrl-C, mid-stop) leaves a process running: the list stays, and
    the next run stops it."""
    record = RunRecord(tmp_path / "processes")
    record.begin()
    still = _shell(tmp_path, "exec sleep 300").start()
    record.note(still.pid, signal.SIGTERM, "worker")
    record.end()
    try:
        assert (tmp_path / "processes").exists()
        assert _begun_and_ended(tmp_path / "processes") == ["worker"]
        wait_until(lambda: not still.alive(), 5, 0.02, "the worker to end")
    finally:
        still.stop()


@pytest.mark.parametrize("dead", ["orders-worker", "broker"])
def test_a_stop_with_a_worker_or_the_broker_dead_says_it_waits_for_nothing(tmp_path, capsys,
                                                                            dead):
    """The drain cannot settle what a dead worker would have handled, nor count what a dead
    broker held (each look would have waited out its timeout, the whole 15 s): it says so, and
    waits not."""
    shop = Stack(tmp_path, quiet=False)
    shop._group = ProcessGroup(handle_signals=False)
    for name in ("broker", "orders-worker", "payments-worker"):
        process = shop._group.start(_shell(tmp_path, "exit 0" if name == dead else "sleep 60",
                                           name))
        if name == "broker":
            shop._broker = process
    try:
        wait_until(lambda: not any(p.alive() for p in shop._group.processes if p.name == dead),
                   5, 0.02, f"the {dead} to exit")

        shop._let_orders_in_flight_settle()
    finally:
        shop._group.stop_all()

    assert (f"[devstack] not waiting for the orders in flight: {dead} not running (what the"
            " broker still holds is lost)") in capsys.readouterr().err


def test_a_start_that_fails_stops_without_waiting_for_orders_in_flight(tmp_path, monkeypatch,
                                                                       capsys):
    """Only a shop that came up can have orders in flight: a start whose services never got
    healthy asked for the drain all the same (as orders-grpc started), and its stop waited out
    the drain's quiet window, up to 15 s, before it stopped the workers. The shop's processes
    here are sleeps under their own names, nothing listening on their ports; the broker too, its
    databases nowhere (what a drain wrongly asked for would try)."""
    made = []

    def sleeping(name: str) -> ManagedProcess:
        made.append(_shell(tmp_path, "exec sleep 60", name))
        return made[-1]

    monkeypatch.setattr("devstack.stack.ProcessGroup",
                        functools.partial(ProcessGroup, handle_signals=False))
    monkeypatch.setattr(infra, "broker_process", lambda port, run_dir: sleeping("broker"))
    monkeypatch.setattr(infra, "start_and_wait_for_broker", lambda broker, port: broker.start())
    nowhere = f"127.0.0.1:{free_port()}"
    shop = Stack(tmp_path, ports={name: free_port() for name in DEFAULT_PORTS}, quiet=False,
                 servers=(f"postgresql://postgres@{nowhere}", f"redis://{nowhere}"))
    monkeypatch.setattr(shop, "_migrate", lambda service: None)
    the_shops = shop._app_processes
    monkeypatch.setattr(shop, "_app_processes",
                        lambda: [sleeping(process.name) for process in the_shops()])

    with pytest.raises(TimeoutError, match="the APIs to report healthy"):
        shop.start(timeout=1)

    said = capsys.readouterr().err
    assert "[devstack] orders-grpc..." in said and "[devstack] orders-worker..." in said
    assert "in flight" not in said, said
    assert len(made) > 1 and not [process.name for process in made if process.alive()]
