"""messages.dot_offsets: where dot-lines begin, found once at delivery so RETR never scans

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-21

Existing messages keep NULL ("not known"): POP3 then finds the offsets when it sends them.
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("messages", schema=None) as batch_op:
        batch_op.add_column(sa.Column("dot_offsets", sa.Text(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("messages", schema=None) as batch_op:
        batch_op.drop_column("dot_offsets")
