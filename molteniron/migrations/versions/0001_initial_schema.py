"""initial schema

Revision ID: 0001
Revises:
"""
import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import mysql

revision = '0001'
down_revision = None
branch_labels = None
depends_on = None

PRECISE_TIME = sa.DateTime().with_variant(mysql.DATETIME(fsp=6), 'mariadb').with_variant(
    mysql.DATETIME(fsp=6), 'mysql')
LONG_TEXT = sa.Text().with_variant(mysql.MEDIUMTEXT(), 'mysql', 'mariadb')


def upgrade() -> None:
    op.create_table('allocations',
    sa.Column('id', sa.BigInteger(), autoincrement=True, nullable=False),
    sa.Column('node_id', sa.Integer(), nullable=False),
    sa.Column('node_name', sa.String(length=255), nullable=False),
    sa.Column('owner', sa.String(length=255), nullable=False),
    sa.Column('request_id', sa.String(length=64), nullable=True),
    sa.Column('started_at', PRECISE_TIME, nullable=False),
    sa.Column('ended_at', PRECISE_TIME, nullable=True),
    sa.Column('end_reason', sa.Enum('released', 'expired', 'cancelled', 'removed',
                                    name='end_reason', native_enum=False, length=16),
              nullable=True),
    sa.PrimaryKeyConstraint('id')
    )
    op.create_index('ix_allocations_node_open', 'allocations', ['node_id', 'ended_at'],
                    unique=False)
    op.create_index('ix_allocations_request', 'allocations', ['request_id'], unique=False)
    op.create_table('nodes',
    sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('name', sa.String(length=255), nullable=False),
    sa.Column('ipmi_ip', sa.String(length=255), nullable=False),
    sa.Column('ipmi_user', sa.String(length=255), nullable=False),
    sa.Column('ipmi_password', sa.String(length=255), nullable=False),
    sa.Column('port_hwaddr', sa.String(length=255), nullable=False),
    sa.Column('cpu_arch', sa.String(length=255), nullable=False),
    sa.Column('cpus', sa.Integer(), nullable=False),
    sa.Column('ram_mb', sa.Integer(), nullable=False),
    sa.Column('disk_gb', sa.Integer(), nullable=False),
    sa.Column('node_pool', sa.String(length=255), nullable=False),
    sa.Column('state', sa.Enum('ready', 'allocated', 'dirty', 'maintenance',
                               name='node_state', native_enum=False, length=16),
              nullable=False),
    sa.Column('owner', sa.String(length=255), nullable=True),
    sa.Column('allocated_at', PRECISE_TIME, nullable=True),
    sa.Column('lease_expires_at', PRECISE_TIME, nullable=True),
    sa.Column('extra', sa.JSON(), nullable=False),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('name')
    )
    op.create_index('ix_nodes_owner', 'nodes', ['owner'], unique=False)
    op.create_index('ix_nodes_pool_state_id', 'nodes', ['node_pool', 'state', 'id'], unique=False)
    op.create_table('processed_requests',
    sa.Column('request_id', sa.String(length=64), nullable=False),
    sa.Column('op', sa.String(length=32), nullable=False),
    sa.Column('reply', LONG_TEXT, nullable=False),
    sa.Column('processed_at', PRECISE_TIME, nullable=False),
    sa.PrimaryKeyConstraint('request_id')
    )
    op.create_index('ix_processed_at', 'processed_requests', ['processed_at'], unique=False)
    op.create_table('waiting_requests',
    sa.Column('id', sa.BigInteger(), autoincrement=True, nullable=False),
    sa.Column('request_id', sa.String(length=64), nullable=False),
    sa.Column('node_pool', sa.String(length=255), nullable=False),
    sa.Column('count', sa.Integer(), nullable=False),
    sa.Column('owner', sa.String(length=255), nullable=False),
    sa.Column('reply_to', sa.String(length=255), nullable=True),
    sa.Column('correlation_id', sa.String(length=255), nullable=True),
    sa.Column('enqueued_at', PRECISE_TIME, nullable=False),
    sa.Column('deadline', sa.Double(), nullable=True),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('request_id')
    )
    op.create_index('ix_waiting_pool_id', 'waiting_requests', ['node_pool', 'id'], unique=False)
    op.create_table('worker_heartbeats',
    sa.Column('worker_id', sa.String(length=255), nullable=False),
    sa.Column('role', sa.String(length=16), nullable=False),
    sa.Column('seen_at', PRECISE_TIME, nullable=False),
    sa.PrimaryKeyConstraint('worker_id')
    )
    op.create_table('worker_meta',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('epoch', sa.BigInteger(), nullable=False),
    sa.Column('holder', sa.String(length=255), nullable=False),
    sa.Column('taken_at', PRECISE_TIME, nullable=True),
    sa.PrimaryKeyConstraint('id')
    )
    op.execute("INSERT INTO worker_meta (id, epoch, holder) VALUES (1, 0, '')")
    op.create_table('node_ips',
    sa.Column('node_id', sa.Integer(), nullable=False),
    sa.Column('position', sa.Integer(), nullable=False),
    sa.Column('ip', sa.String(length=255), nullable=False),
    sa.ForeignKeyConstraint(['node_id'], ['nodes.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('node_id', 'position')
    )


def downgrade() -> None:
    op.drop_table('node_ips')
    op.drop_table('worker_meta')
    op.drop_table('worker_heartbeats')
    op.drop_index('ix_waiting_pool_id', table_name='waiting_requests')
    op.drop_table('waiting_requests')
    op.drop_index('ix_processed_at', table_name='processed_requests')
    op.drop_table('processed_requests')
    op.drop_index('ix_nodes_pool_state_id', table_name='nodes')
    op.drop_index('ix_nodes_owner', table_name='nodes')
    op.drop_table('nodes')
    op.drop_index('ix_allocations_request', table_name='allocations')
    op.drop_index('ix_allocations_node_open', table_name='allocations')
    op.drop_table('allocations')
