"""The README's way out of a refused downgrade ("Rolling back" under Deploying) against the lines
the refusals print: an operator copies the README's commands, which said `discard SERVICE ID` where
the line names the service (`discard gateway ID [ID ...]`), and an id list, --all, that the line
gives and the README did not. (An inbox message's way out is now its replay.)"""

import re
import uuid
from pathlib import Path

import pytest

from shared.migration_steps import (DowngradeRefused,
                                    refuse_while_inbox_messages_await_of_another_version,
                                    refuse_while_outbox_rows_lie_parked)
from tasks.parked import _options_last, _parser

README = Path(__file__).resolve().parents[2] / "README.md"
# The service the README's "Rolling back" names in its examples.
SERVICE = "gateway"


class _TwoWaiting:
    """A connection that answers each count with 2."""

    def scalar(self, statement):
        return 2


def _refusal(refuse) -> str:
    with pytest.raises(DowngradeRefused) as refused:
        refuse(_TwoWaiting(), service=SERVICE)
    return str(refused.value)


def _readme() -> str:
    """The README as one line, whitespace as one space and no backquotes (the README wraps its
    lines and quotes its commands; the lines are unquoted)."""
    return " ".join(README.read_text().replace("`", "").split())


@pytest.mark.parametrize("refuse", [refuse_while_inbox_messages_await_of_another_version,
                                    refuse_while_outbox_rows_lie_parked])
def test_the_readme_gives_the_way_out_a_refused_downgrade_prints(refuse):
    readme = _readme()
    said = _refusal(refuse).replace("`", "")
    (way_out,) = re.findall(
        r"\((python -m tasks\.parked (?:replay|discard) [^;]*; [^)]* shows them)\)", said)
    assert way_out in readme, way_out


def test_the_readme_names_no_service_as_SERVICE_in_a_parked_messages_command():
    readme = _readme()
    assert re.findall(r"tasks\.parked (?:list|replay|discard) SERVICE\b", readme) == []


@pytest.mark.parametrize("refuse", [refuse_while_inbox_messages_await_of_another_version,
                                    refuse_while_outbox_rows_lie_parked])
def test_the_way_out_a_refused_downgrade_prints_is_taken_by_the_command(refuse):
    said = _refusal(refuse)
    (way_out,) = re.findall(r"\(python -m tasks\.parked ((?:replay|discard) [^;,]*)[;,]", said)
    argv = way_out.replace(" [ID ...]", "").replace(" ID", f" {uuid.uuid4()}").split()
    parser, _ = _parser()
    args = parser.parse_args(_options_last([arg for arg in argv if arg != "--outbox"]))
    # (An inbox message's way out is its replay, for this release to handle it; an outbox row's,
    # with the shop stopped, its discard.)
    assert (args.command, args.service) == (
        "replay" if refuse is refuse_while_inbox_messages_await_of_another_version else "discard",
        SERVICE)
    assert bool(args.message_ids) != args.all
