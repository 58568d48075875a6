"""An operator's parked outbox rows (python -m tasks.parked) are replayed or discarded all a
batch a transaction, and listed, through an index of the parked rows alone, in the order they were
written: before, the last parked row was found by walking the outbox back from its newest row, and
each batch read every refused row, or every row between two parked ones.

Revision ID: 0017
"""

from shared.migration_steps import drop_outbox_parked_by_id_index, index_parked_outbox_rows_by_id

revision = "0017"
down_revision = "0016"


def upgrade() -> None:
    index_parked_outbox_rows_by_id()


def downgrade() -> None:
    drop_outbox_parked_by_id_index()
