"""A child a test starts dies with the test session, even one killed outright
(tests/process_tools.py)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from concurrent import futures
from pathlib import Path

import grpc
import pytest

from devstack.infra import free_port
from devstack.leftovers import started_at
from tests.polling import wait_for
from tests.process_tools import end_child, gone, line_within, start_child

REPO_ROOT = Path(__file__).resolve().parents[2]

# A test session, as far as its children go: it starts one as a test does, prints its pid, waits.
SESSION = textwrap.dedent(
    """
    import time
    from tests.process_tools import start_child
    print(start_child(["sleep", "300"]).pid, flush=True)
    time.sleep(300)  # (lives on until killed: the scenario)
    """
)


def test_a_child_dies_with_a_session_killed_outright():
    session = start_child([sys.executable, "-c", SESSION], cwd=REPO_ROOT, stdout=subprocess.PIPE,
                          text=True, env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
    child = int(line_within(session.stdout, 30, "the child's pid"))
    child_started = started_at(child)
    try:
        assert child_started is not None
        session.kill()
        session.wait(10)
        wait_for(lambda: gone(child), timeout=10, what="the child to die with its session")
    finally:
        end_child(session)
        if started_at(child) == child_started:  # (left by a failure: not left running)
            os.kill(child, signal.SIGKILL)


def test_a_child_is_not_started_from_a_thread_it_would_die_with():
    refused = []

    def start() -> None:
        with pytest.raises(RuntimeError, match="main thread") as raised:
            start_child(["true"])
        refused.append(raised.value)

    thread = threading.Thread(target=start)
    thread.start()
    thread.join(10)
    assert refused


def test_a_child_forked_after_grpc_ran_here_has_no_grpc_threads_before_it_execs(tmp_path):
    """With gRPC's fork support on, its fork handler started its threads again in each child:
    between fork and exec, where the child closes its files (gRPC's epoll among them), a poller
    thread could abort it before it ran what it was started for (tests/conftest.py)."""
    server = grpc.server(futures.ThreadPoolExecutor(1))
    server.add_insecure_port("127.0.0.1:0")
    server.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{free_port()}")  # (most likely nothing there)
    said = tmp_path / "threads"
    try:
        # (Connecting, or trying to: the channel's threads at work as the child is forked.)
        with contextlib.suppress(grpc.FutureTimeoutError):
            grpc.channel_ready_future(channel).result(timeout=0.2)

        def count_threads() -> None:  # (in the child, before it execs)
            said.write_text(" ".join(sorted(
                Path(f"/proc/self/task/{task}/comm").read_text().strip()
                for task in os.listdir("/proc/self/task"))))

        child = start_child(["true"], preexec_fn=count_threads)
        assert child.wait(10) == 0
        assert len(said.read_text().split()) == 1, said.read_text()
    finally:
        channel.close()
        server.stop(grace=None)


def test_a_line_a_silent_child_never_writes_fails_the_test_in_time_saying_what_had_come():
    """line_within, where a readline waited for good (the test, and CI, hung): the child wrote
    half a line, then went silent."""
    child = start_child(["sh", "-c", "printf 'half a'; exec sleep 300"], stdout=subprocess.PIPE,
                        text=True)
    try:
        began = time.monotonic()
        with pytest.raises(AssertionError) as failed:
            line_within(child.stdout, 0.5, '"ready"')
        assert time.monotonic() - began < 5
        assert str(failed.value) == ('timed out after 0.5s waiting for "ready"; read of the line '
                                     "so far: 'half a'")
    finally:
        end_child(child)


def test_a_line_is_read_as_readline_reads_it_the_next_left_for_the_next_read():
    child = start_child(["printf", "one\\ntwo\\nthree"], stdout=subprocess.PIPE, text=True)
    try:
        assert line_within(child.stdout, 10, "the first line") == "one\n"
        assert line_within(child.stdout, 10, "the second line") == "two\n"
        assert line_within(child.stdout, 10, "the last, unended") == "three"
        assert line_within(child.stdout, 10, "the end") == ""
    finally:
        end_child(child)


def test_a_pipe_opened_in_binary_is_refused_not_read_to_its_end():
    """In binary, no character read is "\n": the line would be the whole stream, and the
    failure a TypeError from joining bytes, not what was awaited."""
    child = start_child(["printf", "one\\ntwo\\n"], stdout=subprocess.PIPE)
    try:
        with pytest.raises(TypeError, match="reads a pipe opened in text, not BufferedReader"):
            line_within(child.stdout, 10, "the first line")
    finally:
        end_child(child)
