"""The README's settings table (its "Configuration" section) against shared/config.py: an operator
reads the table, not the code, so a setting missing from it, or a default it states that the code
no longer has, goes unseen (KAFKA_SESSION_TIMEOUT_MS was read by every worker and named nowhere)."""

import re
from pathlib import Path

from shared.config import ENVIRONMENT

README = Path(__file__).resolve().parents[2] / "README.md"
# A row's leading run of defaults, `a`, `b`: its prose after it is not read.
_LEADING_DEFAULTS = re.compile(r"^(`[^`]*`(?:, `[^`]*`)*)")


def _settings_table_rows() -> list[tuple[str, str]]:
    section = README.read_text().split("\n## Configuration\n", 1)[1].split("\n## ", 1)[0]
    rows = [line.split(" | ", 1) for line in section.splitlines() if line.startswith("| `")]
    return [(variables.removeprefix("| "), defaults.removesuffix(" |"))
            for variables, defaults in rows]


def test_the_settings_table_names_every_setting():
    named = {name for variables, _ in _settings_table_rows()
             for name in re.findall(r"`([A-Z][A-Z0-9_]+)`", variables)}
    assert sorted(set(ENVIRONMENT) - named) == []
    assert sorted(named - set(ENVIRONMENT)) == []


def test_the_defaults_the_settings_table_states_are_the_codes():
    """Rows whose leading defaults pair with their variables one to one (`…:8002` abbreviates the
    one before it); the others say theirs in prose."""
    compared = 0
    for variables, defaults in _settings_table_rows():
        names = re.findall(r"`([A-Z][A-Z0-9_]+)`", variables)
        leading = _LEADING_DEFAULTS.match(defaults)
        values = re.findall(r"`([^`]*)`", leading.group(1)) if leading else []
        if len(values) != len(names):
            continue
        for name, value in zip(names, values):
            if value.startswith("…"):
                assert ENVIRONMENT[name].endswith(value[1:]), name
            else:
                assert ENVIRONMENT[name] == value, name
            compared += 1
    assert compared >= 15  # (19 as written: not a table this test no longer reads)
