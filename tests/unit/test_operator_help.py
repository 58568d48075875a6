"""The operator's commands' --help says what each does and what its arguments take."""

import pytest

from shared import migrations
from tasks import parked


def _help(main, argv, capsys) -> str:
    with pytest.raises(SystemExit) as exited:
        main(argv)
    assert exited.value.code == 0
    return " ".join(capsys.readouterr().out.split())


def test_the_migrations_help_says_what_it_does_and_which_revisions_it_takes(capsys):
    said = _help(migrations.main, ["--help"], capsys)
    assert "Schema migrations (Alembic) for each service" in said
    assert "the revision to go to (0012, head, head-1, -1, ...)" in said


def test_the_parked_lists_help_says_how_many_it_shows(capsys):
    said = _help(parked.main, ["list", "--help"], capsys)
    assert "--limit LIMIT how many, newest parked first (1 to 10000; 50 unless given)" in said
