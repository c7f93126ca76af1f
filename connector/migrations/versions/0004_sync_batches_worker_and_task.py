"""sync_batches worker and task: which host and which Airflow task sent each batch (the
Celery/Kubernetes spread; NULL task for the CLI)

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-02 18:26:21.907604
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0004'
down_revision = '0003'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('sync_batches', schema=None) as batch_op:
        batch_op.add_column(sa.Column('worker', sa.String(length=250), nullable=True))
        batch_op.add_column(sa.Column('task', sa.String(length=250), nullable=True))



def downgrade() -> None:
    with op.batch_alter_table('sync_batches', schema=None) as batch_op:
        batch_op.drop_column('task')
        batch_op.drop_column('worker')


