"""tasks/parked.py's audit line names who ran the command: the OS user, or, where the process's
user has no name (a container's uid with no passwd entry, nor LOGNAME or USER set, where
getpass.getuser raises), its uid, rather than the command failing after it changed the rows."""

import getpass
import os

import pytest

from tasks import parked


@pytest.mark.parametrize("error", [OSError("No username set in the environment"),  # (3.13)
                                   KeyError("getpwuid(): uid not found: 12345")])  # (before)
def test_the_audit_names_the_uid_of_a_user_with_no_name(monkeypatch, error):
    def nameless() -> str:
        raise error

    monkeypatch.setattr(getpass, "getuser", nameless)
    assert parked._who() == f"uid {os.getuid()}"
