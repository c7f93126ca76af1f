"""The sync tables' definitions, the one place their columns are written.

SQLAlchemy Core only, so the same code runs on SQLite, PostgreSQL and MySQL/MariaDB.
``usersync ddl`` prints the DDL (:func:`ddl`); ``sql/sync_tables.*.sql`` are that output. A
change to these tables is a revision in ``connector/migrations`` (see there), which every
run applies (:func:`connect`, ``engine.upgrade_state``). Each table's rules live in the
module that writes it: ``plans`` (sync_plan), ``snapshots`` (sync_snapshot), ``failed``
(sync_failures), ``history`` (sync_runs, sync_batches, sync_cursors, sync_mappings),
``lease`` (sync_locks).
"""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.dialects import mysql
from sqlalchemy.engine import Engine

from connector import db, migrations

metadata = sa.MetaData()
KEY = sa.String(255)
SYNC = sa.String(100)
JSON = sa.Text().with_variant(mysql.LONGTEXT(), "mysql", "mariadb")
TS = sa.DateTime(timezone=True)

runs = sa.Table(
    "sync_runs", metadata,
    sa.Column("run_id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("sync", SYNC, nullable=False, index=True),
    sa.Column("vendor", sa.String(40), nullable=False),
    sa.Column("mode", sa.String(20), nullable=False),  # incremental / full / backfill / dry_run
    sa.Column("trigger", sa.String(250), nullable=False),  # cli / airflow:<dag run id>
    sa.Column("status", sa.String(20), nullable=False),  # running / success / partial / failed / blocked / dry_run / abandoned
    sa.Column("started_at", TS, nullable=False),
    sa.Column("finished_at", TS),
    sa.Column("users_read", sa.Integer, default=0),
    sa.Column("users_changed", sa.Integer, default=0),
    sa.Column("users_delivered", sa.Integer, default=0),
    sa.Column("users_rejected", sa.Integer, default=0),
    sa.Column("users_failed", sa.Integer, default=0),
    sa.Column("requests", sa.Integer, default=0),
    sa.Column("watermark_from", sa.String(100)),
    sa.Column("watermark_to", sa.String(100)),  # cursor value to commit when the run succeeds
    sa.Column("error", sa.Text),
    # JSON, set when the run backfills a changed mapping: {"added", "changed", "removed", "unset", "mapping"};
    # "mapping" is what the run planned under, remembered in sync_mappings once its deliveries are recorded
    sa.Column("mapping_change", sa.Text),
)

batches = sa.Table(
    "sync_batches", metadata,
    sa.Column("batch_id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("run_id", sa.Integer, nullable=False, index=True),
    sa.Column("sync", SYNC, nullable=False),
    sa.Column("shard", sa.Integer, nullable=False),
    sa.Column("users", sa.Integer, nullable=False),
    sa.Column("first_user", KEY),
    sa.Column("attributes", sa.Text),  # comma-separated attribute names in the request
    sa.Column("http_status", sa.Integer),
    sa.Column("vendor_code", sa.String(40)),
    sa.Column("vendor_message", sa.Text),
    sa.Column("attempts", sa.Integer, nullable=False),
    sa.Column("latency_ms", sa.Integer),
    sa.Column("outcome", sa.String(20), nullable=False),  # delivered / partial / rejected / failed / stopped
    sa.Column("sent_at", TS, nullable=False),
    # who sent it, so the spread over workers shows: the host (on Airflow, the task instance's
    # hostname as Airflow records it) and the Airflow task (dag_id.task_id[map_index] try n; NULL for the CLI)
    sa.Column("worker", sa.String(250)),
    sa.Column("task", sa.String(250)),
)

snapshot = sa.Table(
    "sync_snapshot", metadata,
    sa.Column("sync", SYNC, primary_key=True),
    sa.Column("user_key", KEY, primary_key=True),
    sa.Column("payload", JSON, nullable=False),  # attribute -> last delivered wire value
    sa.Column("row_hash", sa.BigInteger, nullable=False),  # hash of the mapped source row
    sa.Column("run_id", sa.Integer),
    sa.Column("updated_at", TS, nullable=False),
)

# One row per open failure: the user's ('' attribute: the user as a whole, as the vendor or
# the plan refused it) and one per attribute whose value was set aside while planning (the
# rest of that user delivered). ``value_hash`` is the hash of what was set aside (the
# attribute's source value; the source row for a whole user): the same value seen again is
# no new failure, and is never sent.
failures = sa.Table(
    "sync_failures", metadata,
    sa.Column("sync", SYNC, primary_key=True),
    sa.Column("user_key", KEY, primary_key=True),
    sa.Column("attribute", KEY, primary_key=True, server_default=""),  # '' (failed.WHOLE): the whole user
    sa.Column("identity", sa.Text, nullable=False),  # source identity columns, JSON
    sa.Column("run_id", sa.Integer),
    sa.Column("error_class", sa.String(20), nullable=False),  # invalid / rejected / retryable / in_doubt
    sa.Column("code", sa.String(40)),
    sa.Column("message", sa.Text),
    sa.Column("attempts", sa.Integer, nullable=False, default=1),
    sa.Column("first_seen", TS, nullable=False),
    sa.Column("last_seen", TS, nullable=False),
    sa.Column("value_hash", sa.BigInteger),  # set aside while planning: what was (see above)
)

plan = sa.Table(
    "sync_plan", metadata,
    sa.Column("run_id", sa.Integer, primary_key=True),
    sa.Column("user_key", KEY, primary_key=True),
    sa.Column("shard", sa.Integer, nullable=False),
    sa.Column("identity", sa.Text, nullable=False),  # vendor identity fields, JSON
    sa.Column("source_identity", sa.Text, nullable=False),  # source identity columns, JSON
    sa.Column("ops", JSON, nullable=False),  # [[attribute, op, value], ...]
    sa.Column("payload", JSON, nullable=False),  # snapshot payload once delivered
    sa.Column("row_hash", sa.BigInteger, nullable=False),
    sa.Column("status", sa.String(20), nullable=False),  # pending / out / sending / delivered / failed: see plans
    sa.Column("in_flight", sa.Text),  # while sending: JSON list of the non-idempotent attributes that may land
    sa.Index("ix_sync_plan_shard", "run_id", "shard", "status"),
)

mappings = sa.Table(
    "sync_mappings", metadata,  # the mapping a sync last delivered under (beside the snapshot it explains)
    sa.Column("sync", SYNC, primary_key=True),
    sa.Column("attribute", KEY, primary_key=True),
    sa.Column("spec", sa.Text, nullable=False),  # JSON: what the wire value depends on (connector.mapping.specs)
    sa.Column("since_run", sa.Integer),  # the run that first delivered under this spec
    sa.Column("updated_at", TS, nullable=False),
)

cursors = sa.Table(
    "sync_cursors", metadata,
    sa.Column("sync", SYNC, primary_key=True),
    sa.Column("watermark", sa.String(100), nullable=False),  # JSON: {"t": type, "v": value}
    sa.Column("run_id", sa.Integer),
    sa.Column("updated_at", TS, nullable=False),
)

locks = sa.Table(
    "sync_locks", metadata,
    sa.Column("sync", SYNC, primary_key=True),
    sa.Column("run_id", sa.Integer, nullable=False),
    sa.Column("owner", sa.String(200), nullable=False),
    sa.Column("acquired_at", TS, nullable=False),
    sa.Column("heartbeat_at", TS, nullable=False),
)


def connect(url: str) -> Engine:
    """An engine for the state database, its sync tables at this release's schema."""
    engine = db.make_engine(url)
    migrations.ensure(engine)
    return engine


def ddl(dialect: str) -> str:
    """CREATE TABLE statements for a dialect (sqlite, postgresql, mysql)."""
    from sqlalchemy.schema import CreateIndex, CreateTable

    eng = sa.create_mock_engine(f"{dialect}://", lambda *a, **k: None)
    out = []
    for table in metadata.sorted_tables:
        out.append(str(CreateTable(table).compile(dialect=eng.dialect)).strip() + ";")
        for index in sorted(table.indexes, key=lambda i: i.name):
            out.append(str(CreateIndex(index).compile(dialect=eng.dialect)).strip() + ";")
    return "\n\n".join(out) + "\n"

