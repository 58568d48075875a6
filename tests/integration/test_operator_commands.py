"""How the commands a README procedure runs (`python -m shared.migrations`, `shared.grpc_server`,
`tasks.parked`, `devstack`, gunicorn) end when they cannot go on: a setting they cannot take, said
in a line; Ctrl-C, whenever it comes, quietly, the command dying of SIGINT (a shell's 130), for a
script running it to stop as it stops for any command Ctrl-C ends."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import grpc
import pytest

from devstack.infra import free_port
from devstack.stack import gunicorn_argv
from tests.polling import wait_for
from tests.postgres_tools import drop_database
from tests.process_tools import start_child

REPO_ROOT = Path(__file__).resolve().parents[2]
# tests/import_pause/sitecustomize.py: holds the command as it is about to import a module.
IMPORT_PAUSE = REPO_ROOT / "tests" / "import_pause"


@pytest.mark.parametrize("setting, value, said", [
    ("ORDERS_DATABASE_URL", "postgresql://shop:not-to-be-shown@127.0.0.1:port/hseshop_orders",
     "ORDERS_DATABASE_URL='postgresql://shop:***@127.0.0.1:port/hseshop_orders': expected a"
     " PostgreSQL URL, postgresql://user:password@host:port/database"),
    ("ORDERS_GRPC_BIND", "50051", "ORDERS_GRPC_BIND='50051': expected host:port, a socket's"
     " unix:/path or unix-abstract:name, or vsock:cid:port"),
])
def test_a_grpc_server_given_a_setting_it_cannot_take_says_it_in_a_line_and_exits_1(
        settings, setting, value, said):
    """As the operator's other commands say it (shared.config.settings_or_exit), its password
    hidden; before, a ValueError's traceback showed the URL's password."""
    server = start_child([sys.executable, "-m", "shared.grpc_server", "orders"], cwd=REPO_ROOT,
                         env={**os.environ, setting: value}, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    out, err = _ended(server)
    assert server.returncode == 1, err
    assert out == ""
    (line,) = err.splitlines()
    assert line.endswith(f" ERROR shared.grpc_server [request_id=-] orders gRPC: nothing served:"
                         f" {said}"), line


@pytest.mark.parametrize("app, options", [
    ("orders_app:create_app()", []),
    ("gateway_app:create_app()", []),
    # Named by its app still, whatever a deployment names its processes.
    ("orders_app:create_app()", ["--name", "hseshop-orders"]),
])
def test_an_http_server_given_a_setting_it_cannot_take_says_it_in_a_line_and_stops(
        settings, app, options):
    """gunicorn, as `make run` and compose serve the apps: the arbiter says it in a line, its
    password hidden, before it starts a worker, and exits as one whose worker failed to boot
    (exit 3); before, the app factory's ValueError in gunicorn's traceback, and said by each
    worker, two failing together could end in HaltServer's traceback, exit 1 (clean-clone CI)."""
    *argv, given_app = gunicorn_argv(free_port(), app)
    server = start_child(
        [sys.executable, "-m", *argv, *options, given_app], cwd=REPO_ROOT,
        env={**os.environ, "ORDERS_DATABASE_URL":
             "postgresql://shop:not-to-be-shown@127.0.0.1:port/hseshop_orders"},
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = _ended(server)
    assert server.returncode == 3, err
    assert "Traceback" not in err and "not-to-be-shown" not in err, err
    assert "Booting worker" not in err, err
    assert (f"[ERROR] {app}: nothing served: ORDERS_DATABASE_URL='postgresql://shop:***@127.0.0.1:"
            "port/hseshop_orders': expected a PostgreSQL URL") in err, err


# Each command, and a module it loads before it does anything (Celery's for tasks.parked, which
# its package `tasks` loaded before the command's own module ran). Those that would serve or start
# a stack are asked for --help: it loads the same modules, and ends at once should a change ever
# have it not load the one held.
COMMANDS_LOADING = [
    (["shared.migrations", "upgrade", "orders"], "sqlalchemy"),
    (["shared.grpc_server", "--help"], "grpc"),
    (["tasks.parked", "list", "orders"], "celery"),
    (["tasks.parked", "list", "orders"], "psycopg2"),
    (["devstack", "--help"], "sqlalchemy"),
]


@pytest.mark.parametrize("argv, module", COMMANDS_LOADING)
def test_ctrl_c_while_a_command_loads_its_modules_ends_it_quietly_of_sigint(
        settings, tmp_path, argv, module):
    """Before, Python's KeyboardInterrupt printed the traceback of the import it cut short."""
    command = _held_at_the_import_of(module, argv, tmp_path)
    command.send_signal(signal.SIGINT)
    out, err = _ended(command)
    assert (command.returncode, out, err) == (-signal.SIGINT, "", "")


@pytest.mark.parametrize("argv, module", [
    # As it makes its first connection, the database's name its own (dropped below).
    (["shared.migrations", "upgrade", "orders"], "psycopg2.extras"),
    # As it builds its server, its settings read and its app made.
    (["shared.grpc_server", "orders"], "orders_app.grpc_api"),
])
def test_ctrl_c_while_a_command_runs_ends_it_quietly_of_sigint(settings, infrastructure,
                                                               tmp_path, argv, module):
    name = f"test_interrupted_{uuid.uuid4().hex[:8]}_orders"
    try:
        command = _held_at_the_import_of(
            module, argv, tmp_path, ORDERS_DATABASE_URL=f"{infrastructure.postgres_base}/{name}",
            ORDERS_GRPC_BIND=f"127.0.0.1:{free_port()}")
        command.send_signal(signal.SIGINT)
        out, err = _ended(command)
        assert command.returncode == -signal.SIGINT, err
        assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
        assert out == ""
    finally:
        drop_database(f"{infrastructure.postgres_base}/postgres", name)


def test_ctrl_c_while_replay_hands_messages_back_says_how_many_went_and_ends_of_sigint(
        settings, tmp_path):
    """tasks.parked takes Ctrl-C its own way as it runs: it says how many went through, then ends
    as Ctrl-C ends a command (it exited 130). Held as it first builds the service's app, a
    message's id that nothing parked named: it replays nothing of the run's."""
    command = _held_at_the_import_of(
        "orders_app", ["tasks.parked", "replay", "orders", str(uuid.uuid4())], tmp_path)
    command.send_signal(signal.SIGINT)
    out, err = _ended(command)
    assert (command.returncode, out, err) == (
        -signal.SIGINT, "", "orders inbox: at least 0 message(s) handed back to be handled before"
        " it was interrupted; run it again for the rest\n")


@pytest.mark.parametrize("signum, returncode", [(signal.SIGINT, -signal.SIGINT),
                                                 (signal.SIGTERM, 0)])
def test_a_serving_grpc_server_stops_serving_then_ctrl_c_has_it_die_of_sigint(
        settings, tmp_path, signum, returncode):
    """Stopped by Ctrl-C as it serves, the gRPC server stops serving (its calls in flight given
    7 s), then dies of SIGINT as the other commands Ctrl-C ends, for a script running it to stop
    too: it exited 0. Stopped by SIGTERM (a deploy, compose), it exits 0, as before."""
    with open(tmp_path / "grpc.log", "wb") as log:
        server = start_child([sys.executable, "-m", "shared.grpc_server", "orders"],
                             cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT,
                             env={**os.environ, "ORDERS_GRPC_BIND": f"127.0.0.1:{free_port()}"},
                             preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        wait_for(lambda: "orders gRPC listening on" in (tmp_path / "grpc.log").read_text()
                 or server.poll() is not None, timeout=60, what="the gRPC server to listen")
        server.send_signal(signum)

        assert server.wait(30) == returncode, (tmp_path / "grpc.log").read_text()
    finally:
        if server.poll() is None:
            server.kill()
            server.wait(10)
    said = _said_it_stopped(server, tmp_path, returncode)
    assert "Traceback" not in said, said


# `python -m shared.grpc_server orders` (run_main), its server given a method /test.Slow/Sleep that
# says "slow call" and sleeps a minute, its grace `grace` s (when it has a STOP_GRACE), `app_made`
# run once its app is made, `before_start` run in build_server, once the server listens, before
# main starts it, and `as_stop_begins` as main stops it with a grace, before the stop begins.
SLOW_GRPC_SERVER = textwrap.dedent(
    """
    import os, signal, sys, time
    import grpc
    import shared.grpc_server as grpc_server
    from shared.quiet_interrupt import run_main

    import orders_app

    built, made = grpc_server.build_server, orders_app.create_app

    def create_app(*args, **kwargs):
        app = made(*args, **kwargs)
        {app_made}
        return app

    def slow(request, context):
        print("slow call", flush=True)
        time.sleep(60)  # (a call still running as the server stops: the scenario)
        return b""

    def build_server(*args, **kwargs):
        server = built(*args, **kwargs)
        server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(
            "test.Slow", {{"Sleep": grpc.unary_unary_rpc_method_handler(slow)}})])
        {before_start}
        stop_server = server.stop

        def stop(grace):  # (its stop given a grace: `as_stop_begins` run first, "grace begun" said)
            if grace:
                {as_stop_begins}
            done = stop_server(grace)
            if grace:
                print("grace begun", flush=True)
            return done

        server.stop = stop
        return server

    orders_app.create_app = create_app
    grpc_server.build_server, grpc_server.STOP_GRACE = build_server, {grace}
    run_main(lambda: grpc_server.main(["orders"]))
    """
)


def _slow_grpc_server(tmp_path: Path, bind: str, grace: float = 5, before_start: str = "pass",
                      preexec_fn=None, buffered: bool = False, app_made: str = "pass",
                      as_stop_begins: str = "pass") -> subprocess.Popen:
    """`buffered`: its stdout buffered, as Python has it on a file or pipe, whatever
    PYTHONUNBUFFERED this run was given."""
    env = {**os.environ, "ORDERS_GRPC_BIND": bind, "PYTHONPATH": str(REPO_ROOT)}
    if buffered:
        env.pop("PYTHONUNBUFFERED", None)
    with open(tmp_path / "grpc.log", "wb") as log:
        return start_child(
            [sys.executable, "-c", SLOW_GRPC_SERVER.format(grace=grace, before_start=before_start,
                                                        app_made=app_made,
                                                        as_stop_begins=as_stop_begins)],
            cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT, preexec_fn=preexec_fn, env=env)


def _stopped(server: subprocess.Popen, timeout: float) -> None:
    try:
        server.wait(timeout)
    finally:
        if server.poll() is None:
            server.kill()
            server.wait(10)


def _listening(server: subprocess.Popen, tmp_path: Path) -> None:
    wait_for(lambda: "orders gRPC listening on" in (tmp_path / "grpc.log").read_text()
             or server.poll() is not None, timeout=60, what="the gRPC server to listen")


@contextlib.contextmanager
def _a_slow_call_taken(server: subprocess.Popen, tmp_path: Path, bind: str,
                       what: str = "the slow call to be taken"):
    """A call to /test.Slow/Sleep, in flight once the server has taken it, till the block ends
    (its future held till then: one collected cancels its call)."""
    with grpc.insecure_channel(bind) as channel:
        call = channel.unary_unary("/test.Slow/Sleep").future(b"")
        try:
            wait_for(lambda: "slow call" in (tmp_path / "grpc.log").read_text()
                     or server.poll() is not None, timeout=30, what=what)
            yield
        finally:
            call.cancel()


def _said_it_stopped(server: subprocess.Popen, tmp_path: Path, returncode: int = 0) -> str:
    """The gRPC server's log, once it has exited `returncode` saying 'stopped' last."""
    said = (tmp_path / "grpc.log").read_text()
    assert server.returncode == returncode, said
    assert said.splitlines()[-1].endswith(" INFO shared.grpc_server [request_id=-] orders gRPC"
                                          " stopped"), said
    return said


def test_a_grpc_server_sigtermed_before_it_starts_stops_saying_so_and_exits_0(settings,
                                                                             tmp_path):
    """A SIGTERM as it makes its server (listening already: add_insecure_port binds, and a connect
    succeeds, which devstack takes for ready) or reads its settings, makes its app, has it stop
    as one serving would, saying so, exit 0, not started: before, SIGTERM was taken only then,
    and killed it (exit 143, nothing said). (Ctrl-C then ends it at once, quietly: above.)"""
    server = _slow_grpc_server(tmp_path, f"127.0.0.1:{free_port()}",
                               before_start="os.kill(os.getpid(), signal.SIGTERM)")
    _stopped(server, 60)

    said = _said_it_stopped(server, tmp_path)
    assert "listening" not in said, said


def test_a_grpc_server_sigtermed_exits_with_what_it_printed_written(settings, tmp_path):
    """Its exit on SIGTERM (os._exit, for the calls cut short not to be waited for) writes out
    what stdout holds, as Python's own exit would: only logging's handlers were flushed, and a
    line printed to a stdout that is a file or pipe (buffered) was lost."""
    server = _slow_grpc_server(
        tmp_path, f"127.0.0.1:{free_port()}",
        before_start="print('printed, not flushed'); os.kill(os.getpid(), signal.SIGTERM)",
        buffered=True)
    _stopped(server, 60)

    said = (tmp_path / "grpc.log").read_text()
    assert server.returncode == 0, said
    assert "printed, not flushed" in said, said


def test_a_grpc_server_sigtermed_as_it_makes_its_app_binds_nothing_and_stops(settings,
                                                                              tmp_path):
    """A SIGTERM as it reads its settings or makes its app has it stop there, saying so, exit 0,
    nothing bound: it went on to bind, and a bind that failed (here its port taken) exited 1
    with a traceback."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        server = _slow_grpc_server(tmp_path, f"127.0.0.1:{taken.getsockname()[1]}",
                                   app_made="os.kill(os.getpid(), signal.SIGTERM)")
        _stopped(server, 60)

    said = _said_it_stopped(server, tmp_path)
    assert "Traceback" not in said, said


def test_a_grpc_server_sigtermed_with_a_call_past_its_grace_exits_once_it_has_stopped(settings,
                                                                                      tmp_path):
    """SIGTERM'd with a call in flight that outlasts the grace, the gRPC server says 'stopped'
    once the grace is out and exits 0 then: before, it went on until the call's handler returned
    (its thread waited for at exit), here a minute, README's 5 s holding for Ctrl-C only."""
    bind = f"127.0.0.1:{free_port()}"
    server = _slow_grpc_server(tmp_path, bind, grace=1)
    _listening(server, tmp_path)
    with _a_slow_call_taken(server, tmp_path, bind):
        server.send_signal(signal.SIGTERM)
        sent = time.monotonic()
        _stopped(server, 30)
    said = _said_it_stopped(server, tmp_path)
    assert time.monotonic() - sent < 1 + 5, said  # (its grace, and a margin)


@pytest.mark.parametrize("signum, returncode", [(signal.SIGINT, -signal.SIGINT),
                                                 (signal.SIGTERM, 0)])
@pytest.mark.parametrize("during_its_grace", [False, True])
def test_a_second_stop_signal_has_a_stopping_grpc_server_cut_its_calls_short(
        settings, tmp_path, signum, returncode, during_its_grace):
    """A second Ctrl-C (SIGTERM) as the gRPC server gives its calls in flight their grace has it
    cut them short and stop at once: it did nothing, the grace (here 30 s) waited out. Whenever it
    comes: as the stop begins (sent by the server itself, before gRPC's stop is called), or once
    the grace has begun (sent from here)."""
    bind = f"127.0.0.1:{free_port()}"
    as_stop_begins = "pass" if during_its_grace else f"os.kill(os.getpid(), {int(signum)})"
    server = _slow_grpc_server(tmp_path, bind, grace=30, as_stop_begins=as_stop_begins,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    _listening(server, tmp_path)
    with _a_slow_call_taken(server, tmp_path, bind):
        server.send_signal(signum)
        if during_its_grace:
            wait_for(lambda: "grace begun" in (tmp_path / "grpc.log").read_text()
                     or server.poll() is not None, timeout=30, what="the grace to begin")
            server.send_signal(signum)

        _stopped(server, 10)
    _said_it_stopped(server, tmp_path, returncode)


def test_a_grpc_server_started_with_ctrl_c_ignored_serves_on_through_it(settings, tmp_path):
    """Started with SIGINT ignored (a job a script started in the background, `... &`), the gRPC
    server goes on serving through a SIGINT, as its other commands and devstack leave it
    ignored; SIGTERM stops it, exit 0. It took SIGINT all the same, stopped, and died of it.
    (The SIGINT is taken before the SIGTERM sent after it, a lower signal pending first.)"""
    bind = f"127.0.0.1:{free_port()}"
    server = _slow_grpc_server(tmp_path, bind,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    _listening(server, tmp_path)
    server.send_signal(signal.SIGINT)
    with _a_slow_call_taken(server, tmp_path, bind, what="a call taken after the SIGINT"):
        server.send_signal(signal.SIGTERM)
        _stopped(server, 30)
    said = (tmp_path / "grpc.log").read_text()
    assert server.returncode == 0, said
    assert "slow call" in said, said


def test_ctrl_c_stops_a_script_running_a_command_as_it_stops_any(settings, tmp_path):
    """bash, given Ctrl-C (SIGINT to the terminal's process group: itself and the command it
    waits for), stops only once the command dies of SIGINT: one that exits, 130 or not, is taken
    to have dealt with it, and the script goes on (`for s in orders payments gateway; do python
    -m shared.migrations upgrade $s; done` went on to the next service)."""
    script = f"{sys.executable} -m shared.migrations upgrade orders; echo went on"
    command = _held_at_the_import_of("sqlalchemy", ["bash", "-c", script], tmp_path,
                                     run_as_module=False, start_new_session=True)
    try:
        os.killpg(command.pid, signal.SIGINT)
        out, err = _ended(command)
        assert (command.returncode, out, err) == (-signal.SIGINT, "", "")
    finally:
        try:
            os.killpg(command.pid, signal.SIGKILL)  # (the command too, had the test failed)
        except ProcessLookupError:
            pass


def test_a_command_started_with_ctrl_c_ignored_goes_on_ignoring_it(settings, tmp_path):
    """Started in the background by a script (`&`), or under nohup: SIGINT stays ignored while
    its modules load, as Python itself leaves it."""
    command = _held_at_the_import_of(
        "grpc", ["shared.grpc_server", "--help"], tmp_path,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    try:
        status = Path(f"/proc/{command.pid}/status").read_text()
        ignored = int(next(line for line in status.splitlines()
                           if line.startswith("SigIgn:")).split()[1], 16)
        assert ignored & (1 << (signal.SIGINT - 1))
    finally:
        command.kill()
        command.wait(10)


def _held_at_the_import_of(module: str, argv: list[str], tmp_path: Path, preexec_fn=None,
                           run_as_module: bool = True, start_new_session: bool = False,
                           **env: str) -> subprocess.Popen:
    """`python -m ARGV` (or ARGV, a command that runs Python) held as it is about to import
    `module`."""
    held = tmp_path / "held"
    argv = [sys.executable, "-m", *argv] if run_as_module else argv
    # (IMPORT_PAUSE first, for its sitecustomize to be the one Python imports; the PYTHONPATH the
    # tests were given after it.)
    python_path = os.pathsep.join(filter(None, [str(IMPORT_PAUSE), os.environ.get("PYTHONPATH")]))
    command = start_child(
        argv, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        preexec_fn=preexec_fn, start_new_session=start_new_session,
        env={**os.environ, **env, "PYTHONPATH": python_path,
             "HSESHOP_TEST_HOLD_IMPORT_OF": module, "HSESHOP_TEST_HELD_FILE": str(held)})
    try:
        wait_for(lambda: held.exists() or command.poll() is not None, timeout=60,
                 what=f"{' '.join(argv)} to import {module}")
    except AssertionError:
        command.kill()
        raise
    if not held.exists():
        raise AssertionError(f"ended before it imported {module}: {_ended(command)}")
    return command


def _ended(command: subprocess.Popen) -> tuple[str, str]:
    try:
        return command.communicate(timeout=60)
    finally:
        if command.poll() is None:
            command.kill()
            command.wait(10)
