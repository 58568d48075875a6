"""Outbox rows whose message is too large ever to be sent (and, since, those naming a topic the
relay is not told of) are parked, and hold back only the later rows with their topic and key
(shared.outbox.relaying.CLAIM_ROWS).
The downgrade is refused while a row lies parked (shared.migration_steps.drop_outbox_parking),
asked before any revision of a downgrade through this one goes down (refuse_downgrade).

Revision ID: 0008
"""

from shared.migration_steps import (add_outbox_parking, drop_outbox_parking,
                                    refuse_while_outbox_rows_lie_parked)

revision = "0008"
down_revision = "0007"
refuse_downgrade = refuse_while_outbox_rows_lie_parked


def upgrade() -> None:
    add_outbox_parking()


def downgrade() -> None:
    drop_outbox_parking()
