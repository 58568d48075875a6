"""When the Makefile makes .venv anew, and that it does so from scratch: a venv made by another
interpreter, or whose own python no longer runs, was called up to date; one whose requirements
changed was installed over, keeping what they no longer name; and `make -q venv` ran the ensurepip
check's line (it named $(MAKE)). Asked of make with -q and -n in a copy of the Makefile and
requirements/, over a venv of a python link and the stamps, so that nothing is installed."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
# The interpreter make is told to make the venv with (PYTHON=): this one, by its real path.
INTERPRETER = os.path.realpath(sys._base_executable)
# What the Makefile records of it in .venv/.python: its real path and version, major.minor.
RECORDED = f"{INTERPRETER} {sys.version_info[0]}.{sys.version_info[1]}\n"
# The requirements' last change, and the venv's making, as far as make can tell: a file touched
# now is newer than both (whatever the file system's clock granularity).
AN_HOUR_AGO = 3600
HALF_AN_HOUR_AGO = 1800


def _make(checkout: Path, *args: str, python: str = INTERPRETER) -> subprocess.CompletedProcess:
    return subprocess.run(["make", "--no-print-directory", f"PYTHON={python}", *args],
                          cwd=checkout, capture_output=True, text=True, timeout=60)


def _dated(path: Path, seconds_ago: float) -> None:
    if not path.exists():
        path.touch()
    then = time.time() - seconds_ago
    os.utime(path, (then, then), follow_symlinks=False)


def _venv_listing(checkout: Path) -> list[tuple[str, float]]:
    return sorted((str(path.relative_to(checkout)), path.lstat().st_mtime)
                  for path in (checkout / ".venv").rglob("*"))


@pytest.fixture
def checkout(tmp_path):
    """The Makefile and requirements/, with a venv made by INTERPRETER after the requirements
    last changed, as far as make can tell."""
    shutil.copy(REPO_ROOT / "Makefile", tmp_path / "Makefile")
    shutil.copytree(REPO_ROOT / "requirements", tmp_path / "requirements")
    for requirements in (tmp_path / "requirements").iterdir():
        _dated(requirements, AN_HOUR_AGO)
    (tmp_path / ".venv" / "bin").mkdir(parents=True)
    (tmp_path / ".venv" / "bin" / "python").symlink_to(INTERPRETER)
    (tmp_path / ".venv" / ".python").write_text(RECORDED)
    _dated(tmp_path / ".venv" / ".installed", HALF_AN_HOUR_AGO)
    return tmp_path


def test_a_venv_made_by_the_interpreter_after_its_requirements_is_up_to_date(checkout):
    assert _make(checkout, "-q", "venv").returncode == 0


def test_a_venv_another_interpreter_made_is_made_anew_from_scratch(checkout):
    (checkout / ".venv" / ".python").write_text("/usr/bin/python3.11 3.11.2\n")
    assert _make(checkout, "-q", "venv").returncode == 1
    said = _make(checkout, "-n", "venv").stdout
    assert "rm -rf .venv\n" in said
    assert said.index("rm -rf .venv\n") < said.index(f"{INTERPRETER} -m venv .venv\n")


def test_a_venv_recorded_with_another_minor_version_of_its_path_is_made_anew(checkout):
    major, minor = sys.version_info[:2]
    (checkout / ".venv" / ".python").write_text(f"{INTERPRETER} {major}.{minor + 1}\n")
    assert _make(checkout, "-q", "venv").returncode == 1


def test_a_venv_made_before_its_interpreter_was_recorded_is_made_anew(checkout):
    (checkout / ".venv" / ".python").unlink()
    assert _make(checkout, "-q", "venv").returncode == 1


def test_a_venv_whose_python_no_longer_runs_is_made_anew(checkout):
    (checkout / ".venv" / "bin" / "python").unlink()
    (checkout / ".venv" / "bin" / "python").symlink_to(checkout / "removed" / "python3")
    assert _make(checkout, "-q", "venv").returncode == 1
    assert "rm -rf .venv\n" in _make(checkout, "-n", "venv").stdout


@pytest.mark.parametrize("requirements", ["base.txt", "dev.txt", "constraints.txt"])
def test_a_venv_whose_requirements_changed_is_made_anew_from_scratch(checkout, requirements):
    (checkout / "requirements" / requirements).touch()
    assert _make(checkout, "-q", "venv").returncode == 1
    said = _make(checkout, "-n", "venv").stdout
    assert "rm -rf .venv\n" in said
    assert said.index("rm -rf .venv\n") < said.index("-r requirements/dev.txt\n")


def test_the_bench_extras_go_into_the_venv_made_anew(checkout):
    _dated(checkout / ".venv" / ".installed-bench", HALF_AN_HOUR_AGO)
    (checkout / "requirements" / "dev.txt").touch()
    said = _make(checkout, "-n", ".venv/.installed-bench").stdout
    assert said.index("rm -rf .venv\n") < said.index("-r requirements/bench.txt\n")


def test_a_venv_the_bench_extras_went_into_is_made_anew_when_they_change(checkout):
    """pip would leave an extra taken out of requirements/bench.txt installed."""
    _dated(checkout / ".venv" / ".installed-bench", HALF_AN_HOUR_AGO)
    (checkout / "requirements" / "bench.txt").touch()
    assert _make(checkout, "-q", "venv").returncode == 1
    assert "rm -rf .venv\n" in _make(checkout, "-n", "venv").stdout


def test_bench_txt_alone_does_not_make_a_venv_without_the_extras_anew(checkout):
    (checkout / "requirements" / "bench.txt").touch()
    assert _make(checkout, "-q", "venv").returncode == 0


@pytest.mark.parametrize("flag", ["-q", "-n"])
def test_make_q_and_n_change_nothing_in_a_venv_to_be_made_anew(checkout, flag):
    (checkout / "requirements" / "dev.txt").touch()
    before = _venv_listing(checkout)
    _make(checkout, flag, "venv")
    assert _venv_listing(checkout) == before


def test_a_python_older_than_3_11_is_refused_before_the_venv_is_touched(checkout):
    """It says so and what to do, where `python3 -m venv` or pip failed on it further in."""
    old = checkout / "python3.9"
    # (Fails whatever it is asked but its version and ensurepip's import.)
    old.write_text('#!/bin/sh\ncase "$*" in\n  --version) echo "Python 3.9.18" ;;\n'
                   '  *ensurepip*) exit 0 ;;\n  *) exit 1 ;;\nesac\n')
    old.chmod(0o755)
    before = _venv_listing(checkout)
    made = _make(checkout, "venv", python=str(old))
    assert made.returncode != 0
    assert (f"HseShop needs Python 3.11 or later; {old} is Python 3.9.18. Name another: "
            "make PYTHON=python3.11") in made.stdout
    assert _venv_listing(checkout) == before
