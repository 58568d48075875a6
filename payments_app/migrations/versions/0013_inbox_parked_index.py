"""An operator's parked inbox messages (python -m tasks.parked) are listed, and replayed or
discarded all a batch a transaction, through an index of the parked rows alone, in the order they
were parked: before, each read the whole inbox.

Revision ID: 0013
"""

from shared.migration_steps import drop_inbox_parked_index, index_parked_inbox_rows

revision = "0013"
down_revision = "0012"


def upgrade() -> None:
    index_parked_inbox_rows()


def downgrade() -> None:
    drop_inbox_parked_index()
