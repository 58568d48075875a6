"""Inbox rows keep their message's envelope version (`envelope_version`): a message of a version
the service does not know is kept under its own id with its version and its text, and read again,
whole, by a replay once the service knows the version (shared.contracts.KNOWN_ENVELOPE_VERSIONS).
The downgrade is refused while a message of another version with a payload is left unhandled
(shared.migration_steps.drop_inbox_envelope_version), asked before any revision of a downgrade
through this one goes down (refuse_downgrade).

Revision ID: 0014
"""

from shared.migration_steps import (add_inbox_envelope_version, drop_inbox_envelope_version,
                                    refuse_while_inbox_messages_await_of_another_version)

revision = "0014"
down_revision = "0013"
refuse_downgrade = refuse_while_inbox_messages_await_of_another_version


def upgrade() -> None:
    add_inbox_envelope_version()


def downgrade() -> None:
    drop_inbox_envelope_version()
