"""sync_failures per attribute: a value set aside while planning is remembered per attribute
(``attribute``; '' is the user as a whole, as every row before this revision was) with the
hash of what was set aside (``value_hash``), so it is not sent again until its source
value changes.

Revision ID: 0002
Revises: 0001
"""
from __future__ import annotations

import warnings

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # the primary key gains a column: the table is copied into its new shape on every dialect
    # (it holds the open failures only, a small table), the existing rows as whole-user ones.
    # SQLAlchemy warns that the copy's key differs from the reflected one: that is the point.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Table '_alembic_tmp_sync_failures' specifies columns")
        with op.batch_alter_table("sync_failures", recreate="always") as batch:
            batch.add_column(sa.Column("attribute", sa.String(255), server_default="", nullable=False))
            batch.add_column(sa.Column("value_hash", sa.BigInteger(), nullable=True))
            batch.create_primary_key("pk_sync_failures", ["sync", "user_key", "attribute"])


def downgrade() -> None:
    with op.batch_alter_table("sync_failures", recreate="always") as batch:
        batch.drop_column("value_hash")
        batch.drop_column("attribute")
        batch.create_primary_key("pk_sync_failures", ["sync", "user_key"])
