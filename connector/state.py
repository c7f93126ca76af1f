"""The sync tables: what was delivered, what each run and batch did, what failed.

SQLAlchemy Core only, so the same code runs on SQLite, PostgreSQL and MySQL/MariaDB.
``usersync ddl`` prints the DDL; ``sql/sync_tables.*.sql`` are that output. A change to these
tables is a revision in ``connector/migrations`` (see there), which every run applies.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import functools
import io
import json
import os
import socket
import threading
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import msgspec
import numpy as np
import pandas as pd
import sqlalchemy as sa
from sqlalchemy.dialects import mysql, postgresql
from sqlalchemy.engine import Engine

from connector import migrations

metadata = sa.MetaData()
_KEY = sa.String(255)
_SYNC = sa.String(100)
_JSON = sa.Text().with_variant(mysql.LONGTEXT(), "mysql", "mariadb")
_TS = sa.DateTime(timezone=True)

runs = sa.Table(
    "sync_runs", metadata,
    sa.Column("run_id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("sync", _SYNC, nullable=False, index=True),
    sa.Column("vendor", sa.String(40), nullable=False),
    sa.Column("mode", sa.String(20), nullable=False),  # incremental / full / backfill / dry_run
    sa.Column("trigger", sa.String(250), nullable=False),  # cli / airflow:<dag run id>
    sa.Column("status", sa.String(20), nullable=False),  # running / success / partial / failed / blocked / dry_run / abandoned
    sa.Column("started_at", _TS, nullable=False),
    sa.Column("finished_at", _TS),
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
    sa.Column("sync", _SYNC, nullable=False),
    sa.Column("shard", sa.Integer, nullable=False),
    sa.Column("users", sa.Integer, nullable=False),
    sa.Column("first_user", _KEY),
    sa.Column("attributes", sa.Text),  # comma-separated attribute names in the request
    sa.Column("http_status", sa.Integer),
    sa.Column("vendor_code", sa.String(40)),
    sa.Column("vendor_message", sa.Text),
    sa.Column("attempts", sa.Integer, nullable=False),
    sa.Column("latency_ms", sa.Integer),
    sa.Column("outcome", sa.String(20), nullable=False),  # delivered / partial / rejected / failed / stopped
    sa.Column("sent_at", _TS, nullable=False),
    # who sent it, so the spread over workers shows: the host (on Airflow, the task instance's
    # hostname as Airflow records it) and the Airflow task (dag_id.task_id[map_index] try n; NULL for the CLI)
    sa.Column("worker", sa.String(250)),
    sa.Column("task", sa.String(250)),
)

snapshot = sa.Table(
    "sync_snapshot", metadata,
    sa.Column("sync", _SYNC, primary_key=True),
    sa.Column("user_key", _KEY, primary_key=True),
    sa.Column("payload", _JSON, nullable=False),  # attribute -> last delivered wire value
    sa.Column("row_hash", sa.BigInteger, nullable=False),  # hash of the mapped source row
    sa.Column("run_id", sa.Integer),
    sa.Column("updated_at", _TS, nullable=False),
)

# One row per open failure: the user's ('' attribute: the user as a whole, as the vendor or
# the plan refused it) and one per attribute whose value was set aside while planning (the
# rest of that user delivered). ``value_hash`` is the hash of what was set aside (the
# attribute's source value; the source row for a whole user): the same value seen again is
# no new failure, and is never sent.
failures = sa.Table(
    "sync_failures", metadata,
    sa.Column("sync", _SYNC, primary_key=True),
    sa.Column("user_key", _KEY, primary_key=True),
    sa.Column("attribute", _KEY, primary_key=True, server_default=""),  # '': the whole user
    sa.Column("identity", sa.Text, nullable=False),  # source identity columns, JSON
    sa.Column("run_id", sa.Integer),
    sa.Column("error_class", sa.String(20), nullable=False),  # invalid / rejected / retryable / in_doubt
    sa.Column("code", sa.String(40)),
    sa.Column("message", sa.Text),
    sa.Column("attempts", sa.Integer, nullable=False, default=1),
    sa.Column("first_seen", _TS, nullable=False),
    sa.Column("last_seen", _TS, nullable=False),
    sa.Column("value_hash", sa.BigInteger),  # set aside while planning: what was (see above)
)
WHOLE = ""  # the ``attribute`` of a failure of the user as a whole

plan = sa.Table(
    "sync_plan", metadata,
    sa.Column("run_id", sa.Integer, primary_key=True),
    sa.Column("user_key", _KEY, primary_key=True),
    sa.Column("shard", sa.Integer, nullable=False),
    sa.Column("identity", sa.Text, nullable=False),  # vendor identity fields, JSON
    sa.Column("source_identity", sa.Text, nullable=False),  # source identity columns, JSON
    sa.Column("ops", _JSON, nullable=False),  # [[attribute, op, value], ...]
    sa.Column("payload", _JSON, nullable=False),  # snapshot payload once delivered
    sa.Column("row_hash", sa.BigInteger, nullable=False),
    sa.Column("status", sa.String(20), nullable=False),  # pending / sending (in flight) / delivered / failed
    sa.Column("in_flight", sa.Text),  # while sending: JSON list of the non-idempotent attributes that may land
    sa.Index("ix_sync_plan_shard", "run_id", "shard", "status"),
)

mappings = sa.Table(
    "sync_mappings", metadata,  # the mapping a sync last delivered under (beside the snapshot it explains)
    sa.Column("sync", _SYNC, primary_key=True),
    sa.Column("attribute", _KEY, primary_key=True),
    sa.Column("spec", sa.Text, nullable=False),  # JSON: what the wire value depends on (connector.mapping.specs)
    sa.Column("since_run", sa.Integer),  # the run that first delivered under this spec
    sa.Column("updated_at", _TS, nullable=False),
)

cursors = sa.Table(
    "sync_cursors", metadata,
    sa.Column("sync", _SYNC, primary_key=True),
    sa.Column("watermark", sa.String(100), nullable=False),  # JSON: {"t": type, "v": value}
    sa.Column("run_id", sa.Integer),
    sa.Column("updated_at", _TS, nullable=False),
)

locks = sa.Table(
    "sync_locks", metadata,
    sa.Column("sync", _SYNC, primary_key=True),
    sa.Column("run_id", sa.Integer, nullable=False),
    sa.Column("owner", sa.String(200), nullable=False),
    sa.Column("acquired_at", _TS, nullable=False),
    sa.Column("heartbeat_at", _TS, nullable=False),
)


def now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def connect(url: str) -> Engine:
    """An engine for the state database, its sync tables at this release's schema."""
    engine = make_engine(url)
    migrations.ensure(engine)
    return engine


def threads_share(engine: Engine) -> bool:
    """Whether a connection opened on another thread sees the same database (not so for an
    in-memory SQLite database, which SQLAlchemy keeps one per thread)."""
    return not (engine.dialect.name == "sqlite" and engine.url.database in (None, "", ":memory:"))


def make_engine(url: str) -> Engine:
    kwargs: dict[str, Any] = {"pool_pre_ping": True}
    if url.startswith("sqlite"):
        kwargs = {"connect_args": {"timeout": 60}}
    elif url.startswith(("mysql", "mariadb")):
        # PostgreSQL's default isolation. Under InnoDB's REPEATABLE READ, the push's
        # INSERT ... SELECT from sync_plan would share-lock every plan row it scans, and
        # deadlock with a sender marking its own rows `sending`; READ COMMITTED reads them
        # as a consistent snapshot, without locks.
        kwargs["isolation_level"] = "READ COMMITTED"
    engine = sa.create_engine(url, **kwargs)
    if engine.dialect.name == "sqlite":
        @sa.event.listens_for(engine, "connect")
        def _wal(dbapi_conn, _):  # readers do not block the writer
            dbapi_conn.execute("PRAGMA journal_mode=WAL")
            dbapi_conn.execute("PRAGMA synchronous=NORMAL")
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


def plain(value: Any) -> Any:
    """numpy / pandas scalars as plain Python values (JSON and bind parameters)."""
    if isinstance(value, pd.Timestamp):
        return value.to_pydatetime()
    if isinstance(value, np.generic):
        return value.item()
    if value is pd.NA:
        return None
    return value


def _encodable(value: Any) -> Any:
    """What msgspec has no JSON type for: numpy and pandas scalars as Python's, the rest (Decimal, ...) as text."""
    out = plain(value)
    return str(value) if out is value else out


_ENCODER = msgspec.json.Encoder(enc_hook=_encodable)


def dumps(value: Any) -> str:
    """Compact JSON (msgspec: a quarter of ``json.dumps``' time, text included; the plan writes five a user)."""
    return _ENCODER.encode(value).decode()


def loads(text: str) -> Any:
    try:
        return msgspec.json.decode(text)
    except msgspec.DecodeError:  # NaN or Infinity, as Python's json wrote them: msgspec refuses
        return json.loads(text)


# -- runs ----------------------------------------------------------------------------
def start_run(engine: Engine, sync: str, vendor: str, mode: str, trigger: str) -> int:
    with engine.begin() as c:
        res = c.execute(runs.insert().values(sync=sync, vendor=vendor, mode=mode, trigger=trigger,
                                             status="running", started_at=now(), users_read=0,
                                             users_changed=0, users_delivered=0, users_rejected=0,
                                             users_failed=0, requests=0))
        return int(res.inserted_primary_key[0])


def update_run(engine: Engine, run_id: int, **values: Any) -> None:
    with engine.begin() as c:
        c.execute(runs.update().where(runs.c.run_id == run_id).values(**values))


def get_run(engine: Engine, run_id: int) -> dict[str, Any]:
    with engine.connect() as c:
        row = c.execute(sa.select(runs).where(runs.c.run_id == run_id)).mappings().one()
    return dict(row)


# -- plan ----------------------------------------------------------------------------
STAGED = ("run_id", "user_key", "shard", "identity", "source_identity", "ops", "payload", "row_hash", "status")


def stage(conn: sa.Connection, rows: list[tuple]) -> None:
    """Insert plan rows (tuples in ``STAGED`` order). PostgreSQL through psycopg2 takes
    them with COPY: a third of the multi-row INSERTs' time for the plan's wide JSON rows."""
    if not rows:
        return
    if conn.dialect.name == "sqlite":  # the driver's executemany of the tuples: a third of the time off
        conn.exec_driver_sql(f"INSERT INTO {plan.name} ({', '.join(STAGED)}) VALUES ({', '.join('?' * len(STAGED))})", rows)
        return
    if (conn.dialect.name, conn.dialect.driver) != ("postgresql", "psycopg2"):
        conn.execute(plan.insert(), [dict(zip(STAGED, r)) for r in rows])
        return
    text = "".join("\t".join(map(str, r)) + "\n" for r in rows)
    if text.count("\t") == len(rows) * (len(STAGED) - 1) and text.count("\n") == len(rows) and "\r" not in text:
        text = text.replace("\\", "\\\\")  # no value holds a separator (JSON escapes its own): only backslashes
    else:
        text = "".join("\t".join(map(_copy_text, r)) + "\n" for r in rows)
    with conn.connection.dbapi_connection.cursor() as cursor:
        cursor.copy_expert(f"COPY {plan.name} ({', '.join(STAGED)}) FROM STDIN", io.StringIO(text))


def _copy_text(value: Any) -> str:
    """A value in COPY's text format (none of the staged values is NULL)."""
    return str(value).replace("\\", "\\\\").replace("\t", "\\t").replace("\n", "\\n").replace("\r", "\\r")


# -- snapshot ------------------------------------------------------------------------
# The snapshot value of an attribute whose value at the vendor is unknown: a request carrying
# it may have left, and no answer was recorded (the run died or lost its lock, or the answer
# was ambiguous). No wire value is a JSON object, so the next diff finds it changed and
# re-sends the warehouse's value, whatever the warehouse did meanwhile.
UNKNOWN = {"usersync": "unconfirmed"}

def snapshot_rows(engine: Engine, sync: str, keys: Iterable[str]) -> dict[str, tuple[int, str]]:
    """Some users' (row hash, last delivered payload as JSON), by key: a thousand keys a
    query (PostgreSQL: ``= ANY(array)``, one parameter); from a database server, on two
    connections at once. The server's index and page lookups are most of the time (10,000
    keys of 1M on PostgreSQL: 0.12 s of 0.2 s on one connection), and each connection is
    served by a process of its own. SQLite's work is this process's: one connection."""
    chunks = list(chunked(list(keys), 1000))
    if len(chunks) < 2 or engine.dialect.name == "sqlite":
        return _snapshot_rows(engine, sync, chunks)
    with ThreadPoolExecutor(2, thread_name_prefix="usersync-snapshot") as pool:
        out, other = pool.map(_snapshot_rows, [engine] * 2, [sync] * 2, [chunks[0::2], chunks[1::2]])
    return out | other


def _snapshot_rows(engine: Engine, sync: str, chunks: list[list[str]]) -> dict[str, tuple[int, str]]:
    """``snapshot_rows`` on one connection, from the driver's own cursor."""
    out: dict[str, tuple[int, str]] = {}
    s = snapshot
    with engine.connect() as c, contextlib.closing(c.connection.cursor()) as cursor:
        for chunk in chunks:
            driver_execute(c, cursor, sa.select(s.c.user_key, s.c.row_hash, s.c.payload).where(
                s.c.sync == sync, _among(c, s.c.user_key, chunk)))
            out.update((k, (h, p)) for k, h, p in cursor.fetchall())
    return out


def _among(conn: sa.Connection, column: sa.ColumnElement, values: list) -> sa.ColumnElement[bool]:
    if conn.dialect.name == "postgresql":
        return column == sa.any_(sa.bindparam(None, values, type_=postgresql.ARRAY(column.type)))
    return column.in_(values)


def staged_rows(conn: sa.Connection, sync: str, run_id: int, keys: list[str]) -> dict[str, tuple[dict, dict, dict]]:
    """Some users' (source identity, payload once delivered) as a run's plan staged them, and
    their snapshot payload now ({} for a new user). That is the payload the plan diffed
    against: a user's snapshot row changes only when its own outcome is recorded, once a run."""
    out = {}
    s = snapshot
    for chunk in chunked(keys, 500):
        q = (sa.select(plan.c.user_key, plan.c.source_identity, plan.c.payload, s.c.payload)
             .outerjoin(s, (s.c.sync == sync) & (s.c.user_key == plan.c.user_key))
             .where(plan.c.run_id == run_id, plan.c.user_key.in_(chunk)))
        out.update((k, (loads(i), loads(p), loads(b) if b is not None else {})) for k, i, p, b in conn.execute(q))
    return out


def driver_execute(conn: sa.Connection, cursor: Any, query: sa.Executable) -> None:
    """Run a Core query on the driver's own cursor, whose rows are plain tuples."""
    compiled = query.compile(conn, compile_kwargs={"render_postcompile": True})  # IN's list: one parameter a value
    params = compiled.construct_params()
    cursor.execute(str(compiled), [params[p] for p in compiled.positiontup or ()] if compiled.positional else params)


def snapshot_hashes(engine: Engine, sync: str, batch: int = 100_000) -> Iterator[tuple[list[str], list[int]]]:
    """Every (user keys, row hashes) of a sync, ``batch`` users at a time.

    Fetched in key order, a page a query, from the driver's own cursor: a million users are
    two million cells, and a SQLAlchemy row (or a DataFrame) around each would cost more
    than the fetch itself.
    """
    s, after = snapshot, None
    with engine.connect() as c, contextlib.closing(c.connection.cursor()) as cursor:
        while True:
            q = sa.select(s.c.user_key, s.c.row_hash).where(s.c.sync == sync)
            q = q.where(s.c.user_key > after) if after is not None else q
            driver_execute(c, cursor, q.order_by(s.c.user_key).limit(batch))
            rows = cursor.fetchall()
            if not rows:
                return
            yield [r[0] for r in rows], [r[1] for r in rows]  # 10x zip(*rows), which makes an iterator a row
            after = rows[-1][0]


def upsert_snapshot(conn: sa.Connection, sync: str, run_id: int | None,
                    rows: list[tuple[str, dict[str, Any] | str, int]]) -> None:
    """Write delivered payloads (a payload given as text is its JSON already, as staged).

    One upsert statement where the dialect has one (SQLite, PostgreSQL, MySQL/MariaDB);
    elsewhere delete then insert, portable across dialects.
    """
    if not rows:
        return
    ts = now()
    values = [{"sync": sync, "user_key": k, "payload": p if isinstance(p, str) else dumps(p), "row_hash": h,
               "run_id": run_id, "updated_at": ts} for k, p, h in rows]
    stmt = _snapshot_upsert(conn.dialect.name)
    if stmt is None:
        for chunk in chunked([k for k, _, _ in rows], 500):
            conn.execute(snapshot.delete().where(snapshot.c.sync == sync, snapshot.c.user_key.in_(chunk)))
        stmt = snapshot.insert()
    conn.execute(stmt, values)


def snapshot_from_plan(conn: sa.Connection, sync: str, run_id: int, keys: list[str]) -> None:
    """Delivered users: their staged payload and row hash become their snapshot, copied
    from ``sync_plan`` by the database (only the keys go through Python: a push records
    10,000 users a second at Tencent's limit)."""
    stmt, ts = _from_plan(conn.dialect.name), now()
    for chunk in chunked(keys, 500):
        params = {"sync": sync, "run_id": run_id, "keys": chunk, "ts": ts}
        if _snapshot_upsert(conn.dialect.name) is None:  # no upsert: delete, then insert
            conn.execute(snapshot.delete().where(snapshot.c.sync == sync, snapshot.c.user_key.in_(chunk)))
        conn.execute(stmt, params)


_UPSERTED = ("payload", "row_hash", "run_id", "updated_at")


@functools.cache
def _from_plan(dialect: str):
    """INSERT (or overwrite) INTO sync_snapshot SELECT the plan rows of :keys (run :run_id)."""
    ts = sa.bindparam("ts", type_=_TS)
    rows = sa.select(sa.bindparam("sync", type_=_SYNC), plan.c.user_key, plan.c.payload, plan.c.row_hash,
                     plan.c.run_id, ts).where(plan.c.run_id == sa.bindparam("run_id"),
                                              plan.c.user_key.in_(sa.bindparam("keys", expanding=True)))
    columns = ["sync", "user_key", *_UPSERTED]
    if dialect == "sqlite":
        return snapshot.insert().prefix_with("OR REPLACE").from_select(columns, rows)
    if dialect == "postgresql":
        from sqlalchemy.dialects import postgresql
        ins = postgresql.insert(snapshot).from_select(columns, rows)
        return ins.on_conflict_do_update(index_elements=[snapshot.c.sync, snapshot.c.user_key],
                                         set_={c: ins.excluded[c] for c in _UPSERTED})
    if dialect in ("mysql", "mariadb"):  # the plan's columns by name: MySQL has no row alias for a SELECT
        return mysql.insert(snapshot).from_select(columns, rows).on_duplicate_key_update(
            payload=plan.c.payload, row_hash=plan.c.row_hash, run_id=plan.c.run_id, updated_at=ts)
    return snapshot.insert().from_select(columns, rows)  # no upsert (see _snapshot_upsert): after a DELETE


@functools.cache
def _snapshot_upsert(dialect: str):
    """The dialect's insert-or-overwrite of a snapshot row (None: it has none we use)."""
    if dialect == "sqlite":  # REPLACE: the old row is deleted, the new one inserted
        return snapshot.insert().prefix_with("OR REPLACE")
    if dialect == "postgresql":
        from sqlalchemy.dialects import postgresql
        ins = postgresql.insert(snapshot)
        return ins.on_conflict_do_update(index_elements=[snapshot.c.sync, snapshot.c.user_key],
                                         set_={c: ins.excluded[c] for c in _UPSERTED})
    if dialect in ("mysql", "mariadb"):
        ins = mysql.insert(snapshot)
        return ins.on_duplicate_key_update({c: ins.inserted[c] for c in _UPSERTED})
    return None


# -- failures ------------------------------------------------------------------------
def record_failures(conn: sa.Connection, sync: str, run_id: int,
                    rows: list[tuple[str, dict[str, Any], str, str | None, str]]) -> None:
    """(key, source identity, error class, code, message) of users failed as a whole — kept
    until delivered (a user's set-aside attributes are kept apart: :func:`set_aside`)."""
    set_aside(conn, sync, run_id, [(k, WHOLE, ident, cls, code, msg, None) for k, ident, cls, code, msg in rows])


def set_aside(conn: sa.Connection, sync: str, run_id: int,
              rows: list[tuple[str, str, dict[str, Any], str, str | None, str, int | None]]) -> None:
    """Write failure rows (key, attribute, source identity, error class, code, message, value
    hash), each replacing that (user, attribute)'s own, its first sight and attempts kept."""
    if not rows:
        return
    f = failures
    prior: dict[tuple[str, str], tuple[int, dt.datetime]] = {}
    for attribute in {r[1] for r in rows}:
        for chunk in chunked([r[0] for r in rows if r[1] == attribute], 500):
            where = (f.c.sync == sync, f.c.attribute == attribute, f.c.user_key.in_(chunk))
            prior.update(((k, attribute), (a, s)) for k, a, s in
                         conn.execute(sa.select(f.c.user_key, f.c.attempts, f.c.first_seen).where(*where)))
            conn.execute(f.delete().where(*where))
    ts = now()
    conn.execute(f.insert(), [
        {"sync": sync, "user_key": k, "attribute": a, "identity": dumps(ident), "run_id": run_id,
         "error_class": cls, "code": code, "message": (msg or "")[:2000], "value_hash": h,
         "attempts": prior.get((k, a), (0, ts))[0] + 1, "first_seen": prior.get((k, a), (0, ts))[1],
         "last_seen": ts}
        for k, a, ident, cls, code, msg, h in rows])


def open_failures(conn: sa.Connection, sync: str, keys: list[str]) -> dict[str, dict[str, tuple[str, int | None]]]:
    """Some users' open failures: key -> {attribute ('' the whole user): (error class, value hash)}."""
    f, out = failures, {}
    for chunk in chunked(keys, 500):
        q = sa.select(f.c.user_key, f.c.attribute, f.c.error_class, f.c.value_hash).where(
            f.c.sync == sync, f.c.user_key.in_(chunk))
        for k, a, cls, h in conn.execute(q):
            out.setdefault(k, {})[a] = (cls, h)
    return out


def clear_failures(conn: sa.Connection, sync: str, keys: list[str], among: set[str] | None = None,
                   attribute: str = WHOLE) -> None:
    """Delete the failure rows of ``keys`` (of the user as a whole, or of one attribute);
    ``among``: the keys known to have one (from :func:`failure_keys`; None: unknown), so that
    the others cost no DELETE. A delivery clears the user's row, never a set-aside attribute's:
    that one goes when the plan finds its value changed."""
    if among is not None:
        keys = [k for k in keys if k in among]
    f = failures
    for chunk in chunked(keys, 500):
        conn.execute(f.delete().where(f.c.sync == sync, f.c.attribute == attribute, f.c.user_key.in_(chunk)))


def clear_unmapped(engine: Engine, sync: str, attributes: list[str]) -> None:
    """Forget set-aside attributes the mapping no longer has."""
    f = failures
    with engine.begin() as c:
        c.execute(f.delete().where(f.c.sync == sync, f.c.attribute != WHOLE, f.c.attribute.notin_(attributes)))


def failure_keys(engine: Engine, sync: str, most: int = 100_000) -> set[str] | None:
    """The keys of a sync's users with a failure row (None: more than ``most`` of them)."""
    with engine.connect() as c:
        keys = c.execute(sa.select(failures.c.user_key).where(failures.c.sync == sync).distinct()
                         .limit(most + 1)).scalars().all()
    return set(keys) if len(keys) <= most else None


def failed_identities(engine: Engine, sync: str) -> list[dict[str, Any]]:
    """Source identities of users whose last attempt failed as a whole: re-read every run.
    (A set-aside attribute is not: its user is read again when the source row changes.)"""
    with engine.connect() as c:
        rows = c.execute(sa.select(failures.c.identity).where(failures.c.sync == sync,
                                                              failures.c.attribute == WHOLE))
        return [ident for ident in (json.loads(i) for (i,) in rows) if ident]


# -- mapping -------------------------------------------------------------------------
def get_mapping(engine: Engine, sync: str) -> dict[str, tuple[dict[str, str], int | None, dt.datetime]]:
    """The mapping a sync last delivered under: attribute -> (spec, since run, since when)."""
    m = mappings
    with engine.connect() as c:
        rows = c.execute(sa.select(m.c.attribute, m.c.spec, m.c.since_run, m.c.updated_at).where(m.c.sync == sync))
        return {a: (loads(s), r, _aware(t)) for a, s, r, t in rows}


def remember_mapping(conn: sa.Connection, sync: str, run_id: int, specs: dict[str, dict[str, str]]) -> None:
    """Record ``specs`` as the mapping delivered, once run ``run_id``'s deliveries are: an
    attribute whose spec did not change keeps the run (and time) since which it holds."""
    m, ts = mappings, now()
    kept = {a: (s, r, t) for a, s, r, t in conn.execute(
        sa.select(m.c.attribute, m.c.spec, m.c.since_run, m.c.updated_at).where(m.c.sync == sync))}
    conn.execute(m.delete().where(m.c.sync == sync))
    rows = []
    for attr, spec in specs.items():
        old = kept.get(attr)
        same = old is not None and loads(old[0]) == spec
        rows.append({"sync": sync, "attribute": attr, "spec": dumps(spec), "since_run": old[1] if same else run_id,
                     "updated_at": old[2] if same else ts})
    if rows:
        conn.execute(m.insert(), rows)


# -- cursor --------------------------------------------------------------------------
def encode_watermark(value: Any) -> str:
    """A cursor value as JSON text that keeps its type (datetimes stay datetimes)."""
    if isinstance(value, dt.datetime):
        return dumps({"t": "datetime", "v": value.isoformat()})
    if hasattr(value, "item"):  # numpy scalar
        value = value.item()
    return dumps({"t": "value", "v": value})


def decode_watermark(raw: str | None) -> Any:
    if raw is None:
        return None
    w = json.loads(raw)
    return dt.datetime.fromisoformat(w["v"]) if w["t"] == "datetime" else w["v"]


def get_watermark(engine: Engine, sync: str) -> Any:
    with engine.connect() as c:
        return decode_watermark(c.execute(sa.select(cursors.c.watermark).where(cursors.c.sync == sync)).scalar())


def set_watermark(conn: sa.Connection, sync: str, value: Any, run_id: int) -> None:
    conn.execute(cursors.delete().where(cursors.c.sync == sync))
    conn.execute(cursors.insert().values(sync=sync, watermark=encode_watermark(value), run_id=run_id, updated_at=now()))


def show_watermark(value: Any) -> str | None:
    return None if value is None else str(value)[:100]


# -- lock (a lease) ---------------------------------------------------------------------
class Locked(Exception):
    """Another run of the same sync holds the lock."""


class LeaseLost(Exception):
    """This run's lock was taken over (or lapsed): it may send nothing more and commit nothing more.

    Not a :class:`Locked`: a run that loses its lock mid-push did start, and may have sent
    requests (``requests``, ``delivered``: what its push did before it stopped, when known)."""

    def __init__(self, sync: str, run_id: int, holder: Any = None):
        self.sync, self.run_id, self.holder = sync, run_id, holder
        self.requests: int | None = None
        self.delivered: int | None = None
        by = (f"run {holder['run_id']} ({_shown(holder['owner'])})" if holder else "no run (the lock row is gone)")
        super().__init__(f"sync '{sync}': run {run_id} lost its lock; it is now held by {by}")


# The lease's clock: CLOCK_BOOTTIME counts a system suspend (a laptop lid, a VM paused by its
# host), CLOCK_MONOTONIC on Linux does not; neither jumps with the wall clock.
if hasattr(time, "CLOCK_BOOTTIME"):
    clock = functools.partial(time.clock_gettime, time.CLOCK_BOOTTIME)
else:  # pragma: no cover - not Linux
    clock = time.monotonic


def _proc_start(pid: int | str) -> str | None:
    """A Linux process's start time (clock ticks since boot) while it lives; None once it is
    gone or a zombie. With the PID it names one process: a recycled PID starts later."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rpartition(")")[2].split()
    except OSError:
        return None
    return None if fields[0] in ("Z", "X") else fields[19]


@functools.cache
def _process_token() -> str | None:
    """What names this process on this machine: the boot, the PID namespace and the process's
    start time (a PID alone is recycled, and another container may have the same hostname)."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
        ns = os.readlink("/proc/self/ns/pid")
    except OSError:
        return None
    start = _proc_start(os.getpid())
    return f"{boot}/{ns}/{start}" if start else None


def owner(bound: bool = True) -> str:
    """``host:pid``; with ``bound`` (the lock lives and dies with this process: a CLI run), also
    the process's token, so that a run on this host can tell when the holder is gone."""
    token = _process_token() if bound else None
    return f"{socket.gethostname()}:{os.getpid()}" + (f"@{token}" if token else "")


def _shown(owner_: str) -> str:
    return owner_.partition("@")[0]


def _holder_gone(owner_: str) -> bool:
    """True only when the lock's owner is a process of this machine (same boot, same PID
    namespace) that no longer exists; anything else (another host, an Airflow run whose
    tasks come and go, no /proc) is judged by its heartbeat alone."""
    host_pid, _, token = owner_.partition("@")
    mine = _process_token()
    if not token or not mine:
        return False
    host, _, pid = host_pid.rpartition(":")
    boot, ns, start = token.split("/")
    if host != socket.gethostname() or f"{boot}/{ns}" != mine.rpartition("/")[0] or not pid.isdigit():
        return False
    return _proc_start(pid) != start


def acquire_lock(engine: Engine, sync: str, run_id: int, stale_after: float = 600.0, bound: bool = True) -> int | None:
    """Take the sync's lock for a run. Returns the run id of a holder taken over.

    Raises :class:`Locked` when a live run holds it. A holder is presumed dead, and
    replaced, when its heartbeat is older than ``stale_after`` seconds, or at once when it
    was a process of this machine that no longer exists. The takeover is conditional on
    what was judged (the heartbeat still that old, or the row unchanged): a holder that
    renewed its lease meanwhile keeps it. ``bound``: the lock belongs to this process
    (see :func:`owner`).
    """
    ts = now()
    me = owner(bound)
    with engine.begin() as c:
        held = c.execute(sa.select(locks).where(locks.c.sync == sync)).mappings().first()
        if held is None:
            try:
                with c.begin_nested():
                    c.execute(locks.insert().values(sync=sync, run_id=run_id, owner=me, acquired_at=ts, heartbeat_at=ts))
                return None
            except sa.exc.IntegrityError:
                held = c.execute(sa.select(locks).where(locks.c.sync == sync)).mappings().first()
        if held["run_id"] == run_id:
            return None
        beat = _aware(held["heartbeat_at"])
        take = locks.update().where(locks.c.sync == sync, locks.c.run_id == held["run_id"])
        if _holder_gone(held["owner"]):  # it cannot renew: the run_id condition alone decides a race of takers
            why = "its process is gone"
        elif (ts - beat).total_seconds() >= stale_after:
            take = take.where(locks.c.heartbeat_at <= ts - dt.timedelta(seconds=stale_after))
            why = f"no heartbeat for {stale_after:g} s"
        else:
            dead_at = beat + dt.timedelta(seconds=stale_after)
            raise Locked(f"sync '{sync}' is locked by run {held['run_id']} ({_shown(held['owner'])}), last heartbeat "
                         f"{beat:%Y-%m-%d %H:%M:%S} UTC. If that run is dead (killed, its machine gone), its lock "
                         f"is presumed dead at {dead_at:%Y-%m-%d %H:%M:%S} UTC (lock_timeout {stale_after:g} s)")
        res = c.execute(take.values(run_id=run_id, owner=me, acquired_at=ts, heartbeat_at=ts))
        if res.rowcount != 1:
            raise Locked(f"sync '{sync}' lock was taken by another run, or renewed by its holder, just now")
        c.execute(runs.update().where(runs.c.run_id == held["run_id"], runs.c.status == "running")
                  .values(status="abandoned", finished_at=ts, error=f"lock taken over by run {run_id} ({why})"))
        return int(held["run_id"])


def fence(conn: sa.Connection, sync: str, run_id: int) -> float:
    """The fencing check: in ``conn``'s transaction, prove this run still holds the sync's lock
    (renewing its heartbeat), else raise :class:`LeaseLost` (the caller's transaction then
    rolls back). Run it as the transaction's last statement: from here to the commit the lock
    row is this transaction's (a row lock; SQLite's write lock), so a takeover waits for the
    commit and the new holder sees everything committed. Returns the lease clock's reading
    from just before the renewal (a lease renewed by this commit runs from there)."""
    t0 = clock()
    res = conn.execute(locks.update().where(locks.c.sync == sync, locks.c.run_id == run_id).values(heartbeat_at=now()))
    if res.rowcount != 1:
        raise LeaseLost(sync, run_id, conn.execute(sa.select(locks).where(locks.c.sync == sync)).mappings().first())
    return t0


@contextlib.contextmanager
def fenced(engine: Engine, sync: str, run_id: int, lease: Lease | None = None) -> Iterator[sa.Connection]:
    """A transaction that commits only while this run holds the lock (:func:`fence`, last);
    ``lease``: renewed by the commit."""
    with engine.begin() as conn:
        yield conn
        t0 = fence(conn, sync, run_id)
    if lease is not None:
        lease.renewed(t0)


def heartbeat(engine: Engine, sync: str, run_id: int) -> float:
    """Keep the run's lock alive; raise :class:`LeaseLost` if another run took it over meanwhile."""
    with engine.begin() as conn:
        return fence(conn, sync, run_id)


class Lease:
    """How long this process may go on acting for a run without asking the state database.

    Every fenced commit (:func:`fenced` with this lease) renews it, and :meth:`keep` renews it
    when a third of ``lock_timeout`` passed without one. A renewal that began at clock time
    ``t`` is good until ``t + lock_timeout - margin``: another run presumes this one dead only
    ``lock_timeout`` after the heartbeat that renewal wrote (judged on its own wall clock; the
    margin, a third of the timeout, absorbs clock skew between hosts). :meth:`ready` — a clock
    reading, no round trip — is asked before each request starts; past the lease it waits for
    a renewal (the thread calling :meth:`keep`), so a process that was stopped (SIGSTOP, a VM
    freeze, a suspend, a long GC) starts nothing until it has proved it still holds the lock.
    """

    def __init__(self, engine: Engine, sync: str, run_id: int, lock_timeout: float, stop: threading.Event | None = None):
        self.engine, self.sync, self.run_id = engine, sync, run_id
        self.every, self.length = lock_timeout / 3, lock_timeout * 2 / 3
        self.stop = stop or threading.Event()
        self.lost: LeaseLost | None = None
        self._cond = threading.Condition()
        self.due = self.valid_until = 0.0  # not proved yet: the first keep() renews

    def renewed(self, t0: float) -> None:
        with self._cond:
            if t0 + self.length > self.valid_until:
                self.due, self.valid_until = t0 + self.every, t0 + self.length
            self._cond.notify_all()

    def renew_in(self) -> float:
        """Seconds until :meth:`keep` should renew (0: now)."""
        return max(0.0, self.due - clock())

    def keep(self) -> None:
        """Renew when due (one fenced heartbeat); raises :class:`LeaseLost` (and sets ``stop``)."""
        if clock() < self.due:
            return
        with self.guard():
            self.renewed(heartbeat(self.engine, self.sync, self.run_id))

    @contextlib.contextmanager
    def begin(self) -> Iterator[sa.Connection]:
        """A fenced transaction that renews the lease (see :func:`fenced`)."""
        with self.guard(), fenced(self.engine, self.sync, self.run_id, self) as conn:
            yield conn

    @contextlib.contextmanager
    def guard(self) -> Iterator[None]:
        """Turn a lost lock into ``stop`` (the senders start nothing more) before it propagates."""
        try:
            yield
        except LeaseLost as e:
            self.lose(e)
            raise

    def lose(self, e: LeaseLost) -> None:
        with self._cond:
            self.lost = self.lost or e
            self.stop.set()
            self._cond.notify_all()

    def ready(self) -> bool:
        """Whether a request may start now: the lease is good (no round trip), or, once it has
        lapsed, as soon as it is renewed; False once the run is stopping."""
        if clock() < self.valid_until and not self.stop.is_set():
            return True
        with self._cond:
            while not self.stop.is_set() and clock() >= self.valid_until:
                self._cond.wait(self.every)
            return not self.stop.is_set()


def release_lock(engine: Engine, sync: str, run_id: int) -> None:
    with engine.begin() as c:
        c.execute(locks.delete().where(locks.c.sync == sync, locks.c.run_id == run_id))


def _aware(ts: dt.datetime) -> dt.datetime:
    return ts if ts.tzinfo else ts.replace(tzinfo=dt.timezone.utc)


def chunked(items: list[Any], size: int) -> Iterator[list[Any]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]
