"""stored replies: the broker user whose request each one answers

A request id is not a permission: a stored reply is replayed only to the user
it was made for.

Revision ID: 0010
Revises: 0009
"""
import sqlalchemy as sa
from alembic import op

revision = '0010'
down_revision = '0009'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column('processed_requests', sa.Column('user', sa.String(255), nullable=True))


def downgrade() -> None:
    op.drop_column('processed_requests', 'user')
