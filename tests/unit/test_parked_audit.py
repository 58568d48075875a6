"""tasks/parked.py's audit line names who ran the command: the OS user with the process's real uid
(and SUDO_USER when set), or, where the process's user has no name (a container's uid with no
passwd entry, nor LOGNAME or USER set, where getpass.getuser raises), its uid alone, rather than
the command failing after it changed the rows."""

import getpass
import os

import pytest

from tasks import parked


@pytest.mark.parametrize("error", [OSError("No username set in the environment"),  # (3.13)
                                   KeyError("getpwuid(): uid not found: 12345")])  # (before)
def test_the_audit_names_the_uid_of_a_user_with_no_name(monkeypatch, error):
    def nameless() -> str:
        raise error

    monkeypatch.delenv("SUDO_USER", raising=False)
    monkeypatch.setattr(getpass, "getuser", nameless)
    assert parked._who() == f"uid {os.getuid()}"


def test_the_audit_names_the_real_uid_beside_the_user_the_environment_names(monkeypatch):
    """getpass names the user LOGNAME or USER say, which whoever runs the command sets: the line
    gives the kernel's uid beside it, and SUDO_USER (who ran sudo) when set. Before, `USER=alice`
    made any user alice in the audit."""
    monkeypatch.delenv("SUDO_USER", raising=False)
    for name in ("LOGNAME", "USER", "LNAME", "USERNAME"):
        monkeypatch.setenv(name, "alice")
    assert parked._who() == f"alice (uid {os.getuid()})"
    monkeypatch.setenv("SUDO_USER", "bob")
    assert parked._who() == f"alice (uid {os.getuid()}, SUDO_USER bob)"


def test_the_names_the_environment_gives_cannot_break_the_audit_line(monkeypatch):
    """A name from the environment is escaped: a newline in it cannot forge a second line."""
    monkeypatch.setenv("LOGNAME", "alice\nWARNING tasks.parked forged")
    monkeypatch.setenv("SUDO_USER", "bob\r")
    assert parked._who() == (f"alice\\x0aWARNING tasks.parked forged (uid {os.getuid()},"
                             " SUDO_USER bob\\x0d)")
