"""Tokens signed out before they expire (POST /api/auth/logout), refused until they do
(gateway_app/sign_out.py), and pruned by when they expire; and each user's generation of tokens,
which signing out everywhere moves on (POST /api/auth/logout/everywhere).

Revision ID: 0011
"""

import sqlalchemy as sa
from alembic import op

revision = "0011"
down_revision = "0010"


def upgrade() -> None:
    op.create_table(
        "signed_out_tokens",
        sa.Column("digest", sa.LargeBinary(32), primary_key=True),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_signed_out_tokens_expires_at", "signed_out_tokens", ["expires_at"])
    op.add_column("users", sa.Column("token_generation", sa.Integer, nullable=False,
                                     server_default=sa.text("0")))


def downgrade() -> None:
    op.drop_column("users", "token_generation")
    op.drop_table("signed_out_tokens")
