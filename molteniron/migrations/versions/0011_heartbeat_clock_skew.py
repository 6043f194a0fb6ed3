"""worker heartbeats: each worker's wall clock minus the database's

The pool keeps the database's time (workers/clock.py); a worker whose own clock
is off says by how much, so `molteniron workers` can show it.

Revision ID: 0011
Revises: 0010
"""
import sqlalchemy as sa
from alembic import op

revision = '0011'
down_revision = '0010'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column('worker_heartbeats', sa.Column('clock_skew_s', sa.Double(), nullable=True))


def downgrade() -> None:
    op.drop_column('worker_heartbeats', 'clock_skew_s')
