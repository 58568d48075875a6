"""Ctrl-C ends the benchmark's commands quietly (shared.quiet_interrupt), as it ends the shop's
other commands: `python -m bench` (`make bench`), bench.latency_only, bench.gateway_transports,
bench.chaos (`make chaos`) and the load generator they run, bench.load, die of SIGINT (a shell's
130) with nothing said, whether it comes while their modules load or while they measure. They
printed KeyboardInterrupt's traceback. A run cut short so stops its stack and forgets its data
first, as it did (bench.shop.running_bench_stack)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.polling import wait_for
from tests.process_tools import end_child, line_within, start_child

REPO_ROOT = Path(__file__).resolve().parents[2]
# tests/import_pause/sitecustomize.py: holds the command as it is about to import a module.
IMPORT_PAUSE = REPO_ROOT / "tests" / "import_pause"


def _as_a_terminal_starts_it(argv: list[str], **env: str) -> subprocess.Popen:
    """`python ARGV` with Ctrl-C's SIGINT as a terminal's job gets it (whatever this run was
    started with: pytest under nohup would pass it on ignored), its stdout and stderr read."""
    return start_child([sys.executable, *argv], cwd=REPO_ROOT, stdout=subprocess.PIPE,
                       stderr=subprocess.PIPE, text=True, env={**os.environ, **env},
                       preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def _ended_by_ctrl_c(command: subprocess.Popen) -> tuple[int, str, str]:
    """Ctrl-C's SIGINT to `command`: how it ended, what it wrote on stdout after, on stderr."""
    command.send_signal(signal.SIGINT)
    try:
        out, err = command.communicate(timeout=60)
    finally:
        end_child(command)
    return command.returncode, out, err


# Each command, and a module it loads before it does anything.
COMMANDS_LOADING = [
    (["bench", "--smoke"], "bench.runner"),
    (["bench.latency_only", "a-label", "--smoke"], "bench.runner"),
    (["bench.gateway_transports", "--smoke"], "bench.servers"),
    (["bench.chaos", "--seconds", "1"], "bench.chaos.soak"),
    (["bench.load", "--url", "http://127.0.0.1:9", "--users", "u", "--duration", "1",
      "--out", "unused.json"], "http.client"),
]


@pytest.mark.parametrize("argv, module", COMMANDS_LOADING,
                         ids=[argv[0] for argv, _ in COMMANDS_LOADING])
def test_ctrl_c_while_a_bench_command_loads_its_modules_ends_it_quietly_of_sigint(
        tmp_path, argv, module):
    held = tmp_path / "held"
    python_path = os.pathsep.join(filter(None, [str(IMPORT_PAUSE), os.environ.get("PYTHONPATH")]))
    command = _as_a_terminal_starts_it(["-m", *argv], PYTHONPATH=python_path,
                                       HSESHOP_TEST_HOLD_IMPORT_OF=module,
                                       HSESHOP_TEST_HELD_FILE=str(held))
    try:
        wait_for(lambda: held.exists() or command.poll() is not None, timeout=60,
                 what=f"{' '.join(argv)} to import {module}")
        assert held.exists(), f"ended before it imported {module}: {command.communicate()}"
    except BaseException:
        end_child(command)
        raise

    assert _ended_by_ctrl_c(command) == (-signal.SIGINT, "", "")


# Each command that runs on a bench stack, and what it measures first (a module's function).
COMMANDS_MEASURING = [
    (["bench", "--smoke"], "bench.runner", "run_benchmark"),
    (["bench.latency_only", "a-label", "--smoke"], "bench.shop", "seed_shoppers"),
    (["bench.gateway_transports", "--smoke"], "bench.servers", "server_versions"),
    (["bench.chaos", "--seconds", "1"], "bench.chaos.soak", "run_chaos"),
]


@pytest.mark.parametrize("argv, module, measure", COMMANDS_MEASURING,
                         ids=[argv[0] for argv, _, _ in COMMANDS_MEASURING])
def test_ctrl_c_while_a_bench_command_measures_stops_its_stack_then_ends_it_quietly_of_sigint(
        tmp_path, argv, module, measure):
    """The command run as `python -m` runs it, on a stack that is one folder (its stop noted in
    a file), its first measurement one that waits to be interrupted."""
    stopped = tmp_path / "stopped"
    program = textwrap.dedent(
        f"""
        import contextlib
        import importlib
        import runpy
        import sys
        import time
        from pathlib import Path
        from types import SimpleNamespace

        import bench.shop

        @contextlib.contextmanager
        def running_bench_stack(say, **options):
            try:
                yield SimpleNamespace(run_dir=Path({str(tmp_path)!r}))
            finally:  # (where the real one stops the stack and forgets its data)
                Path({str(stopped)!r}).touch()

        def measuring(*args, **kwargs):
            print("measuring", flush=True)
            time.sleep(300)

        bench.shop.running_bench_stack = running_bench_stack
        setattr(importlib.import_module({module!r}), {measure!r}, measuring)
        sys.argv = [{argv[0]!r}, *{argv[1:]!r}]
        runpy.run_module({argv[0]!r}, run_name="__main__", alter_sys=True)
        """
    )
    command = _as_a_terminal_starts_it(["-c", program])
    try:
        assert line_within(command.stdout, 60, '"measuring"') == "measuring\n"
    except BaseException:
        end_child(command)
        raise

    assert _ended_by_ctrl_c(command) == (-signal.SIGINT, "", "")
    assert stopped.exists()
