"""Each service's committed revisions, pinned: the SHA-256 of each revision file's text, by its
revision, in shared/revision_pins.json, and the SHA-256 of each step it runs from the repository's
code (shared/migration_steps.py: the steps it imports, and the helpers and constants they name,
shared/revision_steps.py), by the step's dotted name, in its pin's "steps". A revision that has
been committed is never edited, nor its number given to another, nor a step it runs: a database
it migrated records its number, and `upgrade` would find nothing to do there while the schema is
not the one the revision now makes (an index's WHERE, a server default: shared.schema_drift does
not compare them). A change is a new revision (and a new step, for it to run).
tests/unit/test_migration_revisions.py fails when a pinned revision's file is edited, renamed or
gone, when a step a pinned revision runs is edited or gone (naming the revisions that run it), and
when a revision, or what it runs, is not pinned yet; a new revision is pinned, as it is committed,
by

    python -m shared.revision_pins

which pins each revision not pinned yet with its steps (and the steps of one pinned before its
steps were), and never changes a pin. A step run by several revisions is pinned in each one's
line, so that a revision pinned but never released (committed during a stop whose CI has not yet
passed, so that no main a stop landed holds it), edited since or running a step edited since, is
pinned again by taking its line out of the file and running the command again; a step a released
revision runs too stays as it was pinned there."""

from __future__ import annotations

if __name__ == "__main__":
    from shared.quiet_interrupt import quiet_while_loading
    quiet_while_loading()

import argparse
import hashlib
import json
import sys
from pathlib import Path

from alembic.script import ScriptDirectory

from shared.config import SERVICES
from shared.revision_steps import steps_run_by

REPO_ROOT = Path(__file__).resolve().parent.parent
PINS = Path(__file__).with_name("revision_pins.json")
NEVER_EDITED = ("a revision that has been committed is never edited, nor its number given to"
                " another (a database it migrated records its number and keeps the schema it"
                " made): write a new revision")
STEP_NEVER_EDITED = ("a step a released revision runs is never edited (a database the revision"
                     " migrated keeps what the step made then): write a new step, and a new"
                     " revision to run it")


def revision_files(migrations: Path) -> dict[str, Path]:
    """The revisions of the migrations directory `migrations` (a service's `<service>_app/
    migrations`), each by its revision's number, with its file."""
    script = ScriptDirectory(str(migrations))
    return {revision.revision: Path(revision.path) for revision in script.walk_revisions()}


def pin_of(path: Path, root: Path = REPO_ROOT) -> dict:
    """A revision's pin: its file's name, the SHA-256 of its text (line ends as `\\n`, however
    the checkout wrote them), and its steps' (step_pins_of)."""
    return {**_file_pin_of(path), "steps": step_pins_of(path, root)}


def _file_pin_of(path: Path) -> dict[str, str]:
    return {"file": path.name, "sha256": _sha256(path.read_text(encoding="utf-8"))}


def step_pins_of(path: Path, root: Path = REPO_ROOT) -> dict[str, str]:
    """The SHA-256 of the source of each step the revision file `path` runs from the repository
    under `root` (shared/revision_steps.py), by its dotted name."""
    return {name: _sha256(source) for name, source in steps_run_by(path, root).items()}


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def changed_since_pinned(pinned: dict[str, dict], files: dict[str, Path]) -> list[str]:
    """Each pinned revision whose file is gone, renamed (another revision under its number) or
    edited, in a line: none, when every pinned revision's file is as it was pinned (its steps:
    steps_changed_since_pinned)."""
    changed = []
    for revision, pin in sorted(pinned.items()):
        path = files.get(revision)
        if path is None:
            changed.append(f"revision {revision} ({pin['file']}) is gone")
        elif path.name != pin["file"]:
            changed.append(f"revision {revision} was {pin['file']} when pinned and is now"
                           f" {path.name}: its number given to another")
        elif _file_pin_of(path) != {"file": pin["file"], "sha256": pin["sha256"]}:
            changed.append(f"revision {revision} ({path.name}) has been edited since it was"
                           " pinned")
    return changed


def steps_changed_since_pinned(pins: dict[str, dict[str, dict]],
                               files: dict[str, dict[str, Path]],
                               root: Path = REPO_ROOT) -> list[str]:
    """Each step edited, gone, or newly run since the revisions that run it were pinned (`pins`
    and `files` by service, as read_pins and service_revision_files give them), in a line naming
    the step and those revisions: none, when every pinned revision's steps are as they were
    pinned. (A revision pinned before its steps were is left to steps_unpinned.)"""
    revisions_by_change: dict[tuple[str, str], dict[str, list[str]]] = {}
    for service, pinned in sorted(pins.items()):
        for revision, pin in sorted(pinned.items()):
            path = files.get(service, {}).get(revision)
            if path is None or path.name != pin["file"] or "steps" not in pin:
                continue  # (its file gone or renamed: changed_since_pinned says so)
            now = step_pins_of(path, root)
            for step in sorted(pin["steps"].keys() | now.keys()):
                if step not in now:
                    change = "is gone, or no longer run by the revisions that ran it when pinned"
                elif step not in pin["steps"]:
                    change = "is run now by revisions that did not run it when pinned"
                elif now[step] != pin["steps"][step]:
                    change = "has been edited since the revisions running it were pinned"
                else:
                    continue
                revisions_by_change.setdefault((step, change), {}).setdefault(
                    service, []).append(revision)
    return [f"step {step} {change}: " + "; ".join(
        f"{service} {', '.join(revisions)}" for service, revisions in by_service.items())
        for (step, change), by_service in sorted(revisions_by_change.items())]


def unpinned(pinned: dict[str, dict], files: dict[str, Path]) -> list[str]:
    """The revisions not pinned yet, by their numbers."""
    return sorted(revision for revision in files if revision not in pinned)


def steps_unpinned(pinned: dict[str, dict], files: dict[str, Path]) -> list[str]:
    """The revisions pinned, as they are now, before the steps they run were pinned, by their
    numbers."""
    return sorted(revision for revision, pin in pinned.items()
                  if "steps" not in pin and revision in files
                  and _file_pin_of(files[revision]) == pin)


def read_pins() -> dict[str, dict[str, dict]]:
    """Each service's pins, by revision: {"file": ..., "sha256": ..., "steps": {step: sha256}}
    ("steps" missing in a pin written before steps were pinned: steps_unpinned)."""
    return json.loads(PINS.read_text(encoding="utf-8"))


def service_revision_files(service: str) -> dict[str, Path]:
    return revision_files(REPO_ROOT / f"{service}_app" / "migrations")


def main(argv: list[str] | None = None) -> None:
    """Pin each service's revisions not pinned yet; say which, and which pinned ones have
    changed (left as they were pinned: exit 1)."""
    argparse.ArgumentParser(
        prog="python -m shared.revision_pins", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False).parse_args(argv)
    pins = read_pins()
    files = {service: service_revision_files(service) for service in SERVICES}
    changed = []
    for service in SERVICES:
        pinned = pins.setdefault(service, {})
        changed += [f"{service}: {line}" for line in changed_since_pinned(pinned, files[service])]
        for revision in steps_unpinned(pinned, files[service]):
            pinned[revision]["steps"] = step_pins_of(files[service][revision])
            print(f"{service}: pinned the steps revision {revision} runs")
        for revision in unpinned(pinned, files[service]):
            pinned[revision] = pin_of(files[service][revision])
            print(f"{service}: pinned revision {revision} ({files[service][revision].name})")
    changed_steps = steps_changed_since_pinned(pins, files)
    PINS.write_text(_in_lines(pins), encoding="utf-8")
    if changed:
        print("\n".join(changed) + f"\nNot pinned again: {NEVER_EDITED}", file=sys.stderr)
    if changed_steps:
        print("\n".join(changed_steps) + f"\nNot pinned again: {STEP_NEVER_EDITED}",
              file=sys.stderr)
    if changed or changed_steps:
        raise SystemExit(1)


def _in_lines(pins: dict[str, dict[str, dict]]) -> str:
    """The pins as JSON, a revision a line (its line is taken out to pin it again)."""
    services = [f"  {json.dumps(service)}: {{\n" + ",\n".join(
        f"    {json.dumps(revision)}: {json.dumps(pin, sort_keys=True)}"
        for revision, pin in sorted(pinned.items())) + "\n  }"
        for service, pinned in sorted(pins.items())]
    return "{\n" + ",\n".join(services) + "\n}\n"


if __name__ == "__main__":
    from shared.quiet_interrupt import run_main
    run_main(main)
