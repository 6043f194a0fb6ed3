"""node tags (constraints) and the reason a node is in maintenance

Revision ID: 0004
Revises: 0003
"""
import sqlalchemy as sa
from alembic import op

revision = '0004'
down_revision = '0003'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column('nodes', sa.Column('tags', sa.JSON(), nullable=True))
    op.add_column('nodes', sa.Column('maintenance_reason', sa.String(length=255), nullable=True))


def downgrade() -> None:
    op.drop_column('nodes', 'maintenance_reason')
    op.drop_column('nodes', 'tags')
