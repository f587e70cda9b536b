"""bans: addresses refused after too many failed logins ([auth] ban_after)

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-02
"""

import sqlalchemy as sa
from alembic import op

from mailsrv.models import UTCDateTime

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "bans",
        sa.Column("address", sa.String(length=64), nullable=False),
        sa.Column("banned_at", UTCDateTime(timezone=True), nullable=False),
        sa.Column("until", UTCDateTime(timezone=True), nullable=False),
        sa.Column("failures", sa.Integer(), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("address", name=op.f("pk_bans")),
    )
    op.create_index(op.f("ix_bans_until"), "bans", ["until"], unique=False)


def downgrade() -> None:
    op.drop_index(op.f("ix_bans_until"), table_name="bans")
    op.drop_table("bans")
