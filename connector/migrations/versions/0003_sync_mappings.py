"""sync_mappings and sync_runs.mapping_change: the mapping a sync last delivered under, and
what a mapping backfill run changed (connector/mapping.py)

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-02 18:09:47.150517
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('sync_mappings',
    sa.Column('sync', sa.String(length=100), nullable=False),
    sa.Column('attribute', sa.String(length=255), nullable=False),
    sa.Column('spec', sa.Text(), nullable=False),
    sa.Column('since_run', sa.Integer(), nullable=True),
    sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('sync', 'attribute')
    )
    with op.batch_alter_table('sync_runs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('mapping_change', sa.Text(), nullable=True))



def downgrade() -> None:
    with op.batch_alter_table('sync_runs', schema=None) as batch_op:
        batch_op.drop_column('mapping_change')

    op.drop_table('sync_mappings')

