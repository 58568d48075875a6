"""Each service's revisions are numbered in order, one after another (0001, 0002, ...): a release
rolled back tells a later release's revision, which it does not know, by its number past its own
head (shared/migrations.py: upgrade)."""

from __future__ import annotations

import pytest
from alembic.script import ScriptDirectory

from shared.config import SERVICES
from shared.migrations import alembic_config


@pytest.mark.parametrize("service", SERVICES)
def test_a_services_revisions_are_numbered_in_order(service):
    script = ScriptDirectory.from_config(alembic_config(service, "postgresql://unused/unused"))
    revisions = list(reversed(list(script.walk_revisions())))  # base first, one head
    assert [revision.revision for revision in revisions] == [
        f"{number:04d}" for number in range(1, len(revisions) + 1)]
    assert [revision.down_revision for revision in revisions] == [
        None, *(revision.revision for revision in revisions[:-1])]
