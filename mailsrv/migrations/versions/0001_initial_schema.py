"""initial schema: every table of mailsrv.models as of version 0.1

Revision ID: 0001
Revises: (none)
Create Date: 2026-11-21
"""

import sqlalchemy as sa
from alembic import op

import mailsrv.models

revision = '0001'
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('aliases',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('address', sa.String(length=320), nullable=False),
    sa.Column('target', sa.String(length=320), nullable=False),
    sa.Column('created_at', mailsrv.models.UTCDateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_aliases')),
    sa.UniqueConstraint('address', name=op.f('uq_aliases_address')),
    sqlite_autoincrement=True
    )
    op.create_table('domains',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('name', sa.String(length=255), nullable=False),
    sa.Column('kind', sa.String(length=8), nullable=False),
    sa.Column('created_at', mailsrv.models.UTCDateTime(timezone=True), nullable=False),
    sa.CheckConstraint("kind IN ('local', 'odmr')", name=op.f('ck_domains_kind')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_domains')),
    sa.UniqueConstraint('name', name=op.f('uq_domains_name')),
    sqlite_autoincrement=True
    )
    op.create_table('accounts',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('address', sa.String(length=320), nullable=False),
    sa.Column('domain_id', sa.Integer(), nullable=False),
    sa.Column('password_hash', sa.String(length=100), nullable=False),
    sa.Column('cram_secret', sa.Text(), nullable=True),
    sa.Column('enabled', sa.Boolean(), nullable=False),
    sa.Column('quota_bytes', sa.BigInteger(), nullable=True),
    sa.Column('created_at', mailsrv.models.UTCDateTime(timezone=True), nullable=False),
    sa.Column('last_login_at', mailsrv.models.UTCDateTime(timezone=True), nullable=True),
    sa.ForeignKeyConstraint(['domain_id'], ['domains.id'], name=op.f('fk_accounts_domain_id_domains')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_accounts')),
    sa.UniqueConstraint('address', name=op.f('uq_accounts_address')),
    sqlite_autoincrement=True
    )
    with op.batch_alter_table('accounts', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_accounts_domain_id'), ['domain_id'], unique=False)

    op.create_table('maildrop_locks',
    sa.Column('account_id', sa.Integer(), nullable=False),
    sa.Column('holder', sa.String(length=200), nullable=False),
    sa.Column('expires_at', mailsrv.models.UTCDateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['account_id'], ['accounts.id'], name=op.f('fk_maildrop_locks_account_id_accounts'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('account_id', name=op.f('pk_maildrop_locks'))
    )
    op.create_table('messages',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('account_id', sa.Integer(), nullable=False),
    sa.Column('uid', sa.String(length=70), nullable=False),
    sa.Column('sender', sa.String(length=320), nullable=False),
    sa.Column('size', sa.BigInteger(), nullable=False),
    sa.Column('body', sa.LargeBinary(), nullable=False),
    sa.Column('received_at', mailsrv.models.UTCDateTime(timezone=True), nullable=False),
    sa.Column('seen', sa.Boolean(), nullable=False),
    sa.ForeignKeyConstraint(['account_id'], ['accounts.id'], name=op.f('fk_messages_account_id_accounts'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_messages')),
    sa.UniqueConstraint('uid', name=op.f('uq_messages_uid')),
    sqlite_autoincrement=True
    )
    with op.batch_alter_table('messages', schema=None) as batch_op:
        batch_op.create_index('ix_messages_account_id_id', ['account_id', 'id'], unique=False)

    op.create_table('odmr_grants',
    sa.Column('account_id', sa.Integer(), nullable=False),
    sa.Column('domain_id', sa.Integer(), nullable=False),
    sa.ForeignKeyConstraint(['account_id'], ['accounts.id'], name=op.f('fk_odmr_grants_account_id_accounts'), ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['domain_id'], ['domains.id'], name=op.f('fk_odmr_grants_domain_id_domains'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('account_id', 'domain_id', name=op.f('pk_odmr_grants'))
    )
    with op.batch_alter_table('odmr_grants', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_odmr_grants_domain_id'), ['domain_id'], unique=False)

    op.create_table('queue',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('sender', sa.String(length=320), nullable=False),
    sa.Column('body', sa.LargeBinary(), nullable=False),
    sa.Column('size', sa.BigInteger(), nullable=False),
    sa.Column('origin', sa.String(length=16), nullable=False),
    sa.Column('account_id', sa.Integer(), nullable=True),
    sa.Column('created_at', mailsrv.models.UTCDateTime(timezone=True), nullable=False),
    sa.CheckConstraint("origin IN ('mpp', 'smtp', 'submission', 'bounce')", name=op.f('ck_queue_origin')),
    sa.ForeignKeyConstraint(['account_id'], ['accounts.id'], name=op.f('fk_queue_account_id_accounts'), ondelete='SET NULL'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_queue')),
    sqlite_autoincrement=True
    )
    op.create_table('queue_recipients',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('queue_id', sa.Integer(), nullable=False),
    sa.Column('recipient', sa.String(length=320), nullable=False),
    sa.Column('domain', sa.String(length=255), nullable=False),
    sa.Column('state', sa.String(length=16), nullable=False),
    sa.Column('attempts', sa.Integer(), nullable=False),
    sa.Column('next_attempt_at', mailsrv.models.UTCDateTime(timezone=True), nullable=False),
    sa.Column('lease_owner', sa.String(length=200), nullable=True),
    sa.Column('lease_expires_at', mailsrv.models.UTCDateTime(timezone=True), nullable=True),
    sa.Column('last_error', sa.Text(), nullable=True),
    sa.Column('updated_at', mailsrv.models.UTCDateTime(timezone=True), nullable=False),
    sa.CheckConstraint("state IN ('queued', 'held', 'inflight', 'delivered', 'failed')", name=op.f('ck_queue_recipients_state')),
    sa.ForeignKeyConstraint(['queue_id'], ['queue.id'], name=op.f('fk_queue_recipients_queue_id_queue'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_queue_recipients')),
    sqlite_autoincrement=True
    )
    with op.batch_alter_table('queue_recipients', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_queue_recipients_domain'), ['domain'], unique=False)
        batch_op.create_index(batch_op.f('ix_queue_recipients_queue_id'), ['queue_id'], unique=False)
        batch_op.create_index('ix_queue_recipients_state_next_attempt_at', ['state', 'next_attempt_at'], unique=False)



def downgrade() -> None:
    with op.batch_alter_table('queue_recipients', schema=None) as batch_op:
        batch_op.drop_index('ix_queue_recipients_state_next_attempt_at')
        batch_op.drop_index(batch_op.f('ix_queue_recipients_queue_id'))
        batch_op.drop_index(batch_op.f('ix_queue_recipients_domain'))

    op.drop_table('queue_recipients')
    op.drop_table('queue')
    with op.batch_alter_table('odmr_grants', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_odmr_grants_domain_id'))

    op.drop_table('odmr_grants')
    with op.batch_alter_table('messages', schema=None) as batch_op:
        batch_op.drop_index('ix_messages_account_id_id')

    op.drop_table('messages')
    op.drop_table('maildrop_locks')
    with op.batch_alter_table('accounts', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_accounts_domain_id'))

    op.drop_table('accounts')
    op.drop_table('domains')
    op.drop_table('aliases')
