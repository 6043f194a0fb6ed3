"""who holds what (the broker user behind each owner); room for encrypted passwords

Revision ID: 0003
Revises: 0002
"""
import sqlalchemy as sa
from alembic import op

revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column('nodes', sa.Column('holder_user', sa.String(length=255), nullable=True))
    op.add_column('allocations', sa.Column('user', sa.String(length=255), nullable=True))
    op.add_column('waiting_requests', sa.Column('user', sa.String(length=255), nullable=True))
    # A Fernet token of a 255-character password is about 420 characters.
    op.alter_column('nodes', 'ipmi_password', existing_type=sa.String(length=255),
                    type_=sa.String(length=1024), existing_nullable=False)


def downgrade() -> None:
    op.alter_column('nodes', 'ipmi_password', existing_type=sa.String(length=1024),
                    type_=sa.String(length=255), existing_nullable=False)
    op.drop_column('waiting_requests', 'user')
    op.drop_column('allocations', 'user')
    op.drop_column('nodes', 'holder_user')
