"""cleaning: who claimed a dirty node, and until when

Revision ID: 0008
Revises: 0007
"""
import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import mysql

revision = '0008'
down_revision = '0007'
branch_labels = None
depends_on = None

PRECISE_TIME = sa.DateTime().with_variant(mysql.DATETIME(fsp=6), 'mariadb').with_variant(
    mysql.DATETIME(fsp=6), 'mysql')


def upgrade() -> None:
    op.add_column('nodes', sa.Column('clean_claim', sa.String(length=255), nullable=True))
    op.add_column('nodes', sa.Column('clean_claimed_until', PRECISE_TIME, nullable=True))


def downgrade() -> None:
    op.drop_column('nodes', 'clean_claimed_until')
    op.drop_column('nodes', 'clean_claim')
