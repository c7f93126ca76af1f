"""The sync tables as usersync 0.1.0 made them; adopts the tables of a release before migrations.

On an empty database this creates the schema of ``connector/state.py`` at fd24d1f. A database
whose sync tables an earlier release made with ``metadata.create_all`` (no version table) runs
this revision too: it creates only the tables missing there and brings the others to the
same schema, so every snapshot row stays where it is.

Revision ID: 0001
Revises:
Create Date: 2026-12-02
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import mysql

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

# Frozen here, not imported from state.py: later revisions change state.py's tables, and this
# one must keep creating what it created the day it was written.
_KEY = sa.String(255)
_SYNC = sa.String(100)
_JSON = sa.Text().with_variant(mysql.LONGTEXT(), "mysql", "mariadb")
_TS = sa.DateTime(timezone=True)


def _tables() -> dict[str, list]:
    return {
        "sync_runs": [
            sa.Column("run_id", sa.Integer, primary_key=True, autoincrement=True),
            sa.Column("sync", _SYNC, nullable=False),
            sa.Column("vendor", sa.String(40), nullable=False),
            sa.Column("mode", sa.String(20), nullable=False),
            sa.Column("trigger", sa.String(250), nullable=False),
            sa.Column("status", sa.String(20), nullable=False),
            sa.Column("started_at", _TS, nullable=False),
            sa.Column("finished_at", _TS),
            sa.Column("users_read", sa.Integer),
            sa.Column("users_changed", sa.Integer),
            sa.Column("users_delivered", sa.Integer),
            sa.Column("users_rejected", sa.Integer),
            sa.Column("users_failed", sa.Integer),
            sa.Column("requests", sa.Integer),
            sa.Column("watermark_from", sa.String(100)),
            sa.Column("watermark_to", sa.String(100)),
            sa.Column("error", sa.Text),
        ],
        "sync_batches": [
            sa.Column("batch_id", sa.Integer, primary_key=True, autoincrement=True),
            sa.Column("run_id", sa.Integer, nullable=False),
            sa.Column("sync", _SYNC, nullable=False),
            sa.Column("shard", sa.Integer, nullable=False),
            sa.Column("users", sa.Integer, nullable=False),
            sa.Column("first_user", _KEY),
            sa.Column("attributes", sa.Text),
            sa.Column("http_status", sa.Integer),
            sa.Column("vendor_code", sa.String(40)),
            sa.Column("vendor_message", sa.Text),
            sa.Column("attempts", sa.Integer, nullable=False),
            sa.Column("latency_ms", sa.Integer),
            sa.Column("outcome", sa.String(20), nullable=False),
            sa.Column("sent_at", _TS, nullable=False),
        ],
        "sync_snapshot": [
            sa.Column("sync", _SYNC, primary_key=True),
            sa.Column("user_key", _KEY, primary_key=True),
            sa.Column("payload", _JSON, nullable=False),
            sa.Column("row_hash", sa.BigInteger, nullable=False),
            sa.Column("run_id", sa.Integer),
            sa.Column("updated_at", _TS, nullable=False),
        ],
        "sync_failures": [
            sa.Column("sync", _SYNC, primary_key=True),
            sa.Column("user_key", _KEY, primary_key=True),
            sa.Column("identity", sa.Text, nullable=False),
            sa.Column("run_id", sa.Integer),
            sa.Column("error_class", sa.String(20), nullable=False),
            sa.Column("code", sa.String(40)),
            sa.Column("message", sa.Text),
            sa.Column("attempts", sa.Integer, nullable=False),
            sa.Column("first_seen", _TS, nullable=False),
            sa.Column("last_seen", _TS, nullable=False),
        ],
        "sync_plan": [
            sa.Column("run_id", sa.Integer, primary_key=True),
            sa.Column("user_key", _KEY, primary_key=True),
            sa.Column("shard", sa.Integer, nullable=False),
            sa.Column("identity", sa.Text, nullable=False),
            sa.Column("source_identity", sa.Text, nullable=False),
            sa.Column("ops", _JSON, nullable=False),
            sa.Column("payload", _JSON, nullable=False),
            sa.Column("row_hash", sa.BigInteger, nullable=False),
            sa.Column("status", sa.String(20), nullable=False),
            sa.Column("in_flight", sa.Text),
        ],
        "sync_cursors": [
            sa.Column("sync", _SYNC, primary_key=True),
            sa.Column("watermark", sa.String(100), nullable=False),
            sa.Column("run_id", sa.Integer),
            sa.Column("updated_at", _TS, nullable=False),
        ],
        "sync_locks": [
            sa.Column("sync", _SYNC, primary_key=True),
            sa.Column("run_id", sa.Integer, nullable=False),
            sa.Column("owner", sa.String(200), nullable=False),
            sa.Column("acquired_at", _TS, nullable=False),
            sa.Column("heartbeat_at", _TS, nullable=False),
        ],
    }


_INDEXES = {
    "sync_runs": [("ix_sync_runs_sync", ["sync"])],
    "sync_batches": [("ix_sync_batches_run_id", ["run_id"])],
    "sync_plan": [("ix_sync_plan_shard", ["run_id", "shard", "status"])],
}


def upgrade() -> None:
    bind = op.get_bind()
    have = set(sa.inspect(bind).get_table_names())
    _refuse_lost_snapshot(bind, have)
    for name, columns in _tables().items():
        if name not in have:
            op.create_table(name, *columns)
            for index, on in _INDEXES.get(name, []):
                op.create_index(index, name, on)
    if "sync_runs" in have:
        _adopt(bind)


def _refuse_lost_snapshot(bind, have: set[str]) -> None:
    """Runs recorded but the snapshot or failures gone (dropped?): created empty here, every
    user would be sent again as new and every increment counted twice. ``engine.check_state``
    says so before a run; this keeps ``usersync db upgrade`` from undoing it."""
    missing = {"sync_snapshot", "sync_failures"} - have
    if "sync_runs" in have and missing and bind.execute(sa.text("SELECT COUNT(*) FROM sync_runs")).scalar():
        from connector.migrations import SchemaError

        raise SchemaError(f"sync table(s) {', '.join(sorted(missing))} missing although sync_runs records runs: "
                          "dropped? Restore from a backup, or drop every sync_* table to start over")


def _adopt(bind) -> None:
    """What ``state.create_tables`` left behind in tables made by earlier releases (it only ever
    created missing tables, and patched ``sync_plan``): the same schema as a fresh database."""
    inspector = sa.inspect(bind)
    plan = {c["name"] for c in inspector.get_columns("sync_plan")}
    if "in_flight" not in plan or "before" in plan:
        with op.batch_alter_table("sync_plan") as t:  # SQLite: a copy of the table; the others ALTER it
            if "in_flight" not in plan:  # before e27714b
                t.add_column(sa.Column("in_flight", sa.Text))
            if "before" in plan:  # 8546572..edcd691: the snapshot payload is read from sync_snapshot now
                t.drop_column("before")
    # b0cb612..d09f6f6 made a covering snapshot index; d09f6f6 dropped it from the schema (a third
    # added to every snapshot write) but never from the databases that had it
    if "ix_sync_snapshot_hash" in {i["name"] for i in inspector.get_indexes("sync_snapshot")}:
        op.drop_index("ix_sync_snapshot_hash", "sync_snapshot")
    # before cae18e3 a trigger was VARCHAR(40): an Airflow run id overflows it (SQLite does not check)
    trigger = next(c for c in inspector.get_columns("sync_runs") if c["name"] == "trigger")
    if bind.dialect.name != "sqlite" and (trigger["type"].length or 250) < 250:
        with op.batch_alter_table("sync_runs") as t:
            t.alter_column("trigger", type_=sa.String(250), existing_nullable=False)


def downgrade() -> None:
    for name in reversed(_tables()):
        op.drop_table(name)
