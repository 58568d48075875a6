"""Inbox rows keep their message's envelope version (`envelope_version`): a message of a version
the service does not know is kept under its own id with its payload, not as raw text, and handled
once a replay finds the service knows the version (shared.contracts.KNOWN_ENVELOPE_VERSIONS).

Revision ID: 0014
"""

from shared.migration_steps import add_inbox_envelope_version, drop_inbox_envelope_version

revision = "0014"
down_revision = "0013"


def upgrade() -> None:
    add_inbox_envelope_version()


def downgrade() -> None:
    drop_inbox_envelope_version()
