"""server_processes: each running `mailsrv serve`, its listeners and open sessions

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-02

Read by `mailsrv status`; a process writes its row when it starts and every few seconds
after, and deletes it when it stops.
"""

import sqlalchemy as sa
from alembic import op

from mailsrv.models import UTCDateTime

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "server_processes",
        sa.Column("holder", sa.String(length=200), nullable=False),
        sa.Column("started_at", UTCDateTime(timezone=True), nullable=False),
        sa.Column("seen_at", UTCDateTime(timezone=True), nullable=False),
        sa.Column("listeners", sa.Text(), nullable=False),
        sa.Column("sessions", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("holder", name=op.f("pk_server_processes")),
    )


def downgrade() -> None:
    op.drop_table("server_processes")
