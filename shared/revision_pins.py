"""Each service's committed revisions, pinned: the SHA-256 of each revision file's text, by its
revision, in shared/revision_pins.json. A revision that has been committed is never edited, nor
its number given to another: a database it migrated records its number, and `upgrade` would find
nothing to do there while the schema is not the one the revision now makes. A change is a new
revision. tests/unit/test_migration_revisions.py fails when a pinned revision's file is edited,
renamed or gone, and when a revision is not pinned yet; a new revision is pinned, as it is
committed, by

    python -m shared.revision_pins

which pins each revision not pinned yet, and never changes a pin. (A revision pinned but never
committed, and edited since: take its line out of the file and pin it again.)"""

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

REPO_ROOT = Path(__file__).resolve().parent.parent
PINS = Path(__file__).with_name("revision_pins.json")
NEVER_EDITED = ("a revision that has been committed is never edited, nor its number given to"
                " another (a database it migrated records its number and keeps the schema it"
                " made): write a new revision")


def revision_files(migrations: Path) -> dict[str, Path]:
    """The revisions of the migrations directory `migrations` (a service's `<service>_app/
    migrations`), each by its revision's number, with its file."""
    script = ScriptDirectory(str(migrations))
    return {revision.revision: Path(revision.path) for revision in script.walk_revisions()}


def pin_of(path: Path) -> dict[str, str]:
    """A revision's pin: its file's name, and the SHA-256 of its text (line ends as `\\n`, however
    the checkout wrote them)."""
    text = path.read_text(encoding="utf-8")
    return {"file": path.name, "sha256": hashlib.sha256(text.encode("utf-8")).hexdigest()}


def changed_since_pinned(pinned: dict[str, dict[str, str]], files: dict[str, Path]) -> list[str]:
    """Each pinned revision whose file is gone, renamed (another revision under its number) or
    edited, in a line: none, when every pinned revision is as it was pinned."""
    changed = []
    for revision, pin in sorted(pinned.items()):
        path = files.get(revision)
        if path is None:
            changed.append(f"revision {revision} ({pin['file']}) is gone")
        elif path.name != pin["file"]:
            changed.append(f"revision {revision} was {pin['file']} when pinned and is now"
                           f" {path.name}: its number given to another")
        elif pin_of(path) != pin:
            changed.append(f"revision {revision} ({path.name}) has been edited since it was"
                           " pinned")
    return changed


def unpinned(pinned: dict[str, dict[str, str]], files: dict[str, Path]) -> list[str]:
    """The revisions not pinned yet, by their numbers."""
    return sorted(revision for revision in files if revision not in pinned)


def read_pins() -> dict[str, dict[str, dict[str, str]]]:
    """Each service's pins, by revision."""
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
    changed = []
    for service in SERVICES:
        files = service_revision_files(service)
        pinned = pins.setdefault(service, {})
        changed += [f"{service}: {line}" for line in changed_since_pinned(pinned, files)]
        for revision in unpinned(pinned, files):
            pinned[revision] = pin_of(files[revision])
            print(f"{service}: pinned revision {revision} ({files[revision].name})")
    PINS.write_text(_in_lines(pins), encoding="utf-8")
    if changed:
        print("\n".join(changed) + f"\nNot pinned again: {NEVER_EDITED}", file=sys.stderr)
        raise SystemExit(1)


def _in_lines(pins: dict[str, dict[str, dict[str, str]]]) -> str:
    """The pins as JSON, a revision a line (its line is taken out to pin it again)."""
    services = [f"  {json.dumps(service)}: {{\n" + ",\n".join(
        f"    {json.dumps(revision)}: {json.dumps(pin, sort_keys=True)}"
        for revision, pin in sorted(pinned.items())) + "\n  }"
        for service, pinned in sorted(pins.items())]
    return "{\n" + ",\n".join(services) + "\n}\n"


if __name__ == "__main__":
    from shared.quiet_interrupt import run_main
    run_main(main)
