"""Each service's revisions are numbered in order, one after another (0001, 0002, ...): a release
rolled back tells a later release's revision, which it does not know, by its number past its own
head (shared/migrations.py: upgrade). And each, once committed, is pinned, never edited, nor the
steps it runs (shared/revision_pins.py)."""

from __future__ import annotations

import shutil

import pytest
from alembic.script import ScriptDirectory

from shared.config import SERVICES
from shared.migrations import alembic_config
from shared.revision_pins import (NEVER_EDITED, REPO_ROOT, STEP_NEVER_EDITED, changed_since_pinned,
                                  pin_of, read_pins, revision_files, service_revision_files,
                                  step_pins_of, steps_changed_since_pinned, steps_unpinned,
                                  unpinned)


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
    pinned, files = read_pins().get(service, {}), service_revision_files(service)
    new = unpinned(pinned, files) + steps_unpinned(pinned, files)
    assert new == [], (
        f"{service}: revision(s) {', '.join(new)} not pinned, or not the steps they run: once"
        " written, pin them as you commit them: python -m shared.revision_pins (a revision that"
        " has been committed is never edited, nor a step it runs: a change is a new revision)")


def test_a_step_a_committed_revision_runs_is_never_edited():
    """Each step a pinned revision runs from shared/migration_steps.py (and the helpers and
    constants it names) is as it was pinned: a fresh database would get what the step makes now,
    one the revision migrated what it made then, and the schema comparison does not see an
    index's WHERE or a server default (shared/schema_drift.py)."""
    files = {service: service_revision_files(service) for service in SERVICES}
    changed = steps_changed_since_pinned(read_pins(), files)
    assert changed == [], f"{'; '.join(changed)}: {STEP_NEVER_EDITED}"


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


@pytest.fixture
def repository_copy(tmp_path):
    """The orders service's revisions and shared/migration_steps.py, copied under tmp_path as they
    lie in the repository, with the revisions' pins."""
    (tmp_path / "shared").mkdir()
    shutil.copy(REPO_ROOT / "shared" / "migration_steps.py", tmp_path / "shared")
    migrations = tmp_path / "orders_app" / "migrations"
    shutil.copytree(REPO_ROOT / "orders_app" / "migrations", migrations,
                    ignore=shutil.ignore_patterns("__pycache__"))
    pins = {"orders": {revision: pin_of(path, tmp_path)
                       for revision, path in revision_files(migrations).items()}}
    return tmp_path, pins


def _edit(path, old, new):
    text = path.read_text()
    assert text.count(old) == 1
    path.write_text(text.replace(old, new))


def _changed(root, pins):
    files = {"orders": revision_files(root / "orders_app" / "migrations")}
    return steps_changed_since_pinned(pins, files, root)


def test_a_pinned_step_edited_is_named_with_the_revisions_running_it(repository_copy):
    """A step's condition edited (the revision's file as it was) is named, with the revisions
    that run it: 0013 builds the parked rows' index with it."""
    root, pins = repository_copy
    assert _changed(root, pins) == []
    _edit(root / "shared" / "migration_steps.py",
          '["parked_at", "message_id"], "parked_at IS NOT NULL")',
          '["parked_at", "message_id"], "parked_at IS NOT NULL AND attempts > 0")')
    assert _changed(root, pins) == [
        "step shared.migration_steps.index_parked_inbox_rows has been edited since the revisions"
        " running it were pinned: orders 0013"]


def test_a_helper_or_constant_a_step_names_is_pinned_with_it(repository_copy):
    """create_index_concurrently, which the index steps call (0015's downgrade through
    index_handled_inbox_rows, which 0007 runs too), and the trigger's function text that 0003's
    step runs, are pinned for the revisions whose steps name them."""
    root, pins = repository_copy
    steps = root / "shared" / "migration_steps.py"
    _edit(steps, "postgresql_concurrently=True, if_not_exists=True)",
          "postgresql_concurrently=True)")
    _edit(steps, "PERFORM pg_notify('outbox_messages', '');", "PERFORM pg_notify('outbox', '');")
    assert _changed(root, pins) == [
        "step shared.migration_steps._CREATE_NOTIFY_FUNCTION has been edited since the revisions"
        " running it were pinned: orders 0003",
        "step shared.migration_steps.create_index_concurrently has been edited since the"
        " revisions running it were pinned: orders 0007, 0008, 0009, 0011, 0013, 0015, 0016"]
    assert {"shared.migration_steps.index_handled_inbox_rows",
            "shared.migration_steps.index_handled_inbox_rows_by_storing_again",
            "shared.migration_steps._drop_if_invalid"} <= pins["orders"]["0015"]["steps"].keys()


def test_a_new_step_is_pinned_with_its_revision_and_one_gone_is_named(repository_copy):
    """A new revision's new step is among its pins, with the helper it calls; a step a pinned
    revision ran, gone from the module, is named."""
    root, pins = repository_copy
    steps = root / "shared" / "migration_steps.py"
    steps.write_text(steps.read_text() + (
        "\n\ndef index_inbox_rows_by_topic() -> None:\n"
        '    create_index_concurrently("ix_inbox_messages_topic", "inbox_messages", ["topic"])\n'))
    new = root / "orders_app" / "migrations" / "versions" / "0099_inbox_topic_index.py"
    new.write_text('"""An index."""\n\nfrom shared import migration_steps\n\n'
                   'revision = "0099"\ndown_revision = "0016"\n\n\n'
                   "def upgrade() -> None:\n    migration_steps.index_inbox_rows_by_topic()\n")
    assert unpinned(pins["orders"], revision_files(new.parent.parent)) == ["0099"]
    assert step_pins_of(new, root).keys() == {
        "shared.migration_steps.index_inbox_rows_by_topic",
        "shared.migration_steps.create_index_concurrently",
        "shared.migration_steps._drop_if_invalid"}

    _edit(steps, "def drop_inbox_parked_index()", "def drop_inbox_parked_index_gone()")
    assert _changed(root, pins) == [
        "step shared.migration_steps.drop_inbox_parked_index is gone, or no longer run by the"
        " revisions that ran it when pinned: orders 0013"]


def test_a_pin_written_before_steps_were_pinned_is_read_and_its_steps_are_unpinned(
        repository_copy):
    """A pin of a file alone (as every pin was written before steps were pinned) still pins the
    file; its steps are pinned by `python -m shared.revision_pins`, as new revisions are."""
    root, pins = repository_copy
    files = revision_files(root / "orders_app" / "migrations")
    old = {revision: {"file": pin["file"], "sha256": pin["sha256"]}
           for revision, pin in pins["orders"].items()}
    assert changed_since_pinned(old, files) == []
    assert steps_changed_since_pinned({"orders": old}, {"orders": files}, root) == []
    assert steps_unpinned(old, files) == sorted(files)
    assert steps_unpinned(pins["orders"], files) == []
