"""leases on waiting requests, the grant outbox, history pruning index

Revision ID: 0002
Revises: 0001
"""
import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import mysql

revision = '0002'
down_revision = '0001'
branch_labels = None
depends_on = None

PRECISE_TIME = sa.DateTime().with_variant(mysql.DATETIME(fsp=6), 'mariadb').with_variant(
    mysql.DATETIME(fsp=6), 'mysql')
LONG_TEXT = sa.Text().with_variant(mysql.MEDIUMTEXT(), 'mysql', 'mariadb')


def upgrade() -> None:
    op.add_column('waiting_requests', sa.Column('lease_seconds', sa.Integer(), nullable=True))
    op.create_table('grant_outbox',
    sa.Column('request_id', sa.String(length=64), nullable=False),
    sa.Column('reply_to', sa.String(length=255), nullable=False),
    sa.Column('correlation_id', sa.String(length=255), nullable=True),
    sa.Column('reply', LONG_TEXT, nullable=False),
    sa.Column('created_at', PRECISE_TIME, nullable=False),
    sa.Column('returned', sa.Boolean(), nullable=False, server_default=sa.false()),
    sa.PrimaryKeyConstraint('request_id')
    )
    op.create_index('ix_allocations_ended_at', 'allocations', ['ended_at'], unique=False)


def downgrade() -> None:
    op.drop_index('ix_allocations_ended_at', table_name='allocations')
    op.drop_table('grant_outbox')
    op.drop_column('waiting_requests', 'lease_seconds')
