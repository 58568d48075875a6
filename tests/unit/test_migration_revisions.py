"""Each service's revisions are numbered in order, one after another (0001, 0002, ...): a release
rolled back tells a later release's revision, which it does not know, by its number past its own
head (shared/migrations.py: upgrade). And each, once committed, is pinned, never edited
(shared/revision_pins.py)."""

from __future__ import annotations

import shutil

import pytest
from alembic.script import ScriptDirectory

from shared.config import SERVICES
from shared.migrations import alembic_config
from shared.revision_pins import (NEVER_EDITED, REPO_ROOT, changed_since_pinned, pin_of, read_pins,
                                  revision_files, service_revision_files, unpinned)


@pytest.mark.parametrize("service", SERVICES)
def test_a_services_revisions_are_numbered_in_order(service):
    script = ScriptDirectory.from_config(alembic_config(service, "postgresql://unused/unused"))
    revisions = list(reversed(list(script.walk_revisions())))  # base first, one head
    assert [revision.revision for revision in revisions] == [
        f"{number:04d}" for number in range(1, len(revisions) + 1)]
    assert [revision.down_revision for revision in revisions] == [
        None, *(revision.revision for revision in revisions[:-1])]


@pytest.mark.parametrize("service", SERVICES)
def test_a_committed_revision_is_never_edited_nor_its_number_given_to_another(service):
    """Each pinned revision (shared/revision_pins.json) is as it was pinned: a database it
    migrated records its number, and `upgrade` finds nothing to do there, whatever the revision
    makes now (the gateway's 0011 gained a column after it had migrated databases)."""
    changed = changed_since_pinned(read_pins().get(service, {}), service_revision_files(service))
    assert changed == [], f"{service}: {'; '.join(changed)}: {NEVER_EDITED}"


@pytest.mark.parametrize("service", SERVICES)
def test_every_revision_is_pinned(service):
    """A new revision is pinned as it is committed (python -m shared.revision_pins), so that
    editing it afterwards fails the test above."""
    new = unpinned(read_pins().get(service, {}), service_revision_files(service))
    assert new == [], (
        f"{service}: revision(s) {', '.join(new)} not pinned: once written, pin them as you commit"
        " them: python -m shared.revision_pins (a revision that has been committed is never"
        " edited: a change is a new revision)")


def test_a_pinned_revision_edited_renamed_or_gone_is_named(tmp_path):
    """What changed since the revisions were pinned, each in a line; a new revision is unpinned,
    not changed."""
    migrations = tmp_path / "migrations"
    shutil.copytree(REPO_ROOT / "orders_app" / "migrations", migrations,
                    ignore=shutil.ignore_patterns("__pycache__"))
    versions = migrations / "versions"
    pinned = {revision: pin_of(path) for revision, path in revision_files(migrations).items()}
    assert changed_since_pinned(pinned, revision_files(migrations)) == []

    edited = versions / pinned["0011"]["file"]
    edited.write_text(edited.read_text() + "# one more line\n")
    (versions / pinned["0012"]["file"]).rename(versions / "0012_another.py")
    last = max(pinned)  # (the head: gone, it leaves no revision without the one below it)
    (versions / pinned[last]["file"]).unlink()
    assert changed_since_pinned(pinned, revision_files(migrations)) == [
        f"revision 0011 ({pinned['0011']['file']}) has been edited since it was pinned",
        f"revision 0012 was {pinned['0012']['file']} when pinned and is now 0012_another.py: its"
        " number given to another",
        f"revision {last} ({pinned[last]['file']}) is gone"]

    del pinned["0014"]
    assert unpinned(pinned, revision_files(migrations)) == ["0014"]
