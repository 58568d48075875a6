"""Inbox rows keep the request id that caused them.

Revision ID: 0002
"""

from shared.migration_steps import add_inbox_request_id, drop_inbox_request_id

revision = "0002"
down_revision = "0001"


def upgrade() -> None:
    add_inbox_request_id()


def downgrade() -> None:
    drop_inbox_request_id()
