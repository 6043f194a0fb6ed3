"""indexes for `history`: newest first, by owner, by node name or id

Revision ID: 0006
Revises: 0005
"""
from alembic import op

revision = '0006'
down_revision = '0005'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index('ix_allocations_owner_started', 'allocations', ['owner', 'started_at'],
                    unique=False)
    op.create_index('ix_allocations_node_name_started', 'allocations', ['node_name', 'started_at'],
                    unique=False)
    op.create_index('ix_allocations_node_started', 'allocations', ['node_id', 'started_at'],
                    unique=False)
    op.create_index('ix_allocations_started', 'allocations', ['started_at'], unique=False)


def downgrade() -> None:
    op.drop_index('ix_allocations_started', table_name='allocations')
    op.drop_index('ix_allocations_node_started', table_name='allocations')
    op.drop_index('ix_allocations_node_name_started', table_name='allocations')
    op.drop_index('ix_allocations_owner_started', table_name='allocations')
