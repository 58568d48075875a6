"""`python -m devstack run`: start the whole shop locally and show its logs until Ctrl-C."""

from __future__ import annotations

# Run as a command: Ctrl-C while the modules below load ends it quietly (shared.quiet_interrupt).
if __name__ == "__main__":
    from shared.quiet_interrupt import quiet_while_loading
    quiet_while_loading()

import argparse
import contextlib
import os
import sys
import time
from pathlib import Path

from devstack.local_secrets import SECRETS_FILE, secrets_to_hand_out
from devstack.logs import LogFollower
from devstack.run_settings import chosen_ports, names_prefix
from devstack.stack import DEFAULT_PORTS, REPO_ROOT, Stack
from devstack.supervision import RunMustStop, Supervisor
from shared.quiet_interrupt import INTERRUPTED


def run() -> int:
    run_dir = REPO_ROOT / ".run"
    try:  # (its ports and names, as the environment sets them: devstack.run_settings)
        ports, prefix = chosen_ports(DEFAULT_PORTS, os.environ), names_prefix(os.environ)
    except RuntimeError as exc:
        print(f"[devstack] could not start: {exc}", file=sys.stderr, flush=True)
        return 1
    # The checkout's own secrets, the same every run (devstack.local_secrets), not the published
    # defaults: no process signs with what anyone can read in the code.
    stack = Stack(run_dir, env_overrides=secrets_to_hand_out(run_dir / SECRETS_FILE),
                  ports=ports, with_flower=True, quiet=False, names_prefix=prefix)
    env_file = run_dir / "env"
    wrote_env_file = False  # (a run that could not start leaves a running one's file alone)
    said_why_it_could_not_start = False  # (then that is its last line)
    try:
        try:
            stack.start()
        except (RuntimeError, TimeoutError) as exc:  # (each says what kept it from starting)
            print(f"[devstack] could not start: {exc}", file=sys.stderr, flush=True)
            said_why_it_could_not_start = True
            return 1
        stack.write_env_file(env_file)
        wrote_env_file = True
        print_urls(stack, env_file)
        follower = LogFollower([(process.name, process.log_path) for process in stack.processes])
        supervisor = Supervisor(stack, say, claim=stack.claim)
        while True:
            if not follower.poll():
                time.sleep(0.2)
            supervisor.look()
    except RunMustStop as exc:  # (a server died, a process keeps dying, the claim taken: it says)
        say(str(exc))
        return 1
    except KeyboardInterrupt:
        # Once all is stopped (below), it dies of SIGINT as the operator's commands do
        # (run_main), for a script running the command itself (`while python -m devstack run;
        # do ...; done`) to stop too. ("stopping..." was said as the signal came: Stack.)
        return INTERRUPTED
    finally:
        # A stop that began without a signal (RunMustStop's, a start's failure) may be cut short
        # by one (Ctrl-C during its drain, a hangup): its handler stops the rest at once, and
        # what it raises goes up once the run has ended as every stop ends.
        cut_short = None
        try:
            stack.stop()
        except (KeyboardInterrupt, SystemExit) as exc:
            cut_short = exc
        if wrote_env_file:
            env_file.unlink(missing_ok=True)
        if not said_why_it_could_not_start:
            # The stop's last line, said once every process has stopped, for the operator to
            # know the stop is over (README: The two commands).
            say("stopped.")
        if cut_short is not None:
            raise cut_short


def say(message: str) -> None:
    """Say `message` on stderr. A stderr that cannot take it (a pipe whose reader died of the
    same Ctrl-C) changes nothing: the run still stops, and ends as its stop signal has it."""
    with contextlib.suppress(OSError):
        print(f"[devstack] {message}", file=sys.stderr, flush=True)


def print_urls(stack: Stack, env_file: Path) -> None:
    print(
        "\n".join(
            [
                "",
                "HseShop is running. Open the shop:",
                f"  {stack.gateway_url}/",
                f"  API docs        {stack.gateway_url}/docs",
                "Behind the gateway (internal; they only trust identities the gateway signs):",
                f"  orders API      {stack.orders_url}   docs {stack.orders_url}/docs/swagger-ui",
                f"  payments API    {stack.payments_url}"
                f"   docs {stack.payments_url}/docs/swagger-ui",
                f"  orders gRPC     {stack.grpc_address('orders')}",
                f"  payments gRPC   {stack.grpc_address('payments')}",
                f"  Flower          {stack.flower_url}",
                f"  Kafka broker    {stack.broker_address}",
                f"  logs            {stack.logs_dir}",
                f"  settings        {env_file}  (for the tools: set -a; . {env_file}; set +a)",
                "Ctrl-C stops everything.",
                "",
            ]
        ),
        flush=True,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m devstack", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("run", help="start every process of the shop and follow their logs")
    parser.parse_args(argv)
    return run()


if __name__ == "__main__":
    from shared.quiet_interrupt import run_main
    run_main(main)
