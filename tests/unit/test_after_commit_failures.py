"""What a transaction runs once committed (shared.db: _run_once_committed, transaction()'s last
step): each callback whatever the others did, one that raises logged with its error and raising
nothing (the work is committed: an error then made a committed request a 500, and skipped the
callbacks after it, the cache's bumps among them)."""

from __future__ import annotations

import logging

import pytest

from shared.db import _run_once_committed


def test_a_callback_that_raises_is_logged_and_the_ones_after_it_still_run(caplog):
    done = []
    broke = RuntimeError("the publish broke")

    def failing() -> None:
        done.append("the failing one's")
        raise broke

    with caplog.at_level(logging.ERROR, logger="shared.db"):
        _run_once_committed([failing, lambda: done.append("the bump's")])
    assert done == ["the failing one's", "the bump's"]
    [logged] = [record for record in caplog.records if record.name == "shared.db"]
    assert logged.levelno == logging.ERROR and logged.exc_info[1] is broke
    assert "after a commit" in logged.getMessage()


def test_what_is_no_exception_goes_on_up():
    """A KeyboardInterrupt or a SystemExit stops the process's work, callbacks and all: it is not
    taken for a callback's failure."""
    done = []

    def interrupted() -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _run_once_committed([interrupted, lambda: done.append("the bump's")])
    assert done == []
