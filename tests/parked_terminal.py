"""tasks.parked run as an operator types it on a terminal, for the tests of what it asks there
(discard's "[y/N]") and what it says there: the child, its controlling terminal a pseudo-terminal,
and what it writes on that terminal read as it comes."""

from __future__ import annotations

import contextlib
import fcntl
import os
import subprocess
import sys
import termios
import uuid
from collections.abc import Callable, Iterator

from sqlalchemy.engine import make_url

from devstack.stack import REPO_ROOT
from tests.polling import wait_for
from tests.process_tools import start_child


def said_until(fd: int, end: str, timeout: float) -> str:
    """What a child wrote on `fd` (a pipe, or a terminal's controller) up to and including `end`
    (a prompt, which no newline ends), read as it comes; fails the test should it not come
    within `timeout` seconds."""
    os.set_blocking(fd, False)
    said = bytearray()

    def said_it() -> str | None:
        with contextlib.suppress(BlockingIOError):
            said.extend(os.read(fd, 4096))
        return said.decode() if said.decode(errors="replace").endswith(end) else None

    return wait_for(said_it, timeout=timeout, what=f"{end!r} from the child")


def environment_without_sudo() -> dict[str, str]:
    """This process's environment but SUDO_USER, for a child whose audit line names this process's
    user alone."""
    return {name: value for name, value in os.environ.items() if name != "SUDO_USER"}


def database_named(settings, service: str) -> str:
    """The service's database as the operator's command names it: its name and server."""
    url = make_url(settings.database_url(service))
    return f"{url.database} at {url.host}:{url.port}"


@contextlib.contextmanager
def on_a_terminal(argv: list[str], stderr) -> Iterator[tuple[subprocess.Popen, int]]:
    """`python -m tasks.parked ARGV` run as typed on a terminal: in a session of its own whose
    controlling terminal (its /dev/tty) is a pseudo-terminal, its stdin, as a login shell's
    command has; its stdout piped, its stderr `stderr` (a file, as `2>>parked-audit.log` sends
    it). Yields the child and the terminal's controller, which reads what the child writes on the
    terminal and types the answers. The child is killed, should it still run, as the block ends.
    (Held open here, the terminal stays readable once the child has ended.)"""
    controller, terminal = os.openpty()
    try:
        child = start_child(
            [sys.executable, "-m", "tasks.parked", *argv], stdin=terminal,
            stdout=subprocess.PIPE, stderr=stderr, cwd=REPO_ROOT, start_new_session=True,
            preexec_fn=lambda: fcntl.ioctl(0, termios.TIOCSCTTY, 0),
            env=environment_without_sudo())
        try:
            yield child, controller
        finally:
            child.kill()
            child.wait()
            child.stdout.close()
    finally:
        os.close(terminal)
        os.close(controller)


def discarded_all_confirmed_leaving_some_parked(settings, service: str, outbox: bool,
                                                counted: int,
                                                while_it_asks: Callable[[], None]) -> None:
    """`discard SERVICE --all` (of the outbox when `outbox`) typed on a terminal: it asks to
    discard `counted` rows of the service's database, `while_it_asks` runs as the question waits,
    and the answer is y; it must then say that it discarded `counted` messages and that messages
    parked since they were counted are left parked, exit 0."""
    box, outbox_option = ("outbox", ["--outbox"]) if outbox else ("inbox", [])
    with on_a_terminal(["discard", service, *outbox_option, "--all"],
                       stderr=subprocess.PIPE) as (command, terminal):
        asked = said_until(terminal, "[y/N] ", timeout=60)
        assert asked.endswith(f"discard {counted} rows of {database_named(settings, service)}?"
                              " [y/N] ")
        while_it_asks()
        os.write(terminal, b"y\n")
        out, err = command.communicate(timeout=60)
    assert command.returncode == 0, err
    assert out.decode() == (
        f"{service} {box}: {counted} message(s) discarded\n{service} {box}: messages parked since"
        f" they were counted are left parked (list {service}{' --outbox' * outbox} shows them)\n")


def discarded_named_confirmed_leaving_one_parked(settings, service: str, outbox: bool,
                                                 counted: uuid.UUID, parked_meanwhile: uuid.UUID,
                                                 while_it_asks: Callable[[], None]) -> None:
    """`discard SERVICE ID ID` (of the outbox when `outbox`) of a parked message, `counted`, and
    one not parked, `parked_meanwhile`, typed on a terminal: it asks to discard the one row of the
    service's database, `while_it_asks` runs (parking the other) as the question waits, and the
    answer is y; it must then say that it discarded one message, and that the other is not, being
    parked since it was counted, left parked; exit 1."""
    box, outbox_option = ("outbox", ["--outbox"]) if outbox else ("inbox", [])
    with on_a_terminal(["discard", service, *outbox_option, str(counted), str(parked_meanwhile)],
                       stderr=subprocess.PIPE) as (command, terminal):
        asked = said_until(terminal, "[y/N] ", timeout=60)
        assert asked.endswith(f"discard 1 rows of {database_named(settings, service)}? [y/N] ")
        while_it_asks()
        os.write(terminal, b"y\n")
        out, err = command.communicate(timeout=60)
    assert command.returncode == 1, err
    assert out.decode() == f"{service} {box}: 1 message(s) discarded\n"
    assert err.decode().splitlines()[-1] == (
        f"{parked_meanwhile}: not discarded (parked since it was counted, so not asked about: left"
        " parked; discard it again to give it up)")
